"""Lesson 07 exercises: the reference solutions pass, typical wrong answers fail with a hint."""

from __future__ import annotations

import numpy as np
import torch
from qlab.kernels.roofline import H100, H200

from qlab.exercises.lesson07 import (
    check_decode_intensity,
    check_ridge_batch,
    check_split_planes,
    check_unpack,
)


def unpack_solution(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The notebook's solution: shift every word by bits * j for each slot j, then mask."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (words[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(*words.shape[:-1], -1)


def unpack_no_mask(words: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = words[..., None] >> shifts
    return codes.reshape(*words.shape[:-1], -1) % 2**31  # keeps sign garbage in the high bits


def unpack_msb_first(words: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    shifts = (per - 1 - torch.arange(per, dtype=torch.int32)) * bits
    return ((words[..., None] >> shifts) & (2**bits - 1)).reshape(*words.shape[:-1], -1)


def test_unpack_solution_passes_and_wrong_ones_fail(capsys):
    assert check_unpack(unpack_solution)
    assert "correct" in capsys.readouterr().out
    assert not check_unpack(unpack_msb_first, quiet=True)
    assert not check_unpack(lambda w, b: w, quiet=True)  # shape is wrong: not unpacked
    result = check_unpack(unpack_no_mask, quiet=True)
    assert not result and "mask" in result.message


def test_unpack_malformed_answers_get_a_hint():
    not_fn = check_unpack(42, quiet=True)
    assert not not_fn and "unpack must be a function" in not_fn.message
    assert not check_unpack(..., quiet=True)
    raises = check_unpack(lambda w, b: w >> "2", quiet=True)  # the learner's code raises
    assert not raises and "raised TypeError" in raises.message
    assert not check_unpack(lambda w, b: None, quiet=True)  # an unfinished body


def test_intensity_solution_and_typical_mistakes():
    assert check_decode_intensity(1, 4, 2 * 1 / (4 / 8), quiet=True)  # 4 FLOPs per byte
    assert check_decode_intensity(16, 2, 128.0, quiet=True)
    assert check_decode_intensity(1, 16, torch.tensor(1.0), quiet=True)
    forgot_bytes = check_decode_intensity(1, 4, 2.0, quiet=True)  # FLOPs per weight
    assert not forgot_bytes and "bits / 8" in forgot_bytes.message
    half = check_decode_intensity(16, 2, 64.0, quiet=True)  # counted one FLOP per multiply-add
    assert not half and "2 FLOPs" in half.message
    text = check_decode_intensity(1, 4, "4", quiet=True)
    assert not text and "answer must be a number" in text.message
    assert check_decode_intensity(1, 4, np.float32(4.0), quiet=True)


def test_ridge_solution_and_typical_mistakes():
    assert check_ridge_batch(H100, 4, H100.peak_flops / H100.bandwidth * 4 / 16, quiet=True)
    assert check_ridge_batch(H200, 2, 989e12 / 4.8e12 / 8, quiet=True)
    ridge_itself = check_ridge_batch(H100, 4, H100.ridge, quiet=True)
    assert not ridge_itself and "solve" in ridge_itself.message
    upside_down = check_ridge_batch(H100, 4, H100.ridge * 16 / 4, quiet=True)
    assert not upside_down and "upside down" in upside_down.message
    assert not check_ridge_batch(H100, 4, ..., quiet=True)


def split_solution(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The notebook's solution: q1 rounds x / sx, q2 rounds the rest on a 254x finer grid."""
    sx = x.abs().amax(dim=1, keepdim=True) / 127
    t = x / sx
    q1 = torch.round(t)
    q2 = torch.round((t - q1) * 254)
    return sx, q1, q2


def test_split_planes_solution_and_typical_mistakes(capsys):
    assert check_split_planes(split_solution)
    assert "correct" in capsys.readouterr().out

    def one_plane(x):
        sx, q1, _ = split_solution(x)
        return sx, q1, torch.zeros_like(q1)

    def global_scale(x):
        sx = x.abs().max() / 127 * torch.ones(x.shape[0], 1)
        t = x / sx
        return sx, torch.round(t), torch.round((t - torch.round(t)) * 254)

    def coarse_rest(x):
        sx, q1, _ = split_solution(x)
        return sx, q1, torch.round((x / sx - q1) * 127)

    def truncating(x):
        sx = x.abs().amax(dim=1, keepdim=True) / 127
        q1 = torch.trunc(x / sx)
        return sx, q1, torch.round((x / sx - q1) * 254).clamp(-127, 127)

    for wrong, word in (
        (one_plane, "left over"),
        (global_scale, "each row"),
        (coarse_rest, "254"),
        (truncating, "nearest"),
    ):
        result = check_split_planes(wrong, quiet=True)
        assert not result and word in result.message, (wrong.__name__, result.message)
    assert not check_split_planes(lambda x: x, quiet=True)
    not_fn = check_split_planes(3, quiet=True)
    assert not not_fn and "split_planes must be a function" in not_fn.message
    raises = check_split_planes(lambda x: x.amax(dim=5), quiet=True)
    assert not raises and "raised IndexError" in raises.message
