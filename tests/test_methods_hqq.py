"""HQQ: beats round-to-nearest on the lp error it optimizes, matches a plain-torch HQQ step."""

from __future__ import annotations

import pytest
import torch

from qlab.methods.hqq import hqq_quantize
from qlab.quantize import QuantSpec, quantize


def heavy_tailed(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Student-t weights: a normal bulk with outliers, like trained layers."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g)
    chi = torch.randn(rows, cols, 4, generator=g).pow(2).mean(-1)
    return 0.02 * z / chi.sqrt()


def lp_per_group(w: torch.Tensor, w_hat: torch.Tensor, g: int, p: float = 0.7) -> torch.Tensor:
    return (w - w_hat).abs().pow(p).reshape(-1, g).mean(1)


@pytest.mark.parametrize(
    "bits,group,gain", [(1, 64, 1.0), (2, 64, 0.99), (3, 64, 0.99), (4, 128, 0.99), (8, 32, 0.99)]
)
@pytest.mark.parametrize("init", ["minmax", "rtn"])
def test_hqq_beats_rtn_on_lp_error_in_every_group(bits: int, group: int, gain: float, init: str) -> None:
    w = heavy_tailed()
    spec = QuantSpec.per_group(bits, group)
    rtn = quantize(w, spec).dequantize()
    hqq = hqq_quantize(w, spec, init=init).dequantize()
    e_rtn, e_hqq = lp_per_group(w, rtn, group), lp_per_group(w, hqq, group)
    assert (e_hqq <= e_rtn * (1 + 1e-5)).all()  # keeps RTN's parameters where those are better
    assert e_hqq.mean() < gain * e_rtn.mean()


def test_hqq_with_scale_refit_also_lowers_squared_error() -> None:
    w = heavy_tailed(seed=1)
    spec = QuantSpec.per_group(2, 64)
    rtn = quantize(w, spec).dequantize()
    hqq = hqq_quantize(w, spec, optimize_scale=True).dequantize()
    assert (w - hqq).pow(2).mean() < 0.8 * (w - rtn).pow(2).mean()
    assert lp_per_group(w, hqq, 64).mean() < lp_per_group(w, rtn, 64).mean()


def test_codes_and_dequantize_follow_the_shared_convention() -> None:
    w = heavy_tailed(seed=2)
    spec = QuantSpec.per_group(3, 64)
    qt = hqq_quantize(w, spec)
    assert qt.codes.dtype == torch.uint8 and qt.zero is not None
    assert qt.scale.shape == qt.zero.shape == (64, 4)
    s = qt.scale.float().repeat_interleave(64, dim=1)
    z = qt.zero.float().repeat_interleave(64, dim=1)
    codes = torch.clamp(torch.round(w / s + z), 0, 7)
    assert torch.equal(qt.codes.float(), codes)
    torch.testing.assert_close(qt.dequantize(), s * (codes - z))
    assert not torch.equal(qt.zero, qt.zero.round())  # HQQ moves zero-points off the integers


def reference_one_step(w: torch.Tensor, bits: int, g: int, p: float, beta: float) -> torch.Tensor:
    """One HQQ zero update written as in the paper (min-max start, fractional zero, generalized soft
    threshold on every element), then per group the better of that and round-to-nearest by lp error."""
    qmax = 2**bits - 1
    wg = w.reshape(-1, g)
    mn, mx = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
    s0 = (mx - mn) / qmax
    z0 = -mn / s0

    def recon(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return s * (torch.clamp(torch.round(wg / s + z), 0, qmax) - z)

    q = torch.clamp(torch.round(wg / s0 + z0), 0, qmax)
    r = wg - recon(s0, z0)
    we = torch.sign(r) * torch.relu(r.abs() - r.abs().clamp_min(1e-30).pow(p - 1) / beta)
    z1 = torch.mean(q - (wg - we) / s0, dim=1, keepdim=True)
    # qlab's round-to-nearest: range widened to include 0, integer zero-point
    lo, hi = mn.clamp(max=0), mx.clamp(min=0)
    rs = (hi - lo) / qmax
    rz = torch.round(-lo / rs)
    ours, rtn = recon(s0, z1), recon(rs, rz)
    lp = lambda x: (wg - x).abs().pow(p).mean(1, keepdim=True)  # noqa: E731
    return torch.where(lp(ours) > lp(rtn), rtn, ours).reshape(w.shape)


@pytest.mark.parametrize("beta", [10.0, 1e4])  # 1e4: the shrinkage is active on many elements
def test_one_iteration_matches_plain_torch_reference(beta: float) -> None:
    w = heavy_tailed(seed=3)
    spec = QuantSpec.per_group(2, 32)
    ours = hqq_quantize(w, spec, iters=1, beta=beta).dequantize()
    torch.testing.assert_close(ours, reference_one_step(w, 2, 32, 0.7, beta), rtol=1e-4, atol=1e-6)


def test_per_channel_and_per_tensor_granularity() -> None:
    w = heavy_tailed(seed=4)
    for spec in (QuantSpec.per_channel(3, symmetric=False), QuantSpec.per_tensor(4, symmetric=False)):
        rtn = quantize(w, spec).dequantize()
        qt = hqq_quantize(w, spec)
        assert qt.scale.shape == quantize(w, spec).scale.shape
        assert (w - qt.dequantize()).abs().pow(0.7).mean() <= (w - rtn).abs().pow(0.7).mean()
    spec = QuantSpec.per_channel(3, symmetric=False, axis=1)
    qt = hqq_quantize(w, spec)
    assert qt.scale.shape == (1, 256)
    assert (w - qt.dequantize()).abs().pow(0.7).mean() <= (w - quantize(w, spec).dequantize()).abs().pow(
        0.7
    ).mean()


def test_bad_inputs_raise_clear_errors() -> None:
    w = heavy_tailed()
    with pytest.raises(ValueError, match="symmetric=False"):
        hqq_quantize(w, QuantSpec.per_group(4, 64, symmetric=True))
    with pytest.raises(ValueError, match="codebook"):
        hqq_quantize(
            w, QuantSpec(bits=4, symmetric=False, granularity="group", group_size=64, codebook="nf4")
        )
    with pytest.raises(ValueError, match="p must be"):
        hqq_quantize(w, QuantSpec.per_group(4, 64), p=1.5)
    with pytest.raises(ValueError, match="iters"):
        hqq_quantize(w, QuantSpec.per_group(4, 64), iters=-1)
    with pytest.raises(ValueError, match="init must be"):
        hqq_quantize(w, QuantSpec.per_group(4, 64), init="zeros")
    with pytest.raises(ValueError, match="w must be a floating-point"):
        hqq_quantize(torch.ones(4, 64, dtype=torch.int32), QuantSpec.per_group(4, 64))
    with pytest.raises(TypeError, match="spec"):
        hqq_quantize(w, "int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_size=48 must divide"):
        hqq_quantize(w, QuantSpec.per_group(4, 48))
