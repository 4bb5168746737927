"""Lesson 08's checks: each reference solution passes, typical wrong and malformed answers get a hint (no
traceback)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qlab.config import QuantConfig
from qlab.driver import quantize_model
from qlab.exercises import lesson08 as L8
from qlab.exercises.lesson08 import check_per_channel_keys
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


def per_channel(k: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """A learner's right answer, in plain torch: groups of `group` tokens within each channel."""
    b, h, t, d = k.shape
    g = k.transpose(-1, -2).reshape(b, h, d, t // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    q = torch.round((g - lo) / s).clamp(0, 2**bits - 1)
    return (s * q + lo).reshape(b, h, d, t).transpose(-1, -2)


def per_token(k: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The lesson's first guess: one grid per token over all of its channels."""
    lo, hi = k.amin(-1, keepdim=True), k.amax(-1, keepdim=True)
    s = (hi - lo) / (2**bits - 1)
    return torch.round((k - lo) / s).clamp(0, 2**bits - 1) * s + lo


def symmetric(k: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    b, h, t, d = k.shape
    g = k.transpose(-1, -2).reshape(b, h, d, t // group, group)
    s = g.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    return (torch.round(g / s) * s).reshape(b, h, d, t).transpose(-1, -2)


def test_right_answer_passes():
    r = check_per_channel_keys(per_channel, quiet=True)
    assert r.ok, r.message


def test_per_token_gets_the_axis_hint():
    r = check_per_channel_keys(per_token, quiet=True)
    assert not r.ok and "per-token" in r.message and "dim -2" in r.message


def test_other_wrong_answers_get_hints():
    r = check_per_channel_keys(lambda k, bits, group: k, quiet=True)
    assert not r.ok and "unchanged" in r.message
    r = check_per_channel_keys(symmetric, quiet=True)
    assert not r.ok and "lo = min" in r.message
    r = check_per_channel_keys(lambda k, bits, group: per_channel(k, bits, group) * float("nan"), quiet=True)
    assert not r.ok and "NaN" in r.message


def test_malformed_answers_get_hints_not_tracebacks():
    for answer, words in (
        (..., "placeholder"),
        (3, "must be a function"),
        (lambda k, bits, group: 1 / 0, "raised ZeroDivisionError"),
        (lambda k, bits, group: k[0], "same shape as k"),
        (lambda k, bits, group: None, "same shape as k"),
        (lambda k: k, "raised TypeError"),
    ):
        r = check_per_channel_keys(answer, quiet=True)
        assert not r.ok and words in r.message, (words, r.message)
