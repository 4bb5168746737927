"""qlab.formats against torch's own casts, bit for bit, plus the properties rounding must have."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qlab import formats as F
from qlab.formats import (
    BF16,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    INT2,
    INT4,
    INT8,
    UINT4,
    UINT8,
    FloatFormat,
    IntFormat,
)

TORCH_FORMATS = [FP16, BF16, FP8_E4M3, FP8_E5M2]
SMALL_FORMATS = [FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1]
ids = lambda fmt: fmt.name  # noqa: E731

# torch >= 2.6 or so saturates float8_e4m3fn casts (overflow and inf -> +-448); older releases gave NaN.
TORCH_E4M3_SATURATES = bool(torch.tensor([1e4]).to(torch.float8_e4m3fn).float().item() == 448.0)


def torch_saturate(fmt: FloatFormat) -> bool | None:
    return TORCH_E4M3_SATURATES if fmt is FP8_E4M3 else None


def torch_round(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    return x.to(fmt.torch_dtype).float()


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal as float32 bit patterns, except that any NaN matches any NaN (payloads differ by dtype)."""
    assert actual.dtype == expected.dtype == torch.float32
    assert actual.shape == expected.shape
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    a, e = actual.view(torch.int32)[~nan_a], expected.view(torch.int32)[~nan_e]
    bad = (a != e).nonzero().flatten()
    if bad.numel():
        i = bad[:5]
        raise AssertionError(f"{bad.numel()} values differ, e.g. got {a[i].view(torch.float32).tolist()} ...")


def float32_from_fields(sign: torch.Tensor, exponent: torch.Tensor, mantissa: torch.Tensor) -> torch.Tensor:
    bits = (sign << 31) | (exponent << 23) | mantissa
    return bits.to(torch.int32).view(torch.float32)  # int64 -> int32 wraps the sign bit as intended


def boundary_floats(fmt: FloatFormat, max_tops: int = 128) -> torch.Tensor:
    """float32 values where rounding into fmt can go wrong: every kind of tie, the values one float32 ulp
    either side, subnormals of both formats, the overflow threshold, +-0, +-inf and NaN.

    Per float32 binade, the mantissa bits down to fmt's rounding bit ("tops") are enumerated, and the bits
    below take patterns that make the value exact, a tie, or just above / below one.  Binades around fmt's
    subnormals and its overflow get every top; other binades (whose rounding is alike) a fixed sample.
    """
    keep = fmt.mantissa_bits + 1
    low_bits = 23 - keep
    lows = torch.tensor([0, 1, (1 << low_bits) - 1, 1 << (low_bits - 1), 0x5A5A5A5A & ((1 << low_bits) - 1)])
    all_tops = torch.arange(2**keep)
    g = torch.Generator().manual_seed(0)
    some_tops = all_tops[torch.randperm(2**keep, generator=g)[:max_tops]]
    some_tops = torch.cat([all_tops[:4], all_tops[-4:], some_tops])
    lo, hi = fmt.emin - fmt.mantissa_bits - 2, fmt.emax + 2  # unbiased float32 exponents that matter
    parts = []
    for e in sorted({*range(max(lo + 127, 0), min(hi + 127, 255) + 1), 0, 1, 254, 255}):
        full = e in (0, 255) or e - 127 <= fmt.emin or e - 127 >= fmt.emax
        tops = all_tops if full else some_tops
        s, top, low = torch.meshgrid(torch.arange(2), tops, lows, indexing="ij")
        parts.append(
            float32_from_fields(
                s.flatten(), torch.full_like(s.flatten(), e), (top.flatten() << low_bits) | low.flatten()
            )
        )
    return torch.cat(parts)


SPECIALS = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 3.4e38, -3.4e38, 1e-45, -1e-45])


# ----------------------------------------------------------------------------------------------------------
# Format facts


