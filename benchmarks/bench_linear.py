"""CPU speed of one 4096x4096 linear layer: fp32/bf16 ``F.linear`` vs qlab's quantized layers vs peers.

Run: ``python benchmarks/bench_linear.py [--size 4096] [--batches 1,64] [--repeats 20] [--model]
[--every-path]``

Everything runs in one process on the same weight, timed round-robin so that the drift of a shared
machine hits every candidate alike; the ratios to fp32 are what to read. By default the caches are
flushed (a 256 MB buffer rewritten) before every call, as when decoding a model larger than the
cache; ``--warm`` times calls with whatever the caches hold. Peers (optimum-quanto,
bitsandbytes) are timed when they import; a peer that fails is reported, not hidden. With ``--model``
it also times one SmolLM2 forward pass (fp32 vs W8A16 vs W4A16 g128).

Run it from outside the repository root, or with ``python benchmarks/bench_linear.py`` (the script
drops the repo root from ``sys.path``): the repo's ``kernels/`` folder would otherwise shadow the
Hugging Face ``kernels`` package that bitsandbytes probes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT]

from qlab.kernels.cpu import status as cpu_status  # noqa: E402

from qlab.config import QuantConfig  # noqa: E402
from qlab.nn import PATH_TABLE, PATHS, QuantLinear, select_path, use_path  # noqa: E402


def round_robin_ms(
    calls: dict[Any, Callable[[], object]], repeats: int, evict: torch.Tensor | None = None
) -> dict[Any, float | str]:
    """Median wall time (ms) of each call, timed in turn ``repeats`` times after two warm-ups each.

    Interleaving the calls spreads the drift of a shared machine over all of them alike, so the
    ratios stay fair even when the absolute times move. With ``evict``, that tensor is rewritten
    (untimed) before every call, so each call finds its weights out of the caches, as when a model
    larger than the cache is decoded layer after layer. A call that raises is reported by the name
    of its exception instead of a time.
    """
    live: dict[Any, Callable[[], object]] = {}
    out: dict[Any, float | str] = {}
    for key, fn in calls.items():
        try:
            fn()
            fn()
            live[key] = fn
        except Exception as err:  # a peer that fails is reported, not hidden
            out[key] = f"failed: {type(err).__name__}"
    times: dict[Any, list[float]] = {key: [] for key in live}
    for _ in range(repeats):
        for key, fn in live.items():
            if evict is not None:
                evict.add_(1.0)
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    out.update({key: 1e3 * statistics.median(v) for key, v in times.items()})
    return out


def qlab_layers(lin: nn.Linear) -> dict[str, QuantLinear]:
    settings = {
        "qlab W8A16": QuantConfig("rtn", 8, None),
        "qlab W4A16 g128": QuantConfig("rtn", 4, 128),
        "qlab W2A16 g64": QuantConfig("rtn", 2, 64),
        "qlab NF4 b64": QuantConfig("nf4", 4, 64),
        "qlab FP8 e4m3": QuantConfig("fp8", 8, None),
        "qlab W8A8": QuantConfig("w8a8", 8, None),
    }
    return {name: QuantLinear.from_linear(lin, cfg) for name, cfg in settings.items()}


def quanto_layers(lin: nn.Linear) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], str]:
    try:
        import optimum.quanto as oq
    except Exception as err:  # a peer that does not import is reported, not fatal
        return {}, f"optimum-quanto unavailable: {type(err).__name__}: {err}"
    out = {}
    for label, wdtype in (
        ("quanto int8", oq.qint8),
        ("quanto int4 g128", oq.qint4),
        ("quanto int2", oq.qint2),
    ):
        try:
            m = nn.Sequential(nn.Linear(lin.in_features, lin.out_features, bias=False)).to(torch.bfloat16)
            m[0].weight.data.copy_(lin.weight.data)
            oq.quantize(m, weights=wdtype)
            oq.freeze(m)
            out[label] = m
        except Exception as err:
            print(f"  {label}: failed ({type(err).__name__}: {err})")
    return out, ""


def bnb_layers(lin: nn.Linear) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], str]:
    try:
        import bitsandbytes as bnb
    except Exception as err:
        return {}, f"bitsandbytes unavailable: {type(err).__name__}: {err}"
    out = {}
    try:
        m = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
        )
        m.weight = bnb.nn.Params4bit(
            lin.weight.data.to(torch.bfloat16), requires_grad=False, quant_type="nf4"
        )
        out["bnb NF4"] = m.to("cpu")
        m8 = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False)
        m8.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        out["bnb int8"] = m8.to("cpu")
    except Exception as err:
        print(f"  bitsandbytes layers failed: {type(err).__name__}: {err}")
    return out, ""


def path_candidates(layers: dict[str, QuantLinear]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each qlab layer on every CPU path that fits it, forced by name (``--every-path``): what the
    selection rules in ``qlab.nn.dispatch`` choose between, timed side by side."""
    probe = torch.zeros(1, 1)
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name, layer in layers.items():
        for path in PATHS:
            if path in ("reference", "triton") or not PATH_TABLE[path].fits(layer, probe):
                continue

            def forced(x: torch.Tensor, layer: QuantLinear = layer, path: str = path) -> torch.Tensor:
                with use_path(path):
                    return layer(x)

            out[f"{name} [{path}]"] = forced
    return out


