"""W8A8 with outliers: Int8Linear against plain torch, LLM.int8 decomposition, SmoothQuant scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlab.methods.smoothquant import smooth_scales
from qlab.nn import Int8Linear, outlier_features


def layer(seed: int = 0, features: int = 64, out: int = 32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(features, out)


def activations(seed: int = 1, rows: int = 40, features: int = 64, outlier: float = 60.0) -> torch.Tensor:
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))
    x[:, [2, 33]] *= outlier
    return x


def test_plain_w8a8_matches_torch_reference() -> None:
    lin, x = layer(), activations()
    ours = Int8Linear.from_linear(lin, threshold=None)(x)
    w = lin.weight.detach()
    sw = w.abs().amax(1, keepdim=True) / 127
    qw = torch.round(w / sw)
    sx = x.abs().amax(1, keepdim=True) / 127
    qx = torch.round(x / sx)
    ref = (qx @ qw.T) * sx * sw.T + lin.bias.detach()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_llm_int8_decomposition_keeps_outlier_features_in_float() -> None:
    lin, x = layer(), activations()
    exact = lin(x).detach()
    plain = Int8Linear.from_linear(lin, threshold=None)(x)
    mixed = Int8Linear.from_linear(lin, threshold=6.0)(x)
    assert outlier_features(x, 6.0).nonzero().flatten().tolist() == [2, 33]
    assert (mixed - exact).pow(2).mean() < 0.1 * (plain - exact).pow(2).mean()
    # Without outliers the decomposition is plain W8A8.
    calm = activations(outlier=1.0).clamp(-5, 5)
    torch.testing.assert_close(
        Int8Linear.from_linear(lin, threshold=6.0)(calm), Int8Linear.from_linear(lin, threshold=None)(calm)
    )


def test_smooth_scales_formula_and_effect() -> None:
    lin, x = layer(2), activations(3)
    s = smooth_scales(x.abs().amax(0), lin.weight, alpha=0.5)
    ref = x.abs().amax(0).sqrt() / lin.weight.detach().abs().amax(0).sqrt()
    torch.testing.assert_close(s, ref)
    exact = lin(x).detach()
    plain = Int8Linear.from_linear(lin, threshold=None)(x)
    smooth = Int8Linear.from_linear(lin, threshold=None, input_scale=s)(x)
    assert (smooth - exact).pow(2).mean() < 0.2 * (plain - exact).pow(2).mean()


def test_bad_inputs() -> None:
    lin = layer()
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear.from_linear(lin, threshold=0.0)
    with pytest.raises(ValueError, match="input_scale must have shape"):
        Int8Linear.from_linear(lin, input_scale=torch.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(torch.ones(64), lin.weight, alpha=2.0)
    with pytest.raises(ValueError, match="to match act_absmax"):
        smooth_scales(torch.ones(63), lin.weight)