@pytest.mark.parametrize("fmt", [FP32, *TORCH_FORMATS], ids=ids)
def test_constants_match_torch_finfo(fmt: FloatFormat) -> None:
    info = torch.finfo(fmt.torch_dtype)
    assert fmt.bits == info.bits
    assert fmt.max == info.max
    assert fmt.min_normal == info.smallest_normal
    assert fmt.eps == info.eps
    assert fmt.min_subnormal == math.ldexp(1.0, fmt.emin - fmt.mantissa_bits)


def test_known_constants() -> None:
    assert (FP8_E4M3.max, FP8_E5M2.max, FP4_E2M1.max, FP16.max) == (448.0, 57344.0, 6.0, 65504.0)
    assert (FP6_E3M2.max, FP6_E2M3.max) == (28.0, 7.5)
    assert FP16.min_subnormal == 2.0**-24 and BF16.min_subnormal == 2.0**-133
    assert FP4_E2M1.min_subnormal == 0.5 and FP4_E2M1.eps == 0.5
    assert FP4_E2M1.torch_dtype is None and FP32.torch_dtype is torch.float32
    assert (FP16.overflow, FP8_E4M3.overflow, FP4_E2M1.overflow) == ("inf", "saturate", "saturate")
    assert "max 448" in FP8_E4M3.describe()


@pytest.mark.parametrize(
    ("fmt", "count"),
    # e4m3: 256 codes - 2 NaN = 254, and +-0 are one value. e5m2: 256 - 2 inf - 6 NaN = 248 -> 247.
    # fp6/fp4: every code is a number: 64 -> 63 and 16 -> 15.
    [(FP8_E4M3, 253), (FP8_E5M2, 247), (FP6_E3M2, 63), (FP6_E2M3, 63), (FP4_E2M1, 15)],
    ids=["e4m3", "e5m2", "e3m2", "e2m3", "e2m1"],
)
def test_grid_counts(fmt: FloatFormat, count: int) -> None:
    grid = fmt.grid()
    assert grid.dtype == torch.float32 and grid.numel() == count
    assert torch.all(grid[1:] > grid[:-1])
    assert grid.max().item() == fmt.max and grid.min().item() == -fmt.max
    assert not torch.signbit(grid[grid == 0]).any()


def test_fp4_grid_values() -> None:
    pos = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert FP4_E2M1.grid().tolist() == [-v for v in reversed(pos[1:])] + pos


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_grid_matches_torch(dtype: torch.dtype) -> None:
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    expected = torch.unique(values[torch.isfinite(values)] + 0.0)
    assert torch.equal(F.get_format(dtype).grid(), expected)


def test_grid_refuses_wide_formats() -> None:
    with pytest.raises(ValueError, match="at most 8 bits.*fp16"):
        FP16.grid()


def test_int_formats() -> None:
    assert (INT8.min, INT8.max, UINT8.min, UINT8.max) == (-128, 127, 0, 255)
    assert (INT4.min, INT4.max, UINT4.max, INT2.min, INT2.max) == (-8, 7, 15, -2, 1)
    assert INT4.grid().tolist() == list(range(-8, 8))
    assert UINT4.grid().numel() == 16 and INT8.torch_dtype is torch.int8 and INT4.torch_dtype is None
    assert IntFormat(1, signed=True).grid().tolist() == [-1.0, 0.0]
    for bad in (0, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            IntFormat(bad)  # type: ignore[arg-type]


def test_format_validation() -> None:
    with pytest.raises(ValueError, match="float32"):
        FloatFormat("fp64ish", 8, 23, 200)
    with pytest.raises(ValueError, match="saturate"):
        FloatFormat("e2m1_nosat", 2, 1, 1, has_inf=False, has_nan=False)
    with pytest.raises(ValueError, match="has_nan"):
        FloatFormat("weird", 4, 3, 7, has_inf=True, has_nan=False)


# ----------------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("fp32", FP32),
        ("float32", FP32),
        ("float16", FP16),
        ("half", FP16),
        ("BF16", BF16),
        ("bfloat16", BF16),
        ("fp8_e4m3", FP8_E4M3),
        ("e4m3", FP8_E4M3),
        ("fp8-e4m3fn", FP8_E4M3),
        ("fp8", FP8_E4M3),
        ("fp8_e5m2", FP8_E5M2),
        ("e5m2", FP8_E5M2),
        ("fp4", FP4_E2M1),
        ("e2m1", FP4_E2M1),
        ("fp6_e3m2", FP6_E3M2),
        ("int8", INT8),
        ("uint4", UINT4),
        ("int2", INT2),
        ("uint3", IntFormat(3, signed=False)),
        (torch.bfloat16, BF16),
        (torch.float8_e5m2, FP8_E5M2),
        (torch.uint8, UINT8),
        (FP16, FP16),
    ],
)
def test_get_format(name: object, fmt: object) -> None:
    assert F.get_format(name) == fmt  # type: ignore[arg-type]


