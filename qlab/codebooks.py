"""Codebook (lookup-table) 4-bit formats: NF4 and FP4, with QLoRA double quantization.

A codebook format stores, per block of ``block_size`` consecutive elements (along the last dim),
one absmax scale, and per element a 4-bit index into a fixed 16-entry table::

    x ≈ absmax * table[q]        with table values in [-1, 1]

* **NF4** (QLoRA, Dettmers et al. 2023): the table holds quantiles of a standard normal,
  normalized to [-1, 1], with an exact 0. Normally distributed weights use every code about
  equally often, which is why NF4 beats uniform int4 on them at the same bits.
* **FP4** (e2m1, OCP microscaling): the 16 bit patterns of a 4-bit float (1 sign, 2 exponent,
  1 mantissa bit), values ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` and their negatives, divided by 6.
  Codes *are* the e2m1 bit patterns (sign in bit 3).
  The hardware variants of e2m1 with small stored scales (MXFP4: an e8m0 power of two per 32;
  NVFP4: an e4m3 scale per 16 and an fp32 one per tensor) are in :mod:`qlab.scaled_floats`.

**Double quantization** (QLoRA): the fp32 absmax scales cost 32/64 = 0.5 bits per weight. Their
mean is subtracted and they are quantized again to int8, symmetric, in blocks of 256: the
overhead drops to ``8/64 + 32/(64*256) ≈ 0.127`` bits per weight.
"""

from __future__ import annotations

import torch

from qlab.affine import quantize_rtn
from qlab.tensor import BlockView, QuantizedTensor, QuantSpec, check_finite_extrema, check_float_tensor

#: Block size QLoRA uses for NF4 scales.
DEFAULT_BLOCK_SIZE = 64
#: Block size for the second (scale-of-scales) quantization.
DOUBLE_QUANT_BLOCK = 256

# QLoRA's construction: 8 positive and 7 negative normal quantiles, offset chosen so that the
# extreme quantile is finite, then normalized so the largest magnitude is 1.
_NF4_OFFSET = 0.9677083


def nf4_table() -> torch.Tensor:
    """The 16 NF4 values, built from standard-normal quantiles (QLoRA, appendix E)."""
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(_NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ndtri(torch.linspace(_NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


def fp4_table() -> torch.Tensor:
    """The 16 e2m1 values indexed by bit pattern (``sign<<3 | exp<<1 | mantissa``), divided by 6."""
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    return torch.cat([magnitudes, -magnitudes]) / 6.0


NF4_VALUES = nf4_table()
FP4_VALUES = fp4_table()


def codebook_table(name: str) -> torch.Tensor:
    """The 16-entry table of ``name`` (``"nf4"`` or ``"fp4"``)."""
    if name == "nf4":
        return NF4_VALUES.clone()
    if name == "fp4":
        return FP4_VALUES.clone()
    raise ValueError(f"codebook must be 'nf4' or 'fp4', got {name!r}")


def nearest_code(xn: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for each value (ties go to the larger value).

    Works on any table order: search the sorted table through its midpoints, then map back.
    """
    sorted_vals, order = table.float().sort()
    mids = (sorted_vals[1:] + sorted_vals[:-1]) / 2
    idx = torch.bucketize(xn.float().contiguous(), mids, right=True, out_int32=True)
    if torch.equal(order, torch.arange(len(table))):  # sorted table (NF4): index is the code
        return idx.to(torch.uint8)
    return order[idx].to(torch.uint8)


def codebook_spec(name: str, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = False) -> QuantSpec:
    """Spec for the codebook ``name`` (``"nf4"`` or ``"fp4"``): one absmax per ``block_size``
    elements of the last dim."""
    return QuantSpec(
        bits=4,
        symmetric=False,
        granularity="group",
        group_size=block_size,
        codebook=name,
        double_quant=double_quant,
    )


def nf4_spec(block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = False) -> QuantSpec:
    """Spec for NF4 with one absmax per ``block_size`` elements of the last dim."""
    return codebook_spec("nf4", block_size, double_quant)


def fp4_spec(block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = False) -> QuantSpec:
    """Spec for FP4 (e2m1) with one absmax per ``block_size`` elements of the last dim."""
    return codebook_spec("fp4", block_size, double_quant)


def double_quantize_scales(scale: torch.Tensor) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
    """QLoRA's second quantization of block scales.

    ``scale ≈ int8_dequant(q) + offset`` with ``offset = mean(scale)`` and symmetric int8 absmax
    blocks of 256 over the flattened scales (zero-padded to a multiple of 256; padding costs are
    counted in ``nbytes``). Returns ``(scale_q, offset, reconstructed_scale)``.
    """
    flat = scale.float().flatten()
    offset = flat.mean()
    centered = flat - offset
    pad = (-centered.numel()) % DOUBLE_QUANT_BLOCK
    centered = torch.nn.functional.pad(centered, (0, pad))
    spec = QuantSpec.per_group(bits=8, group_size=DOUBLE_QUANT_BLOCK, symmetric=True)
    scale_q = quantize_rtn(centered, spec)
    recon = (scale_q.dequantize(torch.float32)[: flat.numel()] + offset).reshape(scale.shape)
    return scale_q, offset.reshape(1), recon


def quantize_codebook(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Blockwise absmax lookup quantization: ``q = nearest(x / absmax)`` in the spec's table."""
    if spec.codebook is None:
        raise ValueError("spec.codebook must be 'nf4' or 'fp4' for quantize_codebook")
    check_float_tensor(x, finite=False)
    table = codebook_table(spec.codebook)
    bv = BlockView(tuple(x.shape), spec.block_size(x.shape))
    xb = bv.of(x.float())
    lo, hi = bv.reduce(xb, "min"), bv.reduce(xb, "max")
    check_finite_extrema(lo, hi)
    absmax = torch.maximum(hi, -lo)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    scale_q = offset = None
    if spec.double_quant:
        scale_q, offset, absmax = double_quantize_scales(absmax)
        # Reconstructed scales can land a hair below the true absmax: values then clip at ±1.
        absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    scale = absmax.to(spec.scale_dtype)
    xn = (xb / bv.per_block(scale.float())).reshape(x.shape)
    codes = nearest_code(xn, table)
    return QuantizedTensor(
        codes=codes,
        scale=scale,
        zero=None,
        spec=spec,
        shape=x.shape,
        dtype=x.dtype,
        scale_q=scale_q,
        scale_offset=offset,
        codebook=table,
    )


def quantize_nf4(
    x: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = False
) -> QuantizedTensor:
    """NF4 quantization (QLoRA): ``x ≈ absmax * NF4[q]`` per block of ``block_size``."""
    return quantize_codebook(x, nf4_spec(block_size, double_quant))


def quantize_fp4(
    x: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = False
) -> QuantizedTensor:
    """FP4 (e2m1) quantization: ``x ≈ absmax * E2M1[q] / 6`` per block of ``block_size``."""
    return quantize_codebook(x, fp4_spec(block_size, double_quant))
