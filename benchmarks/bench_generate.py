"""Greedy generation speed of SmolLM2-135M: transformers, qlab, optimum-quanto, llama.cpp, side by side.

Every candidate is a model in this one process, and the timed calls go round-robin (candidate after
candidate, ``--repeats`` times), so that the drift of a shared machine hits all alike: read the
ratios to ``transformers fp32``, not the absolute numbers. Two threads by default (``--threads``).

Columns:

* ``decode tok/s``: a 32-token prompt, then 64 new tokens; the time of the 63 one-token steps after
  the first new token (llama-bench's ``tg``), median over repeats.
* ``prompt tok/s``: one forward pass over a 512-token prompt writing the cache (llama-bench's ``pp512``),
  eager, so only on eager rows: a compiled row compiles the one-token step, and its prompt pass would be
  the eager row's again.
* ``ppl``: perplexity of the eager model (16 windows of 512 tokens of the evaluation plays), for qlab
  rows, so that a speed-up never hides a quality change.
* ``text``: whether the greedy 64 tokens equal those of the same model run eagerly (compiled rows).

Every row except ``model.generate`` runs :class:`qlab.generate.Generator`: a static KV cache and a
one-token step, eager, or compiled with ``torch.compile(fullgraph=True)`` (``--compile``, ``--backend``),
or exported and compiled ahead of time by AOTInductor (``--aot``, :mod:`qlab.aot`: no Python or Dynamo
between a token's kernels; about 30-45 s to build each). qlab rows
come as they are quantized (head float), and with ``+head+fuse``: the tied embedding and head as
one int8 table (``quantize_embeddings``) and q/k/v, gate/up fused (:func:`qlab.fuse.fuse_projections`).
``--attention eager`` adds those rows once more with transformers' eager attention (matmul, softmax,
matmul) instead of SDPA, the model's default, to compare the two in the compiled one-token step.
llama.cpp runs when ``llama-bench`` is found (``$LLAMA_CPP_BIN`` or ``PATH``) and ``--gguf`` names
files: ``llama-bench --repack 0 -r 1`` once per round inside the round-robin (its AMX repack path
crashes in these VMs), same threads. Its ``tg`` decodes from an empty context, ours after the prompt.

``--quick`` (< 2 minutes on 2 quiet cores): fewer candidates, no compile, no perplexity, 16 new tokens.
Run it as ``python benchmarks/bench_generate.py`` (the script drops the repo root from ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT]

from qlab.config import QuantConfig  # noqa: E402
from qlab.driver import quantize_model  # noqa: E402
from qlab.fuse import fuse_projections  # noqa: E402
from qlab.generate import Generator  # noqa: E402
from qlab.models import load_smollm2  # noqa: E402

#: The quantized head of the ``+head+fuse`` rows: one int8 scale per vocabulary row.
INT8_HEAD = {"lm_head": {"method": "rtn", "bits": 8, "group_size": None}}
SCHEMES: dict[str, QuantConfig] = {
    "int8": QuantConfig("rtn", 8, None),
    "int4 g32": QuantConfig("rtn", 4, 32),
    "int4 g64": QuantConfig("rtn", 4, 64),
    "int4 g128": QuantConfig("rtn", 4, 128),
    "nf4 g64": QuantConfig("nf4", 4, 64),
    "int2 g32": QuantConfig("rtn", 2, 32),
}
QUICK_SCHEMES = ("int8", "int4 g64")


@dataclass
class Candidate:
    name: str
    model: nn.Module
    compiled: bool | str = False  # Generator's compile: True (torch.compile) or "aot"
    qlab: bool = False
    hf_generate: bool = False  # transformers' own model.generate (dynamic cache, eager)
    gen: Any = None  # the decode loop (cache: prompt + new tokens)
    prefill_gen: Any = None  # the prompt-speed loop (cache: --prefill + 1), eager rows only
    decode: list[float] = field(default_factory=list)
    prompt: list[float] = field(default_factory=list)
    ppl: float | None = None
    text_same: bool | None = None
    compile_s: float | None = None
    note: str = ""


def quantized(config: QuantConfig, head_and_fuse: bool) -> nn.Module:
    model, _ = load_smollm2()
    if head_and_fuse:
        overrides = {**config.overrides, **INT8_HEAD}
        d = {**config.to_dict(), "quantize_embeddings": True, "overrides": overrides}
        config = QuantConfig.from_dict(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 576-wide layers fall back to g64 from g128; quantize_model says so
        quantize_model(model, config, progress=False)
    if head_and_fuse:
        fuse_projections(model)
    return model


def quanto_int4() -> tuple[nn.Module | None, str]:
    try:
        import optimum.quanto as oq
    except Exception as err:  # a peer that does not import is reported, not fatal
        return None, f"optimum-quanto unavailable: {type(err).__name__}"
    model, _ = load_smollm2(torch.bfloat16)
    oq.quantize(model, weights=oq.qint4, exclude=["lm_head"])
    oq.freeze(model)
    return model, ""


def build(args: argparse.Namespace) -> tuple[list[Candidate], list[str]]:
    notes: list[str] = []
    cands = [
        Candidate("transformers fp32 model.generate", load_smollm2()[0], hf_generate=True),
        Candidate("transformers fp32", load_smollm2()[0]),
    ]
    if not args.quick and not args.no_peers:
        cands.append(Candidate("transformers bf16", load_smollm2(torch.bfloat16)[0]))
    schemes = args.schemes.split(",") if args.schemes else QUICK_SCHEMES if args.quick else tuple(SCHEMES)
    unknown = set(schemes) - set(SCHEMES)
    if unknown:
        raise SystemExit(f"--schemes: unknown {sorted(unknown)}; choose from {list(SCHEMES)}")
    for s in schemes:
        for hf in (False, True):
            label = f"qlab {s}" + (" +head+fuse" if hf else "")
            cands.append(Candidate(label, quantized(SCHEMES[s], hf), qlab=True))
        for attn in args.attention:  # the fastest recipe again, with another attention implementation
            model = quantized(SCHEMES[s], True)
            model.set_attn_implementation(attn)
            cands.append(Candidate(f"qlab {s} +head+fuse {attn}-attn", model, qlab=True))
    if not args.quick and not args.no_peers:
        model, note = quanto_int4()
        if model is not None:
            cands.append(Candidate("quanto int4 (bf16)", model))
        else:
            notes.append(note)
    rows = []  # each candidate, then its compiled and ahead-of-time rows
    for c in cands:
        rows.append(c)
        for mode, fragments, suffix in ((True, args.compile, " compiled"), ("aot", args.aot, " aot")):
            if not c.hf_generate and any(w in c.name for w in fragments):
                rows.append(Candidate(c.name + suffix, c.model, compiled=mode, qlab=c.qlab))
    return rows, notes


def time_generate(c: Candidate, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """One timed generate call: appends decode tok/s; returns the ids."""
    if c.hf_generate:
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = c.model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        c.decode.append(new / (time.perf_counter() - t0))  # end to end: prompt included
        return ids
    out = c.gen.generate(prompt, new)
    c.decode.append(out.decode_tokens_per_s)
    return out.ids


@dataclass
class LlamaBench:
    """One GGUF file run by llama.cpp's ``llama-bench`` once per round, inside the round-robin."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    decode: list[float] = field(default_factory=list)
    prompt: list[float] = field(default_factory=list)
    error: str = ""

    def run_once(self) -> None:
        if self.error:
            return
        proc = subprocess.run(self.cmd, capture_output=True, text=True, env=self.env)
        if proc.returncode != 0:
            self.error = f"failed ({proc.returncode}): {(proc.stdout + proc.stderr).strip()[-300:]}"
            return
        for r in json.loads(proc.stdout):
            (self.prompt if r["n_prompt"] else self.decode).append(r["avg_ts"])


