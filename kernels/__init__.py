"""Triton kernels for qlab (installed as ``qlab.kernels``): fused dequantize-matmul and quantize-and-pack.

* :func:`dequant_matmul` — ``y = x @ dequant(W)^T`` for int8/int4/int2 (any of 1, 2, 3, 4, 8 bits)
  affine weights and NF4/FP4 codebooks, fp32 accumulation, a split-K decode path and a tiled
  prefill path. :func:`dequant_matmul_reference` is the torch computation it must equal.
* :func:`quantize_pack` — group-wise round-to-nearest into the :mod:`qlab.packing` int32 layout, bit
  for bit equal to :func:`quantize_pack_reference` (``qlab.quantize`` + ``qlab.packing``).

Kernels run compiled on CUDA tensors, or on CPU tensors in Triton's interpreter when the environment
has ``TRITON_INTERPRET=1`` (set it before importing triton; slow, but exact, and how the tests and
lesson 07 run without a GPU). ``import qlab.kernels`` works where triton is missing and does not
import triton: :data:`HAS_TRITON` says whether it is installed, and the kernel functions (imported on
first use) raise a RuntimeError without it.

:mod:`qlab.kernels.roofline` (plain Python, no triton) models why weight-only quantization speeds up
decode and not prefill.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

from . import roofline
from ._launch import interpret_mode


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: a stub module without a spec
        return False


#: Whether triton is installed. It is not imported here: Triton decides between compiling and
#: interpreting when it is first imported, so importing it lazily (on the first kernel call) lets a
#: script or test set ``TRITON_INTERPRET=1`` after ``import qlab``.
HAS_TRITON = _triton_installed()

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

# Public name -> the kernel module defining it (imported on first use).
_LAZY = {
    "dequant_matmul": ".dequant_matmul",
    "dequant_matmul_reference": ".dequant_matmul",
    "dequantize_reference": ".dequant_matmul",
    "quantize_pack": ".quantize_pack",
    "quantize_pack_reference": ".quantize_pack",
    "PackedWeight": ".quantize_pack",
}


def available(device: torch.device | str | None = None) -> bool:
    """Whether the kernels can run: triton installed and (a CUDA device, or ``TRITON_INTERPRET=1``).

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


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not HAS_TRITON:
        raise RuntimeError(
            f"qlab.kernels.{name} needs triton (pip install triton, Linux); "
            "qlab's torch paths work without it"
        )
    module = importlib.import_module(_LAZY[name], __name__)
    # Importing the submodule ``dequant_matmul`` binds that name to the module: rebind the
    # public names to the functions, so ``qlab.kernels.dequant_matmul`` is the function.
    for public, source in _LAZY.items():
        if source == _LAZY[name]:
            globals()[public] = getattr(module, public)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
