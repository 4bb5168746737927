"""A post-pass over a quantized model: fuse the projections that read one input (see :mod:`qlab.nn.fused`).

:func:`fuse_projections` finds, by attribute name (the transformers convention of Llama, Qwen,
Mistral, SmolLM2 ...), attention modules with ``q_proj``/``k_proj``/``v_proj`` and gated MLPs with
``gate_proj``/``up_proj``/``down_proj``/``act_fn``, and where their QuantLinears stack exactly
(:func:`~qlab.nn.fused.can_fuse`) replaces them: q/k/v by views of one stacked layer, the MLP by a
:class:`~qlab.nn.fused.FusedMLP`. The outputs are those of the separate layers (the kernels compute
each output row from its own codes alone); each block then makes 2 kernel calls where it made 5.
"""

from __future__ import annotations

from torch import nn

from qlab.driver import set_module
from qlab.nn.fused import FusedMLP, FusedProjections, ProjectionView, can_fuse, stack_layers

QKV = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")


def fuse_projections(model: nn.Module, qkv: bool = True, gate_up: bool = True) -> dict[str, int]:
    """Fuse q/k/v and gate/up of every block of ``model`` in place; return ``{"qkv": n, "gate_up": n}``,
    the number of modules fused. Layers that do not stack (mixed specs, float layers) are left alone."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    done = {"qkv": 0, "gate_up": 0}
    for name, mod in list(model.named_modules()):
        if qkv and all(hasattr(mod, p) for p in QKV):
            layers = [getattr(mod, p) for p in QKV]
            if can_fuse(layers):
                fused = FusedProjections(stack_layers(layers), [m.out_features for m in layers])
                mod.qkv_proj = fused
                for i, p in enumerate(QKV):
                    setattr(mod, p, ProjectionView(fused, i))
                done["qkv"] += 1
        if gate_up and all(hasattr(mod, p) for p in MLP):
            gate, up = mod.gate_proj, mod.up_proj
            if can_fuse([gate, up]) and gate.out_features == up.out_features:
                set_module(model, name, FusedMLP(stack_layers([gate, up]), mod.down_proj, mod.act_fn))
                done["gate_up"] += 1
    return done
