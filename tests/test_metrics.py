"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from qlab import metrics


def test_known_values():
    x = torch.tensor([3.0, 4.0])
    y = torch.tensor([3.0, 3.0])
    assert metrics.mse(x, y) == 0.5
    assert metrics.max_abs_error(x, y) == 1.0
    assert metrics.sqnr(x, y) == pytest.approx(10 * math.log10(25 / 1))
    assert metrics.relative_error(x, y) == pytest.approx(1 / 5)
    assert metrics.cosine_similarity(x, y) == pytest.approx(21 / (5 * math.sqrt(18)))
    assert metrics.lp_error(x, y, p=0.5) == pytest.approx(0.5)
    assert metrics.sqnr(x, x) == math.inf
    report = metrics.error_report(x, y)
    assert set(report) == {"mse", "sqnr_db", "max_abs_error", "relative_error", "cosine"}


def test_one_bit_is_about_six_db():
    from qlab.quantize import QuantSpec, quantize

    torch.manual_seed(0)
    x = torch.rand(100_000) * 2 - 1
    s6 = metrics.sqnr(x, quantize(x, QuantSpec.per_tensor(6)).dequantize())
    s7 = metrics.sqnr(x, quantize(x, QuantSpec.per_tensor(7)).dequantize())
    assert 5.5 < s7 - s6 < 6.5


def test_memory_footprint_counts_tied_weights_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert metrics.memory_footprint(model) == 10 * 4 * 4
    assert metrics.memory_footprint(torch.zeros(3, dtype=torch.float16)) == 6
    assert metrics.compression_ratio(100, 25) == 4


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        metrics.mse(torch.zeros(2), torch.zeros(3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        metrics.sqnr([1.0], torch.zeros(1))
    with pytest.raises(ValueError, match="empty"):
        metrics.mse(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="p must be"):
        metrics.lp_error(torch.zeros(1), torch.zeros(1), p=0)
    with pytest.raises(ValueError, match="compressed_bytes"):
        metrics.compression_ratio(10, 0)
    with pytest.raises(TypeError, match="obj must be"):
        metrics.memory_footprint("model")
