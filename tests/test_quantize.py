"""Affine quantization: qlab against an independent plain-torch reference, plus properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlab.quantize import QuantizedTensor, QuantSpec, dequantize, fake_quantize, quantize

# ---------------------------------------------------------------- reference (written independently)


def reference_quantize(x: torch.Tensor, bits: int, symmetric: bool, gran: str, group: int | None, axis=0):
    """Textbook RTN on a 2-D tensor, one row-block at a time, with explicit loops over blocks."""
    x = x.float()
    rows, cols = x.shape
    if gran == "tensor":
        blocks = [(slice(None), slice(None))]
    elif gran == "channel" and axis == 0:
        blocks = [(slice(r, r + 1), slice(None)) for r in range(rows)]
    elif gran == "channel":
        blocks = [(slice(None), slice(c, c + 1)) for c in range(cols)]
    else:
        blocks = [(slice(r, r + 1), slice(c, c + group)) for r in range(rows) for c in range(0, cols, group)]
    q = torch.zeros_like(x)
    deq = torch.zeros_like(x)
    for b in blocks:
        v = x[b]
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            s = v.abs().max() / qmax
            s = s if s > 0 else torch.tensor(1.0)
            qq = torch.clamp(torch.round(v / s), -qmax, qmax)
            q[b], deq[b] = qq, s * qq
        else:
            qmax = 2**bits - 1
            lo, hi = min(v.min().item(), 0.0), max(v.max().item(), 0.0)
            s = torch.tensor((hi - lo) / qmax)
            s = s if s > 0 else torch.tensor(1.0)
            z = torch.clamp(torch.round(-lo / s), 0, qmax)
            qq = torch.clamp(torch.round(v / s) + z, 0, qmax)
            q[b], deq[b] = qq, s * (qq - z)
    return q, deq


def _spec(bits, symmetric, gran, group, axis=0):
    if gran == "group":
        return QuantSpec.per_group(bits, group, symmetric=symmetric)
    if gran == "channel":
        return QuantSpec.per_channel(bits, symmetric=symmetric, axis=axis)
    return QuantSpec.per_tensor(bits, symmetric=symmetric)


@st.composite
def cases(draw):
    symmetric = draw(st.booleans())
    bits = draw(st.integers(2 if symmetric else 1, 8))
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    rows = draw(st.integers(1, 6))
    group = draw(st.sampled_from([1, 2, 4, 8, 16]))
    cols = group * draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * scale
    if draw(st.booleans()):  # an outlier
        x[0, 0] = 20 * scale
    axis = draw(st.sampled_from([0, 1])) if gran == "channel" else 0
    return x, bits, symmetric, gran, group if gran == "group" else None, axis


@settings(max_examples=150, deadline=None)
@given(cases())
def test_matches_reference(case):
    x, bits, symmetric, gran, group, axis = case
    qt = quantize(x, _spec(bits, symmetric, gran, group, axis))
    q_ref, deq_ref = reference_quantize(x, bits, symmetric, gran, group, axis)
    assert torch.equal(qt.codes.float(), q_ref)
    torch.testing.assert_close(qt.dequantize(), deq_ref, rtol=1e-6, atol=1e-6 * x.abs().max().item())


@settings(max_examples=150, deadline=None)
@given(cases())
def test_error_at_most_half_a_step_and_codes_in_range(case):
    x, bits, symmetric, gran, group, axis = case
    spec = _spec(bits, symmetric, gran, group, axis)
    qt = quantize(x, spec)
    assert int(qt.codes.min()) >= spec.qmin and int(qt.codes.max()) <= spec.qmax
    assert qt.codes.dtype == (torch.int8 if symmetric else torch.uint8)
    # Per-element step: broadcast each block's scale back to element shape.
    step = QuantizedTensor(
        codes=torch.ones_like(qt.codes, dtype=torch.uint8),
        scale=qt.scale,
        zero=None,
        spec=QuantSpec(
            bits=bits, symmetric=False, granularity=spec.granularity, axis=axis, group_size=spec.group_size
        ),
        shape=qt.shape,
    ).dequantize()
    err = (x - qt.dequantize()).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-12).all())


@settings(max_examples=60, deadline=None)
@given(cases())
def test_dequantize_is_idempotent(case):
    x, bits, symmetric, gran, group, axis = case
    spec = _spec(bits, symmetric, gran, group, axis)
    once = fake_quantize(x, spec)
    twice = fake_quantize(once, spec)
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-6 * x.abs().max().item())


@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_zero_and_single_element_blocks(symmetric):
    bits = 4
    for x in (
        torch.zeros(3, 8),
        torch.full((3, 8), 2.5),
        torch.tensor([[7.0]]),
        torch.tensor([-1e-30, 1e-30]),
    ):
        qt = quantize(x, QuantSpec.per_group(bits, x.shape[-1], symmetric=symmetric))
        out = qt.dequantize()
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, x, rtol=0.15, atol=1e-30)
    zeros = quantize(torch.zeros(4, 4), QuantSpec.per_tensor(8, symmetric=symmetric)).dequantize()
    assert torch.equal(zeros, torch.zeros(4, 4))


def test_symmetric_range_is_restricted_and_zero_is_exact():
    x = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    qt = quantize(x, QuantSpec.per_tensor(8, symmetric=True))
    assert qt.codes.tolist() == [[-127, 0, 64, 127]]
    assert qt.zero is None
    qa = quantize(torch.tensor([[0.0, 0.3, 3.0, -1.0]]), QuantSpec.per_tensor(8, symmetric=False))
    assert qa.dequantize()[0, 0].item() == 0.0
    assert float(qa.zero) == round(float(qa.zero))


def test_dequantize_is_scale_times_code_minus_zero_not_plus():
    # The bug seen in public course reproductions: q*s + z instead of s*(q - z).
    x = torch.tensor([[-1.0, 1.0, 3.0, 5.0]])
    qt = quantize(x, QuantSpec.per_tensor(8, symmetric=False))
    s, z = qt.scale.item(), qt.zero.item()
    assert z > 0
    right = s * (qt.codes.float() - z)
    wrong = qt.codes.float() * s + z
    assert torch.equal(qt.dequantize(), right)
    assert not torch.allclose(qt.dequantize(), wrong)


def test_nbytes_and_bits_per_weight():
    w = torch.randn(64, 256)
    qt = quantize(w, QuantSpec.per_group(4, 128, symmetric=False))
    # 64*256 codes at 4 bits + 128 fp32 scales + 128 fp32 zeros
    assert qt.nbytes == 64 * 256 // 2 + 128 * 4 + 128 * 4
    assert qt.bits_per_weight == pytest.approx(4 + 64 / 128)
    q16 = quantize(w, QuantSpec.per_group(4, 128, symmetric=True, scale_dtype=torch.float16))
    assert q16.bits_per_weight == pytest.approx(4 + 16 / 128)
    assert quantize(w, QuantSpec.per_tensor(8)).nbytes == 64 * 256 + 4


def test_fp16_scales_round_up_to_keep_the_error_bound():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    qt = quantize(w, QuantSpec.per_group(4, 32, symmetric=True, scale_dtype=torch.float16))
    assert qt.scale.dtype == torch.float16
    step = qt.scale.float().repeat_interleave(32, dim=1)
    assert bool(((w - qt.dequantize()).abs() <= step / 2 + 1e-7).all())


def test_block_size_covers_all_granularities():
    shape = (6, 32)
    assert QuantSpec.per_tensor().block_size(shape) == (6, 32)
    assert QuantSpec.per_channel(axis=0).block_size(shape) == (1, 32)
    assert QuantSpec.per_channel(axis=1).block_size(shape) == (6, 1)
    assert QuantSpec.per_channel(axis=-1).block_size(shape) == (6, 1)
    assert QuantSpec.per_group(4, 8).block_size(shape) == (1, 8)


def test_keyword_form_and_dtype_roundtrip():
    w = torch.randn(4, 16, dtype=torch.bfloat16)
    qt = quantize(w, bits=4, granularity="group", group_size=8, symmetric=False)
    assert qt.dequantize().dtype == torch.bfloat16
    assert torch.equal(dequantize(qt, torch.float32), qt.dequantize(torch.float32))
    assert "int4 asym g8" in repr(qt)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"bits": 1, "symmetric": True}, "symmetric"),
        ({"granularity": "row"}, "granularity"),
        ({"granularity": "group", "group_size": 0}, "group_size"),
        ({"granularity": "group"}, "group_size"),
        ({"granularity": "tensor", "group_size": 8}, "group_size"),
        ({"scale_dtype": torch.int8}, "scale_dtype"),
        ({"codebook": "nf3", "bits": 4}, "codebook"),
        ({"double_quant": True}, "double_quant"),
    ],
)
def test_bad_specs_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


@pytest.mark.parametrize(
    "x, spec, exc, match",
    [
        (torch.randn(4, 10), QuantSpec.per_group(4, 4), ValueError, "group_size"),
        (torch.tensor([[1.0, float("nan")]]), QuantSpec(), ValueError, "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")]]), QuantSpec(), ValueError, "NaN or Inf"),
        (torch.empty(0, 4), QuantSpec(), ValueError, "empty"),
        (torch.ones(4, 4, dtype=torch.int32), QuantSpec(), ValueError, "floating-point"),
        (torch.randn(4, 4), QuantSpec.per_channel(axis=2), ValueError, "axis"),
        ([1.0, 2.0], QuantSpec(), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_name_the_argument(x, spec, exc, match):
    with pytest.raises(exc, match=match):
        quantize(x, spec)


def test_spec_and_kwargs_together_is_an_error():
    with pytest.raises(ValueError, match="either spec or keyword"):
        quantize(torch.randn(2, 2), QuantSpec(), bits=4)


def test_per_group_repeats_coarser_parameters():
    from qlab.quantize import per_group

    t = torch.tensor([[2.0]])
    assert torch.equal(per_group(t, 3, 4), torch.full((3, 4), 2.0))
    rows = torch.tensor([[1.0], [2.0]])
    assert torch.equal(per_group(rows, 2, 3), torch.tensor([[1.0] * 3, [2.0] * 3]))
    full = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(per_group(full, 2, 3), full)
    assert per_group(full.half(), 2, 3).dtype == torch.float32