def test_registry_names_round_trip() -> None:
    for name, fmt in F.FORMATS.items():
        assert F.get_format(name) is fmt and fmt.name == name


def test_get_format_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown format name 'fp12'.*bf16.*fp4.*int1\.\.int8"):
        F.get_format("fp12")
    with pytest.raises(ValueError, match="int9|unknown"):
        F.get_format("int9")
    with pytest.raises(ValueError, match="torch dtype"):
        F.get_format(torch.complex64)
    with pytest.raises(TypeError, match="name must be"):
        F.get_format(16)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# round_to against torch, bit for bit


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=ids)
def test_round_to_matches_torch_on_boundaries(fmt: FloatFormat) -> None:
    x = torch.cat([boundary_floats(fmt), SPECIALS])
    assert_same_bits(F.round_to(x, fmt, saturate=torch_saturate(fmt)), torch_round(x, fmt))


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=ids)
def test_round_to_matches_torch_on_grid_midpoints(fmt: FloatFormat) -> None:
    # Representable values of the format, the exact midpoints between neighbours, and one float32 step
    # either side of each midpoint.  16-bit formats: the 256 values at each end of both signs' ranges
    # (subnormals, overflow) and a sample of 4096 in between.
    codes = torch.arange(2**fmt.bits)
    grid = torch.unique(F.from_code(codes, fmt)).double()
    grid = grid[torch.isfinite(grid)]
    if grid.numel() > 8192:
        g = torch.Generator().manual_seed(0)
        sample = torch.randperm(grid.numel(), generator=g)[:4096]
        zero = int(torch.searchsorted(grid, torch.tensor(0.0, dtype=torch.float64)))
        ends = torch.cat(
            [torch.arange(256), torch.arange(-256, 0) + grid.numel(), torch.arange(-256, 256) + zero]
        )
        grid = grid[torch.unique(torch.cat([sample, ends]))]
    mids = ((grid[1:] + grid[:-1]) / 2).float()
    x = torch.cat([grid.float(), mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    assert_same_bits(F.round_to(x, fmt, saturate=torch_saturate(fmt)), torch_round(x, fmt))


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=ids)
@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(width=32), min_size=1, max_size=50))
def test_round_to_matches_torch_hypothesis(fmt: FloatFormat, values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    assert_same_bits(F.round_to(x, fmt, saturate=torch_saturate(fmt)), torch_round(x, fmt))


@pytest.mark.parametrize("fmt", TORCH_FORMATS, ids=ids)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_round_to_matches_torch_in_range(fmt: FloatFormat, data: st.DataObject) -> None:
    lim = float(torch.tensor(min(2 * fmt.max, 3e38)).float())
    values = data.draw(st.lists(st.floats(-lim, lim, width=32), min_size=1, max_size=50))
    x = torch.tensor(values, dtype=torch.float32) * torch.tensor(
        fmt.min_normal if data.draw(st.booleans()) else 1
    )
    assert_same_bits(F.round_to(x, fmt, saturate=torch_saturate(fmt)), torch_round(x, fmt))


@pytest.mark.parametrize("src", [torch.float16, torch.bfloat16])
def test_round_to_from_half_inputs(src: torch.dtype) -> None:
    x = torch.arange(-32768, 32768, dtype=torch.int16).view(src)
    for fmt in (FP8_E4M3, FP8_E5M2):
        expected = x.to(fmt.torch_dtype).float()
        assert_same_bits(F.round_to(x, fmt, saturate=torch_saturate(fmt)), expected)


def test_fp32_is_identity() -> None:
    x = torch.cat([boundary_floats(BF16), SPECIALS, torch.randn(1000)])
    y = F.round_to(x, FP32)
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))  # NaN payloads too
    assert F.round_to(SPECIALS, FP32, saturate=True)[2:4].tolist() == [FP32.max, -FP32.max]


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(width=64), min_size=1, max_size=50))
def test_fp32_rounds_float64_like_torch(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    assert_same_bits(F.round_to(x, FP32), x.float())


def test_float64_subnormal_and_overflow_to_fp32() -> None:
    x = torch.tensor([2.0**-150, 2.0**-150 * 1.0000001, 3.4028235677973366e38 * 1.00000001, 1e300, -1e-300])
    assert_same_bits(F.round_to(x, FP32), x.float())


def test_round_to_float64_rounds_once() -> None:
    # Just above the fp16 tie between 1 and 1 + 2^-10: the right answer is up, while a float32 detour lands
    # exactly on the tie and goes to even (down).
    x = 1 + 2.0**-11 + 2.0**-40
    assert F.round_to(x, FP16).item() == 1 + 2.0**-10


def test_python_scalars_and_shapes() -> None:
    assert F.round_to(1 / 3, FP16).item() == torch.tensor(1 / 3).half().item()
    assert F.round_to(3, "fp4").item() == 3.0
    x = torch.randn(2, 3, 4)
    assert F.round_to(x, BF16).shape == (2, 3, 4)
    assert F.round_to(torch.empty(0), FP16).numel() == 0


# ----------------------------------------------------------------------------------------------------------
# Overflow and the saturation rules


def test_overflow_thresholds() -> None:
    x = torch.tensor([65504.0, 65519.99, 65520.0, 1e6, math.inf])
    assert F.round_to(x, FP16).tolist() == [65504.0, 65504.0, math.inf, math.inf, math.inf]
    assert F.round_to(x, FP16, saturate=True).tolist() == [65504.0] * 5
    x = torch.tensor([448.0, 464.0, 464.01, 1e6, math.inf, -math.inf])
    assert F.round_to(x, FP8_E4M3).tolist() == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0]
    e4m3_nan = F.round_to(x, FP8_E4M3, saturate=False)
    assert e4m3_nan[:2].tolist() == [448.0, 448.0] and torch.isnan(e4m3_nan[2:]).all()
    assert F.round_to(torch.tensor([61439.0, 61440.0]), FP8_E5M2).tolist() == [57344.0, math.inf]


