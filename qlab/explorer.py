"""One weight, many quantizers: what the error-histogram explorer computes, without any widget.

The methods come from the registry (:mod:`qlab.registry`): every data-free method that stores a packed
weight (RTN, NF4, FP4, HQQ) applies to a tensor on its own; the calibrated ones (GPTQ, AWQ) apply
once the layer's inputs are known. Names are shown upper-case (``"RTN"``, ``"GPTQ"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from qlab.calibration import hessian
from qlab.codebooks import codebook_spec
from qlab.methods.awq import awq_quantize
from qlab.methods.gptq import gptq_quantize
from qlab.metrics import sqnr
from qlab.registry import METHODS
from qlab.tensor import QuantizedTensor, QuantSpec

#: A quantizer the error-histogram explorer can call: ``(x, spec) -> QuantizedTensor``, or
#: ``(x, spec) -> (QuantizedTensor of x * s, s)`` for methods that scale input channels first (AWQ), whose
#: reconstruction is ``dequantize() / s``.
Quantizer = Callable[[torch.Tensor, QuantSpec], "QuantizedTensor | tuple[QuantizedTensor, torch.Tensor]"]


def default_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights to explore: Gaussian, Gaussian with a few large outliers, and uniform."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(256, 512, generator=g) * 0.02
    outliers = normal.clone()
    idx = torch.randint(0, outliers.numel(), (64,), generator=g)
    outliers.view(-1)[idx] *= 25  # a handful of weights 25x larger, as some real layers have
    uniform = (torch.rand(256, 512, generator=g) * 2 - 1) * 0.05
    return {"normal 256x512": normal, "normal + outliers 256x512": outliers, "uniform 256x512": uniform}


def _codebook(name: str) -> Quantizer:
    def q(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
        if spec.granularity == "tensor":
            raise ValueError(f"{name.upper()} scales blocks of the last dim: choose 'channel' or 'group'")
        block = spec.group_size if spec.granularity == "group" else x.shape[-1]
        assert block is not None
        return METHODS[name].quantize_weight(x, codebook_spec(name, block))  # type: ignore[misc]

    return q


def available_methods() -> dict[str, Quantizer]:
    """Data-free quantizers of a weight on its own, from the registry: RTN, NF4, FP4, HQQ. (GPTQ and AWQ
    need layer inputs: see :func:`data_methods`.)"""
    out: dict[str, Quantizer] = {}
    for name, m in METHODS.items():
        if m.calibrated or m.quantize_weight is None:
            continue
        codebook = m.spec(4, 64, None).codebook is not None
        out[name.upper()] = _codebook(name) if codebook else m.quantize_weight
    return out


def gptq_method(inputs: torch.Tensor) -> Quantizer:
    """A quantizer that runs GPTQ with the Hessian ``2 XᵀX / n`` of the layer inputs ``inputs`` [..., in]."""
    H = hessian(inputs.detach().float())
    return lambda x, spec: gptq_quantize(x, H, spec)


def awq_method(inputs: torch.Tensor) -> Quantizer:
    """A quantizer that runs AWQ on the layer inputs ``inputs`` [..., in]; it returns ``(qt, s)`` where
    ``qt`` quantizes ``x * s`` (columns scaled) and the layer divides its input by ``s``."""
    X = inputs.detach().float()
    return lambda x, spec: awq_quantize(x, X, spec)


#: Calibrated weight-only methods of the registry as factories ``layer inputs -> Quantizer``.
_FROM_INPUTS: dict[str, Callable[[torch.Tensor], Quantizer]] = {"gptq": gptq_method, "awq": awq_method}


def data_methods() -> dict[str, Callable[[torch.Tensor], Quantizer]]:
    """Methods that need layer inputs, by display name, as factories ``inputs -> Quantizer``: every
    calibrated registry method that stores a packed weight."""
    names = [n for n, m in METHODS.items() if m.calibrated and m.layer == "weight"]
    missing = [n for n in names if n not in _FROM_INPUTS]
    if missing:
        raise RuntimeError(f"the explorer has no per-tensor form of calibrated methods {missing}")
    return {n.upper(): _FROM_INPUTS[n] for n in names}


def reconstruct(
    x: torch.Tensor, result: QuantizedTensor | tuple[QuantizedTensor, torch.Tensor]
) -> tuple[torch.Tensor, QuantizedTensor | None, float]:
    """``(x_hat, qt or None, bits per weight)`` for a quantizer's result.

    For ``(qt, s)`` (AWQ) the reconstruction is ``qt.dequantize() / s`` and the fp32 vector ``s`` is counted
    in the storage (it stays with the layer unless folded into a preceding norm). Its grid is not drawn: each
    input column has its own.
    """
    if isinstance(result, QuantizedTensor):
        return result.dequantize(torch.float32), result, result.bits_per_weight
    qt, s = result
    xhat = qt.dequantize(torch.float32) / s.float()
    bpw = qt.bits_per_weight + 32 * s.numel() / x.numel()
    return xhat, None, bpw


def explorer_quantize(
    x: torch.Tensor,
    method: str = "RTN",
    bits: int = 4,
    symmetric: bool = False,
    granularity: str = "group",
    group_size: int = 64,
    methods: Mapping[str, Quantizer] | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> QuantizedTensor:
    """What the error-histogram explorer computes for one setting of its controls.

    ``scale_dtype`` is the dtype scales and zeros are stored in (it counts in the bits per weight). Codebook
    methods (NF4, FP4) ignore ``bits``, ``symmetric`` and ``scale_dtype``: they are 4-bit formats with an
    fp32 absmax per block.
    """
    methods = available_methods() if methods is None else methods
    if method not in methods:
        raise ValueError(f"method must be one of {list(methods)}, got {method!r}")
    kw: dict[str, Any] = {"group_size": group_size} if granularity == "group" else {}
    entry = METHODS.get(method.lower())
    if entry is not None and entry.spec(4, 64, None).codebook is not None:
        spec = QuantSpec(bits=4, symmetric=False, granularity=granularity, **kw)  # type: ignore[arg-type]
    else:
        spec = QuantSpec(
            bits=bits, symmetric=symmetric, granularity=granularity, scale_dtype=scale_dtype, **kw
        )  # type: ignore[arg-type]
    return methods[method](x, spec)


def output_sqnr(x: torch.Tensor, xhat: torch.Tensor, inputs: torch.Tensor) -> float:
    """SQNR (dB) of the layer output ``inputs @ x.T`` vs ``inputs @ xhat.T``: the error GPTQ minimizes."""
    a = inputs.detach().double().reshape(-1, inputs.shape[-1])
    return sqnr(a @ x.detach().double().T, a @ xhat.detach().double().T)
