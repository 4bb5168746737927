"""GPTQ: matches a plain-torch OBS reference, beats RTN on layer-output error."""

from __future__ import annotations

import pytest
import torch

from qlab.calibration import hessian
from qlab.methods.gptq import gptq_quantize
from qlab.quantize import QuantSpec, compute_scale_zero, quantize


def correlated_inputs(rows: int = 1024, features: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5
    x = torch.randn(rows, features, generator=g) @ mix + 0.1 * torch.randn(rows, features, generator=g)
    x[:, :4] *= 8  # a few strong input channels
    return x


def weight(out: int = 64, features: int = 128, seed: int = 1) -> torch.Tensor:
    return 0.02 * torch.randn(out, features, generator=torch.Generator().manual_seed(seed))


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x @ w.T - x @ w_hat.T).pow(2).mean().item()


def obs_reference(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float) -> torch.Tensor:
    """Optimal Brain Surgeon, column by column, with the inverse Hessian updated by a Schur
    complement after each column (no Cholesky, no blocks): the textbook form GPTQ speeds up."""
    W = w.double().clone()
    H = H.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    scale, zero = compute_scale_zero(w, spec)  # per channel: fixed up front
    s, z = scale.double().reshape(-1), zero.double().reshape(-1)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        q = torch.clamp(torch.round(W[:, j] / s) + z, spec.qmin, spec.qmax)
        Q[:, j] = s * (q - z)
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q.float()


def test_matches_textbook_obs_reference() -> None:
    x, w = correlated_inputs(), weight()
    spec = QuantSpec.per_channel(3, symmetric=False)
    H = hessian(x)
    ours = gptq_quantize(w, H, spec, damp=0.01, block_size=32).dequantize()
    ref = obs_reference(w, H, spec, damp=0.01)
    same = torch.isclose(ours, ref, rtol=1e-4, atol=1e-6).float().mean().item()
    assert same > 0.99  # a rounding tie can flip a code; everything else must agree


@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_lazy_block_size_does_not_change_the_result(block_size: int) -> None:
    x, w = correlated_inputs(seed=2), weight(seed=3)
    spec = QuantSpec.per_group(4, 32)
    H = hessian(x)
    base = gptq_quantize(w, H, spec, block_size=128).dequantize()
    other = gptq_quantize(w, H, spec, block_size=block_size).dequantize()
    assert torch.isclose(base, other, rtol=1e-4, atol=1e-6).float().mean().item() > 0.99


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (2, 32), (4, None)])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_on_layer_output_error(bits: int, group: int | None, act_order: bool) -> None:
    x, w = correlated_inputs(seed=4), weight(seed=5)
    spec = QuantSpec.per_group(bits, group) if group else QuantSpec.per_channel(bits, symmetric=False)
    rtn = quantize(w, spec).dequantize()
    qt = gptq_quantize(w, hessian(x), spec, act_order=act_order)
    assert qt.scale.shape == quantize(w, spec).scale.shape
    assert output_error(x, w, qt.dequantize()) < 0.7 * output_error(x, w, rtn)


def test_symmetric_spec_and_dead_inputs() -> None:
    x, w = correlated_inputs(seed=6), weight(seed=7)
    x[:, 5] = 0  # an input that never fires
    spec = QuantSpec.per_group(4, 32, symmetric=True)
    qt = gptq_quantize(w, hessian(x), spec)
    assert qt.zero is None and qt.codes.dtype == torch.int8
    assert (qt.dequantize()[:, 5] == 0).all()
    assert output_error(x, w, qt.dequantize()) < output_error(x, w, quantize(w, spec).dequantize())


def test_bad_inputs_raise_clear_errors() -> None:
    x, w = correlated_inputs(), weight()
    H = hessian(x)
    spec = QuantSpec.per_group(4, 32)
    with pytest.raises(ValueError, match=r"H must be \[in_features, in_features\]"):
        gptq_quantize(w, H[:64, :64], spec)
    with pytest.raises(ValueError, match="2-D weight"):
        gptq_quantize(w[0], H, spec)
    with pytest.raises(ValueError, match="codebook"):
        gptq_quantize(
            w, H, QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64, codebook="nf4")
        )
    with pytest.raises(ValueError, match="per-output-channel"):
        gptq_quantize(w, H, QuantSpec.per_tensor(4))
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, H, spec, damp=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, H * float("nan"), spec)
    with pytest.raises(TypeError, match="H must be a torch.Tensor"):
        gptq_quantize(w, None, spec)  # type: ignore[arg-type]
