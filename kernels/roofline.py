"""A roofline model of one linear layer ``y = x @ W^T`` (``x: [M, K]``, ``W: [N, K]``), in plain Python.

A kernel needs ``flops = 2 M N K`` multiply-adds and must move at least ``bytes`` through memory
(weights once, plus activations in and outputs out). On a machine with peak compute ``P`` (FLOP/s)
and memory bandwidth ``B`` (bytes/s) it cannot be faster than::

    time >= max(flops / P, bytes / B)

The *arithmetic intensity* ``flops / bytes`` decides which term wins: below the ridge point ``P / B``
the layer is memory-bound. At decode (``M = 1``) a layer does ``2 N K`` FLOPs on ``N K`` weights,
so with fp16 weights (2 bytes) the intensity is ~1 FLOP/byte, far below any GPU's ridge (~300 on
an H100): the time is the time to read the weights, and 4-bit weights read 4x fewer bytes. At
prefill (``M`` in the thousands) the intensity is ``~M`` and the layer is compute-bound: fewer
weight bytes no longer help, and dequantizing costs extra instructions on top.

No triton needed: :mod:`qlab.kernels` imports this module everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    """Peak dense fp16/bf16 tensor-core throughput (FLOP/s) and memory bandwidth (bytes/s)."""

    name: str
    peak_flops: float
    bandwidth: float

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which a kernel is compute-bound: ``peak_flops / bandwidth``."""
        return self.peak_flops / self.bandwidth


#: Datasheet figures (NVIDIA, dense, no sparsity): H100 SXM5 80 GB and H200 SXM 141 GB.
H100 = Accelerator("NVIDIA H100 SXM", 989e12, 3.35e12)
H200 = Accelerator("NVIDIA H200 SXM", 989e12, 4.8e12)


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def linear_flops(m: int, n: int, k: int) -> float:
    """``2 M N K``: one multiply and one add per weight per row of activations."""
    _check_sizes(m=m, n=n, k=k)
    return 2.0 * m * n * k


def linear_bytes(
    m: int,
    n: int,
    k: int,
    weight_bits: float = 16,
    group_size: int | None = None,
    bytes_per_group: float = 0.0,
    act_bytes: float = 2.0,
) -> float:
    """Bytes a perfect kernel moves: weights ``N K bits / 8``, ``bytes_per_group`` per group of
    ``group_size`` weights (scale + zero), activations ``M K`` and outputs ``M N`` of ``act_bytes``.

    ``act_bytes=0`` counts the weights alone (the decode-time picture).
    """
    _check_sizes(m=m, n=n, k=k)
    if weight_bits <= 0:
        raise ValueError(f"weight_bits must be positive, got {weight_bits!r}")
    total = n * k * weight_bits / 8
    if group_size is not None:
        _check_sizes(group_size=group_size)
        total += n * (k / group_size) * bytes_per_group
    return total + act_bytes * (m * k + m * n)


def arithmetic_intensity(m: int, n: int, k: int, weight_bits: float = 16, **byte_kw: float) -> float:
    """FLOPs per byte moved: ``linear_flops / linear_bytes`` (keywords as :func:`linear_bytes`)."""
    return linear_flops(m, n, k) / linear_bytes(m, n, k, weight_bits, **byte_kw)


def roofline_time(
    acc: Accelerator, m: int, n: int, k: int, weight_bits: float = 16, **byte_kw: float
) -> float:
    """Lower bound on the time (s): ``max(flops / peak, bytes / bandwidth)``."""
    flops = linear_flops(m, n, k)
    nbytes = linear_bytes(m, n, k, weight_bits, **byte_kw)
    return max(flops / acc.peak_flops, nbytes / acc.bandwidth)


def ideal_speedup(
    acc: Accelerator,
    m: int,
    n: int,
    k: int,
    weight_bits: float,
    group_size: int | None = None,
    bytes_per_group: float = 0.0,
    act_bytes: float = 2.0,
) -> float:
    """How much faster the quantized layer could be than fp16 weights on ``acc``, by the roofline.

    Both layers move the same activations (``act_bytes`` each); only the weights differ.
    """
    fp16 = roofline_time(acc, m, n, k, 16, act_bytes=act_bytes)
    quant = roofline_time(
        acc, m, n, k, weight_bits, group_size=group_size, bytes_per_group=bytes_per_group, act_bytes=act_bytes
    )
    return fp16 / quant
