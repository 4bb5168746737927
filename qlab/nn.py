"""Quantized linear layers for real models: :class:`QuantLinear`, :func:`quantize_model`, and friends.

A :class:`QuantLinear` stores a ``[out, in]`` weight as packed codes plus scales (and zeros)::

    W[n, k] ≈ scale[n, k // g] * (q[n, k] - zero[n, k // g])      affine integers (RTN, HQQ, GPTQ, AWQ)
    W[n, k] ≈ scale[n, k // g] * table[q[n, k]]                    codebooks (NF4, FP4)
    W[n, k] ≈ scale[n] * fp8_e4m3(W[n, k] / scale[n])              FP8 weight-only
    y ≈ s_x s_w ⊙ (q_x q_wᵀ),  q_x = round(x / s_x) per token      W8A8 (int8 weights and activations)

The codes live in the :mod:`qlab.packing` layout (packed along the input dim), so the buffers *are*
the storage a file or a GPU kernel sees; ``nbytes`` counts them.

Forward dispatch lives in one function, :func:`select_path` (and :func:`_run` which executes it):

* CUDA with triton: ``qlab.kernels.dequant_matmul`` (fused dequantize-matmul, never a float ``W``);
* CPU, many rows of ``x`` (prefill: from :data:`CPU_INT8DOT_MAX_ROWS` rows; from
  :data:`CPU_TILED_MIN_ROWS` for layers whose rows do not come in blocks of 16): ``cpu_tiled``, qlab's C
  kernel (:mod:`qlab.kernels.cpu`) dequantizes 512 rows of ``W`` at a time to bf16 into one
  cache-sized buffer and torch's bf16 GEMM (oneDNN, AMX tiles where the CPU has them) multiplies
  each block: the whole float ``W`` never exists;
* CPU, few rows (decode): qlab's C kernels read the packed codes directly, never a float ``W``:
  ``cpu_int8dot`` for affine and NF4/FP4 codes (``x`` split into two int8 planes,
  ``x ≈ sx (q1 + q2/254)``, products summed exactly in int32 by ``vpdpbusd``, 16 output rows per
  vector), ``cpu_gemv`` for FP8 and for layers whose rows do not come in blocks of 16 (codes looked
  up as bf16 times bf16 ``x``, ``vdpbf16ps``);
* CPU without a C compiler (or ``QLAB_CPU_KERNELS=0``): torch's fused weight-only ops, with bf16
  activations and fp32 accumulation:
  - ``int4``: 1- to 4-bit affine codes (2-bit and 3-bit codes are valid 4-bit codes) through
    ``_weight_int4pack_mm_for_cpu``, whose convention ``w = (u - 8) * s + z'`` is reached exactly
    in real arithmetic with ``z' = s * (8 - zero)``;
  - ``int8``: 5- to 8-bit affine codes, and codebooks, through ``_weight_int8pack_mm`` once per
    group, plus a rank-one correction for the zero-point (see :func:`_int8_groups_forward`).
    Codebook tables are re-encoded as int8 levels: FP4 exactly (its values are ``k/12``), NF4
    rounded to ``round(127 t)/127`` (at most ``absmax/254`` per weight, 15x below NF4's own
    rounding error);
  - ``int_mm``: W8A8 as a true int8 x int8 -> int32 product (``torch._int_mm``; at decode the
    int8-dot kernel with one plane of ``x`` computes the same integers, faster);
  - ``fp8_bf16``: FP8 weights widened to bf16 (exact: e4m3 is a subset of bf16) and scaled (with
    the C kernels, FP8 layers take ``cpu_gemv`` / ``cpu_tiled`` instead, decoding e4m3 in registers);
* otherwise (or inside :func:`use_path` ``("reference")``, or when ``x`` needs a gradient): the
  reference path, dequantize to fp32 then ``F.linear``.

The fast paths agree with the reference within bf16 arithmetic: a relative (Frobenius) output
error below :data:`FAST_PATH_RTOL` (tests check every mode, dtype and shape). Their converted
weights are cached on the module (built on first use, dropped by ``.to()`` and state loading) as a
plain attribute, not a buffer: they are derived data, never saved, and ``nbytes`` (storage) leaves
them out; :meth:`QuantLinear.runtime_nbytes` counts them.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qlab.codebooks import codebook_table
from qlab.config import QuantConfig
from qlab.packing import PACK_BITS, pack, packed_length, unpack
from qlab.quantize import QuantizedTensor, QuantSpec, per_group, quantize

Mode = Literal["weight", "fp8", "w8a8"]
MODES: tuple[str, ...] = ("weight", "fp8", "w8a8")
#: Every forward path :func:`select_path` can return.
PATHS = ("reference", "triton", "cpu_tiled", "cpu_int8dot", "cpu_gemv", "int4", "int8", "int_mm", "fp8_bf16")
#: Rows of ``x`` from which CPU weight-only layers dequantize-in-tiles for a bf16 GEMM (measured
#: crossover on a 2-core AVX-512/AMX machine, ``benchmarks/bench_linear.py``).
CPU_TILED_MIN_ROWS = 8
#: Rows of ``x`` below which affine layers take the int8-dot decode kernel instead (same benchmark).
CPU_INT8DOT_MAX_ROWS = 12
#: The same for W8A8 layers, whose alternative is torch._int_mm (AMX int8), not bf16 tiles.
CPU_W8A8_DOT_MAX_ROWS = 6
#: Relative Frobenius error the fast paths stay under, against the fp32 reference (bf16 arithmetic).
FAST_PATH_RTOL = 1e-2
#: Methods implemented here; the others go through :func:`qlab.methods.quantize_model_with`.
LOCAL_METHODS = ("rtn", "nf4", "fp4", "fp8", "w8a8")
#: Group sizes torch's int4 CPU op accepts.
INT4_OP_GROUPS = (32, 64, 128, 256)
FP8_MAX = 448.0  # largest finite float8_e4m3fn

_state = threading.local()


@contextlib.contextmanager
def use_path(path: Literal["auto", "reference"]) -> Iterator[None]:
    """Force every :class:`QuantLinear` in this thread to take ``path`` (``"reference"`` or ``"auto"``).

    Used by parity tests and lessons to compare the fast paths with the reference.
    """
    if path not in ("auto", "reference"):
        raise ValueError(f"path must be 'auto' or 'reference', got {path!r}")
    old = getattr(_state, "forced", None)
    _state.forced = None if path == "auto" else path
    try:
        yield
    finally:
        _state.forced = old


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear`` or a ``Conv1D``."""
    w = module.weight.detach()
    return w.t() if _is_conv1d(module) else w


