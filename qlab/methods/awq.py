"""AWQ: activation-aware weight quantization (Lin et al., 2023).

A few input channels of a linear layer carry much larger activations than the rest; the weights
that multiply them matter most. Scaling those weight columns up before quantizing (so they get
relatively finer steps) and the matching activations down leaves the float layer unchanged::

    y = x Wᵀ = (x / s) (W · s)ᵀ          s: one positive factor per input channel

AWQ searches ``s = mean|x|^α`` (normalized so that ``max(s) · min(s) = 1``) over a grid of
``α ∈ [0, 1)`` and keeps the one whose quantized layer has the lowest output error on calibration
inputs. ``α = 0`` is round-to-nearest, so the search never does worse than RTN on those inputs.
Then, optionally, it shrinks each group's range (clipping the weight extremes) where that lowers
the output error. The division by ``s`` is folded into the preceding op (an RMSNorm/LayerNorm
weight, or the previous linear's output rows) or kept as the layer's input scale.

The output error of a weight error ``D = W - Ŵ`` is ``mean ||x Dᵀ||² = Σ_o D_o C D_oᵀ`` with
``C = XᵀX / n``, so the search runs on the ``[in, in]`` matrix ``C`` instead of all tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlab.quantize import (
    QuantizedTensor,
    QuantSpec,
    check_float_tensor,
    compute_scale_zero,
    quantize,
    quantize_affine,
)


@dataclass
class AWQResult:
    """Outcome of :func:`awq_search` for weights sharing one input.

    ``scale`` [in]: multiply the weight columns by it and divide the input by it.
    ``loss`` / ``rtn_loss``: output error ``mean ||x (W - Ŵ)ᵀ||²`` (summed over the weights) with the
    chosen scale and with plain round-to-nearest.
    """

    scale: torch.Tensor
    alpha: float
    loss: float
    rtn_loss: float


def _check(weights: Sequence[torch.Tensor], x: torch.Tensor, spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not weights:
        raise ValueError("weights must hold at least one weight")
    check_float_tensor(x, "x")
    for i, w in enumerate(weights):
        check_float_tensor(w, f"weights[{i}]")
        if w.dim() != 2:
            raise ValueError(f"weights[{i}] must be 2-D [out, in], got shape {tuple(w.shape)}")
        if w.shape[1] != x.shape[-1]:
            raise ValueError(
                f"weights[{i}] has {w.shape[1]} input features but x has {x.shape[-1]} (last dim); "
                "they must match"
            )
    if x.reshape(-1, x.shape[-1]).shape[0] < 2:
        raise ValueError("x: AWQ needs at least 2 calibration rows (tokens) to estimate activation scales")


def output_error(D: torch.Tensor, C: torch.Tensor) -> float:
    """``Σ_o D_o C D_oᵀ`` = ``mean ||x Dᵀ||²`` summed over outputs, for ``C = XᵀX / n``."""
    return float(((D @ C) * D).sum())


def _fake(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return quantize(w, spec).dequantize(torch.float32)


@torch.no_grad()
def awq_search(
    weights: torch.Tensor | Sequence[torch.Tensor], x: torch.Tensor, spec: QuantSpec, *, grid: int = 20
) -> AWQResult:
    """Search the per-input-channel scale for ``weights`` that all read the input ``x``.

    Args:
        weights: one weight ``[out, in]`` or several sharing the input (e.g. q, k, v projections).
        x: calibration inputs ``[..., in]`` (rows = tokens).
        spec: the weight spec the scaled weights will be quantized with.
        grid: number of ``α`` values, ``α = i / grid`` for ``i = 0 .. grid - 1``.
    """
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    _check(ws, x, spec)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    X = x.detach().reshape(-1, x.shape[-1]).float()
    C = X.T @ X / X.shape[0]
    x_mean = X.abs().mean(0).clamp_min(1e-8)
    W = torch.cat([w.detach().float() for w in ws])
    best: tuple[float, float, torch.Tensor] | None = None
    rtn_loss = float("nan")
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        Wq = torch.cat([_fake(w.float() * s, spec) for w in ws]) / s
        loss = output_error(W - Wq, C)
        if i == 0:
            rtn_loss = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    assert best is not None
    return AWQResult(scale=best[2], alpha=best[1], loss=best[0], rtn_loss=rtn_loss)


def _grouped(w: torch.Tensor, spec: QuantSpec) -> int:
    """Elements per scale along the input dim (the whole row for per-channel specs)."""
    if spec.granularity == "group":
        assert spec.group_size is not None
        return spec.group_size
    if spec.granularity == "channel" and spec.axis % 2 == 0:
        return w.shape[1]
    raise ValueError(
        f"spec: AWQ needs per-output-channel (axis=0) or per-group scales, got {spec.describe()}"
    )


@torch.no_grad()
def clip_quantize(
    w: torch.Tensor, C: torch.Tensor, spec: QuantSpec, *, grid: int = 20, max_shrink: float = 0.5
) -> QuantizedTensor:
    """Quantize ``w`` with each (row, group) range shrunk by the factor that minimizes output error.

    For ratios ``r = 1 - max_shrink · i / grid`` the group's range is ``r · [min, max]``; weights
    outside it clip to the end codes. The error of a (row, group) is ``d C_gg dᵀ``, with ``C_gg`` the
    group's diagonal block of ``C = XᵀX / n``. ``r = 1`` is round-to-nearest, always a candidate.
    """
    if spec.codebook is not None:
        raise ValueError(f"spec: clipping search supports affine specs, got codebook {spec.codebook!r}")
    g = _grouped(w, spec)
    W = w.detach().float()
    out_f, in_f = W.shape
    n_g = in_f // g
    Cb = torch.stack([C[k * g : (k + 1) * g, k * g : (k + 1) * g] for k in range(n_g)])  # [n_g, g, g]
    Wg = W.reshape(out_f, n_g, g)
    best_err = torch.full((out_f, n_g), float("inf"))
    best_scale = best_zero = None
    for i in range(grid + 1):
        ratio = 1 - max_shrink * i / grid
        scale, zero = compute_scale_zero(W * ratio, spec)
        scale_g = scale.float().reshape(out_f, -1)
        zero_g = zero.float().reshape(out_f, -1) if zero is not None else None
        codes = quantize_affine(W, spec, scale, zero).float().reshape(out_f, n_g, g)
        deq = (codes - zero_g.unsqueeze(-1)) if zero_g is not None else codes
        deq = deq * scale_g.unsqueeze(-1)
        D = Wg - deq
        err = torch.einsum("okg,kgh,okh->ok", D, Cb, D)
        if best_scale is None:
            best_scale, best_zero, best_err = scale_g.clone(), None if zero_g is None else zero_g.clone(), err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale_g, best_scale)
        if zero_g is not None:
            assert best_zero is not None
            best_zero = torch.where(better, zero_g, best_zero)
    assert best_scale is not None
    shape = tuple(n // b for n, b in zip(W.shape, spec.block_size(W.shape), strict=True))
    scale_t = best_scale.reshape(shape).to(spec.scale_dtype)
    zero_t = best_zero.reshape(shape).to(spec.scale_dtype) if best_zero is not None else None
    codes = quantize_affine(W, spec, scale_t, zero_t)
    return QuantizedTensor(codes=codes, scale=scale_t, zero=zero_t, spec=spec, shape=w.shape, dtype=w.dtype)


@torch.no_grad()
def awq_quantize(
    w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, *, grid: int = 20, clip: bool = True
) -> tuple[QuantizedTensor, torch.Tensor]:
    """AWQ for one linear layer whose input scale cannot be folded elsewhere.

    Returns ``(qt, s)``: ``qt`` quantizes ``w · s`` (columns scaled), and the layer computes
    ``(x / s) · dequantize(qt)ᵀ``.
    """
    res = awq_search(w, x, spec, grid=grid)
    ws = w.detach().float() * res.scale
    return quantize_scaled(ws, x, res.scale, spec, clip=clip), res.scale


def quantize_scaled(
    ws: torch.Tensor, x: torch.Tensor, s: torch.Tensor, spec: QuantSpec, *, clip: bool = True
) -> QuantizedTensor:
    """Quantize an already scaled weight ``ws = w · s`` whose input will be ``x / s``."""
    if not clip or spec.codebook is not None:
        return quantize(ws, spec)
    X = x.detach().reshape(-1, x.shape[-1]).float() / s
    C = X.T @ X / X.shape[0]
    return clip_quantize(ws, C, spec)
