"""Number formats as data: :class:`FloatFormat` and :class:`IntFormat`, and the named registry.

A binary float format with ``E`` exponent bits, ``M`` mantissa bits and exponent bias ``b`` stores a sign bit
``s``, an exponent field ``e`` and a mantissa field ``m``.  Its value is::

    normal     (0 < e):  value = (-1)^s * 2^(e - b) * (1 + m / 2^M)
    subnormal  (e == 0): value = (-1)^s * 2^(1 - b) * (0 + m / 2^M)

Formats differ in what the all-ones exponent means:

* IEEE-like (fp32, fp16, bf16, fp8 e5m2): ``e == 2^E - 1`` holds inf (``m == 0``) and NaN (``m != 0``).
* "fn" (finite + NaN, fp8 e4m3fn): only ``S.1111.111`` is NaN; every other code is a finite number, so the
  range reaches 448 instead of 240.  There is no inf.
* finite-only (fp6 e3m2 / e2m3, fp4 e2m1 from the OCP MX spec): every code is a number.

qlab's lowest layer: it imports only torch and the standard library. :mod:`qlab.formats` re-exports all of
it and adds rounding, bit fields, downcast error and memory accounting.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

# Widest grid we enumerate: 2^8 codes is a picture; 2^16 is a data set.
_MAX_GRID_BITS = 8


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, ``exponent_bits`` E, ``mantissa_bits`` M, ``bias`` b.

    ``value = (-1)^s * 2^(e - b) * (1 + m / 2^M)`` for normal codes (``e > 0``) and
    ``value = (-1)^s * 2^(1 - b) * (m / 2^M)`` for subnormal codes (``e == 0``).

    ``has_inf``: the all-ones exponent is reserved (inf when ``m == 0``, NaN otherwise), as in IEEE 754.
    ``has_nan`` without ``has_inf``: only the all-ones code (exponent and mantissa) is NaN ("fn" formats).
    Neither: every code is finite.
    ``saturate``: the default overflow rule of :func:`round_to`: clamp to +-max (True) or go to inf / NaN.

    Every format must fit inside float32, because :func:`round_to` returns float32 tensors.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    has_inf: bool = True
    has_nan: bool = True
    saturate: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.exponent_bits <= 8:
            raise ValueError(f"exponent_bits must be in 1..8 (to fit float32), got {self.exponent_bits}")
        if not 0 <= self.mantissa_bits <= 23:
            raise ValueError(f"mantissa_bits must be in 0..23 (to fit float32), got {self.mantissa_bits}")
        if self.has_inf and not self.has_nan:
            raise ValueError("has_inf=True needs has_nan=True: an IEEE all-ones exponent holds both")
        if self.has_inf and self.exponent_bits < 2:
            raise ValueError("has_inf=True needs exponent_bits >= 2, or no normal numbers are left")
        if self.has_nan and self.mantissa_bits < 1:
            raise ValueError("has_nan=True needs mantissa_bits >= 1 to tell NaN from numbers")
        if not self.saturate and not (self.has_inf or self.has_nan):
            raise ValueError(f"{self.name} has no inf or NaN code, so it must saturate (saturate=True)")
        if self.emax > 127 or self.emin - self.mantissa_bits < -149:
            raise ValueError(
                f"{self.name} (bias {self.bias}) does not fit inside float32: its exponents run "
                f"{self.emin - self.mantissa_bits}..{self.emax}, float32 holds -149..127"
            )

    @property
    def bits(self) -> int:
        """Total width: 1 + E + M."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade: 1 - bias."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite binade (IEEE formats lose the all-ones exponent to inf/NaN)."""
        top_field = 2**self.exponent_bits - (2 if self.has_inf else 1)
        return top_field - self.bias

    @property
    def max(self) -> float:
        """Largest finite value ``2^emax * (1 + m_max / 2^M)``; "fn" formats give ``m = 2^M - 1`` to NaN."""
        m_max = 2**self.mantissa_bits - (2 if self.has_nan and not self.has_inf else 1)
        return math.ldexp(1 + m_max / 2**self.mantissa_bits, self.emax)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value: ``2^(1 - bias)``."""
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value: ``2^(1 - bias - M)`` (the spacing of the subnormals)."""
        return math.ldexp(1.0, self.emin - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Machine epsilon ``2^-M``: the gap from 1 to the next value. Rounding a normal value has relative
        error at most ``eps / 2``."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @property
    def overflow(self) -> str:
        """What :func:`round_to` does past the range by default: ``"inf"``, ``"nan"`` or ``"saturate"``."""
        if self.saturate:
            return "saturate"
        return "inf" if self.has_inf else "nan"

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype with exactly this encoding, or None where torch has none (fp6, fp4: torch's
        ``float4_e2m1fn_x2`` packs two values per byte and has no casts)."""
        key = (self.exponent_bits, self.mantissa_bits, self.bias, self.has_inf, self.has_nan)
        return _TORCH_FLOAT_DTYPES.get(key)

    def grid(self) -> Tensor:
        """All finite representable values, sorted ascending, as float32 (+0 and -0 count once).

        Only for formats of at most 8 bits: wider ones have too many codes to be worth listing.
        """
        if self.bits > _MAX_GRID_BITS:
            raise ValueError(
                f"grid() lists formats of at most {_MAX_GRID_BITS} bits; {self.name} has {self.bits} bits "
                f"({2**self.bits} codes). Use round_to() to snap values to it instead."
            )
        values = from_code(torch.arange(2**self.bits), self)
        # Adding +0.0 turns -0.0 into +0.0 so unique() keeps a single, positive zero.
        return torch.unique(values[torch.isfinite(values)] + 0.0)

    def describe(self) -> str:
        """One line for printing in a lesson."""
        return (
            f"{self.name}: 1 sign + {self.exponent_bits} exponent + {self.mantissa_bits} mantissa bits, "
            f"bias {self.bias}, max {self.max:g}, min normal {self.min_normal:g}, "
            f"min subnormal {self.min_subnormal:g}, eps {self.eps:g}, overflow -> {self.overflow}"
        )


