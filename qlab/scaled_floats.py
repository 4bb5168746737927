"""Scaled floats: small float elements times a scale per block, from per-tensor fp8 to MXFP4 and NVFP4.

Every format here stores, for each block of consecutive elements along the last dim, one scale ``s``,
and per element the bit pattern ``q`` of a small float format (fp8 e4m3 / e5m2, fp4 e2m1)::

    x ≈ s[block] * element(q)                 element(q) = the float value of the bit pattern q

What differs is the block and how the scale is chosen and stored:

==================  =========  ============  ====================================================
format              element    block         scale
==================  =========  ============  ====================================================
``fp8_e4m3_tensor``  e4m3      whole tensor  fp32, ``amax / 448``
``fp8_e4m3_row``     e4m3      one row       fp32 per row (last dim), ``amax_row / 448``
``mxfp8``            e4m3      32            e8m0 (a power of two), OCP MX rule below
``mxfp4``            e2m1      32            e8m0 (a power of two), OCP MX rule below
``nvfp4``            e2m1      16            e4m3 per block, times one fp32 per tensor
==================  =========  ============  ====================================================

(and the ``e5m2`` twins of the fp8 rows, amax / 57344).

* **fp32 scales, dynamic or static.** ``scale = amax / element.max`` maps the largest magnitude to the
  element's largest value. *Dynamic*: amax from the tensor at hand (what a weight, or an activation
  scaled on the fly, uses). *Static*: a scale fixed beforehand from calibration data, passed as
  ``scale=``; values beyond ``scale * element.max`` then saturate.
* **MX (OCP Microscaling spec v1.0).** The shared scale is ``X = 2^(floor(log2(amax)) - emax_elem)``
  (``emax_elem`` = exponent of the element's largest binade: 2 for e2m1, 8 for e4m3), stored as e8m0,
  and each ``x / X`` is rounded to the element format (nearest, ties to even, saturating). Because
  ``X`` rounds amax's exponent *down*, ``amax / X`` lies in ``[4, 8)`` for e2m1, so values above 6 X
  clip to 6 X: the spec's rule trades that clipping for a scale that is a pure exponent.
* **e8m0**: 8 unsigned exponent bits, bias 127, value ``2^(e - 127)`` for ``e`` in 0..254 (so
  ``2^-127 .. 2^127``), ``0xFF`` is NaN; no sign, no zero, no mantissa.
* **NVFP4**: ``global = amax_tensor / (6 * 448)`` (fp32), block scale ``s_b = e4m3(amax_b / (6 * global))``,
  elements ``e2m1(x / (s_b * global))``, and ``x ≈ element * (s_b * global)`` (the product of the two
  scales rounded once to fp32, then multiplied).

A quantized tensor is a :class:`ScaledTensor`, a :class:`~qlab.tensor.QuantizedTensor` whose ``codebook`` is
the element format's value of every bit pattern and whose ``scale`` holds the stored scales (uint8 bytes
for e8m0 and e4m3, fp32 otherwise): ``dequantize``, ``nbytes`` and ``bits_per_weight`` count what is
really stored (MXFP4 4.25 bits per weight, NVFP4 4.5 plus 32 bits per tensor). :meth:`ScaledTensor.pack`
gives the bytes: element codes in the :mod:`qlab.packing` layout (two e2m1 codes per byte, the first in
the low nibble) and the scales as uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from qlab.format_types import FP4_E2M1, FP8_E4M3, FP8_E5M2, FloatFormat, _pow2, from_code
from qlab.formats import bits_of, round_to
from qlab.packing import pack, unpack
from qlab.tensor import BlockView, QuantizedTensor, QuantSpec, check_float_tensor

ScaleKind = Literal["fp32", "e8m0", "e4m3"]
Block = int | Literal["tensor", "row"]

#: e8m0: bias 127; 0xFF is NaN.
E8M0_BIAS = 127
E8M0_NAN = 0xFF


# ---------------------------------------------------------------------------------------------------------
# e8m0 scales


def decode_e8m0(codes: Tensor) -> Tensor:
    """float32 values of e8m0 bytes: ``2^(code - 127)``, NaN for ``0xFF`` (2^-127 is a float32 subnormal)."""
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor of e8m0 bytes, got {getattr(codes, 'dtype', codes)}")
    c = codes.to(torch.int64)
    v = _pow2(c - E8M0_BIAS).to(torch.float32)
    return torch.where(c == E8M0_NAN, torch.full_like(v, math.nan), v)


def encode_e8m0(exponent: Tensor) -> Tensor:
    """e8m0 bytes of the powers of two ``2^exponent``; ``exponent`` must be integers in -127..127."""
    if not isinstance(exponent, Tensor) or exponent.is_floating_point():
        raise TypeError("exponent must be an integer tensor")
    if exponent.numel() and (exponent.min() < -E8M0_BIAS or exponent.max() > E8M0_BIAS):
        raise ValueError(
            f"exponent must lie in -127..127 for e8m0, got {int(exponent.min())}..{int(exponent.max())}"
        )
    return (exponent.to(torch.int64) + E8M0_BIAS).to(torch.uint8)


def floor_log2(a: Tensor) -> Tensor:
    """``floor(log2(a))`` exactly, for positive finite float tensors (int64)."""
    _, e = torch.frexp(a.to(torch.float64))  # a = f * 2^e with f in [0.5, 1)
    return e.to(torch.int64) - 1


# ---------------------------------------------------------------------------------------------------------
# Formats


@dataclass(frozen=True)
class ScaledFormat:
    """Float elements of ``element`` format, one scale of kind ``scale`` per ``block`` of the last dim
    (``"tensor"``: one for the whole tensor; ``"row"``: one per row of the last dim), plus one fp32 scale
    per tensor when ``global_scale``."""

    name: str
    element: FloatFormat
    block: Block
    scale: ScaleKind
    global_scale: bool = False

    def __post_init__(self) -> None:
        if self.block not in ("tensor", "row") and not (isinstance(self.block, int) and self.block >= 1):
            raise ValueError(f"block must be 'tensor', 'row' or a positive int, got {self.block!r}")
        if self.scale not in ("fp32", "e8m0", "e4m3"):
            raise ValueError(f"scale must be 'fp32', 'e8m0' or 'e4m3', got {self.scale!r}")

    @property
    def scale_bits(self) -> int:
        return 32 if self.scale == "fp32" else 8

    def bits_per_weight(self, numel: int | None = None) -> float:
        """Element bits plus scale bits per element: ``bits + scale_bits / block`` (+ 32 / numel for a
        global scale). Per-tensor and per-row blocks depend on the shape: pass a ScaledTensor instead."""
        if not isinstance(self.block, int):
            raise ValueError(
                f"{self.name}'s block depends on the tensor's shape; use ScaledTensor.bits_per_weight"
            )
        extra = 0.0 if not self.global_scale or numel is None else 32 / numel
        return self.element.bits + self.scale_bits / self.block + extra

    def spec(self, shape: tuple[int, ...] | torch.Size) -> QuantSpec:
        """The block layout as a :class:`QuantSpec` (codes ``element.bits`` wide, one scale per block)."""
        if self.block == "tensor":
            return QuantSpec(bits=self.element.bits, granularity="tensor")
        g = shape[-1] if self.block == "row" else self.block
        if shape[-1] % g:
            raise ValueError(
                f"{self.name} needs the last dim ({shape[-1]}) to be a multiple of its block {g}"
            )
        if self.element is FP4_E2M1:
            return QuantSpec(bits=4, symmetric=False, granularity="group", group_size=g, codebook="fp4")
        return QuantSpec(bits=self.element.bits, granularity="group", group_size=g)

    def table(self) -> Tensor:
        """The element value of every bit pattern (float32, ``2^bits`` entries); NaN codes read as 0
        (a saturating conversion never produces them)."""
        v = from_code(torch.arange(2**self.element.bits), self.element)
        return torch.where(torch.isfinite(v), v, torch.zeros_like(v))


FP8_E4M3_TENSOR = ScaledFormat("fp8_e4m3_tensor", FP8_E4M3, "tensor", "fp32")
FP8_E4M3_ROW = ScaledFormat("fp8_e4m3_row", FP8_E4M3, "row", "fp32")
FP8_E5M2_TENSOR = ScaledFormat("fp8_e5m2_tensor", FP8_E5M2, "tensor", "fp32")
FP8_E5M2_ROW = ScaledFormat("fp8_e5m2_row", FP8_E5M2, "row", "fp32")
MXFP8 = ScaledFormat("mxfp8", FP8_E4M3, 32, "e8m0")
MXFP4 = ScaledFormat("mxfp4", FP4_E2M1, 32, "e8m0")
NVFP4 = ScaledFormat("nvfp4", FP4_E2M1, 16, "e4m3", global_scale=True)

SCALED_FORMATS: dict[str, ScaledFormat] = {
    f.name: f for f in (FP8_E4M3_TENSOR, FP8_E4M3_ROW, FP8_E5M2_TENSOR, FP8_E5M2_ROW, MXFP8, MXFP4, NVFP4)
}
#: The block-scaled 4-bit formats :class:`~qlab.nn.QuantLinear` stores (its ``mode`` names them).
BLOCK_SCALED_MODES: tuple[str, ...] = ("mxfp4", "nvfp4")


def get_scaled_format(name: str | ScaledFormat) -> ScaledFormat:
    """A format of :data:`SCALED_FORMATS` by name (instances pass through)."""
    if isinstance(name, ScaledFormat):
        return name
    if not isinstance(name, str) or name.lower() not in SCALED_FORMATS:
        raise ValueError(f"fmt must be one of {sorted(SCALED_FORMATS)}, got {name!r}")
    return SCALED_FORMATS[name.lower()]


def decode_scales(scale: Tensor, fmt: ScaledFormat, global_scale: Tensor | None = None) -> Tensor:
    """fp32 values of stored scales: e8m0 or e4m3 bytes decoded (fp32 scales as they are), times the
    global scale when there is one."""
    if fmt.scale == "e8m0":
        s = decode_e8m0(scale)
    elif fmt.scale == "e4m3":
        s = from_code(scale, FP8_E4M3)
    else:
        s = scale.float()
    return s if global_scale is None else s * global_scale.float()


# ---------------------------------------------------------------------------------------------------------
# The quantized tensor


@dataclass(eq=False)
class ScaledTensor(QuantizedTensor):
    """A :class:`~qlab.tensor.QuantizedTensor` of a :class:`ScaledFormat`: ``x ≈ element(q) * s[block]``.

    ``codes`` are element bit patterns (uint8), ``codebook`` the element value of each pattern, ``scale``
    the stored per-block scales (uint8 bytes for e8m0 / e4m3, fp32 otherwise) and ``global_scale`` the
    fp32 per-tensor scale (NVFP4). :meth:`scales` decodes them: ``s = decode(scale) * global_scale``.
    """

    fmt: ScaledFormat = MXFP4
    global_scale: Tensor | None = None

    def __post_init__(self) -> None:
        byte_scales = self.fmt.scale in ("e8m0", "e4m3")
        if byte_scales != (self.scale.dtype == torch.uint8):
            want = "uint8 bytes" if byte_scales else "a float tensor"
            raise ValueError(f"scale of a {self.fmt.name} tensor must be {want}, got {self.scale.dtype}")
        if self.fmt.global_scale != (self.global_scale is not None):
            need = "needs" if self.fmt.global_scale else "takes no"
            raise ValueError(f"{self.fmt.name} {need} a global_scale")

    def scales(self) -> Tensor:
        """The per-block scales in float32, global scale included."""
        return decode_scales(self.scale, self.fmt, self.global_scale)

    @property
    def nbytes(self) -> int:
        """Packed element codes + scale bytes (+ 4 for the fp32 global scale)."""
        extra = 0 if self.global_scale is None else 4
        return (
            math.ceil(self.numel() * self.bits / 8) + self.scale.numel() * self.scale.element_size() + extra
        )

    def pack(self) -> dict[str, Tensor]:
        """The stored bytes: ``codes`` packed along the last dim (two e2m1 codes per byte, the first in the
        low nibble), ``scale`` as uint8 (fp32 scales as their 4 bytes each), ``global_scale`` if any."""
        scale = (
            self.scale
            if self.scale.dtype == torch.uint8
            else self.scale.float().contiguous().view(torch.uint8)
        )
        out = {"codes": pack(self.codes.contiguous(), self.bits), "scale": scale}
        if self.global_scale is not None:
            out["global_scale"] = self.global_scale.float().reshape(1)
        return out

    @classmethod
    def unpack(
        cls, packed: dict[str, Tensor], fmt: ScaledFormat | str, shape: tuple[int, ...] | torch.Size
    ) -> ScaledTensor:
        """Inverse of :meth:`pack` for a tensor of ``shape``."""
        fmt = get_scaled_format(fmt)
        shape = torch.Size(shape)
        spec = fmt.spec(shape)
        codes = unpack(packed["codes"], spec.bits, shape[-1]).reshape(shape)
        scale = packed["scale"]
        scale_shape = BlockView(tuple(shape), spec.block_size(shape)).scales
        if fmt.scale == "fp32":
            scale = scale.contiguous().view(torch.float32)
        scale = scale.reshape(scale_shape)
        if fmt.global_scale and "global_scale" not in packed:
            raise ValueError(f"packed has no 'global_scale', which {fmt.name} needs")
        g = packed["global_scale"].float().reshape(()) if fmt.global_scale else None
        return cls(codes, scale, None, spec, shape, codebook=fmt.table(), fmt=fmt, global_scale=g)

    def to(self, device: torch.device | str) -> ScaledTensor:
        moved = super().to(device)
        g = None if self.global_scale is None else self.global_scale.to(device)
        return replace(moved, global_scale=g)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        bpw = self.bits_per_weight
        return f"ScaledTensor({self.fmt.name}, shape={tuple(self.shape)}, bits_per_weight={bpw:.3f})"


# ---------------------------------------------------------------------------------------------------------
# Quantization


def _positive_scale(t: Tensor | float, name: str) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32)
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(f"{name} must be positive and finite, got {t.flatten()[:4].tolist()}")
    return t


def _codes_on_grid(r: Tensor, elem: FloatFormat) -> Tensor:
    """Bit patterns of values ``r`` already on ``elem``'s grid: the positive codes count up in value, so
    a search among them finds the magnitude's code, and the sign bit goes on top (as :func:`bits_of`
    would give, without rounding again)."""
    top = 2 ** (elem.bits - 1)
    pos = from_code(torch.arange(top), elem)
    pos = pos[torch.isfinite(pos)]
    idx = torch.searchsorted(pos, r.abs().float().contiguous())
    return (idx | (torch.signbit(r).to(torch.int64) * top)).to(torch.uint8)


def quantize_scaled(
    x: Tensor,
    fmt: ScaledFormat | str = MXFP4,
    *,
    scale: Tensor | float | None = None,
    global_scale: Tensor | float | None = None,
) -> ScaledTensor:
    """Quantize ``x`` to the scaled float format ``fmt`` (see the module docstring for each rule).

    ``scale``: fp32-scale formats only: a *static* scale (a number, or one per block, e.g. from
    calibration) instead of the *dynamic* ``amax / element.max`` of ``x``. ``global_scale``: NVFP4 only: a
    static per-tensor scale instead of ``amax / (6 * 448)``. Element conversion rounds to nearest, ties to
    even, and saturates at ``±element.max``. Scales and quotients are computed in fp32, as the recipes
    (and torch's casts in the tests) compute them: ``x`` is read as fp32.
    """
    fmt = get_scaled_format(fmt)
    check_float_tensor(x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dim (blocks run along the last dim)")
    if scale is not None and fmt.scale != "fp32":
        raise ValueError(
            f"scale= (a static scale) applies to fp32-scaled formats; {fmt.name}'s rule fixes it"
        )
    if global_scale is not None and not fmt.global_scale:
        raise ValueError(f"global_scale= applies to formats with a per-tensor scale (nvfp4), not {fmt.name}")
    spec = fmt.spec(x.shape)
    bv = BlockView(tuple(x.shape), spec.block_size(x.shape))
    # fp32 arithmetic throughout, as the recipes compute it (a float64 quotient can round a tie the other way)
    xb = bv.of(x.detach().float())
    amax = bv.reduce(xb.abs(), "max")  # canonical per-block shape
    elem = fmt.element
    g: Tensor | None = None
    if fmt.scale == "fp32":
        if scale is None:
            s = amax / elem.max
            s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero block: any scale, codes 0
        else:
            given = _positive_scale(scale, "scale")
            if given.numel() not in (1, amax.numel()):
                raise ValueError(
                    f"scale must be one number or one per block ({amax.numel()} for shape "
                    f"{tuple(x.shape)}), got {given.numel()} values"
                )
            s = given.reshape(-1).expand(amax.numel()).reshape(amax.shape).clone()
        stored, value = s, s
    elif fmt.scale == "e8m0":
        exp = torch.where(amax > 0, floor_log2(amax.clamp(min=1e-300)) - elem.emax, -E8M0_BIAS)
        exp = exp.clamp(-E8M0_BIAS, E8M0_BIAS)
        stored = encode_e8m0(exp)
        value = _pow2(exp).float()
    else:  # e4m3 block scales under an fp32 global scale (NVFP4)
        if global_scale is None:
            g = amax.max() / (elem.max * FP8_E4M3.max)
            g = torch.where(g > 0, g, torch.ones_like(g))
        else:
            g = _positive_scale(global_scale, "global_scale").reshape(())
        sb = round_to(amax / (elem.max * g), FP8_E4M3)  # saturates at 448
        stored = bits_of(sb, FP8_E4M3).code.to(torch.uint8)
        value = sb * g  # the fp32 product the decoder forms
    per_block = bv.per_block(value)
    safe = torch.where(per_block > 0, per_block, torch.ones_like(per_block))
    r = round_to(torch.where(per_block > 0, xb / safe, torch.zeros_like(xb)), elem, saturate=True)
    codes = _codes_on_grid(r.reshape(x.shape), elem)
    return ScaledTensor(
        codes=codes,
        scale=stored,
        zero=None,
        spec=spec,
        shape=x.shape,
        dtype=x.dtype,
        codebook=fmt.table(),
        fmt=fmt,
        global_scale=g,
    )


def quantize_mxfp4(x: Tensor) -> ScaledTensor:
    """MXFP4: e2m1 elements, one e8m0 scale ``2^(floor(log2 amax) - 2)`` per 32 elements of the last dim."""
    return quantize_scaled(x, MXFP4)


def quantize_nvfp4(x: Tensor, global_scale: Tensor | float | None = None) -> ScaledTensor:
    """NVFP4: e2m1 elements, an e4m3 scale per 16, times an fp32 per-tensor scale ``amax / (6 * 448)``."""
    return quantize_scaled(x, NVFP4, global_scale=global_scale)


def quantize_fp8(
    x: Tensor,
    granularity: Literal["tensor", "row"] = "row",
    *,
    element: Literal["e4m3", "e5m2"] = "e4m3",
    scale: Tensor | float | None = None,
) -> ScaledTensor:
    """Scaled fp8: ``x ≈ s * fp8(x / s)`` with one fp32 scale per tensor or per row (last dim).

    Dynamic (``scale=None``): ``s = amax / fp8.max`` of ``x`` itself. Static: the given ``scale`` (e.g.
    from calibration); values beyond ``s * fp8.max`` saturate.
    """
    if granularity not in ("tensor", "row") or element not in ("e4m3", "e5m2"):
        raise ValueError(
            "granularity must be 'tensor' or 'row' and element 'e4m3' or 'e5m2', "
            f"got {granularity!r}, {element!r}"
        )
    return quantize_scaled(x, f"fp8_{element}_{granularity}", scale=scale)
