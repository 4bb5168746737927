"""The reference solutions of lessons 05 and 06 pass their checks; typical wrong answers fail."""

from __future__ import annotations

import math

import numpy as np
import torch

from qlab.exercises.lesson05 import (
    check_group_scales,
    check_mx_scale_code,
    check_nf4_bits_per_weight,
    check_pack_4bit,
)
from qlab.exercises.lesson06 import (
    check_hqq_zero_step,
    check_output_error,
    check_straight_through,
    check_two_bit_levels,
)
from qlab.quantize import QuantSpec, fake_quantize


def test_group_scales() -> None:
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    wg = w.reshape(4, -1, 16)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    assert check_group_scales(w, 16, scale, zero, quiet=True)
    assert not check_group_scales(w, 16, (hi - lo) / 16, zero, quiet=True)  # 16 steps instead of 15
    assert not check_group_scales(w, 16, scale, -lo / scale, quiet=True)  # zero not rounded
    assert not check_group_scales(w, 16, scale.flatten(), zero.flatten(), quiet=True)  # wrong shape
    not_tensor = check_group_scales(w, 16, 0.1, zero, quiet=True)  # type: ignore[arg-type]
    assert not not_tensor and "scale must be a torch.Tensor" in not_tensor.message
    assert not check_group_scales(w, 16, ..., ..., quiet=True)  # type: ignore[arg-type]


def test_pack_4bit() -> None:
    assert check_pack_4bit(lambda c: (c[..., 1::2] << 4) | c[..., 0::2], quiet=True)
    assert not check_pack_4bit(lambda c: (c[..., 0::2] << 4) | c[..., 1::2], quiet=True)  # nibbles swapped
    assert not check_pack_4bit(lambda c: c, quiet=True)  # not packed
    assert not check_pack_4bit(lambda c: (c[..., 1::2] << 4) + c[..., 0::2].float(), quiet=True)  # floats
    raises = check_pack_4bit(lambda c: c.reshape(-1, 3), quiet=True)  # the learner's code raises
    assert not raises and "raised RuntimeError" in raises.message
    assert not check_pack_4bit(..., quiet=True)  # type: ignore[arg-type]


def test_nf4_bits_per_weight() -> None:
    n = 1536 * 576
    blocks = n // 64
    right = (4 * n + 8 * blocks + 32 * math.ceil(blocks / 256) + 32) / n
    assert check_nf4_bits_per_weight((1536, 576), 64, True, right, quiet=True)
    assert check_nf4_bits_per_weight((1536, 576), 64, False, 4.5, quiet=True)
    assert not check_nf4_bits_per_weight((1536, 576), 64, True, 4.5, quiet=True)  # no double quant
    assert not check_nf4_bits_per_weight((1536, 576), 64, True, 4.0, quiet=True)  # codes only
    assert check_nf4_bits_per_weight((1536, 576), 64, False, np.float64(4.5), quiet=True)
    text = check_nf4_bits_per_weight((1536, 576), 64, True, "4.127", quiet=True)  # type: ignore[arg-type]
    assert not text and "must be a number" in text.message


def test_mx_scale_code() -> None:
    def amax(b):
        return b.abs().amax(1).double()

    # right: from the spec's formula, in plain torch (the exact floor of log2 via frexp, or log2 in float64)
    assert check_mx_scale_code(lambda b: torch.frexp(amax(b))[1] - 1 - 2 + 127, quiet=True)
    assert check_mx_scale_code(lambda b: torch.floor(torch.log2(amax(b))) + 125, quiet=True)
    no_emax = check_mx_scale_code(lambda b: torch.floor(torch.log2(amax(b))) + 127, quiet=True)
    assert not no_emax and "emax" in no_emax.message
    rounded = check_mx_scale_code(lambda b: torch.round(torch.log2(amax(b))) + 125, quiet=True)
    assert not rounded and "floor" in rounded.message
    unbiased = check_mx_scale_code(lambda b: torch.floor(torch.log2(amax(b))) - 2, quiet=True)
    assert not unbiased and "bias of 127" in unbiased.message
    assert not check_mx_scale_code(lambda b: torch.log2(amax(b)) + 125, quiet=True)  # not an integer
    shape = check_mx_scale_code(lambda b: amax(b)[:3], quiet=True)
    assert not shape and "one integer per block" in shape.message
    assert not check_mx_scale_code(lambda b: 127, quiet=True)
    assert not check_mx_scale_code(..., quiet=True)  # type: ignore[arg-type]
    raises = check_mx_scale_code(lambda b: b.reshape(7, -1), quiet=True)
    assert not raises and "raised RuntimeError" in raises.message


