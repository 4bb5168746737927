"""Per-call cost of qlab's CPU kernels at batch 1: the public function vs the bare ctypes call.

Run: ``python benchmarks/bench_op_overhead.py [--repeats 7] [--calls 2000]``

For a 576x576 (SmolLM2's attention width) and a 4096x4096 int4 g64 layer it times, with warm
caches, ``qlab.kernels.cpu.gemv_int8dot`` / ``gemv`` / ``tiled_matmul`` as :mod:`qlab.nn` calls them
(since issue 13 through ``torch.ops.qlab.*``) and, where the module registers operators, the same
functions with ``lib=`` (the operator's CPU kernel called directly: the ctypes call without the
dispatcher). The difference
is what ``torch.library`` costs a call; SmolLM2 decode makes ~200 such calls a token. Numbers are
medians (µs per call) over ``--repeats`` rounds of ``--calls`` calls, the candidates interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT]

from qlab.kernels import cpu  # noqa: E402


def per_call_us(calls: dict[str, Callable[[], object]], repeats: int, n: int) -> dict[str, float]:
    """Median µs per call of each candidate, timed round-robin (``n`` calls a round, after a warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():
        for _ in range(20):
            fn()
    for _ in range(repeats):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[key].append((time.perf_counter() - t0) / n * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--sizes", default="576,4096")
    args = ap.parse_args()
    if cpu.load() is None:
        sys.exit(f"CPU kernels unavailable: {cpu.status()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels: {cpu.status()}")
    print(f"operators: {', '.join(getattr(cpu, 'OPS', ())) or 'none (direct ctypes calls)'}")
    print("| layer | call | public µs | direct µs | overhead µs |")
    print("|---|---|---:|---:|---:|")
    for size in (int(s) for s in args.sizes.split(",")):
        n = k = size
        g = 64
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        scale = torch.rand(n, k // g, generator=gen) + 0.05
        zero = torch.randint(0, 16, (n, k // g), generator=gen).float()
        w16 = cpu.prepare_rows16(codes, 4, g, scale, zero)
        wb = cpu.prepare(codes, 4, g, scale, zero)
        x = torch.randn(1, k, generator=gen)
        calls: dict[str, Callable[[], object]] = {
            "gemv_int8dot": lambda: cpu.gemv_int8dot(x, w16),
            "gemv": lambda: cpu.gemv(x, wb),
            "tiled_matmul": lambda: cpu.tiled_matmul(x, wb),
        }
        if hasattr(cpu, "OPS"):  # lib= skips the operator and calls the C library directly
            lib = cpu.load()
            calls["gemv_int8dot/direct"] = lambda: cpu.gemv_int8dot(x, w16, lib=lib)
            calls["gemv/direct"] = lambda: cpu.gemv(x, wb, lib=lib)
            calls["tiled_matmul/direct"] = lambda: cpu.tiled_matmul(x, wb, lib=lib)
        us = per_call_us(calls, args.repeats, args.calls if size < 1024 else max(1, args.calls // 20))
        for name in ("gemv_int8dot", "gemv", "tiled_matmul"):
            d = us.get(f"{name}/direct")
            dtxt = f"{d:.1f}" if d is not None else "-"
            otxt = f"{us[name] - d:.1f}" if d is not None else "-"
            print(f"| {n}x{k} int4 g{g} | {name} | {us[name]:.1f} | {dtxt} | {otxt} |")


if __name__ == "__main__":
    main()
