"""QLoRA on qlab layers: PEFT LoRA adapters trained on top of frozen, packed quantized layers.

QLoRA (Dettmers et al., 2023) keeps the pretrained weight quantized and frozen and trains a low-rank
update beside it::

    y = Ŵ x + b + (α / r) · B A x          Ŵ: the packed base (QuantLinear / Int8Linear), frozen
                                            A: [r, in], B: [out, r], the only trainable tensors

Gradients flow to ``A`` and ``B`` and, through the base, to the layers below: ``∂L/∂x = ∂L/∂y · Ŵ``
(plus the adapter's term). Autograd through the base's reference path (dequantize, then ``F.linear``)
would keep the dequantized float ``Ŵ`` of every layer alive until backward, which is the float model
the quantization was meant to avoid. :class:`FrozenQuantMatmul` instead saves nothing but the layer:
forward runs the layer as in inference (any fast path), and backward dequantizes ``Ŵ`` again, uses it
for one matmul, and drops it, so at most one float weight exists at a time. For W8A8 layers the
activation rounding has no useful derivative; backward uses the effective weight (the straight-through
estimator). LLM.int8 and SmoothQuant layers (:class:`~qlab.nn.Int8Linear`) are not wrapped: PEFT needs
a ``qweight``/``weight`` tensor on the layer to place adapters, which Int8Linear does not have;
:func:`get_peft_model` refuses them with a clear error.

Use it through PEFT's custom-module registration::

    from peft import LoraConfig
    import qlab.peft
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    model = qlab.peft.get_peft_model(model, config)   # registers QlabLoraLinear, then peft.get_peft_model
    ...
    merged = qlab.peft.merge_and_unload(model, to="float")   # or to="quantized": back onto the grid
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

import torch
from peft import LoraConfig
from peft import get_peft_model as _peft_get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from qlab.nn import Int8Linear, QuantLinear

MergeTarget = Literal["float", "quantized"]
QUANT_LAYERS = (QuantLinear, Int8Linear)


class FrozenQuantMatmul(torch.autograd.Function):
    """``y = layer(x)`` for a frozen quantized ``layer``, with ``∂L/∂x = ∂L/∂y · W_eff`` recomputed in
    backward (``W_eff = Ŵ / input_scale``, the weight the layer applies). No tensor is saved for
    backward; the dequantized weight lives only inside ``backward``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        with torch.no_grad():
            return layer(x.detach())

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.effective_weight(torch.float32)
        grad_x = (grad_out.float() @ w).to(ctx.x_dtype)
        del w
        return grad_x, None


