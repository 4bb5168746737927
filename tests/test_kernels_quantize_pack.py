"""Quantize-and-pack kernel: bit-for-bit parity with qlab's quantizer + packing, ties, words, bad input.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set here before
triton is imported, only where CUDA is absent). bf16 weights are tested on a GPU only.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (Linux only): qlab.kernels cannot run")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from qlab.kernels import dequant_matmul, quantize_pack, quantize_pack_reference  # noqa: E402

from qlab import packing  # noqa: E402
from qlab.quantize import QuantSpec, quantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def plain_rtn_words(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Independent plain-torch RTN + packing, one Python int per word (no qlab involved)."""
    n, k = w.shape
    x = w.float().reshape(n, k // group_size, group_size)
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1).clamp(min=0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = torch.maximum(hi, -lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / scale[..., None]).clamp(-qmax, qmax) + 2 ** (bits - 1)
        zero = None
    else:
        qmax = 2**bits - 1
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, qmax)
        q = (torch.round(x / scale[..., None]) + zero[..., None]).clamp(0, qmax)
    codes = q.reshape(n, k).long().tolist()
    per = 32 // bits
    words = []
    for row in codes:
        row_words = []
        for start in range(0, k, per):
            word = sum(c << (bits * j) for j, c in enumerate(row[start : start + per]))
            row_words.append(word - 2**32 if word >= 2**31 else word)  # as int32
        words.append(row_words)
    return torch.tensor(words, dtype=torch.int32), scale, zero


