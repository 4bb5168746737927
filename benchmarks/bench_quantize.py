"""Quantize + pack a 4096x4096 fp32 weight: qlab against the peers a user would pick instead.

    python benchmarks/bench_quantize.py [--size 4096] [--repeat 5]

For each scheme (int8 per-channel, int4 g128 asymmetric, NF4 block 64, 2-bit g64 asymmetric) it
times, in one process and on the same weight: qlab, a plain-torch version, and each of
optimum-quanto, hqq (``optimize=False``: round-to-nearest) and bitsandbytes that is installed.
It prints the median time, the SQNR of the reconstruction, and each peer's time divided by
qlab's (above 1 means qlab is faster). Times on a shared 2-core machine vary 10-30% from run to
run: compare rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from qlab import packing
from qlab.codebooks import quantize_nf4
from qlab.metrics import sqnr
from qlab.quantize import QuantSpec, quantize

# ---------------------------------------------------------------------------- contestants
# Each returns (something to keep alive, reconstruction) so SQNR is measured on what it stored.


def qlab_affine(spec: QuantSpec) -> Callable[[torch.Tensor], tuple[object, Callable[[], torch.Tensor]]]:
    def run(w):
        qt = quantize(w, spec)
        packed = packing.pack(qt.unsigned_codes(), spec.bits) if spec.bits < 8 else qt.codes
        return packed, qt.dequantize

    return run


def qlab_nf4(w):
    qt = quantize_nf4(w, block_size=64)
    packed = packing.pack(qt.codes, 4)
    return packed, qt.dequantize


def plain_torch_affine(bits: int, group: int | None):
    """The textbook version: min/max per group, round, clamp, pack with shifts."""

    def run(w):
        rows = w.reshape(-1, group) if group else w
        if bits == 8:  # symmetric per-channel
            scale = rows.abs().amax(dim=1, keepdim=True) / 127
            q = torch.clamp(torch.round(rows / scale), -127, 127).to(torch.int8)
            return q, lambda: (q.float() * scale).reshape(w.shape)
        lo = rows.amin(dim=1, keepdim=True).clamp(max=0)
        hi = rows.amax(dim=1, keepdim=True).clamp(min=0)
        qmax = 2**bits - 1
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(rows / scale) + zero, 0, qmax).to(torch.uint8)
        per = 8 // bits
        q4 = q.reshape(q.shape[0], -1, per).to(torch.int32)
        packed = (q4 << (torch.arange(per, dtype=torch.int32) * bits)).sum(-1).to(torch.uint8)
        return packed, lambda: (scale * (q.float() - zero)).reshape(w.shape)

    return run


def peers(scheme: str) -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    try:
        from optimum.quanto import qint2, qint4, qint8
        from optimum.quanto.tensor import quantize_weight
        from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer

        def quanto(qtype, group):
            # quanto's own defaults: absmax scales at 8 bits, min/max scale + shift below.
            def run(w):
                if qtype.bits == 8:
                    scale, shift = AbsmaxOptimizer()(w, qtype=qtype, axis=0), None
                else:
                    scale, shift = MaxOptimizer()(w, qtype=qtype, axis=0, group_size=group)
                qw = quantize_weight(w, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=group)
                return qw, qw.dequantize

            return run

        out["optimum-quanto"] = {
            "int8": quanto(qint8, None),
            "int4": quanto(qint4, 128),
            "int2": quanto(qint2, 64),
        }.get(scheme)
    except Exception as e:  # noqa: BLE001 - a peer that fails to import is just absent
        print(f"(optimum-quanto unavailable: {type(e).__name__})")
    try:
        from hqq.core.quantize import Quantizer

        def hqq(bits, group):
            def run(w):
                wq, meta = Quantizer.quantize(w, nbits=bits, group_size=group, optimize=False, axis=1)
                return wq, lambda: Quantizer.dequantize(wq, meta).float().reshape(w.shape)

            return run

        out["hqq"] = {"int8": hqq(8, None), "int4": hqq(4, 128), "int2": hqq(2, 64)}.get(scheme)
    except Exception as e:  # noqa: BLE001
        print(f"(hqq unavailable: {type(e).__name__})")
    try:
        import bitsandbytes.functional as bnbf

        def bnb_nf4(w):
            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
            return packed, lambda: bnbf.dequantize_4bit(packed, state).float()

        def bnb_int8(w):
            q, scale, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
            return q, lambda: q.float() * scale.float().unsqueeze(1) / 127

        out["bitsandbytes"] = {"nf4": bnb_nf4, "int8": bnb_int8}.get(scheme)
    except Exception as e:  # noqa: BLE001
        print(f"(bitsandbytes unavailable: {type(e).__name__})")
    return {k: v for k, v in out.items() if v is not None}


def timed(fn: Callable, w: torch.Tensor, repeat: int) -> tuple[float, float]:
    _, recon = fn(w)  # warm-up (lazy imports, allocator)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        keep, recon = fn(w)
        times.append(time.perf_counter() - t0)
        del keep
    return statistics.median(times) * 1e3, sqnr(w, recon().float())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="weight is size x size (default 4096)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per contestant (median kept)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    w = torch.randn(args.size, args.size) * 0.02
    n = args.size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weight {n}x{n} fp32")
    schemes = {
        "int8": ("int8 per-channel sym", qlab_affine(QuantSpec.per_channel(8)), plain_torch_affine(8, None)),
        "int4": ("int4 g128 asym", qlab_affine(QuantSpec.per_group(4, 128)), plain_torch_affine(4, 128)),
        "nf4": ("nf4 block 64", qlab_nf4, None),
        "int2": ("int2 g64 asym", qlab_affine(QuantSpec.per_group(2, 64)), plain_torch_affine(2, 64)),
    }
    header = f"{'scheme':<22} {'implementation':<16} {'time ms':>9} {'SQNR dB':>8} {'time / qlab':>12}"
    print(header)
    print("-" * len(header))
    for key, (label, ours, plain) in schemes.items():
        t_q, s_q = timed(ours, w, args.repeat)
        print(f"{label:<22} {'qlab':<16} {t_q:9.1f} {s_q:8.2f} {1.0:12.2f}")
        contestants = {"plain torch": plain} if plain else {}
        contestants.update(peers(key))
        for name, fn in contestants.items():
            try:
                t, s = timed(fn, w, args.repeat)
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking the others
                print(f"{'':<22} {name:<16} failed: {type(e).__name__}: {str(e)[:60]}")
                continue
            print(f"{'':<22} {name:<16} {t:9.1f} {s:8.2f} {t / t_q:12.2f}")


if __name__ == "__main__":
    main()