def test_two_bit_levels() -> None:
    assert check_two_bit_levels(0.012, 1.4, 0.012 * (torch.arange(4) - 1.4), quiet=True)
    assert not check_two_bit_levels(0.012, 1.4, 0.012 * torch.arange(4), quiet=True)  # zero forgotten
    assert not check_two_bit_levels(0.012, 1.4, 0.012 * (torch.arange(3) - 1.4), quiet=True)
    assert not check_two_bit_levels(0.012, 1.4, 0.012 * (torch.arange(4) + 1.4), quiet=True)  # sign of zero
    # malformed answers get a hint, never a traceback
    for bad in ([0.0, 0.1, 0.2, 0.3], ..., None, "levels"):
        res = check_two_bit_levels(0.012, 1.4, bad, quiet=True)  # type: ignore[arg-type]
        assert not res and "Hint" in res.message


def test_hqq_zero_step() -> None:
    g = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 0.02
    s = ((g.max() - g.min()) / 3).item()
    z = (-g.min() / s).item()
    q = torch.clamp(torch.round(g / s + z), 0, 3)
    right = (q.mean() - (g / s).mean()).item()
    assert check_hqq_zero_step(g, s, z, right, quiet=True)
    assert not check_hqq_zero_step(g, s, z, z, quiet=True)  # no update
    unclamped = torch.round(g / s + z + 0.7)
    assert not check_hqq_zero_step(g, s, z, (unclamped.mean() - (g / s).mean()).item(), quiet=True)
    assert check_hqq_zero_step(g, s, z, torch.tensor(right), quiet=True)
    assert check_hqq_zero_step(g, s, z, np.float32(right), quiet=True)
    assert not check_hqq_zero_step(g, s, z, (g / s).mean().item() - q.mean().item(), quiet=True)  # inverted
    for bad in (..., "0.5", torch.zeros(3)):
        res = check_hqq_zero_step(g, s, z, bad, quiet=True)  # type: ignore[arg-type]
        assert not res and "Hint" in res.message


def test_output_error() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 16, generator=gen), torch.randn(8, 16, generator=gen)
    w_hat = w + 0.1 * torch.randn(8, 16, generator=gen)
    right = (x @ w.T - x @ w_hat.T).pow(2).mean().item()
    assert check_output_error(x, w, w_hat, right, quiet=True)
    assert not check_output_error(x, w, w_hat, (w - w_hat).pow(2).mean().item(), quiet=True)  # weight error
    assert not check_output_error(x, w, w_hat, (x @ (w - w_hat).T).pow(2).sum(1).mean().item(), quiet=True)
    weight = check_output_error(x, w, w_hat, (w - w_hat).pow(2).mean().item(), quiet=True)
    assert "proxy" in weight.message  # the weight error is named as such
    res = check_output_error(x, w, w_hat, ..., quiet=True)  # type: ignore[arg-type]
    assert not res and "placeholder" in res.message


def _rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Asymmetric min-max RTN per group in plain torch (range widened to hold 0, integer zero)."""
    g = w.reshape(-1, spec.group_size)
    lo, hi = g.amin(1, keepdim=True).clamp(max=0), g.amax(1, keepdim=True).clamp(min=0)
    s = (hi - lo) / spec.qmax
    z = torch.round(-lo / s)
    return (s * (torch.clamp(torch.round(g / s) + z, 0, spec.qmax) - z)).reshape(w.shape)


def test_straight_through() -> None:
    assert check_straight_through(lambda w, spec: w + (_rtn(w.detach(), spec) - w).detach(), quiet=True)
    assert check_straight_through(lambda w, spec: (_rtn(w.detach(), spec) - w).detach() + w, quiet=True)
    # typical wrong answers: the gradient flows only through the group's scale, or not at all
    through_scale = check_straight_through(lambda w, spec: fake_quantize(w, spec), quiet=True)
    assert not through_scale and "scale" in through_scale.message
    none = check_straight_through(lambda w, spec: fake_quantize(w.detach(), spec), quiet=True)
    assert not none and "no gradient" in none.message
    cancelled = check_straight_through(lambda w, spec: w + _rtn(w.detach(), spec) - w, quiet=True)
    assert not cancelled and "no gradient" in cancelled.message
    identity = check_straight_through(lambda w, spec: w, quiet=True)  # forgot to quantize
    assert not identity and "forward value" in identity.message
    assert not check_straight_through(
        lambda w, spec: 2 * w + (_rtn(w.detach(), spec) - 2 * w).detach(), quiet=True
    )
    # malformed answers get a hint, never a traceback
    for bad in (..., None, 3, lambda w: w, lambda w, spec: 3, lambda w, spec: w[0], lambda w, spec: 1 / 0):
        res = check_straight_through(bad, quiet=True)
        assert not res and "Hint" in res.message