def test_fp4_saturates() -> None:
    x = torch.tensor([4.9, 5.0, 5.1, 7.0, 100.0, math.inf, -math.inf, -7.0, math.nan])
    y = F.round_to(x, FP4_E2M1)
    assert y[:-1].tolist() == [4.0, 4.0, 6.0, 6.0, 6.0, 6.0, -6.0, -6.0]
    assert torch.isnan(y[-1])
    with pytest.raises(ValueError, match="saturate=False.*fp4_e2m1"):
        F.round_to(x, FP4_E2M1, saturate=False)


def test_signed_zero_and_underflow() -> None:
    x = torch.tensor([-0.0, 0.0, -1e-30, 1e-30, -(2.0**-25), 2.0**-25 * 1.0001])
    y = F.round_to(x, FP16)
    assert torch.equal(torch.signbit(y), torch.tensor([True, False, True, False, True, False]))
    assert y.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 2.0**-24]


# ----------------------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("fmt", [FP16, BF16, *SMALL_FORMATS], ids=ids)
@settings(max_examples=20, deadline=None)
@given(values=st.lists(st.floats(-1e5, 1e5, width=32), min_size=2, max_size=60))
def test_idempotent_and_monotone(fmt: FloatFormat, values: list[float]) -> None:
    x = torch.tensor(sorted(values), dtype=torch.float32)
    y = F.round_to(x, fmt)
    assert_same_bits(F.round_to(y, fmt), y)
    finite = y[torch.isfinite(y)]
    assert torch.all(finite[1:] >= finite[:-1])


