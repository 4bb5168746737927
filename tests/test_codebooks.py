"""NF4 / FP4 lookup quantization and double quantization against plain-torch references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlab.codebooks import (
    FP4_VALUES,
    NF4_VALUES,
    codebook_table,
    nearest_code,
    quantize_fp4,
    quantize_nf4,
)
from qlab.metrics import sqnr
from qlab.quantize import QuantSpec, quantize

# The values bitsandbytes ships (QLoRA appendix E); our table is *built* from normal quantiles.
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf4_table_matches_qlora():
    torch.testing.assert_close(NF4_VALUES, torch.tensor(PUBLISHED_NF4), rtol=0, atol=2e-7)
    assert NF4_VALUES[7] == 0.0 and len(set(NF4_VALUES.tolist())) == 16


def test_fp4_table_is_e2m1_by_bit_pattern():
    # bit pattern s.ee.m -> (-1)^s * 2^(e-1) * (1 + m/2) for e > 0, else (-1)^s * m/2
    ref = []
    for code in range(16):
        s, e, m = code >> 3, (code >> 1) & 0b11, code & 1
        v = 2.0 ** (e - 1) * (1 + m / 2) if e else m / 2
        ref.append((-v if s else v) / 6)
    assert torch.equal(FP4_VALUES, torch.tensor(ref))


def reference_lookup(x: torch.Tensor, table: torch.Tensor, block: int):
    """Per block: absmax, then brute-force nearest table entry (ties to the larger value)."""
    rows = x.reshape(-1, block)
    absmax = rows.abs().amax(dim=1, keepdim=True)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    xn = rows / absmax
    dist = (xn.unsqueeze(-1) - table).abs()
    # argmin picks the first minimum; order candidates by descending value to break ties upward.
    order = table.argsort(descending=True)
    idx = order[dist[..., order].argmin(dim=-1)]
    return idx.reshape(x.shape), (table[idx] * absmax).reshape(x.shape)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    nblocks=st.integers(1, 4),
    block=st.sampled_from([8, 16, 64]),
    name=st.sampled_from(["nf4", "fp4"]),
    seed=st.integers(0, 10_000),
)
def test_lookup_matches_bruteforce(rows, nblocks, block, name, seed):
    x = torch.randn(rows, nblocks * block, generator=torch.Generator().manual_seed(seed))
    fn = quantize_nf4 if name == "nf4" else quantize_fp4
    qt = fn(x, block_size=block)
    table = codebook_table(name)
    idx, deq = reference_lookup(x, table, block)
    # Compare reconstructions (FP4 has +0 and -0: two codes with the same value).
    torch.testing.assert_close(qt.dequantize(), deq, rtol=1e-6, atol=1e-7)
    assert torch.equal(table[qt.codes.long()], table[idx])


def test_nearest_code_ties_and_extremes():
    assert nearest_code(torch.tensor([-5.0, 5.0, 0.0]), NF4_VALUES).tolist() == [0, 15, 7]
    mid = (NF4_VALUES[8] + NF4_VALUES[9]) / 2
    assert nearest_code(mid.reshape(1), NF4_VALUES).tolist() == [9]


def test_nf4_beats_int4_on_normal_weights_at_equal_bits():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    nf4 = quantize_nf4(w, block_size=64)
    int4 = quantize(w, QuantSpec.per_group(4, 64, symmetric=True))
    assert nf4.bits_per_weight == int4.bits_per_weight == 4.5
    assert sqnr(w, nf4.dequantize()) > sqnr(w, int4.dequantize()) + 0.5


def test_double_quant_saves_bits_and_keeps_quality():
    torch.manual_seed(0)
    w = torch.randn(128, 1024)
    plain = quantize_nf4(w)
    dq = quantize_nf4(w, double_quant=True)
    assert plain.bits_per_weight == pytest.approx(4.5)
    # 4 + 8/64 + (fp32 scale per 256 scales + 4-byte offset), scales padded to a multiple of 256
    n_scales = 128 * 1024 // 64
    expected = (128 * 1024 / 2 + n_scales + 4 * (n_scales // 256) + 4) * 8 / (128 * 1024)
    assert dq.bits_per_weight == pytest.approx(expected)
    assert dq.bits_per_weight < 4.13
    assert abs(sqnr(w, dq.dequantize()) - sqnr(w, plain.dequantize())) < 0.05
    torch.testing.assert_close(dq.scale, plain.scale, rtol=2e-2, atol=1e-3)


def test_double_quant_pads_odd_scale_counts():
    w = torch.randn(3, 64 * 5)
    dq = quantize_nf4(w, double_quant=True)
    assert dq.scale.shape == (3, 5)
    assert torch.isfinite(dq.dequantize()).all()


def test_codebook_spec_dispatch_and_errors():
    w = torch.randn(4, 64)
    qt = quantize(w, QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64, codebook="nf4"))
    assert torch.equal(qt.dequantize(), quantize_nf4(w).dequantize())
    with pytest.raises(ValueError, match="group_size"):
        quantize_nf4(torch.randn(4, 60))
    with pytest.raises(ValueError, match="codebook"):
        codebook_table("nf5")
    with pytest.raises(ValueError, match="NaN"):
        quantize_nf4(torch.tensor([[float("nan")] * 64]))
