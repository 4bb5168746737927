"""The calibrated methods' passes over a model: GPTQ, AWQ and SmoothQuant need the whole model and data.

Each pass quantizes the weights of the named target linears (``nn.Linear``; the driver turns a GPT-2
``Conv1D`` into one first) and returns a :class:`QuantizationResult`: quantized tensors and input
scales by full module name. It never builds layers; the model driver (:func:`qlab.quantize_model`)
does that, for every method alike.

Data-driven methods walk a transformers decoder block by block (:mod:`qlab.calibration`): the
inputs of block ``i`` are captured, its linears are quantized, and the block's output becomes the
input of block ``i + 1``. Only one block's activations are alive at a time. Models without a
decoder-layer list are treated as a single block.

* GPTQ quantizes each linear inside the block's forward pass, from a pre-hook, just before the
  layer runs: later layers of the block (and later blocks) see the already quantized earlier ones
  ("true sequential"), and linears fed the same tensor (q, k, v) share one Hessian.
* AWQ and SmoothQuant run the float block once, group its linears by the tensor they read, search
  one input scale per group, and fold ``1/s`` into the op that produced that tensor (a norm, or the
  previous linear's rows for ``up_proj -> down_proj``); where nothing can absorb it, the layer keeps
  it as an input scale. A fold is kept only if the float block's output is unchanged by it: a post-norm
  block (BERT) also adds the norm's output to the residual stream, so there the layer keeps the scale.
  The float output is the next block's input (scaling preserves it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.affine import quantize_rtn
from qlab.calibration import (
    capture_inputs,
    decoder_layers,
    hessian,
    layer_inputs,
    linear_modules,
    model_call,
    run_layer,
)
from qlab.methods.awq import awq_search, quantize_scaled
from qlab.methods.gptq import gptq_quantize
from qlab.methods.smoothquant import smooth_scales
from qlab.tensor import QuantizedTensor, QuantSpec

#: ``spec_for(full module name) -> QuantSpec``: the weight spec of each target layer.
SpecFor = Callable[[str], QuantSpec]

#: (previous, next) sibling linear names where the next one's input is ``act(gate(x)) * previous(x)``,
#: linear in the previous one's output, so a per-channel input scale can move into its rows
#: (Llama-style gated MLPs).
FOLD_INTO_PREVIOUS = (("up_proj", "down_proj"), ("up", "down"))


@dataclass
class QuantizationResult:
    """What a pass produced: quantized weights and input scales, by full module name."""

    method: str
    tensors: dict[str, QuantizedTensor] = field(default_factory=dict)
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per quantized weight (codes + scales + zeros) over all quantized layers."""
        n = sum(qt.numel() for qt in self.tensors.values())
        return 8 * sum(qt.nbytes for qt in self.tensors.values()) / n if n else float("nan")


def _targets(block: nn.Module, prefix: str, targets: set[str]) -> dict[str, nn.Linear]:
    return linear_modules(block, skip=lambda n: prefix + n not in targets)


