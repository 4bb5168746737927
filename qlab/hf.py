"""qlab as a transformers quantization backend: ``from_pretrained``, ``save_pretrained``, ``dequantize``.

``import qlab`` registers two classes with transformers (lazily: the first time transformers imports
its quantizer table, so ``import qlab`` does not pay for importing transformers):

* :class:`QlabConfig` under ``quant_method="qlab"``: the JSON form of a :class:`qlab.QuantConfig`
  (method, bits, group size, symmetric, skip patterns, per-module overrides, method kwargs) plus the
  file format version. It is what ``config.json`` carries as ``quantization_config``.
* :class:`QlabHfQuantizer`: the ``HfQuantizer`` that transformers runs inside ``from_pretrained``.

Two ways in::

    # on the fly: a float checkpoint, quantized layer by layer while it loads (data-free methods)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=QlabConfig("nf4"))
    # pre-quantized: a folder written by save_pretrained (any method, GPTQ and AWQ included)
    model.save_pretrained(out); model = AutoModelForCausalLM.from_pretrained(out)

**On the fly.** Each target ``nn.Linear`` stays on the meta device until its float weight arrives;
the quantize op then builds the packed layer from that one weight (``QuantConfig.build_layer``, the
registry's builder) and swaps it in. transformers loads on-the-fly checkpoints one tensor at a time,
so the peak is about the quantized model plus one float layer, never the float model plus its copy.

**Pre-quantized.** The checkpoint is the model's state dict: each quantized layer contributes its
packed ``qweight``, ``scale``, ``zero``, ``bias``, ``input_scale`` (or Int8Linear's
``weight_codes``/``weight_scale``), byte for byte as :mod:`qlab.io` stores them, and every shard's
safetensors header carries qlab.io's JSON document (``{"format": "qlab-quantized",
"format_version": 1, "layers": {name: layer_config()}, ...}``). Before loading, every described layer
is swapped on the meta device for an empty one of that exact shape (``from_layer_config(cfg,
device="meta")``); the file's tensors then load straight into the packed buffers, and no float
weight is ever materialised. A newer format version is refused.

**Never a silently random model.** A process that never imported qlab does not know
``quant_method="qlab"``: transformers logs "Unknown quantization type" and loads the folder as a
float model. So every quantized layer also writes a small marker tensor under the float name
``<layer>.weight`` (1-D bytes reading "qlab-quantized layer: import qlab ..."). A float ``Linear``
expects a 2-D ``[out, in]`` weight there, so transformers reports a size mismatch and raises
``RuntimeError`` instead of initialising random weights; with qlab imported the marker is ignored.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qlab import driver
from qlab.config import QuantConfig
from qlab.driver import dequantize_model, fit_group_sizes, quantized_layers, set_module
from qlab.io import FORMAT_NAME, FORMAT_VERSION, QuantizedFileError, read_metadata
from qlab.nn import LAYER_TYPES, is_linear

#: The ``quant_method`` qlab registers with transformers.
QUANT_METHOD = "qlab"
#: The safetensors header key holding qlab.io's JSON document (the same key qlab.io uses).
META_KEY = "qlab"
#: Bytes of the marker tensor stored under ``<layer>.weight`` for every quantized layer.
MARKER = b"qlab-quantized layer: import qlab before from_pretrained"
_DEFAULT_SKIP = ("lm_head", "*embed*")


class QlabConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a qlab model: a :class:`qlab.QuantConfig` as JSON values only.

    Args:
        method: a :mod:`qlab.registry` method (``rtn``, ``nf4``, ``fp4``, ``fp8``, ``w8a8``, ``hqq``,
            ``llm_int8`` quantize on the fly; ``gptq``, ``awq``, ``smoothquant`` need calibration data
            and load only pre-quantized).
        bits: weight bits, as the method allows (rtn/hqq/gptq/awq 1..8, nf4/fp4 4, fp8/w8a8/int8 8).
        group_size: elements per scale along the input dimension; ``None``: one scale per output row.
        symmetric: signed codes without a zero-point (``None``: the method's default).
        skip: module-name glob patterns left in float (``lm_head`` and embeddings by default).
        overrides: ``{glob pattern: {field: value}}`` for matching modules.
        method_kwargs: JSON arguments for the method (``{"iters": 20}`` for HQQ).
        format_version: the qlab file format the checkpoint was written with; newer ones are refused.

    Every value is validated through ``QuantConfig`` and the method registry when the config is made
    (or read from ``config.json``); a bad one raises a ValueError naming the field.
    """

    def __init__(
        self,
        method: str = "rtn",
        bits: int = 4,
        group_size: int | None = 128,
        symmetric: bool | None = None,
        skip: Sequence[str] = _DEFAULT_SKIP,
        overrides: dict[str, dict[str, Any]] | None = None,
        method_kwargs: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ValueError(f"QlabConfig: unknown fields {sorted(unknown)}")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version < 1:
            raise ValueError(f"format_version must be a positive integer, got {format_version!r}")
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {format_version} is newer than this qlab reads ({FORMAT_VERSION}); "
                "upgrade qlab to load this checkpoint"
            )
        if isinstance(skip, str) or not all(isinstance(p, str) for p in skip):
            raise ValueError(f"skip must be a list of glob patterns (strings), got {skip!r}")
        self.quant_method = QUANT_METHOD
        self.method = method
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.skip = list(skip)
        self.overrides = {} if overrides is None else overrides
        self.method_kwargs = {} if method_kwargs is None else method_kwargs
        self.format_version = format_version
        self.post_init()

    def post_init(self) -> None:
        """Check every field: JSON values only, and a valid ``QuantConfig`` (overrides included)."""
        for name in ("overrides", "method_kwargs"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name} must hold JSON values only (no dtypes or tensors): {err}") from err
        try:
            cfg = self.to_quant_config()
            known = {f.name for f in fields(QuantConfig)} - {"overrides"}
            for pattern, changes in cfg.overrides.items():
                if not isinstance(changes, dict):
                    raise ValueError(f"overrides[{pattern!r}] must be a dict of QuantConfig fields")
                bad = set(changes) - known
                if bad:
                    raise ValueError(f"overrides[{pattern!r}]: unknown fields {sorted(bad)}")
                QuantConfig(**{**cfg.to_dict(), "skip": tuple(cfg.skip), "overrides": {}, **changes})
        except (TypeError, ValueError) as err:
            raise ValueError(f"QlabConfig: {err}") from err

    def to_quant_config(self) -> QuantConfig:
        """The :class:`qlab.QuantConfig` this config describes."""
        return QuantConfig(
            method=self.method,
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            skip=tuple(self.skip),
            overrides=dict(self.overrides),
            method_kwargs=dict(self.method_kwargs),
        )

    @classmethod
    def from_quant_config(cls, config: QuantConfig) -> QlabConfig:
        """The JSON config of a :class:`qlab.QuantConfig` (for a model quantized by ``quantize_model``)."""
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a qlab.QuantConfig, got {type(config).__name__}")
        fields = config.to_dict()
        if fields.pop("quantize_embeddings", False):
            raise ValueError("quantize_embeddings: not supported by the transformers backend yet")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "skip": list(self.skip),
            "overrides": json.loads(json.dumps(self.overrides)),
            "method_kwargs": json.loads(json.dumps(self.method_kwargs)),
            "format_version": self.format_version,
        }


