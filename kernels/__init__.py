"""Triton kernels for qlab (installed as ``qlab.kernels``): fused dequantize-matmul and quantize-and-pack.

* :func:`dequant_matmul` — ``y = x @ dequant(W)^T`` for int8/int4/int2 (any of 1, 2, 3, 4, 8 bits)
  affine weights and NF4/FP4 codebooks, fp32 accumulation, a split-K decode path and a tiled
  prefill path. :func:`dequant_matmul_reference` is the torch computation it must equal.
* :func:`quantize_pack` — group-wise round-to-nearest into the :mod:`qlab.packing` int32 layout, bit
  for bit equal to :func:`quantize_pack_reference` (``qlab.quantize`` + ``qlab.packing``).

Kernels run compiled on CUDA tensors, or on CPU tensors in Triton's interpreter when the environment
has ``TRITON_INTERPRET=1`` (set it before importing triton; slow, but exact, and how the tests and
lesson 07 run without a GPU). ``import qlab.kernels`` works where triton is missing: :data:`HAS_TRITON`
is then False and the functions raise a RuntimeError saying so.

:mod:`qlab.kernels.roofline` (plain Python, no triton) models why weight-only quantization speeds up
decode and not prefill.
"""

from __future__ import annotations

import torch

from . import roofline
from ._launch import interpret_mode

try:
    import triton  # noqa: F401
except ImportError:  # macOS, Windows, CPU-only wheels
    HAS_TRITON = False
else:
    HAS_TRITON = True

__all__ = [
    "HAS_TRITON",
    "available",
    "dequant_matmul",
    "dequant_matmul_reference",
    "dequantize_reference",
    "quantize_pack",
    "quantize_pack_reference",
    "PackedWeight",
    "roofline",
]


def available(device: torch.device | str | None = None) -> bool:
    """Whether the kernels can run: triton importable and (a CUDA device, or ``TRITON_INTERPRET=1``).

    With ``device`` given, answer for tensors on that device: ``"cuda"`` needs a GPU, ``"cpu"``
    needs the interpreter.
    """
    if not HAS_TRITON:
        return False
    if device is None:
        return torch.cuda.is_available() or interpret_mode()
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpret_mode()


if HAS_TRITON:
    from .dequant_matmul import dequant_matmul, dequant_matmul_reference, dequantize_reference
    from .quantize_pack import PackedWeight, quantize_pack, quantize_pack_reference
else:

    def _missing(*args, **kwargs):
        raise RuntimeError(
            "qlab.kernels needs triton (pip install triton, Linux); qlab's torch paths work without it"
        )

    dequant_matmul = dequant_matmul_reference = dequantize_reference = _missing
    quantize_pack = quantize_pack_reference = PackedWeight = _missing