def llama_cpp(args: argparse.Namespace) -> tuple[list[LlamaBench], list[str]]:
    """``llama-bench`` runners for ``--gguf`` (``$LLAMA_CPP_BIN`` or ``PATH``), or why there are none."""
    exe = os.environ.get("LLAMA_CPP_BIN") or shutil.which("llama-bench")
    if exe and os.path.isdir(exe):
        exe = os.path.join(exe, "llama-bench")
    if not exe or not os.path.exists(exe):
        return [], ["llama.cpp: llama-bench not found (set LLAMA_CPP_BIN or PATH); not run"]
    if not args.gguf:
        return [], ["llama.cpp: no --gguf models given; not run"]
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.path.dirname(exe) + ":" + os.environ.get("LD_LIBRARY_PATH", ""),
    }
    runs = []
    for path in args.gguf:
        if not os.path.isfile(path):
            raise SystemExit(f"--gguf: no such file {path!r}")
        # -r 1: one measured run per round (llama-bench warms up first); --repack 0: its AMX repack
        # path crashes in these VMs. tg{new} decodes from an empty context, our decode after a prompt.
        cmd = [exe, "-m", path, "-t", str(args.threads), "-p", str(args.prefill), "-n", str(args.new),
               "--repack", "0", "-o", "json", "-r", "1"]  # fmt: skip
        runs.append(LlamaBench(f"llama.cpp {os.path.basename(path)}", cmd, env))
    return runs, []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few candidates, 16 new tokens, no compile, no ppl")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--new", type=int, default=64, help="new tokens (decode)")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens for the prompt-speed column")
    p.add_argument(
        "--compile", default="all",
        help="comma list of name fragments of candidates to also run compiled ('all', or 'none')",
    )  # fmt: skip
    p.add_argument(
        "--aot", default="none",
        help="comma list of name fragments of candidates to also run ahead-of-time compiled ('all', 'none')",
    )  # fmt: skip
    p.add_argument("--schemes", default="", help=f"comma list of qlab schemes (default: {list(SCHEMES)})")
    p.add_argument("--no-peers", action="store_true", help="skip transformers bf16 and optimum-quanto")
    p.add_argument(
        "--attention", default="",
        help="comma list of attention implementations (e.g. 'eager') for extra +head+fuse rows "
        "(the model's default is 'sdpa')",
    )  # fmt: skip
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--ppl-windows", type=int, default=16, help="perplexity windows (0: skip)")
    p.add_argument("--gguf", nargs="*", default=[], help="GGUF files for llama-bench (round-robin too)")
    p.add_argument("--json", default="", help="also write the table to this JSON file")
    a = p.parse_args(argv)
    if a.quick:
        a.new, a.compile, a.aot, a.ppl_windows = min(a.new, 16), "none", "none", 0
        a.repeats = min(a.repeats, 2)
    a.compile = [] if a.compile == "none" else [""] if a.compile == "all" else a.compile.split(",")
    a.aot = [] if a.aot == "none" else [""] if a.aot == "all" else a.aot.split(",")
    a.attention = [x for x in a.attention.split(",") if x]
    torch.set_num_threads(a.threads)
    from qlab.kernels.cpu import status

    print(f"torch {torch.__version__}, {a.threads} threads, qlab CPU kernels: {status()}")
    t_build = time.perf_counter()
    cands, notes = build(a)
    llamas, llama_notes = llama_cpp(a)
    notes += llama_notes
    print(f"built {len(cands)} candidates in {time.perf_counter() - t_build:.0f} s")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (1, a.prompt), generator=gen)
    long_prompt = torch.randint(100, 40000, (1, a.prefill), generator=gen)
    eager_ids: dict[int, torch.Tensor] = {}
    for c in cands:  # build the loops; compile and warm up (untimed)
        if not c.hf_generate:
            t0 = time.perf_counter()
            # The decode loop's cache holds exactly the prompt and the new tokens: a static cache's
            # every step attends over all its slots, so a 513-slot cache would time attention over
            # padding (about 4 ms of a 13.5 ms int4 token). The prompt column gets its own cache.
            c.gen = Generator(c.model, a.prompt + a.new, compile=c.compiled, backend=a.backend)
            if not c.compiled:
                c.prefill_gen = Generator(c.model, a.prefill + 1, backend=a.backend)
            ids = c.gen.generate(prompt, a.new).ids
            if c.compiled:
                c.compile_s = time.perf_counter() - t0
                c.text_same = torch.equal(ids, eager_ids[id(c.model)])
            else:
                eager_ids[id(c.model)] = ids
        done = f" (built in {c.compile_s:.0f} s)" if c.compile_s is not None else ""
        print(f"  ready: {c.name}{done}", flush=True)
    for c in cands:  # warm again: an ahead-of-time build (strict torch.export) makes compiled steps recompile
        if not c.hf_generate:
            c.gen.generate(prompt, a.new)
    prefill = {
        c.name: (lambda c=c: c.prefill_gen.generate(long_prompt, 1))
        for c in cands
        if c.prefill_gen is not None
    }
    for _ in range(a.repeats):
        for c in cands:
            time_generate(c, prompt, a.new)
        for c in cands:
            if c.name in prefill:
                c.prompt.append(a.prefill / prefill[c.name]().prefill_s)
        for lb in llamas:
            lb.run_once()
    if a.ppl_windows:
        from qlab.evaluate import perplexity

        tok = load_smollm2()[1]
        for c in cands:
            if c.qlab and not c.compiled:
                c.ppl = perplexity(c.model, tok, seq_len=512, max_windows=a.ppl_windows, progress=False)
        base = next(c for c in cands if c.name == "transformers fp32")
        base.ppl = perplexity(base.model, tok, seq_len=512, max_windows=a.ppl_windows, progress=False)
    med: Callable[[list[float]], float] = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    ref = next(c for c in cands if c.name == "transformers fp32")
    rd, rp = med(ref.decode), med(ref.prompt)
    print(
        f"\nSmolLM2-135M, greedy, batch 1, {a.threads} threads; {a.prompt}-token prompt + {a.new} new "
        f"tokens; prompt speed at {a.prefill} tokens; median of {a.repeats} round-robin"
    )
    print("(x = ratio to transformers fp32 in the same loop, eager)")
    w = max(40, *(len(x.name) + 1 for x in [*cands, *llamas]))  # the name column fits the longest name
    print(f"{'':<{w}}{'decode tok/s':>12}{'':>8}{'prompt tok/s':>13}{'':>8}{'ppl':>9}  text")
    rows: list[dict[str, Any]] = []
    for c in cands:
        d, pr = med(c.decode), med(c.prompt)
        ppl = f"{'':9}" if c.ppl is None else f"{c.ppl:9.2f}" if c.ppl < 1e5 else f"{c.ppl:9.2e}"
        text = "" if c.text_same is None else ("= eager" if c.text_same else "DIFFERS")
        extra = " (end to end)" if c.hf_generate else ""
        print(f"{c.name:<{w}}{d:>12.1f}{d / rd:>7.2f}x{pr:>13.1f}{pr / rp:>7.2f}x{ppl}  {text}{extra}")
        rows.append({"name": c.name, "decode_tok_s": d, "prompt_tok_s": pr, "ppl": c.ppl,
                     "compiled": c.compiled, "text_same": c.text_same})  # fmt: skip
    for lb in llamas:
        if lb.error:
            print(f"{lb.name:<{w}} {lb.error}")
            continue
        d, pr = med(lb.decode), med(lb.prompt)
        ratios = f"{d:>12.1f}{d / rd:>7.2f}x{pr:>13.1f}{pr / rp:>7.2f}x"
        print(f"{lb.name:<{w}}{ratios}{'':9}  (llama-bench tg/pp)")
        rows.append({"name": lb.name, "decode_tok_s": d, "prompt_tok_s": pr, "ppl": None,
                     "compiled": None, "text_same": None})  # fmt: skip
    for note in notes:
        print(f"note: {note}")
    if a.json:
        setup = {"threads": a.threads, "prompt": a.prompt, "new": a.new, "prefill": a.prefill,
                 "repeats": a.repeats, "ppl_windows": a.ppl_windows, "torch": torch.__version__}  # fmt: skip
        with open(a.json, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=1)
            f.write("\n")
        print(f"wrote {a.json}")
    comp = [c for c in cands if c.compile_s is not None]
    if comp:
        print("first call, compile included (s): " + ", ".join(f"{c.name}: {c.compile_s:.0f}" for c in comp))


if __name__ == "__main__":
    main()
