"""Checks for lesson 06, 2-bit: the levels of a group, one HQQ zero-point step, layer-output error, the
straight-through estimator.

Each check recomputes the answer with qlab and compares; a wrong answer gets a hint, never the number.
"""

from __future__ import annotations

import torch

from qlab.exercises import (
    AnswerError,
    CheckResult,
    answer_check,
    as_function,
    as_number,
    as_tensor,
    call_answer,
    report,
)
from qlab.methods.hqq import hqq_zero_update
from qlab.quantize import QuantSpec, fake_quantize


def _tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


@answer_check("the four 2-bit levels")
def check_two_bit_levels(
    scale: float, zero: float, levels: torch.Tensor, *, quiet: bool = False
) -> CheckResult:
    """Exercise 1: the 4 values a 2-bit asymmetric group with ``scale`` and ``zero`` can represent,
    in increasing order (to a relative 1e-5)."""
    levels = as_tensor(levels, "levels")
    if levels.numel() != 4:
        raise AnswerError(f"2 bits give 4 codes, so 4 levels; got {levels.numel()} values.")
    ref = scale * (torch.arange(4, dtype=torch.float64) - zero)
    ok = levels.numel() == 4 and torch.allclose(levels.double().flatten(), ref, rtol=1e-5, atol=1e-12)
    hint = "dequantize every code: ŵ = scale * (q - zero) for q = 0, 1, 2, 3"
    return report(ok, "the four 2-bit levels", hint, quiet=quiet)


@answer_check("one HQQ zero-point step")
def check_hqq_zero_step(
    w: torch.Tensor, scale: float, zero: float, new_zero: object, *, quiet: bool = False
) -> CheckResult:
    """Exercise 2: one HQQ zero-point update of a 2-bit group ``w`` (1-D) whose rounding errors all lie
    below the shrinkage threshold (β small enough; a *smaller* β widens the threshold), so that the
    shrinkage zeroes every error: ``z ← mean(q) - mean(w / s)`` with ``q = clamp(round(w/s + z), 0, 3)``.
    Compared with :func:`qlab.methods.hqq.hqq_zero_update` (one step, β = 10) to a relative 1e-5."""
    w = _tensor(w, "w").float().reshape(1, -1)
    new_zero = as_number(new_zero, "new_zero")
    ref = float(hqq_zero_update(w, float(scale), float(zero), bits=2))
    ok = abs(new_zero - ref) <= 1e-5 * max(1.0, abs(ref))
    hint = (
        "codes first: q = clamp(round(w / scale + zero), 0, 3); then the zero that makes the mean "
        "error zero with those codes: mean(q) - mean(w / scale)"
    )
    return report(ok, "one HQQ zero-point step", hint, quiet=quiet)


@answer_check("layer-output error")
def check_output_error(
    x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor, answer: object, *, quiet: bool = False
) -> CheckResult:
    """Exercise 3: the layer-output error GPTQ and AWQ minimize, ``mean over tokens and outputs of
    (x wᵀ - x ŵᵀ)²`` for inputs ``x`` [tokens, in] (to a relative 1e-4)."""
    x, w, w_hat = _tensor(x, "x"), _tensor(w, "w"), _tensor(w_hat, "w_hat")
    answer = as_number(answer, "answer")
    ref = (x.double() @ (w.double() - w_hat.double()).T).pow(2).mean().item()
    ok = abs(answer - ref) <= 1e-4 * ref
    weight_err = (w.double() - w_hat.double()).pow(2).mean().item()
    if abs(answer - weight_err) <= 1e-4 * weight_err:
        hint = "that is the weight error, the proxy; run both layers on the inputs: x @ w.T and x @ w_hat.T"
    else:
        hint = "run both layers on the same x (x @ w.T and x @ w_hat.T), subtract, square, average everything"
    return report(ok, "layer-output error", hint, quiet=quiet)


@answer_check("the straight-through estimator")
def check_straight_through(ste: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 4: ``ste(w, spec)`` returns a tensor whose *value* is the fake-quantized weight
    ``dequantize(quantize(w, spec))`` and whose *gradient* with respect to ``w`` is the identity
    (``w + (ŵ - w).detach()``). Tried on a seeded 2-bit g64 weight with a random upstream gradient."""
    fn = as_function(ste, "ste", "(w, spec) -> tensor")
    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(8, 128, generator=gen) * 0.02).requires_grad_(True)
    spec = QuantSpec.per_group(2, 64)
    out = call_answer(fn, "ste", w, spec)
    if not isinstance(out, torch.Tensor) or out.shape != w.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise AnswerError(f"ste must return a tensor shaped like w {tuple(w.shape)}, got {shape}.")
    w_hat = fake_quantize(w.detach(), spec)
    if not torch.allclose(out.detach().float(), w_hat, rtol=0, atol=1e-6):
        hint = "the forward value must be the quantized weight ŵ = fake_quantize(w, spec), not w itself"
        return report(False, "the straight-through estimator", hint, quiet=quiet)
    upstream = torch.randn(w.shape, generator=gen)
    if out.requires_grad:
        (grad,) = torch.autograd.grad(out, w, upstream, allow_unused=True)
    else:
        grad = None
    ok = grad is not None and torch.allclose(grad, upstream, rtol=1e-6, atol=1e-7)
    if grad is None or not grad.any():
        hint = (
            "the value is right, but no gradient reaches w: rounding has none. Keep w in the graph and add "
            "the rounding error as a constant: w + (ŵ - w).detach()"
        )
    else:
        hint = (
            "a gradient reaches w, but not the upstream gradient unchanged (through the group's scale, or "
            "scaled): the estimator's backward is the identity, so detach the whole rounding error (ŵ - w)"
        )
    return report(ok, "the straight-through estimator", hint, quiet=quiet)
