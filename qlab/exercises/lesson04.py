"""Checks for lesson 04, int8 in a real model: a W8A16 layer by hand, and W8A8's per-token activations.

Each check recomputes the answer with plain torch on the learner's inputs and says right or wrong; a wrong
answer gets a hint towards the reasoning, never the number.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from qlab.exercises import CheckResult, report


def _tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_channel_scales(weight: torch.Tensor, scales: torch.Tensor, *, quiet: bool = False) -> CheckResult:
    """Exercise 1: symmetric int8 scales, one per output row of ``weight`` [out, in]: ``max|w_row| / 127``.

    ``scales`` may have shape ``[out]`` or ``[out, 1]``; within 1e-6 relative.
    """
    weight, scales = _tensor(weight, "weight"), _tensor(scales, "scales")
    want = weight.detach().float().abs().amax(dim=1) / 127
    got = scales.detach().float().reshape(-1)
    if got.numel() != want.numel():
        ok, hint = False, f"one scale per output row: {want.numel()} of them (reduce over dim=1, the inputs)."
    else:
        ok = torch.allclose(got, want, rtol=1e-6, atol=0)
        if ok:
            hint = ""
        elif torch.allclose(got, weight.detach().float().abs().amax(dim=0)[: got.numel()] / 127, rtol=1e-6):
            hint = "those are per-input-column scales; a Linear weight is [out, in] and rows are outputs."
        else:
            hint = (
                "take the largest magnitude |w| of each row, and divide by 127 (the largest int8 code used)."
            )
    return report(ok, "per-channel int8 scales", hint, quiet=quiet)


def check_w8a16_forward(
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    *,
    quiet: bool = False,
) -> CheckResult:
    """Exercise 2: ``forward(x, q, scale, bias)`` of a W8A16 layer: ``y = x (scale ⊙ q)ᵀ + bias``.

    ``q`` is int8 ``[out, in]``, ``scale`` float ``[out]``, ``bias`` float ``[out]`` or None; ``x`` is
    ``[..., in]``. Tried on several shapes (2-D and 3-D ``x``, with and without bias); within 1e-4.
    """
    if not callable(forward):
        raise TypeError(f"forward must be a function, got {type(forward).__name__}")
    g = torch.Generator().manual_seed(4)
    for shape, with_bias in (((3, 16), True), ((2, 5, 16), False), ((1, 16), True)):
        q = torch.randint(-127, 128, (8, 16), generator=g, dtype=torch.int8)
        scale = torch.rand(8, generator=g) * 0.01 + 0.001
        bias = torch.randn(8, generator=g) if with_bias else None
        x = torch.randn(*shape, generator=g)
        want = F.linear(x, q.float() * scale[:, None], bias)
        try:
            got = forward(x, q, scale, bias)
        except Exception as err:  # a learner's bug is a wrong answer, with its message as the hint
            return report(False, "W8A16 forward", f"it raised {type(err).__name__}: {err}", quiet=quiet)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape_got = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return report(
                False, "W8A16 forward", f"expected shape {tuple(want.shape)}, got {shape_got}.", quiet=quiet
            )
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


def check_token_scales(x: torch.Tensor, scales: torch.Tensor, *, quiet: bool = False) -> CheckResult:
    """Exercise 3: W8A8's dynamic per-token activation scales: ``s_t = max|x[t, :]| / 127`` for ``x`` [T, in].

    ``scales`` may have shape ``[T]`` or ``[T, 1]``; within 1e-6 relative.
    """
    x, scales = _tensor(x, "x"), _tensor(scales, "scales")
    want = x.detach().float().abs().amax(dim=-1).reshape(-1) / 127
    got = scales.detach().float().reshape(-1)
    if got.numel() != want.numel():
        ok, hint = False, f"one scale per token (row of x): {want.numel()} of them."
    else:
        ok = torch.allclose(got, want, rtol=1e-6, atol=0)
        hint = (
            "" if ok else "each token (row) gets its own scale: its largest |x| over the features, over 127."
        )
    return report(ok, "per-token activation scales", hint, quiet=quiet)


def check_w8a16_bytes(
    out_features: int, in_features: int, answer: int, *, quiet: bool = False
) -> CheckResult:
    """Exercise 4: bytes of a W8A16 weight ``[out, in]``: one byte per code plus one fp32 scale per row."""
    for name, v in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(answer, bool) or not isinstance(answer, (int, float)):
        raise TypeError(f"answer must be a number of bytes, got {type(answer).__name__}")
    want = out_features * in_features + 4 * out_features
    ok = answer == want
    if ok:
        hint = ""
    elif answer == out_features * in_features:
        hint = "the scales take memory too: one float32 (4 bytes) per output row."
    else:
        hint = "one byte per int8 code, plus 4 bytes for each row's float32 scale."
    return report(ok, "W8A16 bytes", hint, quiet=quiet)