@dataclass(frozen=True)
class IntFormat:
    """A ``bits``-wide integer format: two's complement when ``signed``, else unsigned.

    signed: ``[-2^(bits-1), 2^(bits-1) - 1]``; unsigned: ``[0, 2^bits - 1]``.
    """

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 1..8, got {self.bits!r}")

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"

    @property
    def min(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """torch.int8 / torch.uint8, else None: torch's sub-byte int dtypes have no arithmetic."""
        return {(8, True): torch.int8, (8, False): torch.uint8}.get((self.bits, self.signed))

    def grid(self) -> Tensor:
        """All representable values ``min..max`` as float32 (float so they plot beside float grids)."""
        return torch.arange(self.min, self.max + 1, dtype=torch.float32)

    def describe(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"{self.name}: {self.bits} bits, {kind}, [{self.min}, {self.max}]"


Format = FloatFormat | IntFormat

# ---------------------------------------------------------------------------------------------------------
# Registry

FP32 = FloatFormat("fp32", 8, 23, 127)
FP16 = FloatFormat("fp16", 5, 10, 15)
BF16 = FloatFormat("bf16", 8, 7, 127)
FP8_E4M3 = FloatFormat("fp8_e4m3", 4, 3, 7, has_inf=False, has_nan=True, saturate=True)
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, 15)
FP6_E3M2 = FloatFormat("fp6_e3m2", 3, 2, 3, has_inf=False, has_nan=False, saturate=True)
FP6_E2M3 = FloatFormat("fp6_e2m3", 2, 3, 1, has_inf=False, has_nan=False, saturate=True)
FP4_E2M1 = FloatFormat("fp4_e2m1", 2, 1, 1, has_inf=False, has_nan=False, saturate=True)

INT8 = IntFormat(8, signed=True)
UINT8 = IntFormat(8, signed=False)
INT4 = IntFormat(4, signed=True)
UINT4 = IntFormat(4, signed=False)
INT3 = IntFormat(3, signed=True)
UINT3 = IntFormat(3, signed=False)
INT2 = IntFormat(2, signed=True)
UINT2 = IntFormat(2, signed=False)

FLOAT_FORMATS: tuple[FloatFormat, ...] = (FP32, FP16, BF16, FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1)
INT_FORMATS: tuple[IntFormat, ...] = (INT8, UINT8, INT4, UINT4, INT3, UINT3, INT2, UINT2)
FORMATS: dict[str, Format] = {f.name: f for f in (*FLOAT_FORMATS, *INT_FORMATS)}

_TORCH_FLOAT_DTYPES: dict[tuple[int, int, int, bool, bool], torch.dtype] = {
    (8, 23, 127, True, True): torch.float32,
    (5, 10, 15, True, True): torch.float16,
    (8, 7, 127, True, True): torch.bfloat16,
    (4, 3, 7, False, True): torch.float8_e4m3fn,
    (5, 2, 15, True, True): torch.float8_e5m2,
}

_ALIASES: dict[str, Format] = {
    **{a: FP32 for a in ("fp32", "float32", "float", "f32", "single")},
    **{a: FP16 for a in ("fp16", "float16", "half", "f16")},
    **{a: BF16 for a in ("bf16", "bfloat16")},
    # Bare "fp8" means e4m3, the usual choice for weights and activations at inference.
    **{a: FP8_E4M3 for a in ("fp8", "fp8_e4m3", "fp8_e4m3fn", "e4m3", "e4m3fn", "float8_e4m3fn")},
    **{a: FP8_E5M2 for a in ("fp8_e5m2", "e5m2", "float8_e5m2")},
    **{a: FP6_E3M2 for a in ("fp6_e3m2", "e3m2")},
    **{a: FP6_E2M3 for a in ("fp6_e2m3", "e2m3")},
    **{a: FP4_E2M1 for a in ("fp4", "fp4_e2m1", "e2m1", "float4_e2m1", "float4_e2m1fn")},
}
_INT_NAME = re.compile(r"(u?)int([1-8])")


def get_format(name: str | Format | torch.dtype) -> Format:
    """Look a format up by name ("fp16", "bfloat16", "e4m3", "fp4", "int4", "uint8", ...) or torch dtype.

    Case, spaces and ``-`` vs ``_`` do not matter; ``int1``..``int8`` and ``uint1``..``uint8`` all parse.
    Format instances pass through unchanged.
    """
    if isinstance(name, (FloatFormat, IntFormat)):
        return name
    if isinstance(name, torch.dtype):
        for fmt in (*FLOAT_FORMATS, *INT_FORMATS):
            if fmt.torch_dtype == name:
                return fmt
        raise ValueError(f"no qlab format for torch dtype {name}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, a torch.dtype or a format, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_").removeprefix("torch.")
    if key in _ALIASES:
        return _ALIASES[key]
    if key in FORMATS:
        return FORMATS[key]
    match = _INT_NAME.fullmatch(key)
    if match:
        return IntFormat(int(match.group(2)), signed=not match.group(1))
    raise ValueError(
        f"unknown format name {name!r}; valid names: {', '.join(sorted(_ALIASES))}, int1..int8, uint1..uint8"
    )


# ---------------------------------------------------------------------------------------------------------
# Decoding: the value formula of the module docstring, applied to bit fields


def _pow2(k: Tensor) -> Tensor:
    """Exact float64 powers of two 2^k for integer tensors k in [-1022, 1023], built from the bit fields.

    Why not ``torch.ldexp`` / ``torch.pow``: those compute in the default dtype (float32), where 2^-149 is
    subnormal and 2^149 overflows.  Writing the float64 exponent field directly is exact by construction.
    """
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def _float_format(fmt: Format | str, arg: str = "fmt") -> FloatFormat:
    fmt = get_format(fmt)
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"{arg} must be a float format (sign/exponent/mantissa), got {fmt.name}")
    return fmt


