"""Where one decode token's time goes: SmolLM2, eager and compiled, split by the torch profiler.

The model is ``bench_generate.py``'s fastest recipe (``--scheme``, default int4 g64, with the int8
tied head and fused q/k/v and gate/up). For the eager, the compiled (``torch.compile``) and the
ahead-of-time (``compile="aot"``, :mod:`qlab.aot`) one-token step of :class:`qlab.generate.Generator`
it prints

* the decode speed without the profiler (median step over ``--tokens`` steps after a ``--prompt``-token
  prompt of seeded random tokens, as in the generate table, after a warm-up), and
* one profiled run of the same steps, its time per token split into buckets by operator name:
  ``qlab::*`` (qlab's kernels: every quantized matmul and the head), float matmuls (``aten::mm`` ...),
  attention (``scaled_dot_product_attention``), Inductor's generated kernels (the compiled glue:
  RMSNorm, RoPE, SiLU, residual adds, cache writes), the other aten ops, and what no operator
  covers (Python, module calls, the dispatcher and the compiled wrapper). The ahead-of-time step's
  C++ wrapper calls aten and ``qlab::`` operators through the dispatcher, so they are profiled too;
  its generated kernels are not, and fall under the last bucket with the wrapper itself.

The profiler adds its own cost to every op, so the profiled token is slower than the unprofiled one;
read the shares, and the unprofiled time for speed. Inductor's kernels are named in the profile only
with ``torch._inductor.config.cpp.enable_kernel_profile``, which this script sets for a second build
of each compiled step, the one it profiles (the unprofiled time is the plain build's).

    python benchmarks/profile_decode.py [--scheme "int4 g64"] [--threads 2] [--prompt 32] [--tokens 63]
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from collections.abc import Callable

import torch
import torch._inductor.config as inductor_config
from bench_generate import SCHEMES, quantized  # the same recipes as the generate table
from torch.profiler import ProfilerActivity, profile

from qlab.generate import Generator

BUCKETS = (
    ("qlab kernels (qlab::*)", lambda k: k.startswith("qlab::")),
    (
        "float matmul (aten::mm/addmm/bmm)",
        lambda k: k in {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"},
    ),
    ("attention (SDPA)", lambda k: "scaled_dot_product" in k or "flash_attention" in k),
    ("Inductor kernels (compiled glue)", lambda k: "cpp_fused" in k or k.startswith("kernel_cpp")),
)


def bucket(key: str) -> str:
    for name, match in BUCKETS:
        if match(key):
            return name
    return "other aten ops" if key.startswith("aten::") else "other profiled ops"


def profiled(gen: Generator, prompt: torch.Tensor, new_tokens: int) -> tuple[Counter[str], list[float]]:
    """Self CPU ms by operator name over one ``generate`` call, and its decode steps' wall times (s)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = gen.generate(prompt, new_tokens)
    by_key: Counter[str] = Counter()
    for e in prof.key_averages():
        by_key[e.key] += e.self_cpu_time_total / 1e3
    return by_key, out.step_s


def measure(
    make: Callable[[], Generator], compiled: bool, prompt: torch.Tensor, tokens: int
) -> tuple[float, Counter[str], float]:
    """Unprofiled ms per token, profiled ms per token by operator name, profiled ms per token in total.

    The unprofiled time comes from a step compiled as users get it; the profiled one from a step
    compiled again with Inductor's kernel profiling on (a named record per generated kernel, which
    costs time of its own: 8.9 vs 6.4 ms a token for the ahead-of-time step). The prompt pass is
    profiled alone too (``generate(prompt, 1)``: no decode step) and subtracted, so the buckets are
    the decode steps' own.
    """
    gen = make()
    gen.generate(prompt, 8)  # warm up (and compile)
    unprofiled = statistics.median(gen.generate(prompt, tokens + 1).step_s) * 1e3
    if compiled:  # built afresh: Dynamo's cache and Inductor's graph cache would hand back the plain build
        torch._dynamo.reset()
        with inductor_config.patch({"cpp.enable_kernel_profile": True, "fx_graph_cache": False}):
            gen = make()
            gen.generate(prompt, 8)
    prefill, _ = profiled(gen, prompt, 1)
    full, step_s = profiled(gen, prompt, tokens + 1)
    n = len(step_s)
    wall = sum(step_s) * 1e3 / n
    by: Counter[str] = Counter({k: max(0.0, full[k] - prefill[k]) / n for k in full})
    return unprofiled, by, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheme", default="int4 g64", choices=sorted(SCHEMES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    ap.add_argument("--tokens", type=int, default=63, help="decode steps profiled")
    args = ap.parse_args()
    if args.threads < 1 or args.tokens < 2 or args.prompt < 1:
        ap.error("--threads and --prompt must be >= 1, --tokens >= 2")
    torch.set_num_threads(args.threads)

    # The generate table's prompt: seeded random tokens (the text does not change a step's work).
    prompt = torch.randint(100, 40000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    model = quantized(SCHEMES[args.scheme], head_and_fuse=True)
    max_len = prompt.shape[1] + args.tokens + 2
    print(f"SmolLM2-135M, qlab {args.scheme} +head+fuse, {args.threads} threads, {args.tokens} decode steps")
    results = {}
    for label, compiled in (("eager", False), ("compiled", True), ("aot", "aot")):
        make = lambda c=compiled: Generator(model, max_len, compile=c)  # noqa: E731
        results[label] = measure(make, bool(compiled), prompt, args.tokens)
    other = "not in any op (Python, modules, dispatch)"
    names = [n for n, _ in BUCKETS] + ["other aten ops", "other profiled ops", other]
    table = {}
    for k, (_, by_key, wall) in results.items():
        table[k] = Counter()
        for key, ms in by_key.items():
            table[k][bucket(key)] += ms
        table[k][other] = max(0.0, wall - sum(by_key.values()))
    print(f"\n{'ms per token':<44}" + "".join(f"{k:>10}" for k in results))
    print(f"{'unprofiled (median step)':<44}" + "".join(f"{results[k][0]:10.2f}" for k in results))
    print(f"{'profiled, in total':<44}" + "".join(f"{results[k][2]:10.2f}" for k in results))
    for n in names:
        print(f"  {n:<42}" + "".join(f"{table[k][n]:10.2f}" for k in results))
    for k, (unprofiled, by_key, wall) in results.items():
        print(
            f"\n{k}: {1e3 / unprofiled:.1f} tokens/s unprofiled; qlab kernels "
            f"{table[k][BUCKETS[0][0]] / wall:.0%} of a profiled token. Largest ops (ms per token):"
        )
        for key, ms in by_key.most_common(8):
            print(f"  {ms:7.2f}  {key[:90]}")


if __name__ == "__main__":
    main()
