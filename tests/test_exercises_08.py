"""Lesson 08's KV-cache exercise check: right, typical wrong and malformed answers (hints, no traceback)."""

from __future__ import annotations

import torch

from qlab.exercises.lesson08 import check_per_channel_keys


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