@pytest.mark.parametrize("fmt", SMALL_FORMATS, ids=ids)
def test_rounds_to_nearest_grid_value(fmt: FloatFormat) -> None:
    grid = fmt.grid().double()
    x = torch.linspace(-fmt.max * 1.2, fmt.max * 1.2, 20001, dtype=torch.float64).float()
    y = F.round_to(x, fmt).double()
    in_range = x.abs() <= fmt.max
    assert torch.isin(y[torch.isfinite(y)], grid).all()
    nearest = (x.double()[:, None] - grid[None, :]).abs().min(dim=1).values
    assert torch.equal((y - x.double()).abs()[in_range], nearest[in_range])


@pytest.mark.parametrize("fmt", [FP16, BF16, FP8_E4M3, FP8_E5M2, FP4_E2M1], ids=ids)
def test_relative_error_bound(fmt: FloatFormat) -> None:
    torch.manual_seed(0)
    x = torch.exp(torch.empty(5000).uniform_(math.log(fmt.min_normal), math.log(fmt.max)))
    err = F.downcast_error(x, fmt)
    assert 0 < err.max_rel <= fmt.eps / 2 and err.overflow == 0 and err.underflow == 0
    assert err.numel == 5000 and fmt.name in str(err)


def test_downcast_error_counts() -> None:
    x = torch.tensor([1e-9, 0.0, 1.0, 70000.0, -1e5, math.inf])
    err = F.downcast_error(x, FP16)
    assert (err.overflow, err.underflow) == (2, 1)
    assert (
        err.max_abs == torch.tensor(1e-9).item() and err.max_rel == 1.0
    )  # the underflowed value lost all of itself
    int_err = F.downcast_error(torch.tensor([0.4, 1.0, 200.0]), INT8)
    assert int_err.overflow == 1 and int_err.underflow == 1 and math.isclose(int_err.max_abs, 73.0)


# ----------------------------------------------------------------------------------------------------------
# Bit fields


def _torch_codes(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    y = x.to(fmt.torch_dtype)
    view = {8: torch.uint8, 16: torch.int16, 32: torch.int32}[fmt.bits]
    return y.view(view).to(torch.int64) & (2**fmt.bits - 1)


@pytest.mark.parametrize("fmt", [FP32, *TORCH_FORMATS], ids=ids)
def test_bits_of_matches_torch_codes(fmt: FloatFormat) -> None:
    x = torch.cat([boundary_floats(FP8_E4M3 if fmt is FP32 else fmt), SPECIALS])
    fields = F.bits_of(x, fmt, saturate=torch_saturate(fmt))
    nan = torch.isnan(torch_round(x, fmt))
    assert torch.equal(fields.code[~nan], _torch_codes(x, fmt)[~nan])
    assert torch.isnan(F.from_code(fields.code[nan], fmt)).all()
    assert torch.equal(fields.sign, torch.signbit(x).long()) or fmt is not FP32


@pytest.mark.parametrize("fmt", [FP16, BF16], ids=ids)
def test_from_code_all_16_bit_codes(fmt: FloatFormat) -> None:
    codes = torch.arange(-32768, 32768, dtype=torch.int16)
    expected = codes.view(fmt.torch_dtype).float()
    unsigned = codes.to(torch.int64) & 0xFFFF
    decoded = F.from_code(unsigned, fmt)
    assert_same_bits(decoded, expected)
    finite = ~torch.isnan(decoded)
    assert torch.equal(F.bits_of(decoded[finite], fmt).code, unsigned[finite])


@pytest.mark.parametrize("fmt", SMALL_FORMATS, ids=ids)
def test_from_code_all_small_codes(fmt: FloatFormat) -> None:
    codes = torch.arange(2**fmt.bits)
    decoded = F.from_code(codes, fmt)
    if fmt.torch_dtype is not None:
        assert_same_bits(decoded, codes.to(torch.uint8).view(fmt.torch_dtype).float())
    keep = ~torch.isnan(decoded)
    fields = F.bits_of(decoded[keep], fmt)
    assert torch.equal(fields.code, codes[keep])
    assert_same_bits(fields.value(), decoded[keep])


def test_fp32_codes_random() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**32, (20000,), generator=g)
    x = codes.to(torch.int32).view(torch.float32)  # int64 -> int32 wraps; the bit pattern is `codes`
    assert_same_bits(F.from_code(codes, FP32), x)
    fields = F.bits_of(x, FP32)
    finite = torch.isfinite(x)
    assert torch.equal(fields.code[finite], codes[finite])
    nan = torch.isnan(x)
    assert torch.equal(fields.code[nan], codes[nan])  # fp32 keeps the NaN payload


