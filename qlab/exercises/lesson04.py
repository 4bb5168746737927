"""Checks for lesson 04, int8 in a real model: a W8A16 layer by hand, W8A8's per-token activations, and
SmoothQuant's migration scales.

Each check recomputes the answer with plain torch on the learner's inputs and says right or wrong; a wrong
answer gets a hint towards the reasoning, never the number. An answer of the wrong form (``...`` left in
place, a list where a tensor belongs, a function that raises) is a wrong answer with a hint; an argument the
lesson itself passes (the weight, the activations) still raises when it is wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from qlab.exercises import (
    AnswerError,
    CheckResult,
    answer_check,
    as_function,
    as_int,
    as_tensor,
    call_answer,
    report,
)


def _given(x: object, name: str, dim: int) -> torch.Tensor:
    """A tensor the lesson passes (not the learner's answer): wrong ones raise."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a float torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    return x.detach().float()


def _answer_vector(x: object, arg: str, n: int, what: str) -> torch.Tensor:
    """The learner's ``[n]`` (or ``[n, 1]``) tensor as a flat float vector, or a hint."""
    t = as_tensor(x, arg)
    if t.numel() != n:
        raise AnswerError(f"{arg} needs {what}: {n} of them, got a tensor of shape {tuple(t.shape)}.")
    return t.detach().float().reshape(-1)


@answer_check("per-channel int8 scales")
def check_channel_scales(weight: torch.Tensor, scales: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 1: symmetric int8 scales, one per output row of ``weight`` [out, in]: ``max|w_row| / 127``.

    ``scales`` may have shape ``[out]`` or ``[out, 1]``; within 1e-6 relative.
    """
    w = _given(weight, "weight", 2)
    want = w.abs().amax(dim=1) / 127
    per_column = w.abs().amax(dim=0) / 127
    column_hint = "those are per-input-column scales; a Linear weight is [out, in] and rows are outputs."
    t = as_tensor(scales, "scales")
    flat = t.detach().float().reshape(-1)
    if flat.numel() == per_column.numel() and torch.allclose(flat, per_column, rtol=1e-6):
        if flat.numel() != want.numel() or not torch.allclose(flat, want, rtol=1e-6):
            return report(False, "per-channel int8 scales", column_hint, quiet=quiet)
    got = _answer_vector(t, "scales", want.numel(), "one scale per output row (reduce over dim=1)")
    ok = torch.allclose(got, want, rtol=1e-6, atol=0)
    hint = "take the largest magnitude |w| of each row, and divide by 127 (the largest int8 code used)."
    return report(ok, "per-channel int8 scales", hint, quiet=quiet)


@answer_check("W8A16 forward")
def check_w8a16_forward(
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    *,
    quiet: bool = False,
) -> CheckResult:
    """Exercise 2: ``forward(x, q, scale, bias)`` of a W8A16 layer: ``y = x (scale ⊙ q)ᵀ + bias``.

    ``q`` is int8 ``[out, in]``, ``scale`` float ``[out]``, ``bias`` float ``[out]`` or None; ``x`` is
    ``[..., in]``. Tried on several shapes (2-D and 3-D ``x``, with and without bias); within 1e-4.
    """
    fn = as_function(forward, "forward", "(x, q, scale, bias) -> y")
    g = torch.Generator().manual_seed(4)
    for shape, with_bias in (((3, 16), True), ((2, 5, 16), False), ((1, 16), True)):
        q = torch.randint(-127, 128, (8, 16), generator=g, dtype=torch.int8)
        scale = torch.rand(8, generator=g) * 0.01 + 0.001
        bias = torch.randn(8, generator=g) if with_bias else None
        x = torch.randn(*shape, generator=g)
        want = F.linear(x, q.float() * scale[:, None], bias)
        got = call_answer(fn, "forward", x, q, scale, bias)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape_got = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AnswerError(f"expected a tensor of shape {tuple(want.shape)}, got {shape_got}.")
        if not torch.allclose(got.float(), want, rtol=1e-4, atol=1e-4):
            if torch.allclose(got.float(), F.linear(x, q.float() * scale[None, :8].T, bias), atol=1e-4):
                hint = "check the broadcast."
            elif bias is not None and torch.allclose(got.float(), want - bias, atol=1e-4):
                hint = "do not forget the bias."
            else:
                hint = (
                    "dequantize first (codes as float times the row's scale, scale[:, None]), then F.linear."
                )
            return report(False, "W8A16 forward", hint, quiet=quiet)
    return report(True, "W8A16 forward", "", quiet=quiet)


@answer_check("per-token activation scales")
def check_token_scales(x: torch.Tensor, scales: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 3: W8A8's dynamic per-token activation scales: ``s_t = max|x[t, :]| / 127`` for ``x`` [T, in].

    ``scales`` may have shape ``[T]`` or ``[T, 1]``; within 1e-6 relative.
    """
    xs = _given(x, "x", 2)
    want = xs.abs().amax(dim=-1) / 127
    t = as_tensor(scales, "token_scales")
    if t.numel() == 1:
        hint = "one scale for the whole tensor is per-tensor; W8A8 gives each token (row) its own."
        return report(False, "per-token activation scales", hint, quiet=quiet)
    got = _answer_vector(t, "token_scales", want.numel(), "one scale per token (row of x)")
    ok = torch.allclose(got, want, rtol=1e-6, atol=0)
    hint = "each token (row) gets its own scale: its largest |x| over the features, over 127."
    return report(ok, "per-token activation scales", hint, quiet=quiet)


@answer_check("W8A16 bytes")
def check_w8a16_bytes(
    out_features: int, in_features: int, answer: object, *, quiet: bool = False
) -> CheckResult:
    """Exercise 4: bytes of a W8A16 weight ``[out, in]``: one byte per code plus one fp32 scale per row."""
    for name, v in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    got = as_int(answer, "answer (bytes)")
    want = out_features * in_features + 4 * out_features
    if got == out_features * in_features:
        hint = "the scales take memory too: one float32 (4 bytes) per output row."
    else:
        hint = "one byte per int8 code, plus 4 bytes for each row's float32 scale."
    return report(got == want, "W8A16 bytes", hint, quiet=quiet)


@answer_check("SmoothQuant scales")
def check_smooth_scales(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float, s: object, *, quiet: bool = False
) -> CheckResult:
    """Exercise 5: SmoothQuant's per-input-feature scales ``s_j = max|X_j|^α / max_n|W_nj|^(1-α)``.

    ``act_absmax`` is ``[in]`` (max |activation| per input feature), ``weight`` ``[out, in]``; within 1e-5
    relative. The layer then computes ``(X / s)(W · s)ᵀ``.
    """
    a = _given(act_absmax, "act_absmax", 1)
    w = _given(weight, "weight", 2)
    if w.shape[1] != a.shape[0]:
        raise ValueError(f"weight must be [out, {a.shape[0]}] to match act_absmax, got {tuple(w.shape)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    w_col = w.abs().amax(dim=0)
    want = a.pow(alpha) / w_col.pow(1 - alpha)
    t = as_tensor(s, "s")
    if t.numel() == w.shape[0] and w.shape[0] != a.numel():
        hint = "one s per input feature j (a column of W [out, in]): reduce |W| over dim=0, the output rows."
        return report(False, "SmoothQuant scales", hint, quiet=quiet)
    got = _answer_vector(t, "s", a.numel(), "one scale per input feature")
    ok = torch.allclose(got, want, rtol=1e-5, atol=0)
    if ok:
        hint = ""
    elif torch.allclose(got, 1 / want, rtol=1e-5):
        hint = "upside down: s divides the activations, so it must be large where max|X_j| is large."
    elif torch.allclose(got, a / w_col, rtol=1e-5):
        hint = f"raise the activation max to α = {alpha} and the weight max to 1 - α before dividing."
    else:
        hint = "per input feature j: max|X_j| to the power α, over max|W[:, j]| to the power 1 - α."
    return report(ok, "SmoothQuant scales", hint, quiet=quiet)
