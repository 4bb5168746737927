"""HQQ and GPTQ speed on CPU, side by side with the reference ``hqq`` package when it is installed.

For a 4096x4096 Gaussian weight (std 0.02, seed 0) at int4 g128 and int2 g64 it prints, for RTN,
qlab's HQQ (zero-point only, and with the scale refit) and ``hqq``'s ``Quantizer.quantize`` (axis=1,
the same groups along the input dim): wall time, SQNR and the lp error (p = 0.7) HQQ minimizes, and
the speed ratio measured in this run. Then it times ``gptq_quantize`` per layer for SmolLM2's layer
shapes and a 4096x4096 layer.

    python benchmarks/bench_methods.py [--repeat 3] [--skip-gptq] [--threads N]

Timings on a shared 2-core machine vary 10-30% from run to run: read the ratios, which are
measured in one run on the same weight.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from qlab.calibration import hessian
from qlab.methods.gptq import gptq_quantize
from qlab.methods.hqq import hqq_quantize
from qlab.metrics import lp_error, sqnr
from qlab.quantize import QuantSpec, quantize


def timed(fn: Callable[[], torch.Tensor], repeat: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    assert out is not None
    return statistics.median(times), out


def hqq_package() -> Callable[[torch.Tensor, int, int], torch.Tensor] | None:
    try:
        from hqq.core.quantize import Quantizer
    except Exception as err:  # not installed, or fails to import on this platform
        print(f"hqq package not available ({type(err).__name__}: {err}); qlab only")
        return None

    def run(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
        wq, meta = Quantizer.quantize(
            w, nbits=bits, group_size=group, axis=1, optimize=True, bitpack=False, device="cpu"
        )
        return Quantizer.dequantize(wq, meta).reshape(w.shape).float()

    return run


def bench_hqq(repeat: int) -> None:
    w = 0.02 * torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    ref = hqq_package()
    print(f"\nHQQ on a 4096x4096 Gaussian weight, torch threads: {torch.get_num_threads()}")
    print(f"{'scheme':10} {'quantizer':22} {'time (s)':>9} {'SQNR (dB)':>10} {'lp err':>10} {'vs hqq':>8}")
    for bits, group in ((4, 128), (2, 64)):
        spec = QuantSpec.per_group(bits, group)
        results: list[tuple[str, float, torch.Tensor]] = []
        t, out = timed(lambda spec=spec: quantize(w, spec).dequantize(), repeat)
        results.append(("RTN", t, out))
        t, out = timed(lambda spec=spec: hqq_quantize(w, spec).dequantize(), repeat)
        results.append(("qlab hqq (zero)", t, out))
        t, out = timed(lambda spec=spec: hqq_quantize(w, spec, optimize_scale=True).dequantize(), repeat)
        results.append(("qlab hqq (zero+scale)", t, out))
        t_ref = None
        if ref is not None:
            t_ref, out = timed(lambda b=bits, g=group: ref(w, b, g), 1)
            results.append(("hqq package", t_ref, out))
        for name, t, out in results:
            ratio = f"{t_ref / t:7.1f}x" if t_ref is not None else "     n/a"
            err = f"{sqnr(w, out):10.2f} {lp_error(w, out):10.5f}"
            print(f"int{bits} g{group:<5} {name:22} {t:9.3f} {err} {ratio}")


def bench_gptq(repeat: int) -> None:
    print("\nGPTQ per layer (int4 g64, damp 0.01, block 128), H from 2048 correlated input rows")
    print(f"{'layer [out, in]':18} {'time (s)':>9}")
    g = torch.Generator().manual_seed(1)
    for out_f, in_f in ((576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096)):
        mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
        x = torch.randn(2048, in_f, generator=g) @ mix
        H = hessian(x)
        w = 0.02 * torch.randn(out_f, in_f, generator=g)
        spec = QuantSpec.per_group(4, 64)
        t, _ = timed(lambda w=w, H=H, spec=spec: gptq_quantize(w, H, spec).dequantize(), repeat)
        print(f"[{out_f}, {in_f}]".ljust(18) + f" {t:9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-gptq", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_hqq(args.repeat)
    if not args.skip_gptq:
        bench_gptq(max(1, args.repeat // 2))


if __name__ == "__main__":
    main()