def _blocks(
    model: nn.Module, calibration: torch.Tensor
) -> tuple[list[tuple[str, nn.Module]], Callable[[int, nn.Module, Any], Any] | None, Any]:
    """``([(prefix, block)], run, state0)``: ``run(i, block, state)`` returns the next state."""
    found = decoder_layers(model)
    if found is None:
        return [("", model)], None, calibration
    prefix, layers = found
    inputs = layer_inputs(model, layers, calibration)
    blocks = [(f"{prefix}.{i}.", layer) for i, layer in enumerate(layers)]

    def run(_i: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return run_layer(layer, hidden, inputs)

    return blocks, run, inputs.hidden


def _run_block(run: Callable[..., Any] | None, model: nn.Module, i: int, block: nn.Module, state: Any) -> Any:
    if run is None:
        with torch.no_grad():
            return model_call(model, state)
    return run(i, block, state)


# ------------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------------
def gptq_pass(
    model: nn.Module,
    calibration: torch.Tensor,
    targets: set[str],
    spec_for: SpecFor,
    kwargs: dict[str, Any],
    progress: bool = True,
) -> QuantizationResult:
    """GPTQ every linear named in ``targets``, block by block, each just before it runs (true sequential).

    ``kwargs`` are :func:`~qlab.methods.gptq.gptq_quantize`'s (``damp``, ``block_size``, ``act_order``).
    """
    kw = {k: v for k, v in kwargs.items() if k != "min_samples"}
    wanted = targets
    result = QuantizationResult("gptq")
    blocks, run, state = _blocks(model, calibration)
    for i, (prefix, block) in enumerate(tqdm(blocks, desc="gptq", unit="block", disable=not progress)):
        targets = _targets(block, prefix, wanted)
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input, H); holding x keeps its address unique

        def hook(
            full: str, cache: list[tuple[torch.Tensor, torch.Tensor]]
        ) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
                if full in result.tensors:
                    return
                x = args[0]
                H = next((h for cx, h in cache if cx is x), None)
                if H is None:
                    H = hessian(x)
                    cache.append((x, H))
                qt = gptq_quantize(mod.weight.detach(), H, spec_for(full), **kw)
                result.tensors[full] = qt
                # The rest of this forward (and the next blocks) must see the quantized layer.
                mod.weight.data = qt.dequantize(mod.weight.dtype)

            return pre

        handles = [m.register_forward_pre_hook(hook(prefix + n, cache)) for n, m in targets.items()]
        try:
            state = _run_block(run, model, i, block, state)
        finally:
            for h in handles:
                h.remove()
        missing = [prefix + n for n in targets if prefix + n not in result.tensors]
        if missing:
            raise ValueError(f"model: these linear layers never ran on the calibration data: {missing}")
    return result
    return result


# ------------------------------------------------------------------------------------------------
# AWQ and SmoothQuant: scale search per input group, folded into the producer
# ------------------------------------------------------------------------------------------------
def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


@dataclass
class _Group:
    names: list[str]
    x: torch.Tensor
    fold: Callable[[torch.Tensor], None] | None
    #: The module ``fold`` changes (a norm, or the previous linear).
    producer: nn.Module | None = None