def test_bit_strings() -> None:
    assert str(F.bits_of(1.0, FP16)) == "0 01111 0000000000"
    assert F.bits_of(torch.tensor([-2.0, 0.1]), "bf16").strings() == [
        "1 10000000 0000000",
        "0 01111011 1001101",
    ]
    assert str(F.bits_of(448.0, FP8_E4M3)) == "0 1111 110"
    assert str(F.bits_of(1e-7, FP16)) == "0 00000 0000000010"  # subnormal: 2 * 2^-24
    assert str(F.bits_of(-math.inf, FP16)) == "1 11111 0000000000"
    assert str(F.bits_of(math.nan, FP16)) == "0 11111 1000000000"
    assert str(F.bits_of(math.nan, FP8_E4M3)) == "0 1111 111"
    assert str(F.bits_of(-6.5, FP4_E2M1)) == "1 11 1"
    assert F.bits_of(torch.zeros(2, 2), FP16).sign.shape == (2, 2)


def test_flip_a_bit() -> None:
    fields = F.bits_of(1.0, FP16)
    assert F.from_bits(1 - fields.sign, fields.exponent, fields.mantissa, FP16).item() == -1.0
    assert F.from_bits(fields.sign, fields.exponent ^ 0b00001, fields.mantissa, FP16).item() == 0.5
    assert F.from_bits(fields.sign, fields.exponent ^ 0b10000, fields.mantissa, FP16).item() == math.inf
    assert F.from_bits(0, 15, 1 << 9, FP16).item() == 1.5
    assert F.from_bits(0, 0, 1, FP16).item() == 2.0**-24
    assert F.from_bits(0, 31, 0, FP16).item() == math.inf and math.isnan(F.from_bits(0, 31, 1, FP16).item())
    assert F.from_bits(1, 15, 7, FP8_E4M3).isnan() and F.from_bits(0, 15, 6, FP8_E4M3).item() == 448.0
    assert F.from_bits(0, 3, 1, FP4_E2M1).item() == 6.0
    grid = F.from_bits(torch.tensor([0, 1]), torch.tensor([[1], [2]]), 0, FP8_E5M2)  # broadcasting
    assert grid.shape == (2, 2) and grid[1, 1].item() == -(2.0**-13)


def test_bit_field_errors() -> None:
    with pytest.raises(ValueError, match="exponent must lie in 0..31"):
        F.from_bits(0, 32, 0, FP16)
    with pytest.raises(ValueError, match="mantissa must lie in 0..1 "):
        F.from_bits(0, 1, 2, FP4_E2M1)
    with pytest.raises(ValueError, match="sign"):
        F.from_bits(-1, 1, 0, FP16)
    with pytest.raises(TypeError, match="mantissa must be an int or an integer tensor"):
        F.from_bits(0, 1, torch.tensor(0.5), FP16)
    with pytest.raises(ValueError, match="code must lie in 0..255"):
        F.from_code(256, FP8_E4M3)
    with pytest.raises(ValueError, match="NaN.*fp4_e2m1"):
        F.bits_of(torch.tensor([1.0, math.nan]), FP4_E2M1)
    with pytest.raises(TypeError, match="float format.*int4"):
        F.bits_of(1.0, INT4)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# Integer rounding and bad inputs


