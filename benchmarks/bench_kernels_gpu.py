"""GPU speed of qlab's fused dequantize-matmul kernels against fp16 ``F.linear`` (cuBLAS), one table.

Run on a CUDA machine: ``python benchmarks/bench_kernels_gpu.py [--sizes 4096,8192] [--ms 1,16,128,2048]``

For every ``M`` (rows of activations) and square weight ``N = K``, it times with
``triton.testing.do_bench`` (median) in one process, side by side:

* torch fp16 ``F.linear`` (cuBLAS): the baseline;
* qlab W8A16 (int8 symmetric per-channel), W4A16 (int4 asymmetric g128), W2A16 (int2 asymmetric g64)
  and NF4 (block 64), all through :func:`qlab.kernels.dequant_matmul` with fp16 activations and
  fp16 scales/zeros;
* a peer: torch's own int4 "tinygemm" CUDA op (bf16 activations, the kernel behind torchao's int4
  weight-only) on the same int4 g128 codes. If it fails it is reported in the table, not hidden.
  (gemlite was not added: no GPU was available to check its API against a real run.)

Columns: time in microseconds, speed-up over fp16 (``fp16 time / time``), achieved weight bandwidth
(bytes of packed weight + scales + zeros read once, divided by the time) and a correctness check of
every row against the torch reference (``max|y - ref| / max|ref|``).

Goals (H100/H200, issue 5): at M=1, W4A16 >= 3.3x fp16 (memory-bound ideal ~3.9x), W8A16 >= 1.8x,
W2A16 >= 5x; at M=16, W4A16 >= 2.5x; at M=2048, >= 0.8x fp16.

Without CUDA the script exits with a message (the kernels themselves are tested on CPU in Triton's
interpreter: ``pytest tests/test_kernels_*.py``). Like ``bench_linear.py``, it drops the repository
root from ``sys.path`` so the repo's ``kernels/`` folder cannot shadow Hugging Face's ``kernels``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT]

from qlab.codebooks import NF4_VALUES, quantize_nf4  # noqa: E402
from qlab.packing import pack_int32  # noqa: E402

#: Relative error a row may show against the reference (fp16 rounding of weights and output).
TOLERANCE = 1e-2


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


class Variant:
    """One qlab weight format: packed arguments for ``dequant_matmul`` and the bytes they occupy."""

    def __init__(self, name: str, w: torch.Tensor, bits: int, group_size: int, fmt: str) -> None:
        from qlab.kernels import quantize_pack

        n, k = w.shape
        self.name, self.bits, self.group_size, self.n, self.k = name, bits, group_size, n, k
        self.codebook = None
        if fmt == "nf4":
            qt = quantize_nf4(w.float(), block_size=group_size)
            self.packed, self.scale, self.zero = pack_int32(qt.codes, 4), qt.scale.float(), None
            self.codebook = NF4_VALUES.to(w.device)
        else:
            self.packed, self.scale, self.zero = quantize_pack(w, bits, group_size, symmetric=fmt == "sym")
        # Scales and zeros in fp16, as GPU int4 kernels store them: g128 costs 0.25 bits per weight
        # instead of 0.5 with fp32 (zero-points are small integers, exact in fp16).
        self.scale = self.scale.half()
        self.zero = None if self.zero is None else self.zero.half()
        parts = [self.packed, self.scale] + ([self.zero] if self.zero is not None else [])
        self.nbytes = sum(t.numel() * t.element_size() for t in parts)

    def kwargs(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, n=self.n, k=self.k, codebook=self.codebook)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        from qlab.kernels import dequant_matmul

        return dequant_matmul(x, self.packed, self.scale, self.zero, **self.kwargs())

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        from qlab.kernels import dequant_matmul_reference

        return dequant_matmul_reference(x, self.packed, self.scale, self.zero, **self.kwargs())


def tinygemm_int4(v: Variant) -> Callable[[torch.Tensor], torch.Tensor]:
    """torch's CUDA int4 op on the same codes: ``w = (q - 8) * s + z`` with ``z = (8 - zero) * s``."""
    from qlab.packing import unpack_int32

    q = unpack_int32(v.packed, 4, v.k).to(torch.int32)  # [N, K] codes 0..15
    # tinygemm's packed input: two codes per byte, the even-indexed code in the high nibble.
    q_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(q_u8.contiguous(), 8)
    z = (8 - v.zero) * v.scale
    scales_and_zeros = torch.stack([v.scale, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(
            x.to(torch.bfloat16), packed, v.group_size, scales_and_zeros
        )

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,8192", help="square weight sizes N = K, comma-separated")
    parser.add_argument("--ms", default="1,16,128,2048", help="activation rows M, comma-separated")
    parser.add_argument("--no-peers", action="store_true", help="skip the torch int4 peer")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_kernels_gpu.py needs a CUDA GPU and none is visible here. The kernels are tested on "
            "CPU in Triton's interpreter instead: pytest tests/test_kernels_*.py",
            file=sys.stderr,
        )
        return 2
    import qlab.kernels
    import triton
    from triton.testing import do_bench

    if not qlab.kernels.available("cuda"):
        print("triton is not importable: pip install triton", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the benchmark times compiled kernels", file=sys.stderr)
        return 2

    torch.manual_seed(0)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"# {props.name}, torch {torch.__version__}, triton {triton.__version__}")
    print("| M | N=K | method | time (us) | x fp16 | weight GB/s | rel. error | check |")
    print("|---:|---:|---|---:|---:|---:|---:|---|")
    failures = 0
    for size in [int(s) for s in args.sizes.split(",")]:
        w = (torch.randn(size, size, device=dev) * 0.02).to(torch.float16)
        variants = [
            Variant("qlab W8A16", w, 8, size, "sym"),
            Variant("qlab W4A16 g128", w, 4, 128, "asym"),
            Variant("qlab W2A16 g64", w, 2, 64, "asym"),
            Variant("qlab NF4 b64", w, 4, 64, "nf4"),
        ]
        peers: dict[str, Callable[[torch.Tensor], torch.Tensor] | str] = {}
        if not args.no_peers:
            name = "torch int4 tinygemm g128 (bf16)"
            try:
                peers[name] = tinygemm_int4(variants[1])
            except Exception as err:  # reported in the table, not hidden
                peers[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"
        for m in [int(s) for s in args.ms.split(",")]:
            x = torch.randn(m, size, device=dev, dtype=torch.float16)
            t_fp16 = do_bench(lambda x=x, w=w: F.linear(x, w), return_mode="median")
            fp16_bytes = w.numel() * w.element_size()
            print(f"| {m} | {size} | torch fp16 F.linear | {1e3 * t_fp16:.1f} | 1.00 | "
                  f"{fp16_bytes / t_fp16 / 1e6:.0f} | - | - |")  # fmt: skip
            for v in variants:
                ref = v.reference(x)
                err = _rel_err(v.run(x), ref)
                ok = err <= TOLERANCE
                failures += not ok
                t = do_bench(lambda v=v, x=x: v.run(x), return_mode="median")
                print(f"| {m} | {size} | {v.name} | {1e3 * t:.1f} | {t_fp16 / t:.2f} | "
                      f"{v.nbytes / t / 1e6:.0f} | {err:.1e} | {'ok' if ok else 'FAIL'} |")  # fmt: skip
            for name, fn in peers.items():
                if isinstance(fn, str):
                    print(f"| {m} | {size} | {name} | - | - | - | - | not run: {fn} |")
                    continue
                try:
                    err = _rel_err(fn(x), variants[1].reference(x))
                    t = do_bench(lambda fn=fn, x=x: fn(x), return_mode="median")
                except Exception as e:  # a peer failing at run time is reported too
                    print(f"| {m} | {size} | {name} | - | - | - | - | failed: {type(e).__name__} |")
                    continue
                check = "ok" if err <= 2 * TOLERANCE else "FAIL"  # bf16 activations: coarser
                print(f"| {m} | {size} | {name} | {1e3 * t:.1f} | {t_fp16 / t:.2f} | "
                      f"{variants[1].nbytes / t / 1e6:.0f} | {err:.1e} | {check} |")  # fmt: skip
    if failures:
        print(f"{failures} qlab rows failed the correctness check", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
