"""qlab.gguf.blocks: GGUF's block bytes <-> qlab codes and scales, and which specs map exactly.

The reference for every layout is gguf-py itself: its ``quantize`` writes blocks, its ``dequantize`` reads
them, and qlab must agree with both bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, dequantize, quantize  # noqa: E402

from qlab.gguf import BLOCK_TYPES, decode, encode, exact_type, spec_for  # noqa: E402
from qlab.gguf.convert import unpermute_rotary  # noqa: E402
from qlab.gguf.export import permute_rotary  # noqa: E402
from qlab.quantize import QuantizedTensor, QuantSpec  # noqa: E402
from qlab.quantize import quantize as qlab_quantize  # noqa: E402

ROWS, COLS = 8, 96


def _weight(seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    w = g.standard_normal((ROWS, COLS)).astype(np.float32) * 0.05
    w[1, :32] = 0.125  # a constant block: Q4_1 gives it d = 0, m = 0.125; Q8_0 d = 0.125/127
    w[2, 32:64] = 0.0  # an all-zero block: d = 0 in every type
    return w


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_decode_then_encode_gives_gguf_pys_bytes_back(name):
    """gguf-py quantizes; qlab decodes the bytes into codes and fp16 scales, and its dequantize equals
    gguf-py's bit for bit; encoding the codes again gives the same bytes."""
    qtype = GGMLQuantizationType[name]
    raw = quantize(_weight(), qtype)
    qt = decode(raw, name, (ROWS, COLS))
    assert qt.spec == spec_for(name) and qt.scale.dtype == torch.float16
    theirs = dequantize(raw, qtype).reshape(ROWS, COLS)
    assert np.array_equal(qt.dequantize(torch.float32).numpy(), theirs)
    assert np.array_equal(encode(qt, name), raw)
    found = exact_type(qt)
    assert found is not None and found[0] == name and np.array_equal(found[1], raw)


def test_q4_1_constant_block_is_d_zero_and_m():
    raw = quantize(_weight(), GGMLQuantizationType.Q4_1)
    qt = decode(raw, "Q4_1", (ROWS, COLS))
    assert float(qt.scale[1, 0]) == 0.0 and float(qt.zero[1, 0]) == 0.125
    assert torch.equal(qt.dequantize()[1, :32], torch.full((32,), 0.125))


def test_nibble_order_is_element_i_with_element_i_plus_16():
    """Byte j of a Q4 block holds element j (low nibble) and element j + 16 (high nibble)."""
    spec = spec_for("Q4_1")
    qt = QuantizedTensor(
        codes=torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32),
        scale=torch.ones(1, 1, dtype=torch.float16), zero=torch.zeros(1, 1, dtype=torch.float16),
        spec=spec, shape=torch.Size((1, 32)),
    )  # fmt: skip
    raw = encode(qt, "Q4_1")
    assert raw.shape == (1, 20)
    assert list(raw[0, :4]) == [0x00, 0x3C, 0x00, 0x00]  # d = 1.0, m = 0.0 in fp16, little-endian
    assert list(raw[0, 4:8]) == [0x00, 0x11, 0x22, 0x33]  # elements 0|16, 1|17, ...


@pytest.mark.parametrize(
    "spec, expected",
    [
        (QuantSpec.per_group(8, 32, symmetric=True, scale_dtype=torch.float16), "Q8_0"),
        (QuantSpec.per_channel(8, symmetric=True, scale_dtype=torch.float16), "Q8_0"),  # one d per row
        (QuantSpec.per_group(4, 32, symmetric=True, scale_dtype=torch.float16), "Q4_0"),
        (QuantSpec.per_group(4, 32, zero_domain="float", scale_dtype=torch.float16), "Q4_1"),
        (QuantSpec.per_group(4, 96, zero_domain="float", scale_dtype=torch.float16), "Q4_1"),
    ],
)
def test_exact_mappings_dequantize_bit_for_bit(spec, expected):
    w = torch.from_numpy(_weight(1))
    qt = qlab_quantize(w, spec)
    found = exact_type(qt)
    assert found is not None and found[0] == expected
    theirs = dequantize(found[1], BLOCK_TYPES[expected].ggml).reshape(ROWS, COLS)
    assert np.array_equal(qt.dequantize(torch.float32).numpy(), theirs)


def test_int_zero_of_eight_is_q4_0():
    qt = qlab_quantize(torch.from_numpy(_weight(2)), QuantSpec.per_group(4, 32, scale_dtype=torch.float16))
    qt.zero = torch.full_like(qt.zero, 8.0)
    found = exact_type(qt)
    assert found is not None and found[0] == "Q4_0"


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec.per_group(4, 32),  # fp32 scales: not fp16 values
        QuantSpec.per_group(8, 32, symmetric=True),
        QuantSpec.per_group(4, 32, codebook="nf4", symmetric=False),
        QuantSpec.per_group(3, 32, scale_dtype=torch.float16),
        QuantSpec.per_group(4, 16, zero_domain="float", scale_dtype=torch.float16),  # groups under 32
    ],
)
def test_specs_without_an_exact_type(spec):
    assert exact_type(qlab_quantize(torch.from_numpy(_weight(3)), spec)) is None


def test_decode_rejects_bad_input():
    raw = quantize(_weight(), GGMLQuantizationType.Q8_0)
    with pytest.raises(ValueError, match="raw: expected"):
        decode(raw[:, :-1], "Q8_0", (ROWS, COLS))
    with pytest.raises(ValueError, match="does not divide"):
        decode(raw, "Q8_0", (ROWS, 48))
    with pytest.raises(ValueError, match="name: GGUF type 'Q6_K'"):
        decode(raw, "Q6_K", (ROWS, COLS))


def test_rotary_permutation_is_the_inverse_of_the_converters():
    w = np.arange(24 * 3).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        assert np.array_equal(unpermute_rotary(permute_rotary(w, heads), heads), w)
        assert np.array_equal(permute_rotary(unpermute_rotary(w, heads), heads), w)
    # head_dim 4: HF pairs rows (0, 2) and (1, 3); ggml pairs adjacent rows
    assert permute_rotary(np.arange(4), 1).tolist() == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="n_heads"):
        permute_rotary(w, 0)


def test_hqq_with_a_float_zero_is_the_same_grid_and_exports_as_q4_1():
    """HQQ optimizes its fractional zero as before; a float-zero spec stores it as ``m = -s z`` (fp16),
    which costs at most the rounding of ``m`` and makes the layer a Q4_1 block, code for code."""
    from dataclasses import replace

    from qlab.methods.hqq import hqq_quantize
    from qlab.metrics import sqnr

    w = torch.from_numpy(_weight(4))
    spec = QuantSpec.per_group(4, 32, zero_domain="float", scale_dtype=torch.float16)
    fz, iz = hqq_quantize(w, spec), hqq_quantize(w, replace(spec, zero_domain="int"))
    assert torch.equal(fz.scale, iz.scale)
    assert abs(sqnr(w, fz.dequantize()) - sqnr(w, iz.dequantize())) < 0.1
    found = exact_type(fz)
    assert found is not None and found[0] == "Q4_1"
    assert exact_type(iz) is None  # a fractional integer-domain zero is no GGUF block