def test_round_to_int_formats() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 7.6, -9.0, math.inf, -math.inf])
    assert F.round_to(x, INT4).tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, 7.0, -8.0, 7.0, -8.0]
    assert F.round_to(x, "uint4").tolist() == [0.0, 2.0, 2.0, 0.0, 0.0, 8.0, 0.0, 15.0, 0.0]
    with pytest.raises(ValueError, match="NaN.*int8"):
        F.round_to(torch.tensor([math.nan]), INT8)


def test_round_to_bad_inputs() -> None:
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int32"):
        F.round_to(torch.tensor([1, 2], dtype=torch.int32), FP16)
    with pytest.raises(TypeError, match="x must be"):
        F.round_to([1.0, 2.0], FP16)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool"):
        F.round_to(True, FP16)
    with pytest.raises(ValueError, match="unknown format name 'fp7'"):
        F.round_to(torch.ones(2), "fp7")


# ----------------------------------------------------------------------------------------------------------
# Memory


def test_tensor_bytes() -> None:
    assert F.tensor_bytes(1000, FP32) == 4000
    assert F.tensor_bytes(torch.empty(10, 10), "bf16") == 200
    assert F.tensor_bytes(7, INT4) == 4  # 28 bits round up to 4 bytes
    assert F.tensor_bytes(8, 3) == 3
    assert F.tensor_bytes(1000, 4.25) == 532  # 4-bit codes + a 16-bit scale per 64 weights
    assert F.tensor_bytes(100, torch.float16) == 200
    assert F.tensor_bytes(0, FP8_E4M3) == 0
    with pytest.raises(TypeError, match="t_or_numel"):
        F.tensor_bytes(-1, FP16)
    with pytest.raises(ValueError, match="bits must be a positive"):
        F.tensor_bytes(10, 0)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 100, bias=False)
        self.head.weight = self.emb.weight  # tied, as in SmolLM2
        self.norm = nn.BatchNorm1d(16)


def test_model_bytes_counts_tied_once() -> None:
    model = _Tied()
    n_params = 100 * 16 + 16 * 16 + 16 + 2 * 16
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert F.model_bytes(model) == 4 * n_params
    assert F.model_bytes(model, "fp16") == 2 * n_params
    assert F.model_bytes(model, INT4) == n_params // 2
    buffers = 16 * 4 * 2 + 8  # running mean/var in fp32, num_batches_tracked in int64
    assert F.model_bytes(model, include_buffers=True) == 4 * n_params + buffers
    model.half()
    assert F.model_bytes(model) == 2 * n_params


def test_model_bytes_shared_storage_and_meta() -> None:
    a = nn.Linear(8, 8, bias=False)
    b = nn.Linear(8, 8, bias=False)
    b.weight = nn.Parameter(a.weight.data)  # another Parameter over the same storage
    assert F.model_bytes(nn.Sequential(a, b)) == 8 * 8 * 4
    with torch.device("meta"):
        big = nn.Linear(4096, 4096)
    assert F.model_bytes(big, BF16) == (4096 * 4096 + 4096) * 2
    with pytest.raises(TypeError, match="nn.Module"):
        F.model_bytes(torch.ones(3))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.00 KB"),
        (1536, "1.54 KB"),
        (123_456, "123 KB"),
        (999_960, "1.00 MB"),
        (22_700_000, "22.7 MB"),
        (98_000_000, "98.0 MB"),
        (4 * 22_713_216, "90.9 MB"),
        (5e12, "5.00 TB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert F.format_bytes(n) == text


def test_format_bytes_binary_and_errors() -> None:
    assert F.format_bytes(1536, binary=True) == "1.50 KiB"
    assert F.format_bytes(1024**3, binary=True) == "1.00 GiB"
    assert F.format_bytes(1023.9 * 1024, binary=True) == "1.00 MiB"
    with pytest.raises(ValueError, match="non-negative"):
        F.format_bytes(-1)
