"""Lesson 08: each reference solution passes its check, and a typical wrong answer fails (lesson 04's are in
test_exercises_04.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qlab.config import QuantConfig
from qlab.driver import quantize_model
from qlab.exercises import lesson08 as L8
from qlab.io import load_quantized, save_quantized


def test_model_bytes():
    n_linear, n_rest = 106_168_320, 28_368_192
    right = n_linear * 4 // 8 + (n_linear // 64) * 8 + 4 * n_rest
    assert L8.check_model_bytes(n_linear, n_rest, 4, 64, right, quiet=True)
    assert (
        "zero"
        in L8.check_model_bytes(n_linear, n_rest, 4, 64, n_linear // 2 + 4 * n_rest, quiet=True).message
    )
    assert not L8.check_model_bytes(n_linear, n_rest, 4, 64, n_linear * 4, quiet=True)


def test_best_setting():
    table = [
        {"setting": "fp32", "mb": 538.0, "perplexity": 10.0},
        {"setting": "W8A16", "mb": 220.0, "perplexity": 10.1},
        {"setting": "W4A16 g64", "mb": 180.0, "perplexity": 11.5},
        {"setting": "W2A16 g64", "mb": 150.0, "perplexity": 400.0},
    ]

    def right(rows, budget):
        return min((r for r in rows if r["mb"] <= budget), key=lambda r: r["perplexity"])["setting"]

    assert L8.check_best_setting(table, right, quiet=True)
    assert L8.check_best_setting(table, L8.best_setting, quiet=True)
    # the old answer, a lookup of one budget, is no longer enough
    assert not L8.check_best_setting(table, lambda rows, budget: "W4A16 g64", quiet=True)
    largest = L8.check_best_setting(  # the largest that fits: ignores perplexity
        table,
        lambda rows, b: max((r for r in rows if r["mb"] <= b), key=lambda r: r["mb"])["setting"],
        quiet=True,
    )
    assert not largest and "lower perplexity" in largest.message
    best_overall = L8.check_best_setting(  # ignores the budget
        table, lambda rows, b: min(rows, key=lambda r: r["perplexity"])["setting"], quiet=True
    )
    assert not best_overall and "does not fit" in best_overall.message
    first_fit = L8.check_best_setting(  # the first row that fits: right on the sorted table, wrong shuffled
        table, lambda rows, b: next(r for r in rows if r["mb"] <= b)["setting"], quiet=True
    )
    assert not first_fit
    # malformed answers: hints, never tracebacks
    for bad in ("W4A16 g64", ..., None, lambda: "x", lambda rows, b: 1 / 0, lambda rows, b: 3):
        res = L8.check_best_setting(table, bad, quiet=True)
        assert not res and "Hint" in res.message
    with pytest.raises(ValueError, match="no setting fits"):
        L8.best_setting(table, 10)


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    model = quantize_model(net, QuantConfig("rtn", 4, 32), progress=False)
    path = save_quantized(model, tmp_path / "m.safetensors")

    def factory():
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))

    assert L8.check_round_trip(model, load_quantized(path, factory), path, quiet=True)
    assert L8.check_round_trip(model, load_quantized(path, factory), str(path), quiet=True)
    other = quantize_model(factory(), QuantConfig("rtn", 4, 32), progress=False)
    assert not L8.check_round_trip(model, other, path, quiet=True)
    assert not L8.check_round_trip(model, factory(), path, quiet=True)  # a float model: different tensors
    # the same module twice, or a deep copy never saved, passed the old check; not this one
    same = L8.check_round_trip(model, model, path, quiet=True)
    assert not same and "same module" in same.message
    unsaved = quantize_model(factory(), QuantConfig("rtn", 4, 32), progress=False)
    not_saved = L8.check_round_trip(unsaved, copy.deepcopy(unsaved), path, quiet=True)  # the file is model's
    assert not not_saved and "does not hold" in not_saved.message
    view = copy.copy(model)  # a shallow copy shares every tensor with the original
    assert not L8.check_round_trip(model, view, path, quiet=True)
    # malformed answers: hints, never tracebacks
    for bad_path in (None, ..., tmp_path / "missing.safetensors", 3):
        res = L8.check_round_trip(model, load_quantized(path, factory), bad_path, quiet=True)
        assert not res and "path" in res.message
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file")
    assert not L8.check_round_trip(model, load_quantized(path, factory), junk, quiet=True)
    assert not L8.check_round_trip("model", model, path, quiet=True)  # type: ignore[arg-type]
