"""The method registry: every fact about a quantization method, in one entry.

A :class:`Method` says which bit widths a method allows, whether it needs calibration data, whether
it uses a group size, which keyword arguments it takes, how a config becomes its weight
:class:`~qlab.tensor.QuantSpec`, and how it quantizes: per layer from the weight alone (``build``), or
over the whole model with data (``model_pass``, then ``wrap`` turns each quantized tensor into a
layer). The model driver (:func:`qlab.quantize_model`), :class:`qlab.QuantConfig`, the CLI, the
widgets and the picker all read :data:`METHODS`; adding a method means adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from qlab.codebooks import DEFAULT_BLOCK_SIZE, codebook_spec
from qlab.methods.hqq import hqq_quantize
from qlab.methods.passes import QuantizationResult, awq_pass, gptq_pass, smoothquant_pass
from qlab.nn import DEFAULT_THRESHOLD, Int8Linear, QuantLinear, linear_weight
from qlab.quantize import quantize
from qlab.scaled_floats import get_scaled_format
from qlab.tensor import QuantizedTensor, QuantSpec

Layer = Literal["weight", "fp8", "w8a8", "int8"]
#: ``(linear, spec, method kwargs) -> quantized module``: a data-free method, one layer at a time.
Build = Callable[[nn.Module, QuantSpec, Mapping[str, Any]], nn.Module]
#: ``(model, calibration, target names, spec_for, kwargs, progress) -> QuantizationResult``.
ModelPass = Callable[..., QuantizationResult]
#: ``(linear, quantized weight, input scale or None) -> quantized module``: a pass's tensor as a layer.
Wrap = Callable[[nn.Module, QuantizedTensor, torch.Tensor | None], nn.Module]

ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
#: The int8 symmetric per-channel spec of W8A8 and FP8 layers (their scales), SmoothQuant, LLM.int8.
INT8_CHANNEL = QuantSpec.per_channel(8, symmetric=True, axis=0)


def affine_spec(bits: int, group_size: int | None, symmetric: bool | None) -> QuantSpec:
    """Integer codes per group (or per output channel when ``group_size`` is None); symmetric by default
    at 8 bits only."""
    sym = symmetric if symmetric is not None else bits == 8
    if group_size is None:
        return QuantSpec.per_channel(bits, symmetric=sym, axis=0)
    return QuantSpec.per_group(bits, group_size, symmetric=sym)


def _codebook(name: str) -> Callable[[int, int | None, bool | None], QuantSpec]:
    def spec(bits: int, group_size: int | None, symmetric: bool | None) -> QuantSpec:
        return codebook_spec(name, group_size or DEFAULT_BLOCK_SIZE)

    return spec


def _int8_channel(bits: int, group_size: int | None, symmetric: bool | None) -> QuantSpec:
    return INT8_CHANNEL


def _weight_layer(quantizer: Callable[..., QuantizedTensor]) -> Build:
    """A ``build`` from a weight quantizer ``(w [out, in] fp32, spec, **kwargs) -> QuantizedTensor``."""

    def build(linear: nn.Module, spec: QuantSpec, kwargs: Mapping[str, Any]) -> nn.Module:
        qt = quantizer(linear_weight(linear).float(), spec, **kwargs)
        qt.dtype = linear.weight.dtype
        return QuantLinear.from_quantized(linear, qt)

    return build


def _scaled_spec(name: str) -> Callable[[int, int | None, bool | None], QuantSpec]:
    """The block layout of a block-scaled format (its block size is the format's, not the config's)."""

    def spec(bits: int, group_size: int | None, symmetric: bool | None) -> QuantSpec:
        fmt = get_scaled_format(name)
        return fmt.spec((1, fmt.block))  # type: ignore[arg-type]

    return spec


def _mode_layer(mode: Literal["fp8", "w8a8", "mxfp4", "nvfp4"]) -> Build:
    def build(linear: nn.Module, spec: QuantSpec, kwargs: Mapping[str, Any]) -> nn.Module:
        return QuantLinear.from_linear(linear, spec, mode=mode)

    return build


def _llm_int8_layer(linear: nn.Module, spec: QuantSpec, kwargs: Mapping[str, Any]) -> nn.Module:
    return Int8Linear.from_linear(linear, threshold=kwargs.get("threshold", DEFAULT_THRESHOLD))


def _wrap_packed(linear: nn.Module, qt: QuantizedTensor, input_scale: torch.Tensor | None) -> nn.Module:
    qt.dtype = linear.weight.dtype
    return QuantLinear.from_quantized(linear, qt, input_scale=input_scale)


def _wrap_int8(linear: nn.Module, qt: QuantizedTensor, input_scale: torch.Tensor | None) -> nn.Module:
    bias = None if linear.bias is None else linear.bias.detach()
    return Int8Linear(qt, bias, threshold=None, input_scale=input_scale)


@dataclass(frozen=True)
class Method:
    """One quantization method and everything the library needs to know about it."""

    name: str
    #: One line for help texts, widgets and the picker.
    summary: str
    bits: tuple[int, ...]
    #: Needs calibration data (token ids) and the whole model.
    calibrated: bool
    #: Uses ``group_size`` (otherwise the weight spec ignores it).
    grouped: bool
    #: The kind of layer it produces: packed weight-only, FP8, W8A8 (QuantLinear modes), or Int8Linear.
    layer: Layer
    #: ``(bits, group_size, symmetric) -> QuantSpec`` of the weight.
    spec: Callable[[int, int | None, bool | None], QuantSpec]
    #: Keyword arguments ``QuantConfig.method_kwargs`` may hold for it.
    kwargs: frozenset[str] = field(default_factory=frozenset)
    #: Whether symmetric (signed, zero-free) codes are allowed.
    allows_symmetric: bool = True
    #: A data-free weight quantizer ``(w, spec, **kwargs) -> QuantizedTensor``; ``build`` then defaults to
    #: packing its result into a QuantLinear.
    quantize_weight: Callable[..., QuantizedTensor] | None = None
    build: Build | None = None
    model_pass: ModelPass | None = None
    wrap: Wrap = _wrap_packed

    def __post_init__(self) -> None:
        if self.build is None and self.quantize_weight is not None:
            object.__setattr__(self, "build", _weight_layer(self.quantize_weight))
        if (self.build is None) == (self.model_pass is None):
            raise ValueError(f"method {self.name!r}: give exactly one of build (data-free) and model_pass")
        if self.calibrated != (self.model_pass is not None):
            raise ValueError(f"method {self.name!r}: calibrated methods are exactly those with a model_pass")


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "rtn", "round-to-nearest integers, 1-8 bits (no data)", ALL_BITS, False, True, "weight",
            affine_spec, quantize_weight=quantize,
        ),
        Method(
            "nf4", "4-bit NormalFloat lookup, absmax per block (QLoRA; no data)", (4,), False, True,
            "weight", _codebook("nf4"), quantize_weight=quantize,
        ),
        Method(
            "fp4", "4-bit float e2m1 lookup, absmax per block (no data)", (4,), False, True, "weight",
            _codebook("fp4"), quantize_weight=quantize,
        ),
        Method(
            "fp8", "FP8 e4m3 weights, one scale per output row (no data)", (8,), False, False, "fp8",
            _int8_channel, build=_mode_layer("fp8"),
        ),
        Method(
            "mxfp4", "OCP MXFP4: e2m1, one power-of-two (e8m0) scale per 32 (no data)", (4,), False, False,
            "weight", _scaled_spec("mxfp4"), allows_symmetric=False, build=_mode_layer("mxfp4"),
        ),
        Method(
            "nvfp4", "NVFP4: e2m1, an e4m3 scale per 16 and an fp32 one per tensor (no data)", (4,), False,
            False, "weight", _scaled_spec("nvfp4"), allows_symmetric=False, build=_mode_layer("nvfp4"),
        ),
        Method(
            "w8a8", "int8 weights and per-token int8 activations (no data)", (8,), False, False, "w8a8",
            _int8_channel, build=_mode_layer("w8a8"),
        ),
        Method(
            "hqq", "half-quadratic zero-point optimization of an lp weight error (no data)", ALL_BITS,
            False, True, "weight", affine_spec,
            kwargs=frozenset({"p", "iters", "beta", "kappa", "optimize_scale", "init"}),
            allows_symmetric=False, quantize_weight=hqq_quantize,
        ),
        Method(
            "llm_int8", "W8A8 with outlier input features kept in float (LLM.int8; no data)", (8,), False,
            False, "int8", _int8_channel, kwargs=frozenset({"threshold"}), build=_llm_int8_layer,
        ),
        Method(
            "gptq", "Hessian-guided error feedback, layer by layer (calibration data)", ALL_BITS, True,
            True, "weight", affine_spec,
            kwargs=frozenset({"damp", "block_size", "act_order", "min_samples"}), model_pass=gptq_pass,
        ),
        Method(
            "awq", "activation-aware input-channel scaling, then groups (calibration data)", ALL_BITS,
            True, True, "weight", affine_spec, kwargs=frozenset({"grid", "clip", "min_samples"}),
            model_pass=awq_pass,
        ),
        Method(
            "smoothquant", "W8A8 with activation outliers migrated into the weights (calibration data)",
            (8,), True, False, "int8", _int8_channel, kwargs=frozenset({"alpha", "min_samples"}),
            model_pass=smoothquant_pass, wrap=_wrap_int8,
        ),
    )
}  # fmt: skip
#: Method names, in registry order.
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: Any, argname: str = "method") -> Method:
    """The registry entry called ``name``; a ValueError naming ``argname`` and the choices otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"{argname} must be one of {METHOD_NAMES}, got {name!r}")
    return METHODS[name]


def data_free_methods() -> tuple[str, ...]:
    """Methods that quantize a layer from its weight alone (on the fly, while loading)."""
    return tuple(n for n, m in METHODS.items() if not m.calibrated)


def calibrated_methods() -> tuple[str, ...]:
    """Methods that need calibration data."""
    return tuple(n for n, m in METHODS.items() if m.calibrated)
