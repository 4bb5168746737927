"""AWQ: scale search and clipping beat RTN on layer-output error over calibration inputs."""

from __future__ import annotations

import pytest
import torch

from qlab.methods.awq import awq_quantize, awq_search, clip_quantize, output_error
from qlab.quantize import QuantSpec, quantize


def outlier_inputs(rows: int = 512, features: int = 128, seed: int = 0) -> torch.Tensor:
    """Activations with a few channels 20x larger than the rest, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g)
    x[:, [3, 17, 90]] *= 20
    return x


def weight(out: int = 96, features: int = 128, seed: int = 1) -> torch.Tensor:
    return 0.02 * torch.randn(out, features, generator=torch.Generator().manual_seed(seed))


def layer_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x @ w.T - x @ w_hat.T).pow(2).mean().item()


def test_output_error_identity_matches_direct_computation() -> None:
    x, w = outlier_inputs(), weight()
    D = w - quantize(w, QuantSpec.per_group(3, 32)).dequantize()
    C = x.T @ x / x.shape[0]
    direct = (x @ D.T).pow(2).sum(1).mean().item()
    assert output_error(D, C) == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("bits,group", [(4, 64), (3, 32), (2, 32)])
def test_awq_beats_rtn_on_layer_output_error(bits: int, group: int) -> None:
    x, w = outlier_inputs(), weight()
    spec = QuantSpec.per_group(bits, group)
    rtn = quantize(w, spec).dequantize()
    for clip in (False, True):
        qt, s = awq_quantize(w, x, spec, clip=clip)
        effective = qt.dequantize() / s  # the layer computes (x / s) Ŵᵀ
        assert layer_error(x, w, effective) < 0.8 * layer_error(x, w, rtn)


def test_search_scales_the_outlier_channels_up_and_includes_rtn() -> None:
    x, w = outlier_inputs(seed=2), weight(seed=3)
    spec = QuantSpec.per_group(3, 32)
    res = awq_search(w, x, spec)
    assert res.alpha > 0 and res.loss < res.rtn_loss
    assert res.scale[[3, 17, 90]].min() > res.scale.median() * 2
    assert res.scale.max() * res.scale.min() == pytest.approx(1.0, rel=1e-4)
    one_point = awq_search(w, x, spec, grid=1)  # only alpha = 0: round-to-nearest
    assert one_point.alpha == 0 and one_point.loss == pytest.approx(one_point.rtn_loss)
    assert torch.equal(one_point.scale, torch.ones(128))


def test_shared_input_weights_are_searched_together() -> None:
    x = outlier_inputs(seed=4)
    ws = [weight(32, seed=5), weight(16, seed=6), weight(16, seed=7)]
    spec = QuantSpec.per_group(3, 32)
    res = awq_search(ws, x, spec)
    s = res.scale

    def summed(w: torch.Tensor, w_hat: torch.Tensor) -> float:  # mean over tokens, sum over outputs
        return (x @ w.T - x @ w_hat.T).pow(2).sum(1).mean().item()

    err = sum(summed(w, quantize(w * s, spec).dequantize() / s) for w in ws)
    err_rtn = sum(summed(w, quantize(w, spec).dequantize()) for w in ws)
    assert err == pytest.approx(res.loss, rel=1e-3) and err < err_rtn


def test_clip_search_never_loses_to_rtn_in_any_row_group() -> None:
    x, w = outlier_inputs(seed=8), weight(seed=9)
    spec = QuantSpec.per_group(2, 32)
    C = x.T @ x / x.shape[0]
    qt = clip_quantize(w, C, spec)
    rtn = quantize(w, spec).dequantize()

    def per_group(w_hat: torch.Tensor) -> torch.Tensor:
        D = (w - w_hat).reshape(96, 4, 32)
        return torch.stack(
            [(D[:, k] @ C[k * 32 : (k + 1) * 32, k * 32 : (k + 1) * 32] * D[:, k]).sum(1) for k in range(4)],
            1,
        )

    assert (per_group(qt.dequantize()) <= per_group(rtn) * (1 + 1e-4) + 1e-12).all()
    assert layer_error(x, w, qt.dequantize()) < layer_error(x, w, rtn)


def test_bad_inputs_raise_clear_errors() -> None:
    x, w = outlier_inputs(), weight()
    spec = QuantSpec.per_group(4, 32)
    with pytest.raises(ValueError, match="input features but x has"):
        awq_search(w, x[:, :64], spec)
    with pytest.raises(ValueError, match="at least 2 calibration rows"):
        awq_search(w, x[:1], spec)
    with pytest.raises(ValueError, match="at least one weight"):
        awq_search([], x, spec)
    with pytest.raises(ValueError, match="grid"):
        awq_search(w, x, spec, grid=0)
    with pytest.raises(ValueError, match="x contains NaN"):
        awq_search(w, x * float("nan"), spec)