def frozen_quant_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a quantized ``layer`` to ``x`` so that gradients reach ``x`` without a stored float weight."""
    if not isinstance(layer, QUANT_LAYERS):
        raise TypeError(f"layer must be a QuantLinear or Int8Linear, got {type(layer).__name__}")
    if not torch.is_grad_enabled() or not x.requires_grad:
        return layer(x)
    return FrozenQuantMatmul.apply(x, layer)


def _requantize(base: nn.Module, weight: torch.Tensor) -> nn.Module:
    """``weight`` [out, in] (float, applied to ``x`` directly) quantized on the grid of ``base``: same
    spec and mode, round to nearest (the base's own method, e.g. GPTQ, is not rerun)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None, device=weight.device)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if base.bias is not None:
            lin.bias.copy_(base.bias.float())
    if isinstance(base, Int8Linear):
        return Int8Linear.from_linear(lin, threshold=base.threshold)
    lin = lin.to(base.weight_dtype)
    return QuantLinear.from_linear(lin, base.spec, mode=base.mode)


def _float_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    dtype = getattr(base, "weight_dtype", torch.float32)
    lin = nn.Linear(
        weight.shape[1], weight.shape[0], bias=base.bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        lin.weight.copy_(weight)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
    return lin


class QlabLoraLinear(nn.Module, LoraLayer):
    """A PEFT LoRA layer around a frozen :class:`~qlab.nn.QuantLinear` or :class:`~qlab.nn.Int8Linear`
    (modelled on PEFT's ``HqqLoraLinear``).

    ``merge`` adds ``(α/r) B A`` to the base's effective weight and installs either a float
    ``nn.Linear`` (``merge_to = "float"``, exact) or a layer quantized on the base's grid
    (``"quantized"``, round to nearest: stays small, loses some of the update). ``unmerge`` restores
    the original packed base.
    """

    #: What ``merge`` produces: ``"float"`` or ``"quantized"`` (see :func:`merge_and_unload`).
    merge_to: MergeTarget = "float"

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        if config.lora_bias:
            raise ValueError(f"{type(self).__name__} does not support lora_bias; set it to False")
        if config.use_dora:
            raise ValueError(f"{type(self).__name__} does not support DoRA; set use_dora=False")
        super().__init__()
        with warnings.catch_warnings():  # PEFT reads in/out_features from the layer, then warns anyway
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self._unmerged_base: nn.Module | None = None
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        # qweight is uint8 (or float8 for FP8 layers): adapters live in the layer's float dtype instead.
        if isinstance(base_layer, QuantLinear):
            return base_layer.qweight.device, base_layer.weight_dtype
        if isinstance(base_layer, Int8Linear):
            return base_layer.weight_codes.device, torch.float32
        return super()._get_base_layer_device_and_dtype(base_layer)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        if not isinstance(base, QUANT_LAYERS):
            raise ValueError("merge: the base layer is already merged (not a quantized layer)")
        w = base.effective_weight(torch.float32)
        for name in adapter_names:
            if name in self.lora_A:
                w = w + self.get_delta_weight(name).float()
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"NaNs detected in the merged weights of adapters {adapter_names}")
        self._unmerged_base = base
        self.base_layer = _requantize(base, w) if self.merge_to == "quantized" else _float_linear(base, w)
        self.merged_adapters.extend(n for n in adapter_names if n in self.lora_A)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        if self._unmerged_base is not None:
            self.base_layer = self._unmerged_base
            self._unmerged_base = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(f"{type(self).__name__} does not support mixed adapter batches")
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            base = self.get_base_layer()
        if self.merged or not isinstance(base, QUANT_LAYERS):
            return base(x, *args, **kwargs)
        result = frozen_quant_linear(base, x)
        if self.disable_adapters:
            return result
        for active in self.active_adapters:
            if active not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[active], self.lora_B[active]
            dropout, scaling = self.lora_dropout[active], self.scaling[active]
            xa = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + (lora_b(lora_a(dropout(xa))) * scaling).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """Make PEFT wrap qlab's quantized layers with :class:`QlabLoraLinear` under ``config``."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: QlabLoraLinear})
    return config


def get_peft_model(model: nn.Module, config: LoraConfig, **kwargs: Any) -> Any:
    """``peft.get_peft_model`` with qlab's layers registered: LoRA adapters on the quantized linears
    named by ``config.target_modules``; everything else (the packed bases included) frozen."""
    int8 = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    if int8:
        raise ValueError(
            f"model: {len(int8)} Int8Linear layers (LLM.int8, SmoothQuant), e.g. {int8[0]}; qlab.peft puts "
            "adapters on QuantLinear bases only (rtn, nf4, fp4, fp8, w8a8, hqq, gptq, awq)"
        )
    return _peft_get_peft_model(model, register(copy.copy(config)), **kwargs)


def merge_and_unload(model: Any, to: MergeTarget = "float") -> nn.Module:
    """``model.merge_and_unload()`` with the merged layers either float (``to="float"``: exactly the
    adapted model) or quantized again on each base's grid (``to="quantized"``: round to nearest)."""
    if to not in ("float", "quantized"):
        raise ValueError(f"to must be 'float' or 'quantized', got {to!r}")
    layers = [m for m in model.modules() if isinstance(m, QlabLoraLinear)]
    for m in layers:
        m.merge_to = to
    return model.merge_and_unload()


def trainable_and_total_bytes(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` bytes: parameters that require grad, and every parameter and buffer
    (packed codes, scales, float embeddings and norms), each tensor counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        total += n
        if t.requires_grad:
            trainable += n
    return trainable, total
