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
SmoothQuant's layers are the same module with ``threshold=None`` and an ``input_scale``. The model
driver builds them (methods ``llm_int8`` and ``smoothquant`` of :mod:`qlab.registry`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qlab.affine import quantize_rows_int8, quantize_rtn
from qlab.nn.linear import linear_weight
from qlab.tensor import QuantizedTensor, QuantSpec, check_finite

#: LLM.int8()'s default outlier threshold on activation magnitude.
DEFAULT_THRESHOLD = 6.0


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
        """Quantize the weight of ``linear`` (an ``nn.Linear`` or GPT-2 ``Conv1D``; times ``input_scale``
        per column, if given) to int8 per channel."""
        w = linear_weight(linear).float()
        if input_scale is not None:
            if input_scale.shape != (w.shape[1],):
                got = tuple(input_scale.shape)
                raise ValueError(f"input_scale must have shape [{w.shape[1]}], got {got}")
            w = w * input_scale.float()
        qt = quantize_rtn(w, QuantSpec.per_channel(8, symmetric=True, axis=0))
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
        y = (qx.float() @ wq.T) * sx * self.weight_scale
        if bool(mask.any()):
            y = y + x[..., mask] @ (wq[:, mask] * self.weight_scale[:, None]).T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype)

    def layer_config(self) -> dict[str, Any]:
        """JSON description from which :meth:`from_layer_config` rebuilds an empty layer of this shape."""
        return {
            "type": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "threshold": self.threshold,
            "bias": self.bias is not None,
            "input_scale": self.input_scale is not None,
        }

    @classmethod
    def from_layer_config(cls, cfg: dict[str, Any], device: torch.device | str | None = None) -> Int8Linear:
        """An empty layer described by :meth:`layer_config`; ``device="meta"`` allocates nothing."""
        n_in, n_out = cfg["in_features"], cfg["out_features"]
        qt = QuantizedTensor(
            codes=torch.zeros(n_out, n_in, dtype=torch.int8, device=device),
            scale=torch.ones(n_out, 1, device=device),
            zero=None,
            spec=QuantSpec.per_channel(8, symmetric=True),
            shape=torch.Size((n_out, n_in)),
        )
        bias = torch.zeros(n_out, device=device) if cfg["bias"] else None
        scale = torch.ones(n_in, device=device) if cfg["input_scale"] else None
        return cls(qt, bias, threshold=cfg["threshold"], input_scale=scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored weight ``Ŵ`` (``codes * scale``), shape ``[out, in]``."""
        return self.weight_dequantized().to(dtype)

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight applied to ``x``: ``Ŵ / input_scale`` (columns), or ``Ŵ``."""
        w = self.weight_dequantized()
        if self.input_scale is not None:
            w = w / self.input_scale
        return w.to(dtype)

    def float_nbytes(self) -> int:
        """Bytes of the fp32 layer this one replaced (weight, bias, input scale)."""
        extra = sum(t.numel() * t.element_size() for t in (self.bias, self.input_scale) if t is not None)
        return 4 * self.in_features * self.out_features + extra

    def check_finite(self, name: str = "layer") -> None:
        """Raise a ValueError naming the tensor if a stored scale or input scale is NaN/Inf."""
        check_finite(self.weight_scale, f"{name}.weight_scale")
        if self.input_scale is not None:
            check_finite(self.input_scale, f"{name}.input_scale")

    def after_load(self) -> None:
        """Nothing is derived from the config here (kept for the loaders' one protocol)."""

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}, "
            f"input_scale={self.input_scale is not None}"
        )