def _marker() -> torch.Tensor:
    return torch.frombuffer(bytearray(MARKER), dtype=torch.uint8)


def _checkpoint_metadata(checkpoint_files: Sequence[str] | None) -> dict[str, Any]:
    """qlab.io's JSON document from the first shard's safetensors header, validated."""
    if not checkpoint_files:
        raise QuantizedFileError(
            "a pre-quantized qlab model loads from safetensors files; none were given (state_dict= is "
            "not supported)"
        )
    first = str(checkpoint_files[0])
    if not first.endswith(".safetensors"):
        raise QuantizedFileError(f"{first}: qlab checkpoints are safetensors files")
    return read_metadata(first)


def _tied_linear_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k.removesuffix(".weight") for pair in tied.items() for k in pair}


def _quantize_op(quantizer: QlabHfQuantizer) -> Any:
    """The ``ConversionOps`` that quantizes one float weight as it loads (imported lazily: transformers'
    loading module imports the quantizer table that registers this backend)."""
    from transformers.core_model_loading import ConversionOps

    class QlabQuantize(ConversionOps):
        """Float weight in, quantized layer swapped into the model; returns no tensors to set."""

        def __init__(self, hf_quantizer: QlabHfQuantizer) -> None:
            self.hf_quantizer = hf_quantizer

        @torch.no_grad()
        def convert(
            self,
            input_dict: dict[str, list[torch.Tensor]],
            model: nn.Module | None = None,
            full_layer_name: str | None = None,
            missing_keys: set[str] | None = None,
            **kwargs: Any,
        ) -> dict[str, torch.Tensor]:
            assert model is not None and full_layer_name is not None
            value = next(iter(input_dict.values()))
            value = value[0] if isinstance(value, list) else value
            self.hf_quantizer.quantize_loaded_weight(model, full_layer_name, value)
            if missing_keys is not None:
                missing_keys.discard(full_layer_name)
                path = full_layer_name.rpartition(".")[0]
                if not self.hf_quantizer.bias_pending(path):
                    missing_keys.discard(f"{path}.bias")
            return {}

    return QlabQuantize(quantizer)