def _groups(
    model: nn.Module, block: nn.Module, prefix: str, wanted: set[str], run: Any, i: int, state: Any
) -> tuple[list[_Group], Any]:
    """Run ``block`` in float once; group its target linears by input tensor; find fold targets."""
    all_linears = linear_modules(block)
    targets = _targets(block, prefix, wanted)
    norm_out: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    handles = []
    for m in block.modules():
        if _is_norm(m) and getattr(m, "weight", None) is not None:

            def post(mod: nn.Module, _args: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor):
                    norm_out[out.data_ptr()] = (mod, out)  # holding ``out`` keeps its address unique

            handles.append(m.register_forward_hook(post))
    # Which modules receive each norm output: a module outside the group's linears and their parents
    # (BERT's BertOutput, given the norm output as its residual ``input_tensor``) uses it elsewhere.
    receivers: dict[int, set[str]] = {}
    for name, m in block.named_modules():

        def pre(_mod: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
            for t in (*args, *kwargs.values()):
                if isinstance(t, torch.Tensor) and t.data_ptr() in norm_out:
                    receivers.setdefault(t.data_ptr(), set()).add(name)

        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with capture_inputs(all_linears) as seen:
            state = _run_block(run, model, i, block, state)
    finally:
        for h in handles:
            h.remove()
    by_source: dict[int, list[str]] = {}
    for n, cap in seen.items():
        if cap.source is not None:
            by_source.setdefault(cap.source, []).append(n)
    missing = [prefix + n for n in targets if seen[n].source is None]
    if missing:
        raise ValueError(f"model: these linear layers never ran on the calibration data: {missing}")
    groups = []
    for source, names in by_source.items():
        members = [n for n in names if n in targets]
        if not members:
            continue
        fold: Callable[[torch.Tensor], None] | None = None
        producer: nn.Module | None = None
        if len(members) == len(names):  # a skipped layer reading the same tensor would be changed too
            if source in norm_out:
                used_elsewhere = source == _hidden(state).data_ptr()  # it is the block's output
                if not used_elsewhere and receivers.get(source, set()) <= _with_parents(members):
                    producer = norm_out[source][0]
                    fold = _fold_into_norm(producer)
            elif len(members) == 1:
                producer = _previous_linear(members[0], all_linears)
                fold = None if producer is None else _fold_into_previous(producer)
        groups.append(_Group(members, seen[members[0]].cat(), fold, producer))
    return groups, state


def _with_parents(names: list[str]) -> set[str]:
    """The dotted names and every prefix of them (``"a.b.c"`` -> ``"a.b.c"``, ``"a.b"``, ``"a"``, ``""``)."""
    out = {""}
    for n in names:
        parts = n.split(".")
        out.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return out


def _fold_into_norm(norm: nn.Module) -> Callable[[torch.Tensor], None]:
    def fold(s: torch.Tensor) -> None:
        norm.weight.data = (norm.weight.float() / s).to(norm.weight.dtype)
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data = (bias.float() / s).to(bias.dtype)

    return fold


def _previous_linear(name: str, linears: dict[str, nn.Linear]) -> nn.Linear | None:
    """The sibling ``up`` of a ``down`` linear (``FOLD_INTO_PREVIOUS``), if its width matches."""
    parent, _, leaf = name.rpartition(".")
    for prev_leaf, next_leaf in FOLD_INTO_PREVIOUS:
        if leaf == next_leaf:
            prev = linears.get(f"{parent}.{prev_leaf}" if parent else prev_leaf)
            if prev is not None and prev.out_features == linears[name].in_features:
                return prev
    return None


def _fold_into_previous(prev: nn.Linear) -> Callable[[torch.Tensor], None]:
    def fold(s: torch.Tensor) -> None:
        prev.weight.data = (prev.weight.float() / s[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data = (prev.bias.float() / s).to(prev.bias.dtype)

    return fold


def _hidden(out: Any) -> torch.Tensor:
    """The main tensor of a block's (or a model's) output: itself, or the first of a tuple/ModelOutput."""
    while not isinstance(out, torch.Tensor):
        out = out[0]
    return out


def _apply_scales(
    plans: list[tuple[_Group, torch.Tensor]],
    linears: dict[str, nn.Linear],
    rerun: Callable[[], Any],
    reference: Any,
) -> None:
    """Multiply each group's weights by ``s`` and fold ``1/s`` into its producer, keeping only folds that
    leave the float block's output unchanged.

    A fold into a norm is exact only if the norm's output feeds nothing but the group's linears. In a
    post-norm block (BERT) that output is also the residual stream, and dividing it by ``s`` changes the
    model. :func:`_groups` already refuses folds into a norm whose output some other module receives;
    this check also catches a residual added inside a common parent's ``forward``, and a fold into a
    previous ``up`` linear through a nonlinearity (``down(act(up(x)))``, not a gated MLP). Such a group
    keeps ``s`` as the layer's input scale (``grp.fold = None``) instead. An exact rewrite moves the
    output by float rounding; a wrong fold moves it by O(1), so the tolerance (relative L2 1e-3 for
    fp32, 5e-2 for 16-bit weights) separates the two.
    """
    ref = _hidden(reference)
    tol = 1e-3 if ref.dtype == torch.float32 else 5e-2

    def exact() -> bool:
        with torch.no_grad():
            out = _hidden(rerun()).float()
        return bool((out - ref.float()).norm() <= tol * ref.float().norm())

    def scale(grp: _Group, s: torch.Tensor) -> None:
        for n in grp.names:
            lin = linears[n]
            lin.weight.data = (lin.weight.float() * s).to(lin.weight.dtype)

    def snapshot(mods: list[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(p, p.data.clone()) for m in mods for p in m.parameters(recurse=False)]

    def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for p, data in saved:
            p.data = data

    # A group that keeps its scale as an input scale (no fold) divides its input at run time, which this
    # float block does not do: scale its weights only after the checks.
    touched = [linears[n] for grp, _ in plans for n in grp.names]
    touched += [grp.producer for grp, _ in plans if grp.producer is not None]
    saved = snapshot(touched) if any(grp.fold is not None for grp, _ in plans) else []
    for grp, s in plans:
        if grp.fold is not None:
            scale(grp, s)
            grp.fold(s)
    if saved and not exact():
        # Some fold changed the block: redo the folds one at a time and drop each one that breaks it.
        restore(saved)
        for grp, s in plans:
            if grp.fold is None or grp.producer is None:
                continue
            before = snapshot([grp.producer, *(linears[n] for n in grp.names)])
            scale(grp, s)
            grp.fold(s)
            if not exact():
                restore(before)
                grp.fold = None
    for grp, s in plans:
        if grp.fold is None:
            scale(grp, s)


def _scaled_pass(
    method: str,
    model: nn.Module,
    calibration: torch.Tensor,
    targets: set[str],
    spec_for: SpecFor,
    kw: dict[str, Any],
    progress: bool,
) -> QuantizationResult:
    result = QuantizationResult(method)
    blocks, run, state = _blocks(model, calibration)
    for i, (prefix, block) in enumerate(tqdm(blocks, desc=method, unit="block", disable=not progress)):
        block_input = state
        groups, state = _groups(model, block, prefix, targets, run, i, state)
        linears = linear_modules(block)
        # Phase 1: search every group's scale, then apply them all in float (a fold may touch another
        # group's rows, so no layer is quantized before all scales are in place).
        plans = []
        for grp in groups:
            ws = [linears[n].weight.detach().float() for n in grp.names]
            if method == "awq":
                spec = spec_for(prefix + grp.names[0])
                s = awq_search(ws, grp.x, spec, grid=kw.get("grid", 20)).scale
            else:
                s = smooth_scales(grp.x.abs().amax(dim=0), ws, alpha=kw.get("alpha", 0.5))
            plans.append((grp, s))
        rerun = functools.partial(_run_block, run, model, i, block, block_input)
        _apply_scales(plans, linears, rerun, state)
        # Phase 2: quantize.
        for grp, s in plans:
            for n in grp.names:
                full = prefix + n
                lin = linears[n]
                if grp.fold is None:
                    result.input_scales[full] = s
                if method == "awq":
                    spec = spec_for(full)
                    qt = quantize_scaled(
                        lin.weight.detach().float(), grp.x, s, spec, clip=kw.get("clip", True)
                    )
                else:  # the weight already holds W · s: quantize it as is
                    qt = quantize_rtn(lin.weight.detach().float(), spec_for(full))
                result.tensors[full] = qt
    return result


def awq_pass(
    model: nn.Module,
    calibration: torch.Tensor,
    targets: set[str],
    spec_for: SpecFor,
    kwargs: dict[str, Any],
    progress: bool = True,
) -> QuantizationResult:
    """AWQ: per input group, search the activation-aware scale ``s`` (``grid`` points), fold ``1/s`` into
    the producer, quantize ``W · s`` with clipping search (``clip``)."""
    return _scaled_pass("awq", model, calibration, targets, spec_for, kwargs, progress)


def smoothquant_pass(
    model: nn.Module,
    calibration: torch.Tensor,
    targets: set[str],
    spec_for: SpecFor,
    kwargs: dict[str, Any],
    progress: bool = True,
) -> QuantizationResult:
    """SmoothQuant: per input group, ``s = max|x|^α / max|W|^(1-α)`` (``alpha``), folded into the
    producer; ``W · s`` is quantized to int8 per channel (``spec_for`` gives that spec)."""
    return _scaled_pass("smoothquant", model, calibration, targets, spec_for, kwargs, progress)
