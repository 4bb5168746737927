"""Bit packing: round trips for every width, the documented layout, and bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlab import packing


@settings(max_examples=120, deadline=None)
@given(
    bits=st.sampled_from(packing.PACK_BITS),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(1, 70),
    seed=st.integers(0, 10_000),
)
def test_round_trip_any_width_and_odd_lengths(bits, lead, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, n), generator=g, dtype=torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packing.packed_length(n, bits))
    assert torch.equal(packing.unpack(packed, bits, n), codes)
    words = packing.pack_int32(codes, bits)
    assert words.dtype == torch.int32
    assert torch.equal(packing.unpack_int32(words, bits, n), codes)


def reference_bitstream(codes: list[int], bits: int) -> list[int]:
    """LSB-first bitstream, one Python int at a time."""
    acc = 0
    for i, c in enumerate(codes):
        acc |= c << (bits * i)
    nbytes = packing.packed_length(len(codes), bits)
    return [(acc >> (8 * i)) & 0xFF for i in range(nbytes)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_layout_is_lsb_first_bitstream(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (24,), generator=g, dtype=torch.uint8)
    assert packing.pack(codes, bits).tolist() == reference_bitstream(codes.tolist(), bits)


def test_documented_examples():
    assert packing.pack(torch.tensor([0b0001, 0b1010], dtype=torch.uint8), 4).tolist() == [0b1010_0001]
    assert packing.pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00_11_10_01]
    assert packing.pack(torch.tensor([3, 12], dtype=torch.uint8), 4).tolist() == [0xC3]
    assert packing.unpack(torch.tensor([0xC3], dtype=torch.uint8), 4, 2).tolist() == [3, 12]
    assert packing.unpack(packing.pack(torch.tensor([3, 2, 1, 0], dtype=torch.uint8), 2), 2, 4).tolist() == [
        3,
        2,
        1,
        0,
    ]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_int32_words_are_the_bytes_viewed_little_endian(bits):
    codes = torch.randint(0, 2**bits, (3, 64), dtype=torch.uint8)
    assert torch.equal(packing.pack(codes, bits).view(torch.int32), packing.pack_int32(codes, bits))


def test_three_bit_int32_holds_ten_codes():
    codes = torch.full((10,), 7, dtype=torch.uint8)
    assert packing.pack_int32(codes, 3).tolist() == [2**30 - 1]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: packing.pack(torch.zeros(4, dtype=torch.uint8), 5), "bits"),
        (lambda: packing.pack(torch.zeros(4, dtype=torch.int32), 4), "uint8"),
        (lambda: packing.pack(torch.tensor([16], dtype=torch.uint8), 4), "< 2\\*\\*4"),
        (lambda: packing.pack(torch.tensor(3, dtype=torch.uint8), 4), "at least one dimension"),
        (lambda: packing.unpack(torch.zeros(3, dtype=torch.uint8), 4, 8), "expected 4"),
        (lambda: packing.unpack_int32(torch.zeros(3, dtype=torch.uint8), 4, 8), "int32"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
