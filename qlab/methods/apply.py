"""Model-level driver: quantize every linear layer of a model with one method.

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
  it as an input scale. The float output is the next block's input (scaling preserves it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.calibration import (
    capture_inputs,
    check_calibration,
    decoder_layers,
    hessian,
    layer_inputs,
    linear_modules,
    model_call,
    run_layer,
)
from qlab.codebooks import DEFAULT_BLOCK_SIZE, codebook_spec
from qlab.config import QuantConfig
from qlab.methods.awq import awq_search, quantize_scaled
from qlab.methods.gptq import gptq_quantize
from qlab.methods.hqq import hqq_quantize
from qlab.methods.llm_int8 import DEFAULT_THRESHOLD, Int8Linear
from qlab.methods.smoothquant import smooth_scales
from qlab.quantize import QuantizedTensor, QuantSpec, quantize

#: Methods :func:`quantize_model_with` implements (``rtn``/``nf4``/``fp4`` are the data-free baselines).
MODEL_METHODS = ("rtn", "nf4", "fp4", "hqq", "gptq", "awq", "smoothquant", "llm_int8")
#: Methods that need calibration data.
CALIBRATED = ("gptq", "awq", "smoothquant")
#: (previous, next) sibling linear names where the next one's input is ``act(gate(x)) * previous(x)``,
#: linear in the previous one's output, so a per-channel input scale can move into its rows
#: (Llama-style gated MLPs).
FOLD_INTO_PREVIOUS = (("up_proj", "down_proj"), ("up", "down"))
#: W8A8 weights: int8 symmetric, one scale per output channel.
INT8_WEIGHT = QuantSpec.per_channel(8, symmetric=True, axis=0)
#: Method keyword arguments each method accepts.
_KWARGS = {
    "rtn": set(),
    "nf4": set(),
    "fp4": set(),
    "hqq": {"p", "iters", "beta", "kappa", "optimize_scale", "init"},
    "gptq": {"damp", "block_size", "act_order", "min_samples"},
    "awq": {"grid", "clip", "min_samples"},
    "smoothquant": {"alpha", "min_samples"},
    "llm_int8": {"threshold"},
}


@dataclass
class QuantizationResult:
    """What :func:`quantize_model_with` did: per-layer tensors, timing, bits per weight."""

    method: str
    tensors: dict[str, QuantizedTensor] = field(default_factory=dict)
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    #: CPU time of this process (all threads) during quantization: on a shared machine it says what the
    #: run costs better than wall time does.
    cpu_seconds: float = 0.0

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per quantized weight (codes + scales + zeros) over all quantized layers."""
        n = sum(qt.numel() for qt in self.tensors.values())
        return 8 * sum(qt.nbytes for qt in self.tensors.values()) / n if n else float("nan")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _install(model: nn.Module, result: QuantizationResult) -> None:
    from qlab.nn import QuantLinear  # nn builds on the methods' output type; import lazily

    for name, qt in result.tensors.items():
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        bias = None if linear.bias is None else linear.bias.detach()
        new = QuantLinear.from_quantized(linear, qt, bias=bias, input_scale=result.input_scales.get(name))
        _set_module(model, name, new)


def _targets(block: nn.Module, prefix: str, config: QuantConfig) -> dict[str, nn.Linear]:
    return linear_modules(block, skip=lambda n: config.is_skipped(prefix + n))


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
def _gptq(
    model: nn.Module, config: QuantConfig, calibration: torch.Tensor, progress: bool
) -> QuantizationResult:
    kw = {k: v for k, v in config.method_kwargs.items() if k != "min_samples"}
    result = QuantizationResult("gptq")
    blocks, run, state = _blocks(model, calibration)
    for i, (prefix, block) in enumerate(tqdm(blocks, desc="gptq", unit="block", disable=not progress)):
        targets = _targets(block, prefix, config)
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
                qt = gptq_quantize(mod.weight.detach(), H, config.for_module(full).spec(), **kw)
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


def _groups(
    model: nn.Module, block: nn.Module, prefix: str, config: QuantConfig, run: Any, i: int, state: Any
) -> tuple[list[_Group], Any]:
    """Run ``block`` in float once; group its target linears by input tensor; find fold targets."""
    all_linears = linear_modules(block)
    targets = _targets(block, prefix, config)
    norm_out: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    handles = []
    for m in block.modules():
        if _is_norm(m) and getattr(m, "weight", None) is not None:

            def post(mod: nn.Module, _args: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor):
                    norm_out[out.data_ptr()] = (mod, out)  # holding ``out`` keeps its address unique

            handles.append(m.register_forward_hook(post))
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
        if len(members) == len(names):  # a skipped layer reading the same tensor would be changed too
            if source in norm_out:
                fold = _fold_into_norm(norm_out[source][0])
            elif len(members) == 1:
                fold = _fold_into_previous(block, members[0], all_linears)
        groups.append(_Group(members, seen[members[0]].cat(), fold))
    return groups, state


def _fold_into_norm(norm: nn.Module) -> Callable[[torch.Tensor], None]:
    def fold(s: torch.Tensor) -> None:
        norm.weight.data = (norm.weight.float() / s).to(norm.weight.dtype)
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data = (bias.float() / s).to(bias.dtype)

    return fold


def _fold_into_previous(
    block: nn.Module, name: str, linears: dict[str, nn.Linear]
) -> Callable[[torch.Tensor], None] | None:
    parent, _, leaf = name.rpartition(".")
    for prev_leaf, next_leaf in FOLD_INTO_PREVIOUS:
        if leaf == next_leaf:
            prev_name = f"{parent}.{prev_leaf}" if parent else prev_leaf
            prev = linears.get(prev_name)
            if prev is not None and prev.out_features == linears[name].in_features:

                def fold(s: torch.Tensor, prev: nn.Linear = prev) -> None:
                    prev.weight.data = (prev.weight.float() / s[:, None]).to(prev.weight.dtype)
                    if prev.bias is not None:
                        prev.bias.data = (prev.bias.float() / s).to(prev.bias.dtype)

                return fold
    return None


