"""Lesson 04's checks: each accepts the right answer and rejects typical wrong and malformed ones with a hint.

The right answers are computed here in plain torch from the formulas the lesson teaches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qlab.exercises import lesson04 as L4

MALFORMED = (..., None, [1.0, 2.0], "0.1", 3)


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(12, 20, generator=torch.Generator().manual_seed(0))


def test_channel_scales(weight: torch.Tensor) -> None:
    assert L4.check_channel_scales(weight, weight.abs().amax(dim=1) / 127, quiet=True)
    assert L4.check_channel_scales(weight, weight.abs().amax(dim=1, keepdim=True) / 127, quiet=True)
    wrong = L4.check_channel_scales(weight, weight.abs().amax(dim=1) / 255, quiet=True)
    assert not wrong and "127" in wrong.message
    columns = L4.check_channel_scales(weight, weight.abs().amax(dim=0) / 127, quiet=True)
    assert not columns and "per-input-column" in columns.message
    square = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))  # same count, rows vs columns
    assert (
        "per-input-column" in L4.check_channel_scales(square, square.abs().amax(0) / 127, quiet=True).message
    )
    assert "12 of them" in L4.check_channel_scales(weight, torch.ones(5), quiet=True).message
    for bad in MALFORMED:
        res = L4.check_channel_scales(weight, bad, quiet=True)
        assert not res and "Hint" in res.message
    with pytest.raises(TypeError, match="weight"):
        L4.check_channel_scales([[1.0]], torch.ones(1))


def test_w8a16_forward() -> None:
    def reference(x, q, scale, bias):
        return F.linear(x, q.float() * scale[:, None], bias)

    def no_bias(x, q, scale, bias):
        return F.linear(x, q.float() * scale[:, None])

    def codes_only(x, q, scale, bias):
        return F.linear(x, q.float(), bias)

    def flattened(x, q, scale, bias):
        return reference(x, q, scale, bias).reshape(-1)

    assert L4.check_w8a16_forward(reference, quiet=True)
    assert "bias" in L4.check_w8a16_forward(no_bias, quiet=True).message
    assert not L4.check_w8a16_forward(codes_only, quiet=True)
    assert "shape" in L4.check_w8a16_forward(flattened, quiet=True).message
    assert "raised ZeroDivisionError" in L4.check_w8a16_forward(lambda *a: 1 / 0, quiet=True).message
    for bad in (..., None, 3, lambda x: x, lambda *a: "y"):
        res = L4.check_w8a16_forward(bad, quiet=True)
        assert not res and "Hint" in res.message


def test_token_scales() -> None:
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    assert L4.check_token_scales(x, x.abs().amax(dim=-1) / 127, quiet=True)
    assert L4.check_token_scales(x, x.abs().amax(dim=-1, keepdim=True) / 127, quiet=True)
    features = L4.check_token_scales(x, x.abs().amax(dim=0) / 127, quiet=True)  # per feature: 16 values
    assert not features and "5 of them" in features.message
    per_tensor = L4.check_token_scales(x, x.abs().max() / 127, quiet=True)
    assert not per_tensor and "per-tensor" in per_tensor.message
    assert not L4.check_token_scales(x, x.abs().max().expand(5) / 127, quiet=True)
    for bad in MALFORMED:
        res = L4.check_token_scales(x, bad, quiet=True)
        assert not res and "Hint" in res.message


def test_w8a16_bytes() -> None:
    assert L4.check_w8a16_bytes(576, 1536, 576 * 1536 + 4 * 576, quiet=True)
    assert L4.check_w8a16_bytes(576, 1536, np.int64(576 * 1536 + 4 * 576), quiet=True)
    assert L4.check_w8a16_bytes(576, 1536, torch.tensor(576 * 1536 + 4 * 576), quiet=True)
    assert "scales" in L4.check_w8a16_bytes(576, 1536, 576 * 1536, quiet=True).message
    assert not L4.check_w8a16_bytes(576, 1536, 576 * 1536 + 2 * 576, quiet=True)  # fp16 scales
    for bad in (..., None, "884736", [1], 1.5, torch.ones(2)):
        res = L4.check_w8a16_bytes(576, 1536, bad, quiet=True)
        assert not res and "Hint" in res.message
    with pytest.raises(ValueError, match="out_features"):
        L4.check_w8a16_bytes(0, 3, 1)


def test_smooth_scales() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 16, generator=g)
    a = torch.rand(16, generator=g) * 3 + 0.1
    a[4] = 40.0  # an outlier feature
    for alpha in (0.5, 0.8):
        right = a**alpha / w.abs().amax(dim=0) ** (1 - alpha)
        assert L4.check_smooth_scales(a, w, alpha, right, quiet=True)
        upside = L4.check_smooth_scales(a, w, alpha, 1 / right, quiet=True)
        assert not upside and "upside down" in upside.message
        no_alpha = L4.check_smooth_scales(a, w, alpha, a / w.abs().amax(dim=0), quiet=True)
        assert not no_alpha and "raise the activation max" in no_alpha.message
        rows = L4.check_smooth_scales(a, w, alpha, a[:1] * w.abs().amax(dim=1), quiet=True)  # 24 values
        assert not rows and "dim=0" in rows.message
        wrong_alpha = 1 - alpha if alpha != 0.5 else 0.3
        assert not L4.check_smooth_scales(
            a, w, alpha, a**wrong_alpha / w.abs().amax(dim=0) ** (1 - wrong_alpha), quiet=True
        )
    for bad in MALFORMED:
        res = L4.check_smooth_scales(a, w, 0.5, bad, quiet=True)
        assert not res and "Hint" in res.message
    with pytest.raises(ValueError, match="alpha"):
        L4.check_smooth_scales(a, w, 1.5, a)
    with pytest.raises(ValueError, match="to match act_absmax"):
        L4.check_smooth_scales(a, w.T, 0.5, a)


def test_checks_print_one_line(capsys: pytest.CaptureFixture[str], weight: torch.Tensor) -> None:
    L4.check_channel_scales(weight, weight.abs().amax(dim=1) / 127)
    L4.check_channel_scales(weight, ...)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("✅") and out[1].startswith("❌") and len(out) == 2
