"""CPU speed of one 4096x4096 linear layer: fp32/bf16 ``F.linear`` vs qlab's quantized layers vs peers.

Run: ``python benchmarks/bench_linear.py [--size 4096] [--batches 1,64] [--repeats 20] [--model]``

Everything runs in one process on the same weight, side by side, so the ratios to fp32 are what to
read (absolute times vary 10-30% between runs on a shared 2-core machine). Peers (optimum-quanto,
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

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT]

from qlab.kernels.cpu import status as cpu_status  # noqa: E402

from qlab.config import QuantConfig  # noqa: E402
from qlab.nn import QuantLinear, select_path  # noqa: E402


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


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


def bench_layer(size: int, batches: list[int], repeats: int, peers: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(size, size, bias=False)
    w32 = lin.weight.detach()
    w16 = w32.to(torch.bfloat16)
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "bf16 F.linear": lambda x: F.linear(x.to(torch.bfloat16), w16),
    }
    layers = qlab_layers(lin)
    candidates.update(layers)
    notes = []
    if peers:
        for make in (quanto_layers, bnb_layers):
            found, note = make(lin)
            candidates.update({k: (lambda x, m=m: m(x.to(torch.bfloat16))) for k, m in found.items()})
            if note:
                notes.append(note)
    threads = torch.get_num_threads()
    print(f"\n{size}x{size} weight, {threads} threads, median of {repeats} (ms; ratio = fp32 / this)")
    for note in notes:
        print(f"  note: {note}")
    header = f"{'':<22}" + "".join(f"{'batch ' + str(b):>22}" for b in batches)
    print(header)
    base = {}
    rows: dict[str, list[str]] = {"fp32 F.linear": []}
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, size)
            base[b] = median_ms(lambda x=x: F.linear(x, w32), repeats)
            rows["fp32 F.linear"].append(f"{base[b]:>10.2f} ms {1.0:>7.2f}x")
        for name, fn in candidates.items():
            cells = []
            for b in batches:
                x = torch.randn(b, size)
                try:
                    t = median_ms(lambda x=x, fn=fn: fn(x), repeats)
                    cells.append(f"{t:>10.2f} ms {base[b] / t:>7.2f}x")
                except Exception as err:
                    cells.append(f"{'failed: ' + type(err).__name__:>22}")
            rows[name] = cells
    for name, cells in rows.items():
        print(f"{name:<22}" + "".join(f"{c:>22}" for c in cells))
    for b in batches:
        paths = {name: select_path(m, torch.randn(b, size)) for name, m in layers.items()}
        shown = ", ".join(f"{k.removeprefix('qlab ')} -> {v}" for k, v in paths.items())
        print(f"qlab paths at batch {b}: {shown}")
    print(f"qlab C kernels (qlab.kernels.cpu): {cpu_status()}")


def bench_model(repeats: int) -> None:
    """SmolLM2 forward passes, fp32 vs quantized, timed round-robin so machine noise hits all alike."""
    from qlab.models import load_smollm2
    from qlab.nn import quantize_model

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
    times: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
    with torch.inference_mode():
        for fn in calls.values():
            fn()
        for _ in range(repeats):
            for key, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    med = {key: 1e3 * statistics.median(v) for key, v in times.items()}
    print(f"\nSmolLM2-135M forward pass, 1 x 64 tokens and 1 token, median of {repeats} round-robin")
    print("(ms; ratio = fp32 / this)")
    for label in models:
        t64, t1 = med[(label, 64)], med[(label, 1)]
        f64, f1 = med[("fp32", 64)], med[("fp32", 1)]
        print(f"{label:<12}{t64:>9.1f} ms {f64 / t64:>5.2f}x{t1:>9.1f} ms {f1 / t1:>5.2f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-peers", action="store_true", help="skip optimum-quanto and bitsandbytes")
    p.add_argument("--model", action="store_true", help="also time a SmolLM2 forward pass")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}")
    bench_layer(a.size, [int(b) for b in a.batches.split(",")], a.repeats, not a.no_peers)
    if a.model:
        bench_model(max(5, a.repeats // 2))


if __name__ == "__main__":
    main()
