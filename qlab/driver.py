"""The model driver: the one place that turns a model's linear layers into quantized ones.

:func:`quantize_model` reads the method from the registry (:mod:`qlab.registry`) and does, for every
method alike, what a model needs:

* finds the targets: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored ``[in, out]``),
  minus the ``skip`` glob patterns (``lm_head`` and embeddings by default);
* fits group sizes that do not divide a layer's width (:func:`fit_group_sizes`, with a warning);
* leaves float, with a warning, a linear whose weight is tied to a module that stays float (an
  embedding): quantizing it would store the matrix twice;
* quantizes linears that share one weight and one bias once, and installs the same layer under every
  name (linears sharing a weight but not a bias are quantized each on its own);
* with ``config.quantize_embeddings``, quantizes the input embedding and a head tied to it as one
  stored table (:func:`quantize_embeddings`);
* runs a data-free method layer by layer (``Method.build``), or a calibrated one over the whole model
  (``Method.model_pass`` on token ids, then ``Method.wrap`` per layer), with a progress bar.

:func:`dequantize_model` is the inverse: every quantized layer becomes an ``nn.Linear`` holding its
effective float weight.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qlab.calibration import check_calibration
from qlab.config import QuantConfig
from qlab.nn import LAYER_TYPES, QuantEmbedding, QuantLinear, is_conv1d, is_linear, linear_weight

#: Called as ``hook(model, config)`` when :func:`quantize_model` or :func:`qlab.load_quantized` has
#: produced a quantized model. The transformers backend (:mod:`qlab.hf`) registers one that makes
#: ``model.save_pretrained`` write a qlab checkpoint; the driver itself knows nothing about it.
AFTER_QUANTIZE: list[Callable[[nn.Module, QuantConfig], None]] = []


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _tied_elsewhere(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, str]:
    """``{linear name: other owner}`` for target weights shared with a module that stays float."""
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    tied = {}
    for name, mod in targets.items():
        others = [o for o in owners.get(id(mod.weight), []) if o.rsplit(".", 1)[0] not in targets]
        if others:
            tied[name] = others[0]
    return tied


def fitting_group_size(in_features: int, group_size: int) -> int:
    """The largest power of two below ``group_size`` that divides ``in_features`` (64 for 576 and 128):
    what a layer gets when the requested group size does not divide its width. qlab does not pad."""
    fit = 2 ** int(math.log2(group_size))
    while fit > 1 and (in_features % fit or fit >= group_size):
        fit //= 2
    return fit


def fit_group_sizes(model: nn.Module, config: QuantConfig) -> QuantConfig:
    """``config`` plus overrides for layers whose ``in_features`` the group size does not divide.

    qlab does not pad groups. Such a layer (SmolLM2's hidden size 576 with ``group_size=128``) gets the
    largest power of two that divides its ``in_features`` and is below the requested size (64 for
    576), with a warning; the other layers keep the requested size.
    """
    if not config.entry.grouped:
        return config
    fits: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if not name or not is_linear(mod) or config.is_skipped(name):
            continue
        g = config.for_module(name).group_size
        k = linear_weight(mod).shape[1]
        if g is None or k % g == 0:
            continue
        fits[name] = {"group_size": fitting_group_size(k, g)}
    if not fits:
        return config
    sizes = sorted(
        {(linear_weight(model.get_submodule(n)).shape[1], f["group_size"]) for n, f in fits.items()}
    )
    warnings.warn(
        f"group_size={config.group_size} does not divide in_features of {len(fits)} layers; they use "
        + ", ".join(f"group_size={g} (in_features={k})" for k, g in sizes),
        stacklevel=3,
    )
    return QuantConfig.from_dict({**config.to_dict(), "overrides": {**config.overrides, **fits}})


def _as_linear(conv: nn.Module) -> nn.Linear:
    """A ``Conv1D`` as the ``nn.Linear`` computing the same thing (weight transposed to ``[out, in]``)."""
    w = linear_weight(conv)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin


def quantize_layer(linear: nn.Module, config: QuantConfig, name: str = "") -> nn.Module:
    """One linear layer quantized with a data-free method of ``config`` (overrides for ``name`` applied)."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a qlab.QuantConfig, got {type(config).__name__}")
    if not is_linear(linear):
        raise TypeError(f"linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
    return config.build_layer(linear, name)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
) -> nn.Module:
    """Replace the linear layers of ``model`` by quantized ones in place; return ``model``.

    Args:
        model: any ``nn.Module``; transformers decoders are walked block by block by calibrated methods.
        config: the method (a :mod:`qlab.registry` name), bits, group size, what to leave float
            (``skip``), per-module ``overrides`` and ``method_kwargs``.
        calibration: token ids ``[n_samples, seq_len]`` (or float model inputs) for methods that need
            data (``gptq``, ``awq``, ``smoothquant``); must be None for the others.
        progress: show a progress bar over layers (or blocks).

    The config actually used (with fitted group sizes) is recorded as ``model.qlab_config``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a qlab.QuantConfig, got {type(config).__name__}")
    method = config.entry
    if method.calibrated:
        min_samples = config.method_kwargs.get("min_samples", 2)
        check_calibration(calibration, min_samples=min_samples, method=config.method)
    elif calibration is not None:
        raise ValueError(f"calibration: method {config.method!r} uses no data; pass calibration=None")
    config = fit_group_sizes(model, config)

    targets = {
        n: m
        for n, m in model.named_modules()
        if n and is_linear(m) and not isinstance(m, QuantLinear) and not config.is_skipped(n)
    }
    for name, owner in _tied_elsewhere(model, targets).items():
        warnings.warn(
            f"{name} shares its weight with {owner}, which stays float: left unquantized", stacklevel=2
        )
        del targets[name]
    # Linears sharing their weight and bias are one layer, quantized once under the first name.
    first: dict[tuple[int, int], str] = {}
    owner_of = {name: first.setdefault((id(mod.weight), id(mod.bias)), name) for name, mod in targets.items()}
    owners = [n for n in targets if owner_of[n] == n]

    layers: dict[str, nn.Module] = {}
    if method.calibrated:
        assert method.model_pass is not None and calibration is not None
        for name in owners:  # the passes hook nn.Linear; a Conv1D becomes its equivalent first
            if is_conv1d(targets[name]):
                targets[name] = _as_linear(targets[name])
                set_module(model, name, targets[name])
        was_training = model.training
        model.eval()
        try:
            result = method.model_pass(
                model, calibration, set(owners), lambda n: config.for_module(n).spec(),
                config.method_kwargs, progress,
            )  # fmt: skip
        finally:
            model.train(was_training)
        for name in owners:
            layers[name] = method.wrap(targets[name], result.tensors[name], result.input_scales.get(name))
    else:
        for name in tqdm(owners, desc=f"quantize {config.method}", unit="layer", disable=not progress):
            layers[name] = config.build_layer(targets[name], name)
    for name in targets:
        set_module(model, name, layers[owner_of[name]])
    if config.quantize_embeddings:
        quantize_embeddings(model, config)
    model.qlab_config = config  # what qlab.io.save_quantized records
    for hook in AFTER_QUANTIZE:
        hook(model, config)
    return model


def _head_config(config: QuantConfig) -> QuantConfig:
    """The settings for the embedding table: ``config`` with its ``"lm_head"`` overrides; ``rtn`` at
    the same bits where the method needs calibration (a head has no block to calibrate in)."""
    cfg = config.for_module("lm_head")
    if cfg.entry.build is None:
        cfg = QuantConfig("rtn", cfg.bits, cfg.group_size, cfg.symmetric)
    return cfg


@torch.no_grad()
def quantize_embeddings(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Quantize ``model``'s input embedding (``get_input_embeddings()``) into a
    :class:`~qlab.nn.QuantEmbedding`, and install its table as the output head when the head's weight
    is the embedding's (tied): one stored table, looked up by rows and multiplied by the kernels.
    An untied float head becomes a QuantLinear of its own. Returns ``model``.

    Settings: :func:`_head_config` (``config`` with the ``"lm_head"`` overrides, so that
    ``overrides={"lm_head": {"bits": 8, "group_size": None}}`` gives an int8 per-row table).
    """
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if not isinstance(emb, nn.Embedding):
        raise ValueError("quantize_embeddings: model has no nn.Embedding as get_input_embeddings()")
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    cfg = _head_config(config)
    k = emb.weight.shape[1]
    if cfg.entry.grouped and cfg.group_size is not None and k % cfg.group_size:
        g = fitting_group_size(k, cfg.group_size)
        cfg = QuantConfig.from_dict({**cfg.to_dict(), "group_size": g, "overrides": {}})
    qemb = QuantEmbedding.from_embedding(emb, cfg)
    names = {id(m): n for n, m in model.named_modules()}
    set_module(model, names[id(emb)], qemb)
    if isinstance(head, nn.Linear) and names.get(id(head)):
        new_head = qemb.linear if head.weight is emb.weight else cfg.build_layer(head)
        set_module(model, names[id(head)], new_head)
    return model


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` for every quantized layer (QuantLinear, Int8Linear) of ``model``, shared ones
    under each of their names."""
    kinds = tuple(LAYER_TYPES.values())
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, kinds)}


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """``{name: QuantLinear}`` in ``model``."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantLinear)}


def quantized_bits_per_weight(model: nn.Module) -> float:
    """Storage bits per weight over the quantized layers of ``model`` (codes, scales, zeros; each
    shared layer counted once)."""
    seen: set[int] = set()
    bits = n = 0
    for layer in quantized_layers(model).values():
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        extra = sum(t.numel() * t.element_size() for t in (layer.bias, layer.input_scale) if t is not None)
        bits += 8 * (layer.nbytes - extra)
        n += layer.in_features * layer.out_features
    return bits / n if n else math.nan


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer (QuantLinear, Int8Linear) by an ``nn.Linear`` (a QuantEmbedding by an
    ``nn.Embedding`` tied to its head's) holding its effective
    float weight, in place; return ``model``. The model then computes what the quantized one computes on
    the reference path."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kinds = tuple(LAYER_TYPES.values())
    replaced: dict[int, nn.Linear] = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if id(mod) in replaced:  # a layer shared under several names stays shared
            set_module(model, name, replaced[id(mod)])
            continue
        if not isinstance(mod, kinds):
            continue
        w = mod.effective_weight()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        replaced[id(mod)] = lin
        if not name:
            return lin
        set_module(model, name, lin)
    for name, mod in list(model.named_modules()):  # their tables are nn.Linear now: tie embeddings to them
        if isinstance(mod, QuantEmbedding):
            emb = nn.Embedding(mod.linear.out_features, mod.linear.in_features, padding_idx=mod.padding_idx)
            emb.weight = mod.linear.weight
            set_module(model, name, emb)
    return model
