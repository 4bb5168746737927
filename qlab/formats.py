"""Number formats as data: float and integer formats, their bit fields, grids and rounding.

This is qlab's lowest layer: it imports only torch and the standard library.

A binary float format with ``E`` exponent bits, ``M`` mantissa bits and exponent bias ``b`` stores a sign bit
``s``, an exponent field ``e`` and a mantissa field ``m``.  Its value is::

    normal     (0 < e):  value = (-1)^s * 2^(e - b) * (1 + m / 2^M)
    subnormal  (e == 0): value = (-1)^s * 2^(1 - b) * (0 + m / 2^M)

Formats differ in what the all-ones exponent means:

* IEEE-like (fp32, fp16, bf16, fp8 e5m2): ``e == 2^E - 1`` holds inf (``m == 0``) and NaN (``m != 0``).
* "fn" (finite + NaN, fp8 e4m3fn): only ``S.1111.111`` is NaN; every other code is a finite number, so the
  range reaches 448 instead of 240.  There is no inf.
* finite-only (fp6 e3m2 / e2m3, fp4 e2m1 from the OCP MX spec): every code is a number.

Rounding (:func:`round_to`) is round-to-nearest, ties-to-even, with subnormals, done in plain torch from the
exponent arithmetic.  It matches torch's own casts bit for bit for float32 inputs (see tests/test_formats.py).

Overflow rules (the ``saturate`` flag of a format, overridable per call):

* fp32, fp16, bf16, fp8 e5m2: overflow goes to +-inf (IEEE).  A value overflows when it rounds past ``max``:
  for fp16 anything ``>= 65520`` (the midpoint between 65504 and 2^16) becomes inf.
* fp8 e4m3fn: saturates to +-448, inf included, as torch (>= 2.6 or so) casts do.  With ``saturate=False``
  overflow gives NaN, like the OCP spec's non-saturating mode and older torch releases.
* fp6 and fp4 e2m1 have no inf or NaN code: they always saturate (+-6 for fp4), as the OCP MX spec's
  conversions do.  NaN inputs stay NaN in :func:`round_to` (the result is float32), but :func:`bits_of`
  refuses them because no code exists.

Memory is counted in decimal units: 1 KB = 1000 bytes, 1 MB = 10^6 bytes (what model cards and disk sizes
use); :func:`format_bytes` takes ``binary=True`` for KiB/MiB.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor, nn

__all__ = [
    "FloatFormat",
    "IntFormat",
    "Format",
    "BitFields",
    "DowncastError",
    "FP32",
    "FP16",
    "BF16",
    "FP8_E4M3",
    "FP8_E5M2",
    "FP6_E3M2",
    "FP6_E2M3",
    "FP4_E2M1",
    "INT8",
    "UINT8",
    "INT4",
    "UINT4",
    "INT3",
    "UINT3",
    "INT2",
    "UINT2",
    "FLOAT_FORMATS",
    "INT_FORMATS",
    "FORMATS",
    "get_format",
    "round_to",
    "bits_of",
    "from_bits",
    "from_code",
    "downcast_error",
    "tensor_bytes",
    "model_bytes",
    "format_bytes",
]

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
# Rounding


def _pow2(k: Tensor) -> Tensor:
    """Exact float64 powers of two 2^k for integer tensors k in [-1022, 1023], built from the bit fields.

    Why not ``torch.ldexp`` / ``torch.pow``: those compute in the default dtype (float32), where 2^-149 is
    subnormal and 2^149 overflows.  Writing the float64 exponent field directly is exact by construction.
    """
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def _as_float64(x: Tensor | float | int, arg: str = "x") -> Tensor:
    """Check x is real-valued float data and return it as float64 (exact for every float input dtype)."""
    if isinstance(x, bool):
        raise TypeError(f"{arg} must be a float tensor or a number, got bool")
    if isinstance(x, (int, float)):
        # Python floats are doubles: keep all their bits so they are rounded once, not twice.
        return torch.tensor(x, dtype=torch.float64)
    if not isinstance(x, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor or a Python number, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{arg} must be a floating-point tensor, got dtype {x.dtype}; convert integer codes with "
            f"{arg}.float() first if you mean their values"
        )
    return x.to(torch.float64)


def _resolve_saturate(fmt: FloatFormat, saturate: bool | None) -> bool:
    if saturate is None:
        return fmt.saturate
    if not saturate and not (fmt.has_inf or fmt.has_nan):
        raise ValueError(f"saturate=False needs an inf or NaN code to overflow into; {fmt.name} has neither")
    return bool(saturate)


def _round_float64(x: Tensor, fmt: FloatFormat, saturate: bool) -> Tensor:
    """Round float64 x to fmt; float64 result (exactly representable in fmt, or +-inf / NaN)."""
    M = fmt.mantissa_bits
    a = x.abs()
    finite = torch.isfinite(a)
    a = torch.where(finite, a, torch.zeros_like(a))  # keep inf/nan out of the arithmetic; patched below
    # frexp splits a = f * 2^E with f in [0.5, 1), so a lies in the binade [2^(E-1), 2^E).
    _, E = torch.frexp(a)
    # Below the smallest normal binade the spacing stops shrinking: that is what subnormals are.
    e = (E.to(torch.int64) - 1).clamp(min=fmt.emin)
    spacing = _pow2(e - M)  # distance between neighbouring values of fmt in this binade
    # a / spacing is exact (power-of-two scaling); torch.round rounds half to even.
    r = torch.round(a / spacing) * spacing
    too_big = r > fmt.max  # rounding up out of the top binade counts too
    if saturate:
        r = torch.where(too_big | ~finite, torch.full_like(r, fmt.max), r)
    else:
        special = math.inf if fmt.has_inf else math.nan
        r = torch.where(too_big | torch.isinf(x), torch.full_like(r, special), r)
    r = torch.where(torch.isnan(x), x, r)
    return torch.copysign(r, x)  # restores the sign, including -0.0 and values that rounded to zero


def round_to(x: Tensor | float, fmt: Format | str, *, saturate: bool | None = None) -> Tensor:
    """Round x to the nearest value of fmt (ties to even) and return it as float32 with x's shape.

    Float formats: the binade of ``|x|`` is ``[2^e, 2^(e+1))`` with ``e = max(floor(log2|x|), 1 - bias)``;
    the values there are spaced ``q = 2^(e - M)`` apart, so ``round_to(x) = round_half_even(x / q) * q``.
    Overflow follows ``saturate`` (default: the format's own rule, see the module docstring); NaN stays NaN.
    For float32 inputs this equals ``x.to(fmt.torch_dtype).float()`` bit for bit.  float64 inputs are rounded
    once, directly; torch's CPU casts from float64 to fp16/bf16/fp8 go through float32 first and so can
    differ in rare double-rounding cases.

    Int formats: ``clamp(round_half_even(x), min, max)``; NaN raises ValueError.
    """
    fmt = get_format(fmt)
    if isinstance(fmt, IntFormat):
        x64 = _as_float64(x)
        if torch.isnan(x64).any():
            raise ValueError(f"x contains NaN, which {fmt.name} cannot represent")
        return torch.round(x64).clamp(fmt.min, fmt.max).to(torch.float32)
    sat = _resolve_saturate(fmt, saturate)
    if isinstance(x, Tensor) and x.dtype == torch.float32 and fmt.torch_dtype == torch.float32 and not sat:
        # Already exact; copying also keeps signalling-NaN payloads that a float64 round trip would quiet.
        return x.clone()
    return _round_float64(_as_float64(x), fmt, sat).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Bit fields


@dataclass(frozen=True)
class BitFields:
    """Sign, exponent and mantissa fields (int64 tensors of one shape) of values in ``fmt``."""

    sign: Tensor
    exponent: Tensor
    mantissa: Tensor
    fmt: FloatFormat

    @property
    def code(self) -> Tensor:
        """The whole bit pattern as an integer: ``s << (E + M) | e << M | m``."""
        E, M = self.fmt.exponent_bits, self.fmt.mantissa_bits
        return (self.sign << (E + M)) | (self.exponent << M) | self.mantissa

    def value(self) -> Tensor:
        """Decode back to float32 (see :func:`from_bits`)."""
        return from_bits(self.sign, self.exponent, self.mantissa, self.fmt)

    def strings(self) -> list[str]:
        """``"s eeeee mmmmmmmmmm"`` per element, row-major (1.0 in fp16 is ``"0 01111 0000000000"``)."""
        E, M = self.fmt.exponent_bits, self.fmt.mantissa_bits
        s, e, m = (f.flatten().tolist() for f in (self.sign, self.exponent, self.mantissa))
        fields = zip(s, e, m, strict=True)
        return [f"{s} {e:0{E}b} {m:0{M}b}" if M else f"{s} {e:0{E}b}" for s, e, m in fields]

    def __str__(self) -> str:
        strings = self.strings()
        return strings[0] if len(strings) == 1 else "\n".join(strings)


def _float_format(fmt: Format | str, arg: str = "fmt") -> FloatFormat:
    fmt = get_format(fmt)
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"{arg} must be a float format (sign/exponent/mantissa), got {fmt.name}")
    return fmt


def bits_of(x: Tensor | float, fmt: FloatFormat | str, *, saturate: bool | None = None) -> BitFields:
    """The sign, exponent and mantissa fields of x AFTER rounding it into fmt (see :func:`round_to`).

    Inverse of the value formula: a normal value ``v`` has ``e = floor(log2|v|) + bias`` and
    ``m = (|v| / 2^(e - bias) - 1) * 2^M``; a subnormal one has ``e = 0`` and ``m = |v| / 2^(1 - bias - M)``.
    NaN gets the all-ones exponent and, in IEEE formats, the top bits of its payload (or the quiet bit);
    torch's own NaN payloads vary by dtype, so compare NaN codes by NaN-ness only.
    """
    fmt = _float_format(fmt)
    r = round_to(x, fmt, saturate=saturate)
    E, M = fmt.exponent_bits, fmt.mantissa_bits
    nan = torch.isnan(r)
    if not fmt.has_nan and nan.any():
        raise ValueError(f"x contains NaN, which {fmt.name} has no code for")
    inf = torch.isinf(r)
    a = torch.where(nan | inf, torch.zeros_like(r), r).abs().to(torch.float64)
    _, E_frexp = torch.frexp(a)
    e = E_frexp.to(torch.int64) - 1
    subnormal = a < fmt.min_normal  # zero included: exponent field 0, mantissa 0
    exponent = torch.where(subnormal, 0, e + fmt.bias)
    scaled = torch.where(subnormal, a / _pow2(torch.full_like(e, fmt.emin - M)), (a / _pow2(e) - 1) * 2**M)
    mantissa = scaled.to(torch.int64)  # exact: r is on the grid of fmt

    all_ones_e = 2**E - 1
    exponent = torch.where(nan | inf, all_ones_e, exponent)
    mantissa = torch.where(inf, 0, mantissa)
    if fmt.has_inf:
        payload = (r.view(torch.int32).to(torch.int64) >> (23 - M)) & (2**M - 1)
        quiet = torch.where(payload == 0, 1 << (M - 1), payload)
        mantissa = torch.where(nan, quiet, mantissa)
    else:
        mantissa = torch.where(nan, 2**M - 1, mantissa)
    sign = torch.signbit(r).to(torch.int64)
    return BitFields(sign, exponent, mantissa, fmt)


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


# ---------------------------------------------------------------------------------------------------------
# Error


@dataclass(frozen=True)
class DowncastError:
    """What rounding x into a format cost.

    Errors are over elements where both x and its rounded value are finite; relative errors also skip x == 0.
    ``overflow`` counts finite x beyond +-max; ``underflow`` counts nonzero finite x that became 0.
    """

    fmt: Format
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    overflow: int
    underflow: int
    numel: int

    def __str__(self) -> str:
        return (
            f"{self.fmt.name}: max abs error {self.max_abs:.3g}, mean abs error {self.mean_abs:.3g}, "
            f"max rel error {self.max_rel:.3g}, mean rel error {self.mean_rel:.3g}, "
            f"overflow {self.overflow}/{self.numel}, underflow {self.underflow}/{self.numel}"
        )


def downcast_error(x: Tensor, fmt: Format | str, *, saturate: bool | None = None) -> DowncastError:
    """Absolute and relative error of ``round_to(x, fmt)``, plus overflow / underflow counts.

    For normal values of a float format the relative error is at most ``fmt.eps / 2``.
    """
    fmt = get_format(fmt)
    x64 = _as_float64(x)
    kwargs = {"saturate": saturate} if isinstance(fmt, FloatFormat) else {}
    r = round_to(x64, fmt, **kwargs).to(torch.float64)
    x_finite = torch.isfinite(x64)
    both = x_finite & torch.isfinite(r)
    abs_err = (r - x64).abs()[both]
    nonzero = both & (x64 != 0)
    rel_err = (r - x64).abs()[nonzero] / x64.abs()[nonzero]

    def stat(t: Tensor, op: str) -> float:
        return float(getattr(t, op)()) if t.numel() else 0.0

    return DowncastError(
        fmt=fmt,
        max_abs=stat(abs_err, "max"),
        mean_abs=stat(abs_err, "mean"),
        max_rel=stat(rel_err, "max"),
        mean_rel=stat(rel_err, "mean"),
        overflow=int((x_finite & (x64.abs() > fmt.max)).sum()),
        underflow=int((x_finite & (x64 != 0) & (r == 0)).sum()),
        numel=x64.numel(),
    )


# ---------------------------------------------------------------------------------------------------------
# Memory


def _bits_per_element(fmt_or_bits: Format | str | torch.dtype | int | float) -> Fraction:
    if isinstance(fmt_or_bits, bool):
        raise TypeError("fmt_or_bits must be a format, a name, a torch.dtype or a number of bits, got bool")
    if isinstance(fmt_or_bits, (int, float)):
        if not fmt_or_bits > 0 or not math.isfinite(fmt_or_bits):
            raise ValueError(f"bits must be a positive finite number, got {fmt_or_bits}")
        return Fraction(fmt_or_bits)
    if isinstance(fmt_or_bits, torch.dtype):
        return Fraction(fmt_or_bits.itemsize * 8)
    return Fraction(get_format(fmt_or_bits).bits)


def tensor_bytes(t_or_numel: Tensor | int, fmt_or_bits: Format | str | torch.dtype | int | float) -> int:
    """Bytes to store ``numel`` elements at the given width, packed densely: ``ceil(numel * bits / 8)``.

    ``fmt_or_bits`` may be a format, a format name, a torch dtype or a bit count (fractional counts such as
    4.25 bits per weight are fine).  Scale and zero-point overhead is the quantizer's to add.
    """
    if isinstance(t_or_numel, Tensor):
        numel = t_or_numel.numel()
    elif isinstance(t_or_numel, int) and not isinstance(t_or_numel, bool) and t_or_numel >= 0:
        numel = t_or_numel
    else:
        raise TypeError(f"t_or_numel must be a tensor or a non-negative int, got {t_or_numel!r}")
    return math.ceil(numel * _bits_per_element(fmt_or_bits) / 8)


def _storage_key(t: Tensor) -> tuple[object, ...]:
    # Tied weights are usually the same Parameter, but two Parameters can also view one storage.
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def model_bytes(
    model: nn.Module,
    fmt: Format | str | torch.dtype | int | float | None = None,
    *,
    include_buffers: bool = False,
) -> int:
    """Bytes for the model's parameters stored in ``fmt`` (None: each tensor's own dtype).

    Shared or tied parameters (e.g. tied embeddings and LM head) count once.  Buffers (batch-norm statistics,
    rotary tables) count only with ``include_buffers=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors = list(model.parameters()) + (list(model.buffers()) if include_buffers else [])
    seen: set[tuple[object, ...]] = set()
    total = 0
    for t in tensors:
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(t.numel(), t.dtype if fmt is None else fmt)
    return total


def format_bytes(n: int | float, *, binary: bool = False) -> str:
    """Human-readable size with three significant digits: ``format_bytes(22_700_000) == "22.7 MB"``.

    Decimal by default (1 KB = 1000 B, as model cards and disk sizes count); ``binary=True`` uses
    1 KiB = 1024 B.
    """
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
        raise ValueError(f"n must be a finite, non-negative number of bytes, got {n!r}")
    base = 1024 if binary else 1000
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"] if binary else ["B", "KB", "MB", "GB", "TB", "PB"]
    value, unit = float(n), 0
    while unit < len(units) - 1 and _shown(value) >= base:  # 999.96 KB shows as "1.00 MB", not "1000 KB"
        value /= base
        unit += 1
    if unit == 0:
        return f"{n:g} B"
    text = f"{value:.0f}" if value >= 100 else f"{value:#.3g}"
    return f"{text} {units[unit]}"


def _shown(value: float) -> float:
    """The number format_bytes would print for value (three significant digits)."""
    return float(round(value)) if value >= 100 else float(f"{value:.3g}")