def _as_int_tensor(v: Tensor | int, arg: str) -> Tensor:
    if isinstance(v, bool):
        return torch.tensor(int(v))
    if isinstance(v, int):
        return torch.tensor(v)
    if isinstance(v, Tensor) and (v.dtype == torch.bool or not (v.is_floating_point() or v.is_complex())):
        return v.to(torch.int64)
    raise TypeError(f"{arg} must be an int or an integer tensor, got {getattr(v, 'dtype', type(v).__name__)}")


def from_bits(
    sign: Tensor | int, exponent: Tensor | int, mantissa: Tensor | int, fmt: FloatFormat | str
) -> Tensor:
    """The value of the code with these fields, as float32 (fields broadcast against each other).

    ``(-1)^s * 2^(e - bias) * (1 + m / 2^M)`` when ``e > 0``, ``(-1)^s * 2^(1 - bias) * (m / 2^M)`` when
    ``e == 0``; the all-ones exponent gives inf/NaN in IEEE formats, and only all-ones e and m give NaN in
    "fn" formats.
    """
    fmt = _float_format(fmt)
    E, M = fmt.exponent_bits, fmt.mantissa_bits
    s, e, m = torch.broadcast_tensors(
        _as_int_tensor(sign, "sign"),
        _as_int_tensor(exponent, "exponent"),
        _as_int_tensor(mantissa, "mantissa"),
    )
    for arg, field, hi in (("sign", s, 1), ("exponent", e, 2**E - 1), ("mantissa", m, 2**M - 1)):
        if field.numel() and (field.min() < 0 or field.max() > hi):
            raise ValueError(
                f"{arg} must lie in 0..{hi} for {fmt.name}, got values in {field.min()}..{field.max()}"
            )
    fraction = m.to(torch.float64) / 2**M
    normal = _pow2(e - fmt.bias) * (1 + fraction)
    subnormal = _pow2(torch.full_like(e, fmt.emin)) * fraction
    magnitude = torch.where(e > 0, normal, subnormal)
    all_ones_e = e == 2**E - 1
    if fmt.has_inf:
        magnitude = torch.where(all_ones_e, torch.where(m == 0, math.inf, math.nan), magnitude)
    elif fmt.has_nan:
        magnitude = torch.where(all_ones_e & (m == 2**M - 1), math.nan, magnitude)
    return torch.where(s == 1, -magnitude, magnitude).to(torch.float32)


def from_code(code: Tensor | int, fmt: FloatFormat | str) -> Tensor:
    """The value of whole bit patterns ``s << (E + M) | e << M | m`` (e.g. an fp8 tensor viewed as uint8)."""
    fmt = _float_format(fmt)
    c = _as_int_tensor(code, "code")
    if c.numel() and (c.min() < 0 or c.max() >= 2**fmt.bits):
        raise ValueError(f"code must lie in 0..{2**fmt.bits - 1} for {fmt.name}")
    E, M = fmt.exponent_bits, fmt.mantissa_bits
    return from_bits(c >> (E + M), (c >> M) & (2**E - 1), c & (2**M - 1), fmt)
