"""Projections that read the same input, fused into one packed layer: q/k/v, and gate/up.

A decoder block multiplies one normalized input by three matrices for attention (``q``, ``k``,
``v``) and two for the MLP (``gate``, ``up``). Stacked along the output dimension they are one
matrix, ``[W_q; W_k; W_v]``, and one kernel call computes ``x [W_q; W_k; W_v]ᵀ = [x W_qᵀ, x W_kᵀ,
x W_vᵀ]``: one call instead of three (for SmolLM2's 576-wide layers the call overhead is a large
part of each product), and one activation split instead of three.

It is exact: every output row of a qlab kernel depends only on ``x`` and its own row of codes,
scales and zeros, so stacking the rows changes no row's result. Fusing needs the layers to share
their spec, mode and input width; a per-tensor scale is first spread over rows (the same weight).

:class:`FusedMLP` replaces a gated MLP (``down(act(gate(x)) * up(x))``, Llama/Qwen/Mistral);
:func:`fuse_into_views` turns q/k/v into views of one fused layer without touching the attention
code: the first view called computes the whole product once and the others take their slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from qlab.nn.linear import QuantLinear


def can_fuse(layers: Sequence[nn.Module]) -> bool:
    """Whether ``layers`` are weight-only QuantLinears that stack into one (same spec, input width,
    weight dtype; no input scale)."""
    first = layers[0]
    return all(
        isinstance(m, QuantLinear)
        and m.mode == "weight"
        and m.input_scale is None
        and m.spec == first.spec
        and m.in_features == first.in_features
        and m.weight_dtype == first.weight_dtype
        and (m.bias is None) == (first.bias is None)
        for m in layers
    )


def stack_layers(layers: Sequence[QuantLinear]) -> QuantLinear:
    """One QuantLinear whose weight is the layers' weights stacked by rows (outputs concatenated)."""
    if not layers or not can_fuse(layers):
        raise ValueError("layers must be weight-only QuantLinears with one spec, input width and dtype")
    first = layers[0]
    n = sum(m.out_features for m in layers)
    out = QuantLinear(
        first.in_features, n, first.spec, bias=first.bias is not None, weight_dtype=first.weight_dtype,
        device=first.qweight.device,
    )  # fmt: skip

    def rows(t: torch.Tensor, m: QuantLinear) -> torch.Tensor:
        return t if t.shape[0] == m.out_features else t.expand(m.out_features, -1)

    out.qweight = torch.cat([m.qweight for m in layers])
    out.scale = torch.cat([rows(m.scale, m) for m in layers]).contiguous()
    if first.zero is not None:
        out.zero = torch.cat([rows(m.zero, m) for m in layers]).contiguous()
    if first.bias is not None:
        out.bias = torch.cat([m.bias for m in layers])
    return out


class FusedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with ``gate`` and ``up`` in one layer, ``gate_up``."""

    def __init__(self, gate_up: QuantLinear, down: nn.Module, act_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.gate_up = gate_up
        self.down_proj = down
        self.act_fn = act_fn
        self.split = gate_up.out_features // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.split, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class FusedProjections(nn.Module):
    """A stacked layer called once per input by its :class:`ProjectionView`\\ s.

    The first view called with an input computes ``x Wᵀ`` for all of them and keeps it with ``x``;
    a view called with that same ``x`` object slices it (otherwise it recomputes). Only the last
    input and product are kept, so a model must call the views of one fused layer on one input in a
    row, as attention blocks do (``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)``).
    """

    def __init__(self, layer: QuantLinear, sizes: Sequence[int]) -> None:
        super().__init__()
        self.layer = layer
        self.sizes = list(sizes)
        self._x: torch.Tensor | None = None
        self._y: tuple[torch.Tensor, ...] = ()

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i == 0 or self._x is not x:
            self._y = tuple(self.layer(x).split(self.sizes, dim=-1))
            self._x = x
        y = self._y[i]
        if i == len(self.sizes) - 1:  # the last view drops the references
            self._x, self._y = None, ()
        return y


class ProjectionView(nn.Module):
    """Output slice ``i`` of a :class:`FusedProjections` (stands in for one of the fused layers)."""

    def __init__(self, fused: FusedProjections, i: int) -> None:
        super().__init__()
        self._fused = [fused]  # not a submodule: the fused layer is registered once, by its owner
        self.index = i
        self.out_features = fused.sizes[i]
        self.in_features = fused.layer.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0].part(self.index, x)

    def extra_repr(self) -> str:
        return f"slice {self.index} of {self._fused[0].sizes}"
