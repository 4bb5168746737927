"""W8A8 with outliers: LLM.int8()'s mixed decomposition (Dettmers et al., 2022).

In W8A8 both the weight and the activation are int8: weights per output channel, activations per
token (row), both symmetric absmax::

    y ≈ (s_x · s_wᵀ) ⊙ (q_x q_wᵀ)          q_x = round(x / s_x),  s_x = max_row |x| / 127

Large language models have a few input features whose activations are 20-100x larger than the rest
("emergent outliers"). One such feature sets the row's ``s_x``, and every other feature of that row is
rounded to a handful of levels. LLM.int8() splits the matmul by input feature: features where any
token exceeds ``threshold`` (6.0 in the paper) stay in floating point, the rest go through int8::

    y = x[:, O] Ŵ[:, O]ᵀ + int8_matmul(x[:, ~O], W[:, ~O])

The outlier columns of the weight are the dequantized int8 ones (as bitsandbytes does), so memory
stays one byte per weight; only the activations' outlier features skip quantization.

This module computes the int8 product in float32 (the integer codes are exact in float32 and the
dot products of this size round by at most one ulp): it is the reference semantics, not a fast path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qlab.quantize import QuantizedTensor, QuantSpec, quantize

#: LLM.int8()'s default outlier threshold on activation magnitude.
DEFAULT_THRESHOLD = 6.0


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: ``x ≈ s · q`` with ``s = max|row| / 127`` (rows of zeros get ``s = 1``)."""
    s = x.abs().amax(dim=-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / s).clamp(-127, 127), s


def outlier_features(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask over the last dim: features where any row has ``|x| > threshold``."""
    return (x.abs() > threshold).reshape(-1, x.shape[-1]).any(dim=0)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and int8 (per-token) activations, outliers optionally in float.

    Args:
        qt: int8 symmetric per-output-channel weight.
        bias: optional float bias.
        threshold: activation magnitude above which a feature is computed in float (LLM.int8);
            ``None`` means plain W8A8 with no decomposition.
        input_scale: optional per-input-feature divisor applied first (SmoothQuant when it could not
            be folded into the preceding op): the layer computes ``f(x / input_scale)``.
    """

    def __init__(
        self,
        qt: QuantizedTensor,
        bias: torch.Tensor | None = None,
        *,
        threshold: float | None = DEFAULT_THRESHOLD,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        spec = qt.spec
        if spec.bits != 8 or not spec.symmetric or spec.granularity != "channel" or spec.axis != 0:
            raise ValueError(f"qt must be int8 symmetric per-output-channel, got {spec.describe()}")
        if len(qt.shape) != 2:
            raise ValueError(f"qt must be a 2-D weight, got shape {tuple(qt.shape)}")
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold must be > 0 or None, got {threshold}")
        self.out_features, self.in_features = qt.shape
        self.threshold = threshold
        self.register_buffer("weight_codes", qt.codes)
        self.register_buffer("weight_scale", qt.scale.float().reshape(-1))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        if input_scale is not None and input_scale.shape != (self.in_features,):
            raise ValueError(
                f"input_scale must have shape [{self.in_features}], got {tuple(input_scale.shape)}"
            )
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float())

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        threshold: float | None = DEFAULT_THRESHOLD,
        input_scale: torch.Tensor | None = None,
    ) -> Int8Linear:
        """Quantize ``linear.weight`` (times ``input_scale`` per column, if given) to int8 per channel."""
        w = linear.weight.detach().float()
        if input_scale is not None:
            if input_scale.shape != (w.shape[1],):
                got = tuple(input_scale.shape)
                raise ValueError(f"input_scale must have shape [{w.shape[1]}], got {got}")
            w = w * input_scale.float()
        qt = quantize(w, QuantSpec.per_channel(8, symmetric=True, axis=0))
        return cls(qt, linear.bias, threshold=threshold, input_scale=input_scale)

    @property
    def nbytes(self) -> int:
        n = self.weight_codes.numel() + 4 * self.weight_scale.numel()
        for t in (self.bias, self.input_scale):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    def weight_dequantized(self) -> torch.Tensor:
        return self.weight_codes.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.input_scale is not None:
            x = x / self.input_scale
        wq = self.weight_codes.float()
        if self.threshold is not None and math.isfinite(self.threshold):
            mask = outlier_features(x, self.threshold)
        else:
            mask = torch.zeros(self.in_features, dtype=torch.bool, device=x.device)
        x_in = x.masked_fill(mask, 0.0) if bool(mask.any()) else x
        qx, sx = quantize_rows_int8(x_in)
        y = (qx @ wq.T) * sx * self.weight_scale
        if bool(mask.any()):
            y = y + x[..., mask] @ (wq[:, mask] * self.weight_scale[:, None]).T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}, "
            f"input_scale={self.input_scale is not None}"
        )


def int8_matmul_reference(x: torch.Tensor, w: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """``x wᵀ`` through :class:`Int8Linear` semantics, for lessons and tests."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.detach().float()
    return Int8Linear.from_linear(lin, threshold=threshold)(x)
