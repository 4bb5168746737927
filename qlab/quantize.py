"""The quantization API: :func:`quantize`, :func:`dequantize`, :func:`fake_quantize`.

One entry point for every spec: integer specs go to round-to-nearest (:mod:`qlab.affine`,
``x ≈ scale * (q - zero)``), codebook specs (``codebook="nf4"``/``"fp4"``) to :mod:`qlab.codebooks`
(``x ≈ scale * table[q]``). Both return the same :class:`~qlab.tensor.QuantizedTensor`.

This is the top of qlab's core. The layers below it, bottom first:

* :mod:`qlab.tensor`: :class:`QuantSpec` (bits, symmetric, one *block size* for per-tensor /
  per-channel / per-group), :class:`BlockView`, :class:`QuantizedTensor`, input checks;
* :mod:`qlab.affine`: scales, zero-points and codes by round-to-nearest;
* :mod:`qlab.codebooks`: NF4 / FP4 lookup quantization and QLoRA double quantization.

Their public names are re-exported here, so ``from qlab.quantize import QuantSpec, compute_scale_zero``
keeps working.
"""

from __future__ import annotations

import torch

from qlab.affine import compute_scale_zero, quantize_affine, quantize_rows_int8, quantize_rtn
from qlab.codebooks import quantize_codebook
from qlab.tensor import (
    BlockView,
    Granularity,
    QuantizedTensor,
    QuantSpec,
    check_finite_extrema,
    check_float_tensor,
    per_group,
)

__all__ = [
    "BlockView",
    "Granularity",
    "QuantSpec",
    "QuantizedTensor",
    "check_finite_extrema",
    "check_float_tensor",
    "compute_scale_zero",
    "dequantize",
    "fake_quantize",
    "per_group",
    "quantize",
    "quantize_affine",
    "quantize_rows_int8",
    "quantize_rtn",
]


def quantize(x: torch.Tensor, spec: QuantSpec | None = None, **kwargs) -> QuantizedTensor:
    """Quantize ``x`` by round-to-nearest: ``x ≈ scale * (q - zero)`` (or ``scale * table[q]``).

    ``spec`` defaults to int8 symmetric per-channel; keyword arguments build a spec instead
    (``quantize(w, bits=4, granularity="group", group_size=128, symmetric=False)``).
    Codebook specs (``codebook="nf4"``) go to :func:`qlab.codebooks.quantize_codebook`.
    """
    if spec is None:
        spec = QuantSpec(**kwargs)
    elif kwargs:
        raise ValueError("pass either spec or keyword arguments, not both")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if spec.codebook is not None:
        return quantize_codebook(x, spec)
    return quantize_rtn(x, spec)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Functional form of :meth:`QuantizedTensor.dequantize`: ``scale * (q - zero)``."""
    return qt.dequantize(dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec | None = None, **kwargs) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: what the network sees after quantization."""
    return quantize(x, spec, **kwargs).dequantize(x.dtype)