def run(w, bits, group_size, symmetric):
    out = quantize_pack(w.to(DEVICE), bits, group_size, symmetric)
    return out.packed.cpu(), out.scale.cpu(), None if out.zero is None else out.zero.cpu()


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8, 1, 3]),
    symmetric=st.booleans(),
    n=st.integers(1, 40),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([8, 16, 32, 64, None]),  # None: per-channel rows of 13/26/39
    dtype=st.sampled_from([torch.float32, torch.float16]),
    spread=st.sampled_from([1.0, 1e-3, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_qlab_and_plain_torch_bit_for_bit(
    bits, symmetric, n, groups, group_size, dtype, spread, seed
):
    if symmetric and bits == 1:
        symmetric = False
    k = groups * (group_size or 13)
    group_size = group_size or k
    g = torch.Generator().manual_seed(seed)
    w = (spread * torch.randn(n, k, generator=g)).to(dtype)
    w[torch.rand(n, k, generator=g) < 0.1] = 0.0  # exact zeros, and sometimes an all-zero group
    packed, scale, zero = run(w, bits, group_size, symmetric)
    ref = quantize_pack_reference(w, bits, group_size, symmetric)
    assert packed.dtype == torch.int32 and packed.shape == (n, -(-k // (32 // bits)))
    assert torch.equal(packed, ref.packed)
    assert torch.equal(scale, ref.scale)
    assert (zero is None) == symmetric == (ref.zero is None)
    if zero is not None:
        assert torch.equal(zero, ref.zero)
    plain_words, plain_scale, plain_zero = plain_rtn_words(w, bits, group_size, symmetric)
    assert torch.equal(packed, plain_words)
    assert torch.equal(scale, plain_scale)
    if zero is not None:
        assert torch.equal(zero, plain_zero)


def test_words_are_assembled_lsb_first_with_the_sign_bit():
    """Codes 0..15 (4-bit, scale 1, zero 0): words 0x76543210 and 0xFEDCBA98, the latter negative."""
    w = torch.arange(16, dtype=torch.float32)[None, :]
    packed, scale, zero = run(w, 4, 16, False)
    assert scale.item() == 1.0 and zero.item() == 0.0
    assert packed.tolist() == [[0x76543210, 0xFEDCBA98 - 2**32]]
    # 2-bit: sixteen codes 3 fill a word: -1; 8-bit: 0x80 in the top byte is the sign bit alone.
    assert run(torch.full((1, 16), 3.0), 2, 16, False)[0].tolist() == [[-1]]
    w8 = torch.tensor([[0.0, 0.0, 0.0, 128.0, 255.0, 0.0, 0.0, 0.0]])
    assert run(w8, 8, 8, False)[0].tolist() == [[-(2**31), 255]]


def test_ties_round_to_even_like_torch():
    """``x / scale`` exactly halfway: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, ... (torch.round), never up."""
    halves = torch.arange(14, dtype=torch.float32) + 0.5  # 0.5 ... 13.5
    w = torch.cat([torch.tensor([0.0, 15.0]), halves])[None, :]  # range 15 -> scale 1, zero 0
    packed, scale, _ = run(w, 4, 16, False)
    codes = packing.unpack_int32(packed, 4, 16)[0, 2:].long()
    assert scale.item() == 1.0
    assert torch.equal(codes, torch.round(halves).long())
    assert codes[:4].tolist() == [0, 2, 2, 4]
    # A negative tie in the symmetric grid: scale = 7/7 = 1, -2.5 -> -2, stored as -2 + 8.
    packed, _, _ = run(torch.tensor([[7.0, -2.5, -3.5, 0.0]]), 4, 4, True)
    assert packing.unpack_int32(packed, 4, 4).tolist() == [[15, 6, 4, 8]]


def test_padding_codes_are_zero_not_the_zero_point():
    """k = 20 in 2-bit words of 16: the last word's 12 unused codes are 0, as pack_int32 pads."""
    w = torch.zeros(3, 20)
    w[:, 0], w[:, 1] = -1.0, 2.0  # range [-1, 2]: scale 1, zero-point 1, so 0.0 has code 1
    packed, scale, zero = run(w, 2, 20, False)
    assert (scale == 1).all() and (zero == 1).all()
    codes = packing.unpack_int32(packed, 2, 32)
    assert codes[0, :20].tolist() == [0, 3] + [1] * 18
    assert (codes[:, 20:] == 0).all()
    assert packed[:, 1].tolist() == [0b01010101] * 3  # codes 16..19 = 1, then twelve zero codes


def test_round_trip_through_the_matmul_kernel():
    """quantize_pack -> dequant_matmul(eye) reads back qlab's dequantized weight exactly."""
    n, k = 12, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    qt = quantize(w, QuantSpec.per_group(bits=4, group_size=32, symmetric=False))
    out = quantize_pack(w.to(DEVICE), 4, 32)
    y = dequant_matmul(torch.eye(k, device=DEVICE), *out, bits=4, group_size=32, n=n, k=k)
    assert torch.equal(y.cpu(), qt.dequantize().T)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 needs a GPU: Triton's interpreter mis-computes bf16")
def test_bf16_weights_on_gpu():
    w = torch.randn(64, 256).to(torch.bfloat16)
    packed, scale, zero = run(w, 4, 128, False)
    ref = quantize_pack_reference(w, 4, 128)
    assert torch.equal(packed, ref.packed) and torch.equal(scale, ref.scale) and torch.equal(zero, ref.zero)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (([[1.0]], 4, 1), TypeError, "w must be a torch.Tensor"),
        ((torch.ones(4, 8, dtype=torch.int32), 4, 8), ValueError, "w must be float16"),
        ((torch.ones(8), 4, 8), ValueError, "2-D weight"),
        ((torch.ones(0, 8), 4, 8), ValueError, "2-D weight"),
        ((torch.ones(4, 8), 5, 8), ValueError, "bits must be one of"),
        ((torch.ones(4, 8), 4, 3), ValueError, "group_size must be a positive integer dividing K=8"),
        ((torch.ones(4, 8), 4, 0), ValueError, "group_size"),
        ((torch.ones(8, 4).T, 4, 4), ValueError, "w must be contiguous"),
        ((torch.tensor([[1.0, float("nan")]]), 4, 2), ValueError, "NaN or Inf"),
    ],
)
def test_bad_input_is_named(args, error, match):
    with pytest.raises(error, match=match):
        quantize_pack(*args)


def test_symmetric_one_bit_is_refused():
    with pytest.raises(ValueError, match="bits >= 2"):
        quantize_pack(torch.ones(2, 8), 1, 8, symmetric=True)