def _kernels() -> Any:
    """``qlab.kernels`` when it can run on CUDA here, else None (guarded: triton may be missing)."""
    try:
        import qlab.kernels as kernels
    except Exception:  # triton missing or broken: the torch paths still work
        return None
    ok = getattr(kernels, "available", None)
    return kernels if ok is not None and ok("cuda") else None


def _cache_tensors(entry: Any) -> tuple[Any, ...]:
    if hasattr(entry, "tensors"):  # a qlab.kernels.cpu.CpuWeight
        return tuple(entry.tensors())
    return entry if isinstance(entry, tuple) else (entry,)


def _cpu_kernels() -> Any:
    """``qlab.kernels.cpu`` when its C library is built and loaded here, else None."""
    try:
        from qlab.kernels import cpu
    except Exception:  # a broken install keeps the torch paths
        return None
    return cpu if cpu.load() is not None else None


def _codebook_int8_levels(table: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Integer levels ``L`` and divisor ``R`` with ``table ≈ L / R``, exact when ``12 t`` are integers."""
    t12 = table.double() * 12
    if torch.equal(t12, t12.round()):
        return t12.round().to(torch.int8), 12.0
    return (table.double() * 127).round().to(torch.int8), 127.0


class QuantLinear(nn.Module):
    """A linear layer with a quantized, packed weight: ``y = x Ŵᵀ + b``.

    Build it with :meth:`from_linear` (quantize an ``nn.Linear`` / ``Conv1D``) or
    :meth:`from_quantized` (wrap a :class:`~qlab.quantize.QuantizedTensor` from any method). The
    constructor makes an empty layer of the right shapes (what :mod:`qlab.io` loads into).

    Args:
        in_features, out_features: the weight is ``[out_features, in_features]``.
        spec: how the weight is quantized (FP8 and W8A8 use an 8-bit per-channel spec for their scales).
        mode: ``"weight"`` (weight-only integers or codebook), ``"fp8"`` or ``"w8a8"``.
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
        self.register_buffer("scale", torch.ones(scale_shape, dtype=spec.scale_dtype, **kw))
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
            if not _is_linear(linear_or_shape):
                raise TypeError(
                    f"linear_or_shape must be an nn.Linear, a transformers Conv1D or a shape, "
                    f"got {type(linear_or_shape).__name__}"
                )
            out_f, in_f = _linear_weight(linear_or_shape).shape
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
        if qt.spec.codebook is not None and qt.codebook is not None:
            if not torch.equal(qt.codebook.float().cpu(), codebook_table(qt.spec.codebook)):
                raise ValueError(f"qt.codebook differs from the standard {qt.spec.codebook} table")
        mod = cls(
            in_f,
            out_f,
            qt.spec,
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
        self._cache.clear()

    @classmethod
    def from_linear(cls, linear: nn.Module, config_or_spec: QuantConfig | QuantSpec) -> QuantLinear:
        """Quantize ``linear`` (``nn.Linear`` or GPT-2 ``Conv1D``) by round-to-nearest or a data-free method.

        ``config_or_spec`` is a :class:`~qlab.config.QuantConfig` (methods ``rtn``, ``nf4``, ``fp4``,
        ``fp8``, ``w8a8``, ``hqq``) or a :class:`~qlab.quantize.QuantSpec` (RTN / codebook with it).
        """
        if not _is_linear(linear):
            raise TypeError(
                f"linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}"
            )
        w = _linear_weight(linear).float()
        bias = None if linear.bias is None else linear.bias.detach()
        if isinstance(config_or_spec, QuantSpec):
            qt = quantize(w, config_or_spec)
            qt.dtype = linear.weight.dtype
            return cls.from_quantized(linear, qt, bias)
        if not isinstance(config_or_spec, QuantConfig):
            raise TypeError(
                f"config_or_spec must be a QuantConfig or QuantSpec, got {type(config_or_spec).__name__}"
            )
        cfg = config_or_spec
        if cfg.method == "fp8":
            return cls._from_fp8(linear, w, bias)
        if cfg.method == "w8a8":
            qt = quantize(w, QuantSpec.per_channel(8, symmetric=True))
            mod = cls(
                w.shape[1], w.shape[0], qt.spec, mode="w8a8", bias=bias is not None,
                weight_dtype=linear.weight.dtype, device=w.device,
            )  # fmt: skip
            mod._set_quantized(qt)
            if bias is not None:
                mod.bias = bias.clone()
            return mod
        if cfg.method == "hqq":
            from qlab.methods.hqq import hqq_quantize  # methods sit above nn in the layering

            qt = hqq_quantize(w, cfg.spec(), **cfg.method_kwargs)
        elif cfg.method in ("rtn", "nf4", "fp4"):
            qt = quantize(w, cfg.spec())
        else:
            raise ValueError(
                f"method {cfg.method!r} needs the whole model (calibration data): use quantize_model"
            )
        qt.dtype = linear.weight.dtype
        return cls.from_quantized(linear, qt, bias)

    @classmethod
    def _from_fp8(cls, linear: nn.Module, w: torch.Tensor, bias: torch.Tensor | None) -> QuantLinear:
        # scale = amax / 448 per output row, so the largest weight of each row maps to e4m3's max.
        amax = w.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        mod = cls(
            w.shape[1], w.shape[0], QuantSpec.per_channel(8, symmetric=True), mode="fp8",
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
        """The stored weight as a :class:`~qlab.quantize.QuantizedTensor` (not for FP8)."""
        if self.mode == "fp8":
            raise ValueError("an fp8 layer holds float8 values, not integer codes; use dequantize()")
        codes = unpack(self.qweight, self.spec.bits, self.in_features)
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
        ts = (self.qweight, self.scale, self.zero, self.bias, self.input_scale)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def runtime_nbytes(self) -> int:
        """Bytes of the converted weights the fast paths cached on this module (0 before first use)."""
        return sum(
            t.numel() * t.element_size()
            for entry in self._cache.values()
            for t in _cache_tensors(entry)
            if isinstance(t, torch.Tensor)
        )

    def clear_cache(self) -> None:
        """Drop the fast paths' converted weights (rebuilt on the next forward)."""
        self._cache.clear()

    def describe(self) -> str:
        if self.mode == "fp8":
            return "fp8 e4m3 per-channel"
        if self.mode == "w8a8":
            return "w8a8 int8 per-channel, per-token activations"
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
        return _run(self, x, select_path(self, x))


# ----------------------------------------------------------------------------------------------
# Forward dispatch: the one place that decides how a QuantLinear multiplies.
# ----------------------------------------------------------------------------------------------
def _int4_group(layer: QuantLinear) -> int | None:
    """Group size to hand torch's int4 CPU op, or None where it does not apply."""
    if layer.mode != "weight" or layer.spec.codebook is not None or layer.spec.bits > 4:
        return None
    if layer.out_features % 16 or layer.in_features % 2:
        return None
    g = layer.group_size
    if layer.spec.granularity != "group":
        # One scale per row (or tensor): any group size dividing K gives the same weight.
        g = next((c for c in reversed(INT4_OP_GROUPS) if layer.in_features % c == 0), 0)
    return g if g in INT4_OP_GROUPS else None


def _cpu_fit(layer: QuantLinear) -> tuple[bool, bool]:
    """(tiles, int8-dot): whether the layer fits the C kernels' layouts (fixed by spec and shape: cached)."""
    fit = layer._cache.get("cpu_fit")
    if fit is None:
        cpu = _cpu_kernels()
        bits, g, k = layer.spec.bits, layer.group_size, layer.in_features
        if cpu is None:
            fit = (False, False)
        elif layer.mode == "fp8":
            fit = (cpu.fits_fp8(k), False)
        else:
            fit = (cpu.fits(bits, g, k), cpu.fits_rows16(bits, g, k, layer.out_features))
        layer._cache["cpu_fit"] = fit
    return fit


def select_path(layer: QuantLinear, x: torch.Tensor) -> str:
    """Which forward path ``layer`` takes for input ``x`` (one of :data:`PATHS`)."""
    if getattr(_state, "forced", None) == "reference":
        return "reference"
    if x.requires_grad and torch.is_grad_enabled():
        return "reference"  # the fused ops have no backward
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "reference"
    if x.device.type == "cuda":
        if layer.mode == "weight" and layer.spec.bits != 3 and _kernels() is not None:
            return "triton"
        return "reference"
    if x.device.type != "cpu":
        return "reference"
    fit = _cpu_fit(layer)
    rows = x.numel() // layer.in_features
    if layer.mode == "w8a8":  # one int8 plane of x: the same integers as torch._int_mm, faster at decode
        return "cpu_int8dot" if fit[1] and rows < CPU_W8A8_DOT_MAX_ROWS else "int_mm"
    if fit[0]:
        if fit[1]:
            return "cpu_int8dot" if rows < CPU_INT8DOT_MAX_ROWS else "cpu_tiled"
        if rows >= CPU_TILED_MIN_ROWS:
            return "cpu_tiled"
        if layer.mode == "weight" and layer.spec.codebook is None and _int4_group(layer) is not None:
            return "int4"
        return "cpu_gemv"
    if layer.mode == "fp8":
        return "fp8_bf16"
    if _int4_group(layer) is not None:
        return "int4"
    return "int8"


def _run(layer: QuantLinear, x: torch.Tensor, path: str) -> torch.Tensor:
    if layer.input_scale is not None:
        x = x / layer.input_scale.to(x.dtype)
    lead = x.shape[:-1]
    if path == "reference":
        y = _reference_forward(layer, x)
    else:
        x2 = x.reshape(-1, layer.in_features)
        if x2.shape[0] == 0:
            y2 = x2.new_zeros(0, layer.out_features)
        elif path == "cpu_int8dot":
            planes = 1 if layer.mode == "w8a8" else 2
            y2 = _cpu_kernels().gemv_int8dot(x2, _cpu_weight(layer, "rows16"), planes=planes)
        elif path == "cpu_gemv":
            y2 = _cpu_kernels().gemv(x2, _cpu_weight(layer))
        elif path == "cpu_tiled":
            y2 = _cpu_kernels().tiled_matmul(x2, _cpu_weight(layer))
        elif path == "int4":
            y2 = _int4_forward(layer, x2)
        elif path == "int8":
            y2 = _int8_groups_forward(layer, x2)
        elif path == "int_mm":
            y2 = _w8a8_forward(layer, x2, exact_int=True)
        elif path == "fp8_bf16":
            w = layer.qweight.to(torch.bfloat16) * layer.scale.to(torch.bfloat16)
            y2 = F.linear(x2.to(torch.bfloat16), w)
        elif path == "triton":
            y2 = _triton_forward(layer, x2)
        else:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        y = y2.reshape(*lead, layer.out_features)
        if layer.bias is not None:
            y = y.float() + layer.bias.float()
    return y.to(x.dtype)


def _reference_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Dequantize to fp32, then ``F.linear`` in fp32 (differentiable in ``x``)."""
    bias = None if layer.bias is None else layer.bias.float()
    if layer.mode == "w8a8":
        lead = x.shape[:-1]
        y = _w8a8_forward(layer, x.reshape(-1, layer.in_features), exact_int=False)
        y = y.reshape(*lead, layer.out_features)
        return y if bias is None else y + bias
    return F.linear(x.float(), layer.dequantize(torch.float32), bias)


def quantize_tokens_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (row) symmetric int8: ``x ≈ s q``, ``s = max|row| / 127`` (zero rows: ``s = 1``)."""
    xf = x.float()
    s = xf.abs().amax(dim=-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(xf / s).clamp(-127, 127).to(torch.int8), s


def _w8a8_forward(layer: QuantLinear, x2: torch.Tensor, exact_int: bool) -> torch.Tensor:
    qx, sx = quantize_tokens_int8(x2)
    sw = layer.scale.float().reshape(1, -1)
    if exact_int:
        wt = layer._cache.get("int_mm")
        if wt is None:
            codes = unpack(layer.qweight, 8, layer.in_features)
            wt = (codes.to(torch.int16) - 128).to(torch.int8).t().contiguous()  # [K, N] as _int_mm wants
            layer._cache["int_mm"] = wt
        acc = torch._int_mm(qx, wt).float()
    else:
        codes = layer.quantized_tensor().codes.float()
        acc = qx.float() @ codes.t()
    return acc * sx * sw


def _zero_point(layer: QuantLinear) -> torch.Tensor | None:
    """The zero-point of the stored (unsigned) codes: ``zero``, or ``2^(bits-1)`` for symmetric codes
    (stored offset by it), or None for codebooks."""
    if layer.zero is not None or layer.codebook is not None:
        return layer.zero
    return torch.full((1, 1), 2.0 ** (layer.spec.bits - 1))


def _cpu_weight(layer: QuantLinear, layout: Literal["blocks", "rows16"] = "blocks") -> Any:
    """The layer's weight laid out for :mod:`qlab.kernels.cpu` (built once per layout, cached).

    ``"blocks"``: :func:`~qlab.kernels.cpu.prepare` (tiles, bf16-dot decode); ``"rows16"``:
    :func:`~qlab.kernels.cpu.prepare_rows16` (int8-dot decode). FP8 layers have one layout,
    :func:`~qlab.kernels.cpu.prepare_fp8` (their bytes, as stored).
    """
    key = f"cpu_{layout}"
    entry = layer._cache.get(key)
    if entry is None:
        cpu = _cpu_kernels()
        if layer.mode == "fp8":
            entry = cpu.prepare_fp8(layer.qweight, layer.scale)
        else:
            bits = layer.spec.bits
            prepare = cpu.prepare if layout == "blocks" else cpu.prepare_rows16
            codes = unpack(layer.qweight, bits, layer.in_features)
            entry = prepare(codes, bits, layer.group_size, layer.scale, _zero_point(layer), layer.codebook)
        layer._cache[key] = entry
    return entry


def _int4_forward(layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
    """torch's int4 CPU op: ``w = (u4 - 8) s + z'`` with ``u4 = u + c`` and ``z' = s (8 - c - zero)``.

    In real arithmetic that is ``s (u - zero)`` for any shift ``c`` that keeps ``u4`` in 0..15;
    ``c = 8 - 2^(b-1)`` centres b-bit codes (symmetric codes then need no ``z'`` at all).
    """
    entry = layer._cache.get("int4")
    if entry is None:
        g = _int4_group(layer)
        assert g is not None
        n, k = layer.out_features, layer.in_features
        # Shift b-bit codes to the middle of the 4-bit range so that u4 - 8 and the folded zero
        # stay small: the bf16 rounding of s and z' then costs ~2^-9 of a weight, not 8x that.
        shift = 8 - 2 ** (layer.spec.bits - 1)
        u = unpack(layer.qweight, layer.spec.bits, k).to(torch.int32) + shift
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
        groups = k // g
        s = per_group(layer.scale, n, groups)
        z = per_group(_zero_point(layer), n, groups)
        sz = torch.stack([s, s * (8 - shift - z)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        entry = (packed, sz, g)
        layer._cache["int4"] = entry
    packed, sz, g = entry
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, g, sz)


def _int8_groups_forward(layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
    """``y = Σ_g s_g ⊙ (x_g c_gᵀ) + (Σ_{k∈g} x_k) s_g (o - zero_g)`` with int8 codes ``c = u - o``.

    One ``_weight_int8pack_mm`` per group of inputs (one call for per-channel); the second term is a
    small ``[M, G] x [G, N]`` product that puts the zero-point back. Codebooks use the table's int8
    levels ``c = L[u]`` and scale ``s / R`` (no zero term).
    """
    entry = layer._cache.get("int8")
    n, k = layer.out_features, layer.in_features
    if entry is None:
        u = unpack(layer.qweight, layer.spec.bits, k)
        groups = layer.scale.shape[1]
        s = per_group(layer.scale, n, groups)
        g = k // groups
        corr = None
        if layer.codebook is not None:
            levels, r = _codebook_int8_levels(layer.codebook.cpu())
            c = levels.to(u.device)[u.long()]
            s = s / r
        else:
            o = 128 if layer.spec.bits == 8 else 0
            c = (u.to(torch.int16) - o).to(torch.int8)
            z = per_group(_zero_point(layer), n, groups)
            if bool((z != o).any()):
                corr = (s * (o - z)).t().contiguous()  # [G, N]
        cg = c.reshape(n, groups, g).transpose(0, 1).contiguous()  # [G, N, g]
        sg = s.t().contiguous().to(torch.bfloat16)  # [G, N]
        entry = (cg, sg, corr)
        layer._cache["int8"] = entry
    cg, sg, corr = entry
    groups, g = cg.shape[0], cg.shape[2]
    xb = x2.to(torch.bfloat16)
    if groups == 1:
        y = torch.ops.aten._weight_int8pack_mm(xb.contiguous(), cg[0], sg[0]).float()
    else:
        y = torch.zeros(x2.shape[0], n, dtype=torch.float32, device=x2.device)
        for i in range(groups):
            xi = xb[:, i * g : (i + 1) * g].contiguous()
            y += torch.ops.aten._weight_int8pack_mm(xi, cg[i], sg[i]).float()
    if corr is not None:
        y += x2.float().reshape(-1, groups, g).sum(dim=-1) @ corr
    return y


def _triton_forward(layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
    kernels = _kernels()
    assert kernels is not None
    n, k = layer.out_features, layer.in_features
    scale = layer.scale if layer.scale.shape[0] == n else layer.scale.expand(n, -1).contiguous()
    zero = layer.zero
    if zero is not None and zero.shape[0] != n:
        zero = zero.expand(n, -1).contiguous()
    return kernels.dequant_matmul(
        x2, layer.qweight, scale, zero, bits=layer.spec.bits, group_size=layer.group_size, n=n, k=k,
        codebook=layer.codebook,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
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


#: Methods whose weight spec uses ``group_size``.
GROUPED_METHODS = ("rtn", "nf4", "fp4", "hqq", "gptq", "awq")


def fit_group_sizes(model: nn.Module, config: QuantConfig) -> QuantConfig:
    """``config`` plus overrides for layers whose ``in_features`` the group size does not divide.

    qlab does not pad groups. Such a layer (SmolLM2's hidden size 576 with ``group_size=128``) gets the
    largest power of two that divides its ``in_features`` and is below the requested size (64 for
    576), with a warning; the other layers keep the requested size.
    """
    if config.method not in GROUPED_METHODS:
        return config
    fits: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if not name or not _is_linear(mod) or isinstance(mod, QuantLinear) or config.is_skipped(name):
            continue
        g = config.for_module(name).group_size
        k = _linear_weight(mod).shape[1]
        if g is None or k % g == 0:
            continue
        fit = 2 ** int(math.log2(g))
        while fit > 1 and (k % fit or fit >= g):
            fit //= 2
        fits[name] = {"group_size": fit}
    if not fits:
        return config
    sizes = sorted(
        {(_linear_weight(model.get_submodule(n)).shape[1], f["group_size"]) for n, f in fits.items()}
    )
    warnings.warn(
        f"group_size={config.group_size} does not divide in_features of {len(fits)} layers; they use "
        + ", ".join(f"group_size={g} (in_features={k})" for k, g in sizes),
        stacklevel=3,
    )
    return QuantConfig.from_dict({**config.to_dict(), "overrides": {**config.overrides, **fits}})


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
) -> nn.Module:
    """Replace the linear layers of ``model`` by :class:`QuantLinear` in place; return ``model``.

    ``config`` says how (method, bits, group size), what to leave in float (``skip`` glob patterns,
    ``lm_head`` and embeddings by default) and per-module ``overrides``. ``nn.Linear`` and
    transformers' ``Conv1D`` are replaced. Tied weights: a linear whose weight is shared with a
    module that stays float (an embedding) is left in float with a warning (quantizing it would
    store the matrix twice); linears sharing a weight with each other share one ``QuantLinear``.

    Methods ``hqq``, ``gptq``, ``awq``, ``smoothquant`` and ``llm_int8`` run through
    :func:`qlab.methods.quantize_model_with` (``calibration``: token ids for the data-driven ones).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a qlab.config.QuantConfig, got {type(config).__name__}")
    config = fit_group_sizes(model, config)
    if config.method not in LOCAL_METHODS:
        try:
            from qlab.methods import quantize_model_with
        except ImportError as err:
            raise NotImplementedError(
                f"method {config.method!r} needs qlab.methods, which is missing"
            ) from err
        quantize_model_with(config.method, model, config, calibration, progress)
        return model
    targets = {
        n: m
        for n, m in model.named_modules()
        if n and _is_linear(m) and not isinstance(m, QuantLinear) and not config.is_skipped(n)
    }
    for name, owner in _tied_elsewhere(model, targets).items():
        warnings.warn(
            f"{name} shares its weight with {owner}, which stays float: left unquantized", stacklevel=2
        )
        del targets[name]
    done: dict[int, QuantLinear] = {}
    for name, mod in tqdm(
        targets.items(), desc=f"quantize {config.method}", unit="layer", disable=not progress
    ):
        key = id(mod.weight)
        new = done.get(key)
        if new is None:
            new = QuantLinear.from_linear(mod, config.for_module(name))
            done[key] = new
        _set_module(model, name, new)
    model.qlab_config = config  # what qlab.io.save_quantized records
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`QuantLinear` (and the methods' ``Int8Linear``) by an ``nn.Linear`` holding
    its effective float weight, in place; return ``model``. The model then computes what the
    quantized one computes on the reference path."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    replaced: dict[int, nn.Linear] = {}
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if id(mod) in replaced:  # a layer shared under several names stays shared
            _set_module(model, name, replaced[id(mod)])
            continue
        if isinstance(mod, QuantLinear):
            w = mod.effective_weight()
        elif type(mod).__name__ == "Int8Linear" and hasattr(mod, "weight_dequantized"):
            w = mod.weight_dequantized()
            if mod.input_scale is not None:
                w = w / mod.input_scale
        else:
            continue
        lin = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        replaced[id(mod)] = lin
        if name:
            _set_module(model, name, lin)
        else:
            return lin
    return model


@dataclass
class FootprintRow:
    kind: str
    count: int
    bytes_now: int
    bytes_float: int


@dataclass
class MemoryFootprint:
    """Bytes per layer type: now, and in float (what the quantized layers took before)."""

    rows: list[FootprintRow] = field(default_factory=list)

    @property
    def total_now(self) -> int:
        return sum(r.bytes_now for r in self.rows)

    @property
    def total_float(self) -> int:
        return sum(r.bytes_float for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.total_float / self.total_now if self.total_now else math.nan

    def __str__(self) -> str:
        lines = [f"{'layer type':<22}{'count':>7}{'float MB':>11}{'now MB':>10}"]
        for r in self.rows:
            lines.append(f"{r.kind:<22}{r.count:>7}{r.bytes_float / 1e6:>11.2f}{r.bytes_now / 1e6:>10.2f}")
        lines.append(f"{'total':<22}{'':>7}{self.total_float / 1e6:>11.2f}{self.total_now / 1e6:>10.2f}")
        lines.append(f"compression {self.ratio:.2f}x")
        return "\n".join(lines)


def memory_footprint(model: nn.Module) -> MemoryFootprint:
    """Bytes of ``model`` per layer type, now and in float, each tensor counted once (tied weights).

    A :class:`QuantLinear` counts its storage (:attr:`QuantLinear.nbytes`); its float size is
    ``out * in`` elements of its ``weight_dtype`` plus bias and input scale. Other modules count the
    parameters and buffers they own directly.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen: set[int] = set()
    rows: dict[str, FootprintRow] = {}

    def tensor_bytes(t: torch.Tensor) -> int:
        key = id(t) if t.device.type == "meta" else t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    for _name, mod in model.named_modules():
        kind = type(mod).__name__
        if isinstance(mod, QuantLinear):
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            now = sum(tensor_bytes(t) for _, t in mod.named_buffers(recurse=False) if t is not mod.codebook)
            extra = mod._extra_nbytes()
            flt = (
                mod.in_features * mod.out_features * torch.empty(0, dtype=mod.weight_dtype).element_size()
                + extra
            )
        else:
            own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
            if not own:
                continue
            now = sum(tensor_bytes(t) for t in own)
            flt = now
        if now == 0 and flt == 0:
            continue
        row = rows.setdefault(kind, FootprintRow(kind, 0, 0, 0))
        row.count += 1
        row.bytes_now += now
        row.bytes_float += flt
    return MemoryFootprint(sorted(rows.values(), key=lambda r: -r.bytes_float))


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """``{name: QuantLinear}`` in ``model``."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantLinear)}