def bench_layer(
    size: int, batches: list[int], repeats: int, peers: bool, cold: bool = True, every_path: bool = False
) -> None:
    torch.manual_seed(0)
    evict = torch.zeros(64 * 2**20) if cold else None  # 256 MB, more than this machine's caches
    lin = nn.Linear(size, size, bias=False)
    w32 = lin.weight.detach()
    w16 = w32.to(torch.bfloat16)
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "bf16 F.linear": lambda x: F.linear(x.to(torch.bfloat16), w16),
    }
    layers = qlab_layers(lin)
    candidates.update(layers)
    if every_path:
        candidates.update(path_candidates(layers))
    notes = []
    if peers:
        for make in (quanto_layers, bnb_layers):
            found, note = make(lin)
            candidates.update({k: (lambda x, m=m: m(x.to(torch.bfloat16))) for k, m in found.items()})
            if note:
                notes.append(note)
    threads = torch.get_num_threads()
    cache = "caches flushed before each call" if cold else "warm caches"
    print(f"\n{size}x{size} weight, {threads} threads, median of {repeats}, round-robin, {cache}")
    print("(ms; ratio = fp32 / this)")
    for note in notes:
        print(f"  note: {note}")
    names = ["fp32 F.linear", *candidates]
    width = max(22, max(len(n) for n in names) + 2)
    print(f"{'':<{width}}" + "".join(f"{'batch ' + str(b):>22}" for b in batches))
    fns = {"fp32 F.linear": lambda x: F.linear(x, w32), **candidates}
    rows: dict[str, list[str]] = {name: [] for name in names}
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, size)
            ms = round_robin_ms({name: (lambda fn=fns[name], x=x: fn(x)) for name in names}, repeats, evict)
            base = ms["fp32 F.linear"]
            assert isinstance(base, float)
            for name in names:
                t = ms[name]
                rows[name].append(f"{t:>22}" if isinstance(t, str) else f"{t:>10.2f} ms {base / t:>7.2f}x")
    for name, cells in rows.items():
        print(f"{name:<{width}}" + "".join(f"{c:>22}" for c in cells))
    for b in batches:
        paths = {name: select_path(m, torch.randn(b, size)) for name, m in layers.items()}
        shown = ", ".join(f"{k.removeprefix('qlab ')} -> {v}" for k, v in paths.items())
        print(f"qlab paths at batch {b}: {shown}")
    print(f"qlab C kernels (qlab.kernels.cpu): {cpu_status()}")


def bench_model(repeats: int) -> None:
    """SmolLM2 forward passes, fp32 vs quantized, timed round-robin so machine noise hits all alike."""
    from qlab.driver import quantize_model
    from qlab.models import load_smollm2

    models: dict[str, nn.Module] = {}
    models["fp32"], _ = load_smollm2()
    for label, cfg in (("W8A16", QuantConfig("rtn", 8, None)), ("W4A16 g128", QuantConfig("rtn", 4, 128))):
        m, _ = load_smollm2()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 576-wide layers fall back to g64; quantize_model says so
            quantize_model(m, cfg, progress=False)
        models[label] = m
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    calls = {(label, n): (lambda m=m, n=n: m(ids[:, :n])) for label, m in models.items() for n in (64, 1)}
    with torch.inference_mode():
        med = round_robin_ms(calls, repeats)
    print(f"\nSmolLM2-135M forward pass, 1 x 64 tokens and 1 token, median of {repeats} round-robin")
    print("(ms; ratio = fp32 / this)")
    for label in models:
        t64, t1, f64, f1 = (float(med[key]) for key in ((label, 64), (label, 1), ("fp32", 64), ("fp32", 1)))
        print(f"{label:<12}{t64:>9.1f} ms {f64 / t64:>5.2f}x{t1:>9.1f} ms {f1 / t1:>5.2f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-peers", action="store_true", help="skip optimum-quanto and bitsandbytes")
    p.add_argument("--warm", action="store_true", help="leave the caches warm between calls")
    p.add_argument("--model", action="store_true", help="also time a SmolLM2 forward pass")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--every-path", action="store_true", help="also time each qlab layer on every CPU path")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}")
    bench_layer(
        a.size, [int(b) for b in a.batches.split(",")], a.repeats, not a.no_peers, cold=not a.warm,
        every_path=a.every_path,
    )  # fmt: skip
    if a.model:
        bench_model(max(5, a.repeats // 2))


if __name__ == "__main__":
    main()
