"""Affine (integer) quantization by round-to-nearest: ``x ≈ scale * (q - zero)``.

* symmetric:  ``scale = max|x| / qmax``, signed codes, no zero-point;
* asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)``, unsigned codes.

Methods that choose their own scales (HQQ, GPTQ, AWQ) call :func:`quantize_affine` to produce codes in
the shared convention. Sits on :mod:`qlab.tensor`; :mod:`qlab.codebooks` and :mod:`qlab.quantize` sit
on it.
"""

from __future__ import annotations

import math

import torch

from qlab.tensor import BlockView, QuantizedTensor, QuantSpec, check_finite_extrema, check_float_tensor


def round_scale_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast scales to ``dtype`` rounding *up*, so the stored scale still covers the block's range."""
    s = scale.to(dtype)
    low = s.float() < scale
    if low.any():
        bumped = torch.nextafter(s.float(), torch.full_like(scale, math.inf)).to(dtype)
        # nextafter in fp32 may round back down to the same low-precision value; step by one ulp of dtype.
        ulp = torch.finfo(dtype).eps * s.float().abs().clamp_min(torch.finfo(dtype).tiny)
        bumped = torch.where(bumped.float() < scale, (s.float() + ulp).to(dtype), bumped)
        s = torch.where(low, bumped, s)
    if not torch.isfinite(s).all():
        raise ValueError(f"scales overflow scale_dtype={dtype}; use a wider scale_dtype")
    return s


def compute_scale_zero(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scales (and zero-points) for every block of ``x``.

    * symmetric:  ``scale = max|x| / qmax``;
    * asymmetric: ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)``, with the
      block range widened to include 0 so that 0.0 stays exactly representable;
    * float zero domain: ``scale = (max - min) / (2^b - 1)`` and ``zero = min`` (the float offset of
      code 0, llama.cpp's Q4_1 rule): the grid spans exactly the block's range, 0 need not be on it.

    Blocks whose range is 0 get ``scale = 1`` (any scale represents all-zero blocks exactly; this
    avoids a division by zero).
    """
    bv = BlockView(tuple(x.shape), spec.block_size(x.shape))
    xb = bv.of(x.float())
    lo, hi = bv.reduce(xb, "min"), bv.reduce(xb, "max")
    check_finite_extrema(lo, hi)
    if spec.symmetric:
        amax = torch.maximum(hi, -lo)
        scale = amax / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return round_scale_up(scale, spec.scale_dtype), None
    if spec.float_zero:
        scale = (hi - lo) / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return round_scale_up(scale, spec.scale_dtype), lo.to(spec.scale_dtype)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / spec.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = round_scale_up(scale, spec.scale_dtype)
    # + 0.0 turns -0.0 (from rounding -0/scale) into 0.0, which prints as learners expect.
    zero = torch.round(-lo / scale.float()).clamp(0, spec.qmax) + 0.0
    return scale, zero.to(spec.scale_dtype)


def quantize_affine(
    x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor | None
) -> torch.Tensor:
    """Codes ``q = clamp(round(x / scale) + zero, qmin, qmax)`` for given scales (and zeros); in the
    float zero domain ``q = clamp(round((x - zero) / scale), qmin, qmax)``.

    Rounding is half-to-even (``torch.round``). Methods that choose their own scales (HQQ, GPTQ,
    AWQ) call this to produce codes in the shared convention.
    """
    bv = BlockView(tuple(x.shape), spec.block_size(x.shape))
    if spec.float_zero:
        if zero is None:
            raise ValueError("zero: a float-zero-domain spec needs the offsets (got None)")
        q = bv.of(x.float()).sub(bv.per_block(zero.float())).div_(bv.per_block(scale.float()))
        return q.round_().clamp_(spec.qmin, spec.qmax).reshape(x.shape).to(spec.code_dtype)
    # In-place after the first op: one temporary instead of four full-size ones.
    q = bv.of(x.float()).div(bv.per_block(scale.float()))
    q.round_()
    if zero is not None:
        q.add_(bv.per_block(zero.float()))
    return q.clamp_(spec.qmin, spec.qmax).reshape(x.shape).to(spec.code_dtype)


def quantize_rtn(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Round-to-nearest affine quantization of ``x`` with ``spec`` (an integer spec, no codebook)."""
    if spec.codebook is not None:
        raise ValueError(f"spec: quantize_rtn is for integer specs; {spec.describe()} is a codebook")
    check_float_tensor(x, finite=False)  # block extrema are checked where they are computed
    scale, zero = compute_scale_zero(x, spec)
    codes = quantize_affine(x, spec, scale, zero)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, spec=spec, shape=x.shape, dtype=x.dtype)


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) symmetric int8 of activations: ``x ≈ s q``.

    ``s = max|row| / 127`` as fp32 ``[..., 1]`` (rows of zeros get ``s = 1``), ``q = round(x / s)``
    as int8 in ``[-127, 127]``. The one definition W8A8 layers, LLM.int8 and the CPU kernels share,
    so their integers agree bit for bit.
    """
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(xf / s).clamp(-127, 127).to(torch.int8), s