class QlabHfQuantizer(HfQuantizer):
    """transformers' hooks for qlab (see the module docstring for the two loading paths).

    * ``_process_model_before_weight_loading``: pre-quantized, swap every layer the checkpoint
      describes for an empty packed one on the meta device; on the fly, plan the targets (linears
      not skipped, not tied to an embedding, not in ``_keep_in_fp32_modules``) and fit group sizes.
    * ``param_needs_quantization`` + ``get_quantize_ops``: each target's float weight becomes its
      quantized layer as it arrives.
    * ``_process_model_after_weight_loading``: rebuild derived buffers (codebook tables), check scales
      are finite and nothing is left on meta.
    * ``get_state_dict_and_metadata``: what ``save_pretrained`` writes (state dict, marker tensors,
      qlab.io's JSON document in every shard header).
    * ``_dequantize``: :func:`qlab.dequantize_model`.
    """

    requires_calibration = False
    quantization_config: QlabConfig

    def __init__(self, quantization_config: QlabConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, QlabConfig):
            raise TypeError(
                f"quantization_config must be a qlab.hf.QlabConfig, got {type(quantization_config).__name__}"
            )
        super().__init__(quantization_config, **kwargs)
        self.qconfig = quantization_config.to_quant_config()
        self._targets: dict[str, QuantConfig] = {}
        self._bias_pending: set[str] = set()

    # --- checks -----------------------------------------------------------------------------------
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized and self.qconfig.entry.calibrated:
            raise ValueError(
                f"QlabConfig: method {self.qconfig.method!r} needs calibration data and cannot quantize "
                "while loading; quantize with qlab.quantize_model(model, config, calibration) and "
                "save_pretrained the result"
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("device_map: qlab layers cannot be offloaded to disk")

    # --- before loading ---------------------------------------------------------------------------
    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: Sequence[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        if self.pre_quantized:
            self._swap_in_skeletons(model, _checkpoint_metadata(checkpoint_files))
        else:
            self._plan_targets(model)
        return model

    def _swap_in_skeletons(self, model: nn.Module, meta: dict[str, Any]) -> None:
        markers = []
        for name, entry in meta["layers"].items():
            cls = LAYER_TYPES.get(entry.get("type")) if isinstance(entry, dict) else None
            if cls is None:
                raise QuantizedFileError(f"layer {name}: unknown layer description {entry!r}")
            try:
                model.get_submodule(name)
            except AttributeError as err:
                raise QuantizedFileError(f"layer {name} in the checkpoint is not in the model") from err
            try:
                layer = cls.from_layer_config(entry, device="meta")  # type: ignore[attr-defined]
            except (KeyError, TypeError, ValueError) as err:
                raise QuantizedFileError(f"layer {name}: invalid layer description: {err}") from err
            set_module(model, name, layer)
            markers.append(re.escape(f"{name}.weight") + "$")
        if meta.get("config"):
            self.qconfig = QuantConfig.from_dict(meta["config"])
        # The marker tensors stored under each <layer>.weight have no place in the quantized model.
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignore | set(markers)

    def _plan_targets(self, model: nn.Module) -> None:
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        tied = _tied_linear_names(model)
        config = fit_group_sizes(model, self.qconfig)
        self.qconfig = config
        self._targets = {
            name: config.for_module(name)
            for name, mod in model.named_modules()
            if name
            and is_linear(mod)
            and not config.is_skipped(name)
            and name not in tied
            and not any(k in name for k in keep)
        }

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        path, _, leaf = param_name.rpartition(".")
        return leaf == "weight" and path in self._targets

    def get_quantize_ops(self) -> Any:
        return _quantize_op(self)

    def bias_pending(self, path: str) -> bool:
        return path in self._bias_pending

    @torch.no_grad()
    def quantize_loaded_weight(self, model: nn.Module, param_name: str, value: torch.Tensor) -> None:
        """Quantize the float ``value`` of ``<layer>.weight`` and swap the quantized layer in.

        Only this one float weight exists at a time. A bias still on the meta device (not loaded yet)
        is built as zeros and overwritten when it arrives (transformers sets it on the new layer).
        """
        path = param_name.rpartition(".")[0]
        module = model.get_submodule(path)
        if not is_linear(module):
            raise TypeError(f"{path}: expected a float linear layer to quantize, got {type(module).__name__}")
        if tuple(value.shape) != tuple(module.weight.shape):
            raise QuantizedFileError(
                f"{param_name}: checkpoint shape {list(value.shape)}, the model expects "
                f"{list(module.weight.shape)}"
            )
        module.weight = nn.Parameter(value.detach(), requires_grad=False)
        if module.bias is not None and module.bias.device.type == "meta":
            module.bias = nn.Parameter(torch.zeros(module.bias.shape, dtype=module.bias.dtype), False)
            self._bias_pending.add(path)
        set_module(model, path, self._targets[path].build_layer(module))

    # --- after loading ----------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        left_float = [n for n in self._targets if is_linear(model.get_submodule(n))]
        if left_float:
            raise QuantizedFileError(
                f"{len(left_float)} layers were not quantized (their weights were not in the checkpoint), "
                f"e.g. {left_float[0]}"
            )
        for name, layer in quantized_layers(model).items():
            on_meta = [n for n, t in layer.named_buffers() if t.device.type == "meta" and n != "codebook"]
            if on_meta:
                raise QuantizedFileError(f"layer {name}: tensors {on_meta} were not in the checkpoint")
            layer.after_load()
            try:
                layer.check_finite(name)
            except ValueError as err:
                raise QuantizedFileError(str(err)) from err
        model.qlab_config = self.qconfig
        return model

    # --- saving, training, dequantizing -----------------------------------------------------------
    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The state dict plus one marker tensor per quantized layer, and qlab.io's JSON document."""
        layers = quantized_layers(model)
        if len({id(m) for m in layers.values()}) != len(layers):
            raise ValueError("model: a quantized layer shared by two names cannot go to save_pretrained")
        state = model.state_dict()
        for name in layers:
            if f"{name}.weight" in state:
                raise ValueError(f"model: {name} has both a quantized layer and a float weight")
            state[f"{name}.weight"] = _marker()
        config = getattr(model, "qlab_config", None) or self.qconfig
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "method": config.method,
            "config": config.to_dict(),
            "layers": {n: m.layer_config() for n, m in layers.items()},
            "aliases": {},
            "extra_buffers": [],
        }
        return state, {META_KEY: json.dumps(doc)}

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters (PEFT LoRA, :mod:`qlab.peft`) train on top of the frozen packed layers."""
        return True

    @property
    def is_compileable(self) -> bool:
        """Not claimed: torch.compile of the dispatching forward is untested."""
        return False

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        return dequantize_model(model)


def attach(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Make ``model.save_pretrained`` write a qlab checkpoint for a model quantized outside
    ``from_pretrained`` (by :func:`qlab.quantize_model` or :func:`qlab.load_quantized`; both call this
    for transformers models). Sets ``model.hf_quantizer`` and ``model.config.quantization_config``."""
    from transformers.modeling_utils import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    config = config if config is not None else getattr(model, "qlab_config", None)
    if config is None:
        raise ValueError("config: the model records no qlab_config; pass the QuantConfig used")
    if config.quantize_embeddings:
        raise ValueError(
            "config.quantize_embeddings: a packed embedding cannot be saved with save_pretrained yet; "
            "quantize without it, or export with qlab.gguf.save_gguf"
        )
    qc = QlabConfig.from_quant_config(config)
    quantizer = QlabHfQuantizer(qc, pre_quantized=True)
    quantizer.qconfig = config
    model.hf_quantizer = quantizer
    model.config.quantization_config = qc
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for mod in model.modules():
        if isinstance(mod, PreTrainedModel):
            mod.config._is_quantized = True
    return model


def _attach_if_transformers(model: nn.Module, config: QuantConfig) -> None:
    from transformers.modeling_utils import PreTrainedModel

    # A packed embedding (quantize_embeddings=True) has no checkpoint layout yet: leave such a model
    # unattached rather than make QlabConfig describe what it cannot load (README, Limits).
    if isinstance(model, PreTrainedModel) and not config.quantize_embeddings:
        attach(model, config)


def export_pretrained(path: str | os.PathLike[str], save_directory: str | os.PathLike[str]) -> None:
    """Convert a :func:`qlab.save_quantized` file of a transformers model into a ``save_pretrained``
    folder (one call; the tensors are the same bytes)."""
    from qlab.io import load_quantized

    model = load_quantized(path)
    attach(model)
    model.save_pretrained(save_directory)


def import_pretrained(directory: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Convert a qlab ``save_pretrained`` folder into one :func:`qlab.save_quantized` file."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from qlab.io import save_quantized

    arch = (AutoConfig.from_pretrained(directory).architectures or [""])[0]
    auto = AutoModelForCausalLM if arch.endswith("ForCausalLM") else AutoModel
    model = auto.from_pretrained(directory)
    save_quantized(model, path)


def register() -> None:
    """Register :class:`QlabConfig` and :class:`QlabHfQuantizer` under ``"qlab"`` (idempotent)."""
    for mapping, cls, reg in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, QlabConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, QlabHfQuantizer, register_quantizer),
    ):
        if mapping.get(QUANT_METHOD) is not cls:
            mapping.pop(QUANT_METHOD, None)  # a reloaded qlab.hf replaces its own earlier class
            reg(QUANT_METHOD)(cls)
    if _attach_if_transformers not in driver.AFTER_QUANTIZE:
        driver.AFTER_QUANTIZE.append(_attach_if_transformers)


register()
