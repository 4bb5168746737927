"""SmoothQuant (Xiao et al., 2022): migrate activation outliers into the weights for W8A8.

Activations have outlier *channels* (the same few input features are large on every token), which
ruin per-token int8 activation quantization; weights are smooth. Divide each input channel of the
activation by ``s_j`` and multiply the matching weight column by it: the float layer is unchanged,
and the difficulty is shared between the two::

    s_j = max|X_j|^α / max|W_j|^(1-α)        (α = 0.5 by default)
    y = (X / s) (W · s)ᵀ

``max|W_j|`` is taken over all the weights that read the input (q, k and v share one). The division
is folded into the preceding normalization's weight where possible; the layers then run as
:class:`~qlab.nn.Int8Linear` with no outlier decomposition (``threshold=None``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qlab.quantize import check_float_tensor


def smooth_scales(
    act_absmax: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], alpha: float = 0.5
) -> torch.Tensor:
    """Per-input-channel ``s = max|X|^α / max|W|^(1-α)`` (clamped away from 0).

    Args:
        act_absmax: ``[in]`` maximum |activation| per input channel over calibration tokens.
        weights: weight(s) ``[out, in]`` reading that input.
        alpha: migration strength in [0, 1]: 0 leaves activations alone, 1 moves everything to weights.
    """
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not ws:
        raise ValueError("weights must hold at least one weight")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    check_float_tensor(act_absmax, "act_absmax")
    if act_absmax.dim() != 1:
        raise ValueError(f"act_absmax must be 1-D [in_features], got shape {tuple(act_absmax.shape)}")
    for i, w in enumerate(ws):
        check_float_tensor(w, f"weights[{i}]")
        if w.dim() != 2 or w.shape[1] != act_absmax.shape[0]:
            raise ValueError(
                f"weights[{i}] must be [out, {act_absmax.shape[0]}] to match act_absmax, got {tuple(w.shape)}"
            )
    w_absmax = torch.cat([w.detach().float() for w in ws]).abs().amax(dim=0).clamp_min(1e-5)
    a = act_absmax.detach().float().clamp_min(1e-5)
    return (a.pow(alpha) / w_absmax.pow(1 - alpha)).clamp_min(1e-5)
