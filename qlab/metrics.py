"""Error and memory metrics for comparing a tensor with its quantized reconstruction.

All error metrics take the reference ``x`` first and the approximation ``y`` second and compute in
float64 so that the figures a lesson prints do not depend on the input dtype.
"""

from __future__ import annotations

import math

import torch


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() == 0:
        raise ValueError("x and y are empty")
    return x.detach().double(), y.detach().double()


def mse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error ``mean((x - y)^2)``."""
    x, y = _pair(x, y)
    return (x - y).pow(2).mean().item()


def max_abs_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """``max |x - y|``."""
    x, y = _pair(x, y)
    return (x - y).abs().max().item()


def sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum x^2 / sum (x - y)^2)``.

    Each extra bit of a uniform quantizer adds about 6.02 dB. Returns ``inf`` for an exact copy.
    """
    x, y = _pair(x, y)
    noise = (x - y).pow(2).sum().item()
    signal = x.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative Frobenius error ``||x - y|| / ||x||`` (``inf`` if ``x`` is all zeros and ``y`` is not)."""
    x, y = _pair(x, y)
    num, den = torch.linalg.vector_norm(x - y).item(), torch.linalg.vector_norm(x).item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine of the angle between ``x`` and ``y`` flattened: ``<x, y> / (|x| |y|)``."""
    x, y = _pair(x, y)
    den = (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)).item()
    if den == 0:
        raise ValueError("cosine similarity is undefined for an all-zero tensor")
    return (x.flatten() @ y.flatten()).item() / den


def lp_error(x: torch.Tensor, y: torch.Tensor, p: float = 0.7) -> float:
    """``mean(|x - y|^p)``; with ``p < 1`` it is robust to outliers (HQQ's objective)."""
    if p <= 0:
        raise ValueError(f"p must be > 0, got {p}")
    x, y = _pair(x, y)
    return (x - y).abs().pow(p).mean().item()


def error_report(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """All error metrics at once, for tables and widgets."""
    return {
        "mse": mse(x, y),
        "sqnr_db": sqnr(x, y),
        "max_abs_error": max_abs_error(x, y),
        "relative_error": relative_error(x, y),
        "cosine": cosine_similarity(x, y),
    }


def compression_ratio(original_bytes: int, compressed_bytes: int) -> float:
    """``original_bytes / compressed_bytes``."""
    if original_bytes < 0 or compressed_bytes <= 0:
        raise ValueError(
            f"need original_bytes >= 0 and compressed_bytes > 0, got {original_bytes} and {compressed_bytes}"
        )
    return original_bytes / compressed_bytes


def memory_footprint(obj: object) -> int:
    """Bytes a tensor, a :class:`~qlab.quantize.QuantizedTensor` or a module's tensors occupy.

    For modules, parameters and buffers are counted once each, even when shared (tied weights).
    Quantized modules report their packed storage because their buffers *are* the packed codes.
    """
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(obj, torch.nn.Module):
        seen: set[int] = set()
        total = 0
        for t in list(obj.parameters()) + list(obj.buffers()):
            key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
        return total
    raise TypeError(f"obj must be a tensor, QuantizedTensor or nn.Module, got {type(obj).__name__}")
