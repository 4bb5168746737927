"""Number formats as data: float and integer formats, their bit fields, grids and rounding.

The format types and their registry live one layer down, in :mod:`qlab.format_types`; this module
re-exports them and adds what is computed with them. It imports only torch and the standard library.

A float format's value is ``(-1)^s * 2^(e - b) * (1 + m / 2^M)`` for a normal code (the fields, the
subnormals and what the all-ones exponent means are in :mod:`qlab.format_types`).

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
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor, nn

from qlab.format_types import (
    BF16,
    FLOAT_FORMATS,
    FORMATS,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    INT2,
    INT3,
    INT4,
    INT8,
    INT_FORMATS,
    UINT2,
    UINT3,
    UINT4,
    UINT8,
    FloatFormat,
    Format,
    IntFormat,
    _float_format,
    _pow2,
    from_bits,
    from_code,
    get_format,
)

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
    "describe_bits",
    "from_bits",
    "from_code",
    "downcast_error",
    "tensor_bytes",
    "model_bytes",
    "format_bytes",
]


# ---------------------------------------------------------------------------------------------------------
# Rounding


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
    #: The values that were rounded into ``fmt`` (float64), when known: :func:`bits_of` records them.
    source: Tensor | None = None

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

    # One value: the pattern as a bit string, what is stored, and what rounding cost.
    def _scalar(self) -> None:
        if self.sign.numel() != 1:
            raise ValueError(f"this property describes one value; these fields hold {self.sign.numel()}")

    @property
    def bits(self) -> str:
        """The whole pattern of one value as a string of 0/1, sign first (``"0011110000000000"``)."""
        self._scalar()
        return self.strings()[0].replace(" ", "")

    @property
    def stored(self) -> float:
        """The value the pattern holds: ``(-1)^s 2^(e - bias) (1 + m / 2^M)`` for a normal code."""
        self._scalar()
        return float(self.value())

    @property
    def abs_error(self) -> float:
        """``|stored - source|``; nan when either is not finite or the source is unknown."""
        self._scalar()
        if self.source is None:
            return math.nan
        src = float(self.source)
        if not (math.isfinite(src) and math.isfinite(self.stored)):
            return math.nan
        return abs(self.stored - src)

    @property
    def rel_error(self) -> float:
        """``abs_error / |source|``; nan when the source is 0 or the error is nan."""
        err = self.abs_error
        if math.isnan(err) or float(self.source) == 0:  # type: ignore[arg-type]
            return math.nan
        return err / abs(float(self.source))  # type: ignore[arg-type]


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
    one = not isinstance(x, Tensor) or x.numel() == 1  # a whole tensor's float64 copy is not worth keeping
    return BitFields(sign, exponent, mantissa, fmt, source=_as_float64(x) if one else None)


def describe_bits(value: float, fmt: Format | str) -> BitFields:
    """Round one Python number into the float format ``fmt`` (ties to even) and split its bit pattern:
    ``.bits``, ``.stored``, ``.abs_error``, ``.rel_error``, and the fields themselves."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"value must be a Python number, got {type(value).__name__}")
    f = get_format(fmt)
    if not isinstance(f, FloatFormat):
        raise ValueError(f"fmt must be a float format (sign/exponent/mantissa), got {f.name}")
    return bits_of(float(value), f)


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
