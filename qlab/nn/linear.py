"""A linear layer with a quantized, packed weight: :class:`QuantLinear`.

A :class:`QuantLinear` stores a ``[out, in]`` weight as packed codes plus scales (and zeros)::

    W[n, k] ≈ scale[n, k // g] * (q[n, k] - zero[n, k // g])      affine integers (RTN, HQQ, GPTQ, AWQ)
    W[n, k] ≈ scale[n, k // g] * table[q[n, k]]                    codebooks (NF4, FP4)
    W[n, k] ≈ scale[n] * fp8_e4m3(W[n, k] / scale[n])              FP8 weight-only
    W[n, k] ≈ e2m1(q[n, k]) * decode(scale[n, k // g]) (* global)   MXFP4 (g 32, e8m0), NVFP4 (g 16, e4m3)
    y ≈ s_x s_w ⊙ (q_x q_wᵀ),  q_x = round(x / s_x) per token      W8A8 (int8 weights and activations)

The codes live in the :mod:`qlab.packing` layout (packed along the input dim), so the buffers *are*
the storage a file or a GPU kernel sees; ``nbytes`` counts them. How the layer multiplies (C kernels,
Triton, torch's fused ops, or the fp32 reference) is decided in :mod:`qlab.nn.dispatch`.

Which weights to quantize and with which method is the model driver's job
(:func:`qlab.quantize_model`); this module holds the layer only.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch
from torch import nn

import qlab.nn.dispatch as dispatch
from qlab.affine import quantize_rtn
from qlab.codebooks import codebook_table
from qlab.packing import PACK_BITS, pack, packed_length, unpack
from qlab.quantize import quantize
from qlab.scaled_floats import (
    BLOCK_SCALED_MODES,
    ScaledTensor,
    decode_scales,
    get_scaled_format,
    quantize_scaled,
)
from qlab.tensor import QuantizedTensor, QuantSpec, check_finite, dtype_name, parse_dtype

Mode = Literal["weight", "fp8", "w8a8", "mxfp4", "nvfp4"]
MODES: tuple[str, ...] = ("weight", "fp8", "w8a8", *BLOCK_SCALED_MODES)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
#: W8A8 and FP8 layers keep one scale per output row in an 8-bit symmetric per-channel spec.
INT8_CHANNEL = QuantSpec.per_channel(8, symmetric=True, axis=0)


class LayerRecipe(Protocol):
    """Anything that knows how to quantize one linear layer (a :class:`qlab.QuantConfig` does)."""

    def build_layer(self, linear: nn.Module, name: str = "") -> nn.Module: ...


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` (not yet quantized)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear`` or a ``Conv1D``."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


class QuantLinear(nn.Module):
    """A linear layer with a quantized, packed weight: ``y = x Ŵᵀ + b``.

    Build it with :meth:`from_linear` (quantize an ``nn.Linear`` / ``Conv1D``) or
    :meth:`from_quantized` (wrap a :class:`~qlab.quantize.QuantizedTensor` from any method). The
    constructor makes an empty layer of the right shapes (what :mod:`qlab.io` loads into).

    Args:
        in_features, out_features: the weight is ``[out_features, in_features]``.
        spec: how the weight is quantized (FP8 and W8A8 use an 8-bit per-channel spec for their scales).
        mode: ``"weight"`` (weight-only integers or codebook), ``"fp8"``, ``"w8a8"``, or a block-scaled
            4-bit float, ``"mxfp4"`` / ``"nvfp4"`` (:mod:`qlab.scaled_floats`): e2m1 codes packed like
            FP4, ``scale`` holds the stored scale *bytes* (e8m0 / e4m3) and NVFP4 adds an fp32
            ``global_scale``. The reference path decodes them exactly; the CPU and CUDA fast paths run
            them as an FP4 codebook layer with the decoded fp32 scales (``6 * scale``, table ``/ 6``).
        bias: whether there is a bias.
        input_scale: whether there is a per-input-channel divisor (AWQ/SmoothQuant): the layer
            computes ``Ŵ (x / input_scale)``.
        weight_dtype: the float dtype :meth:`dequantize` returns by default (the original weight's).
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bias: torch.Tensor | None
    input_scale: torch.Tensor | None
    codebook: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        *,
        mode: Mode = "weight",
        bias: bool = False,
        input_scale: bool = False,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if spec.granularity == "channel" and spec.axis not in (0, -2):
            raise ValueError(f"per-channel specs must use axis=0 (one scale per output row), got {spec.axis}")
        if spec.bits not in PACK_BITS:
            raise ValueError(f"spec.bits must be one of {PACK_BITS} (the packed widths), got {spec.bits}")
        if spec.double_quant:
            raise ValueError(
                "double-quantized scales are not supported by QuantLinear; use double_quant=False"
            )
        if mode in ("fp8", "w8a8") and not (
            spec.bits == 8 and spec.symmetric and spec.granularity == "channel"
        ):
            raise ValueError(f"mode {mode!r} needs an int8 symmetric per-channel spec, got {spec.describe()}")
        if mode in BLOCK_SCALED_MODES and spec != get_scaled_format(mode).spec((out_features, in_features)):
            raise ValueError(f"mode {mode!r} needs the spec {get_scaled_format(mode).spec((1, in_features))}")
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.mode: Mode = mode
        self.weight_dtype = weight_dtype
        block = spec.block_size((out_features, in_features))
        scale_shape = (out_features // block[0], in_features // block[1])
        kw: dict[str, Any] = {"device": device}
        if mode == "fp8":
            self.register_buffer(
                "qweight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, **kw)
            )
        else:
            nbytes = packed_length(in_features, spec.bits)
            self.register_buffer("qweight", torch.zeros(out_features, nbytes, dtype=torch.uint8, **kw))
        scale_dtype = torch.uint8 if mode in BLOCK_SCALED_MODES else spec.scale_dtype  # scale bytes
        self.register_buffer("scale", torch.ones(scale_shape, dtype=scale_dtype, **kw))
        has_global = mode in BLOCK_SCALED_MODES and get_scaled_format(mode).global_scale
        self.register_buffer("global_scale", torch.ones((), **kw) if has_global else None)
        has_zero = mode == "weight" and not spec.symmetric and spec.codebook is None
        self.register_buffer(
            "zero", torch.zeros(scale_shape, dtype=spec.scale_dtype, **kw) if has_zero else None
        )
        self.register_buffer("bias", torch.zeros(out_features, dtype=weight_dtype, **kw) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features, **kw) if input_scale else None)
        table = codebook_table(spec.codebook) if spec.codebook else None
        self.register_buffer("codebook", None if table is None else table.to(device), persistent=False)
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_quantized(
        cls,
        linear_or_shape: nn.Module | tuple[int, int],
        qt: QuantizedTensor,
        bias: torch.Tensor | None = None,
        *,
        input_scale: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Wrap a quantized ``[out, in]`` weight (from RTN, HQQ, GPTQ, AWQ ...) as a layer.

        Args:
            linear_or_shape: the layer being replaced (its shape, dtype and, when ``bias`` is None,
                its bias are used) or an ``(out_features, in_features)`` tuple.
            qt: the quantized weight; codes are packed here.
            bias: ``[out_features]`` float bias.
            input_scale: ``[in_features]`` divisor applied to ``x`` first (the layer computes
                ``Ŵ (x / input_scale)``): AWQ's scale when no previous op could absorb it.
        """
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
        weight_dtype = qt.dtype
        if isinstance(linear_or_shape, nn.Module):
            if not is_linear(linear_or_shape):
                raise TypeError(
                    f"linear_or_shape must be an nn.Linear, a transformers Conv1D or a shape, "
                    f"got {type(linear_or_shape).__name__}"
                )
            out_f, in_f = linear_weight(linear_or_shape).shape
            if bias is None and linear_or_shape.bias is not None:
                bias = linear_or_shape.bias.detach()
            weight_dtype = linear_or_shape.weight.dtype
        elif isinstance(linear_or_shape, tuple) and len(linear_or_shape) == 2:
            out_f, in_f = linear_or_shape
        else:
            raise TypeError(
                f"linear_or_shape must be a linear module or an (out, in) tuple, got {linear_or_shape!r}"
            )
        if tuple(qt.shape) != (out_f, in_f):
            raise ValueError(
                f"qt has shape {tuple(qt.shape)}, expected the layer's [out, in] = {[out_f, in_f]}"
            )
        if qt.spec.double_quant or qt.scale_q is not None:
            raise ValueError(
                "double-quantized scales are not supported by QuantLinear; use double_quant=False"
            )
        mode: Mode = "weight"
        if isinstance(qt, ScaledTensor):
            if qt.fmt.name not in BLOCK_SCALED_MODES:
                raise ValueError(
                    f"QuantLinear stores the scaled formats {BLOCK_SCALED_MODES}, got {qt.fmt.name}"
                )
            mode = qt.fmt.name  # type: ignore[assignment]
        elif qt.spec.codebook is not None and qt.codebook is not None:
            if not torch.equal(qt.codebook.float().cpu(), codebook_table(qt.spec.codebook)):
                raise ValueError(f"qt.codebook differs from the standard {qt.spec.codebook} table")
        mod = cls(
            in_f,
            out_f,
            qt.spec,
            mode=mode,
            bias=bias is not None,
            input_scale=input_scale is not None,
            weight_dtype=weight_dtype,
            device=qt.codes.device,
        )
        mod._set_quantized(qt)
        if bias is not None:
            if tuple(bias.shape) != (out_f,):
                raise ValueError(f"bias must have shape [{out_f}], got {tuple(bias.shape)}")
            mod.bias = bias.detach().clone()
        if input_scale is not None:
            if tuple(input_scale.shape) != (in_f,):
                raise ValueError(f"input_scale must have shape [{in_f}], got {tuple(input_scale.shape)}")
            if not bool((input_scale != 0).all()):
                raise ValueError("input_scale must be nonzero everywhere (it divides x)")
            mod.input_scale = input_scale.detach().float().clone()
        return mod

    def _set_quantized(self, qt: QuantizedTensor) -> None:
        self.qweight = pack(qt.unsigned_codes().contiguous(), qt.spec.bits)
        self.scale = qt.scale.detach().clone()
        if self.zero is not None:
            if qt.zero is None:
                raise ValueError("qt has no zero-point but its spec is asymmetric")
            self.zero = qt.zero.detach().clone()
        if self.global_scale is not None:
            if not isinstance(qt, ScaledTensor) or qt.global_scale is None:
                raise ValueError(f"a {self.mode} layer needs a ScaledTensor with a global scale")
            self.global_scale = qt.global_scale.detach().float().reshape(()).clone()
        self._cache.clear()

    @classmethod
    def from_linear(
        cls, linear: nn.Module, spec_or_recipe: QuantSpec | LayerRecipe, *, mode: Mode = "weight"
    ) -> QuantLinear:
        """Quantize ``linear`` (``nn.Linear`` or GPT-2 ``Conv1D``) into a packed layer.

        Args:
            linear: the float layer.
            spec_or_recipe: a :class:`~qlab.tensor.QuantSpec` (round-to-nearest or codebook, in
                ``mode``), or a recipe such as :class:`qlab.QuantConfig` (any data-free method of the
                registry: ``QuantLinear.from_linear(layer, QuantConfig("hqq", 4, 64))``).
            mode: with a spec: ``"weight"``, ``"fp8"`` (one amax/448 scale per row), ``"w8a8"``
                (int8 per-channel weights, int8 per-token activations), ``"mxfp4"`` or ``"nvfp4"`` (the
                spec is then ignored: the format fixes it).
        """
        if not is_linear(linear):
            raise TypeError(
                f"linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}"
            )
        if not isinstance(spec_or_recipe, QuantSpec):
            if not callable(getattr(spec_or_recipe, "build_layer", None)):
                raise TypeError(
                    "spec_or_recipe must be a QuantSpec or a QuantConfig, "
                    f"got {type(spec_or_recipe).__name__}"
                )
            layer = spec_or_recipe.build_layer(linear)
            if not isinstance(layer, cls):
                raise ValueError(
                    f"spec_or_recipe builds a {type(layer).__name__}, not a {cls.__name__}; "
                    "use qlab.quantize_layer for it"
                )
            return layer
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        w = linear_weight(linear).float()
        bias = None if linear.bias is None else linear.bias.detach()
        if mode == "fp8":
            return cls._from_fp8(linear, w, bias)
        if mode in BLOCK_SCALED_MODES:
            st = quantize_scaled(w, mode)
            st.dtype = linear.weight.dtype
            return cls.from_quantized(linear, st, bias)
        if mode == "w8a8":
            qt = quantize_rtn(w, INT8_CHANNEL)
            mod = cls(
                w.shape[1], w.shape[0], qt.spec, mode="w8a8", bias=bias is not None,
                weight_dtype=linear.weight.dtype, device=w.device,
            )  # fmt: skip
            mod._set_quantized(qt)
            if bias is not None:
                mod.bias = bias.clone()
            return mod
        qt = quantize(w, spec_or_recipe)
        qt.dtype = linear.weight.dtype
        return cls.from_quantized(linear, qt, bias)

    @classmethod
    def _from_fp8(cls, linear: nn.Module, w: torch.Tensor, bias: torch.Tensor | None) -> QuantLinear:
        # scale = amax / 448 per output row, so the largest weight of each row maps to e4m3's max.
        amax = w.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        mod = cls(
            w.shape[1], w.shape[0], INT8_CHANNEL, mode="fp8",
            bias=bias is not None, weight_dtype=linear.weight.dtype, device=w.device,
        )  # fmt: skip
        mod.qweight = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        mod.scale = scale
        if bias is not None:
            mod.bias = bias.clone()
        return mod

    # ------------------------------------------------------------------------------------------
    # Reading the weight back
    # ------------------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> int:
        """Inputs sharing one scale (``in_features`` for per-channel and per-tensor)."""
        return self.spec.block_size((self.out_features, self.in_features))[1]

    def quantized_tensor(self) -> QuantizedTensor:
        """The stored weight as a :class:`~qlab.quantize.QuantizedTensor` (not for FP8); a
        :class:`~qlab.scaled_floats.ScaledTensor` for MXFP4 / NVFP4."""
        if self.mode == "fp8":
            raise ValueError("an fp8 layer holds float8 values, not integer codes; use dequantize()")
        codes = unpack(self.qweight, self.spec.bits, self.in_features)
        if self.mode in BLOCK_SCALED_MODES:
            fmt = get_scaled_format(self.mode)
            return ScaledTensor(
                codes, self.scale, None, self.spec, torch.Size((self.out_features, self.in_features)),
                self.weight_dtype, codebook=fmt.table().to(codes.device), fmt=fmt,
                global_scale=self.global_scale,
            )  # fmt: skip
        if self.spec.code_dtype == torch.int8:
            codes = (codes.to(torch.int16) - 2 ** (self.spec.bits - 1)).to(torch.int8)
        return QuantizedTensor(
            codes=codes,
            scale=self.scale,
            zero=self.zero,
            spec=self.spec,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            codebook=self.codebook,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored weight ``Ŵ`` in float (``weight_dtype`` by default), shape ``[out, in]``."""
        dtype = dtype or self.weight_dtype
        if self.mode == "fp8":
            return (self.qweight.float() * self.scale.float()).to(dtype)
        return self.quantized_tensor().dequantize(dtype)

    def effective_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight this layer applies to ``x``: ``Ŵ / input_scale`` (columns), or ``Ŵ``."""
        w = self.dequantize(torch.float32)
        if self.input_scale is not None:
            w = w / self.input_scale.float()
        return w.to(dtype or self.weight_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes + scales + zeros (+ bias, input scale)."""
        ts = (self.qweight, self.scale, self.zero, self.global_scale, self.bias, self.input_scale)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def runtime_nbytes(self) -> int:
        """Bytes of the converted weights the fast paths cached on this module (0 before first use)."""
        return dispatch.cache_nbytes(self._cache)

    def float_nbytes(self) -> int:
        """Bytes the float layer this one replaced took: ``out * in`` weights of ``weight_dtype``, plus
        the bias and input scale it keeps."""
        weight = self.in_features * self.out_features * torch.empty(0, dtype=self.weight_dtype).element_size()
        return weight + self._extra_nbytes()

    def clear_cache(self) -> None:
        """Drop the fast paths' converted weights (rebuilt on the next forward)."""
        self._cache.clear()

    def describe(self) -> str:
        if self.mode == "fp8":
            return "fp8 e4m3 per-channel"
        if self.mode == "w8a8":
            return "w8a8 int8 per-channel, per-token activations"
        if self.mode == "mxfp4":
            return "mxfp4 (e2m1, e8m0 scale per 32)"
        if self.mode == "nvfp4":
            return "nvfp4 (e2m1, e4m3 scale per 16, fp32 per tensor)"
        return self.spec.describe()

    def extra_repr(self) -> str:
        extras = ", bias" if self.bias is not None else ""
        extras += ", input_scale" if self.input_scale is not None else ""
        bpw = 8 * (self.nbytes - self._extra_nbytes()) / (self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}, "
            f"{bpw:.2f} bits/weight{extras}"
        )

    def _extra_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bias, self.input_scale) if t is not None)

    # What a file records about the layer (qlab.io, the transformers backend, GGUF).
    def layer_config(self) -> dict[str, Any]:
        """JSON description from which :meth:`from_layer_config` rebuilds an empty layer of this shape."""
        return {
            "type": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "mode": self.mode,
            "spec": self.spec.to_dict(),
            "weight_dtype": dtype_name(self.weight_dtype),
            "bias": self.bias is not None,
            "input_scale": self.input_scale is not None,
        }

    @classmethod
    def from_layer_config(cls, cfg: dict[str, Any], device: torch.device | str | None = None) -> QuantLinear:
        """An empty layer (zeros) described by :meth:`layer_config`; ``device="meta"`` allocates nothing."""
        return cls(
            cfg["in_features"],
            cfg["out_features"],
            QuantSpec.from_dict(cfg["spec"]),
            mode=cfg["mode"],
            bias=bool(cfg["bias"]),
            input_scale=bool(cfg["input_scale"]),
            weight_dtype=parse_dtype(cfg["weight_dtype"], "weight_dtype"),
            device=device,
        )

    def check_finite(self, name: str = "layer") -> None:
        """Raise a ValueError naming the tensor if a stored scale, zero-point or input scale is NaN/Inf."""
        for attr in ("scale", "zero", "global_scale", "input_scale"):
            t = getattr(self, attr)
            if t is not None:
                check_finite(t, f"{name}.{attr}")
        if self.mode in BLOCK_SCALED_MODES:  # scale bytes: e8m0 0xFF and e4m3 S.1111.111 are NaN
            check_finite(self.block_scales(), f"{name}.scale")

    def block_scales(self) -> torch.Tensor:
        """MXFP4 / NVFP4: the decoded fp32 per-block scales ``[out, in / g]``, global scale included."""
        if self.mode not in BLOCK_SCALED_MODES:
            raise ValueError(
                f"block_scales() is for the modes {BLOCK_SCALED_MODES}, this layer is {self.mode!r}"
            )
        return decode_scales(self.scale, get_scaled_format(self.mode), self.global_scale)

    def after_load(self) -> None:
        """Rebuild what is derived from the spec (the codebook table) after tensors were assigned."""
        if self.spec.codebook is not None:
            self.codebook = codebook_table(self.spec.codebook).to(self.qweight.device)
        self._cache.clear()

    # torch hooks: converted weights must follow the stored ones.
    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        self._cache.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}], got {list(x.shape)}")
        return dispatch.run(self, x, dispatch.select_path(self, x))