def _scaled_method(
    method: str, model: nn.Module, config: QuantConfig, calibration: torch.Tensor, progress: bool
) -> tuple[QuantizationResult, dict[str, nn.Module]]:
    kw = config.method_kwargs
    result = QuantizationResult(method)
    int8_modules: dict[str, nn.Module] = {}
    blocks, run, state = _blocks(model, calibration)
    for i, (prefix, block) in enumerate(tqdm(blocks, desc=method, unit="block", disable=not progress)):
        groups, state = _groups(model, block, prefix, config, run, i, state)
        linears = linear_modules(block)
        plans = []
        # Phase 1: search and apply every group's scale in float (a fold may touch another group's
        # rows, so no layer is quantized before all scales are in place).
        for grp in groups:
            ws = [linears[n].weight.detach().float() for n in grp.names]
            if method == "awq":
                spec = config.for_module(prefix + grp.names[0]).spec()
                s = awq_search(ws, grp.x, spec, grid=kw.get("grid", 20)).scale
            else:
                s = smooth_scales(grp.x.abs().amax(dim=0), ws, alpha=kw.get("alpha", 0.5))
            for n in grp.names:
                lin = linears[n]
                lin.weight.data = (lin.weight.float() * s).to(lin.weight.dtype)
            if grp.fold is not None:
                grp.fold(s)
            plans.append((grp, s))
        # Phase 2: quantize.
        for grp, s in plans:
            for n in grp.names:
                full = prefix + n
                lin = linears[n]
                if grp.fold is None:
                    result.input_scales[full] = s
                if method == "awq":
                    spec = config.for_module(full).spec()
                    qt = quantize_scaled(
                        lin.weight.detach().float(), grp.x, s, spec, clip=kw.get("clip", True)
                    )
                    result.tensors[full] = qt
                else:  # the weight already holds W · s: quantize it as is
                    qt = quantize(lin.weight.detach().float(), INT8_WEIGHT)
                    int8_modules[full] = Int8Linear(
                        qt, lin.bias, threshold=None, input_scale=result.input_scales.get(full)
                    )
    return result, int8_modules


def _reject_unknown_kwargs(method: str, kwargs: dict[str, Any]) -> None:
    unknown = set(kwargs) - _KWARGS[method]
    if unknown:
        raise ValueError(
            f"config.method_kwargs: {sorted(unknown)} not understood by {method!r}; "
            f"it accepts {sorted(_KWARGS[method]) or 'none'}"
        )


@torch.no_grad()
def quantize_model_with(
    method: str,
    model: nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
) -> QuantizationResult:
    """Quantize the linear layers of ``model`` in place with ``method``; return what was done.

    Args:
        method: one of :data:`MODEL_METHODS`.
        model: any ``nn.Module``; transformers decoders are processed block by block.
        config: bits, group size, skipped layers, per-layer overrides and ``method_kwargs``
            (e.g. ``{"damp": 0.01, "act_order": True}`` for GPTQ).
        calibration: token ids ``[n_samples, seq_len]`` (or float model inputs ``[n, ...]``) for
            GPTQ, AWQ and SmoothQuant; ignored by the data-free methods.
        progress: show a tqdm bar over blocks (or layers).

    Linear layers become :class:`qlab.nn.QuantLinear` (``Int8Linear`` for ``smoothquant`` and
    ``llm_int8``).
    """
    if method not in MODEL_METHODS:
        raise ValueError(f"method must be one of {MODEL_METHODS}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a qlab.config.QuantConfig, got {type(config).__name__}")
    _reject_unknown_kwargs(method, config.method_kwargs)
    if method in ("smoothquant", "llm_int8") and config.bits != 8:
        raise ValueError(f"config.bits: {method} is W8A8, got bits={config.bits}")
    if method in CALIBRATED:
        min_samples = config.method_kwargs.get("min_samples", 2)
        check_calibration(calibration, min_samples=min_samples, method=method)
    was_training = model.training
    model.eval()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        int8_modules: dict[str, nn.Module] = {}
        if method == "gptq":
            assert calibration is not None
            result = _gptq(model, config, calibration, progress)
        elif method in ("awq", "smoothquant"):
            assert calibration is not None
            result, int8_modules = _scaled_method(method, model, config, calibration, progress)
        else:
            result = QuantizationResult(method)
            targets = _targets(model, "", config)
            for name, lin in tqdm(targets.items(), desc=method, unit="layer", disable=not progress):
                w = lin.weight.detach().float()
                if method == "llm_int8":
                    int8_modules[name] = Int8Linear.from_linear(
                        lin, threshold=config.method_kwargs.get("threshold", DEFAULT_THRESHOLD)
                    )
                elif method == "hqq":
                    result.tensors[name] = hqq_quantize(
                        w, config.for_module(name).spec(), **config.method_kwargs
                    )
                else:
                    cfg = config.for_module(name)
                    spec = (
                        cfg.spec()
                        if method == "rtn"
                        else codebook_spec(method, cfg.group_size or DEFAULT_BLOCK_SIZE)
                    )
                    result.tensors[name] = quantize(w, spec)
        for name, mod in int8_modules.items():
            _set_module(model, name, mod)
        _install(model, result)
        result.seconds = time.perf_counter() - start
        result.cpu_seconds = time.process_time() - cpu_start
    finally:
        model.train(was_training)
    return result
