"""Quantize-and-pack: group-wise round-to-nearest of a weight ``[N, K]`` straight into int32 words.

Bit for bit the same as ``qlab.quantize.quantize(w, QuantSpec.per_group(bits, group_size,
symmetric))`` followed by ``qlab.packing.pack_int32(qt.unsigned_codes(), bits)``:

* asymmetric: ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)`` per group (0 stays representable),
  ``scale = (hi - lo) / (2^b - 1)``, ``zero = round(-lo / scale)``,
  ``u = clamp(round(x / scale) + zero, 0, 2^b - 1)``;
* symmetric: ``scale = max|x| / (2^(b-1) - 1)``, ``q = clamp(round(x / scale), -(2^(b-1) - 1), 2^(b-1) - 1)``,
  stored unsigned as ``u = q + 2^(b-1)`` (so the matmul kernel takes ``zero = 2^(b-1)``);
* a group whose range is 0 gets ``scale = 1``; ``round`` is half-to-even, like ``torch.round``.

Two kernels, because a group's scale depends on all of its elements while a word of codes may
straddle two groups (e.g. 2-bit words of 16 codes with ``group_size = 8``):

1. ``_group_scale_kernel``: one program per (block of rows, group) reduces the group to its min
   and max and writes ``scale`` and ``zero``;
2. ``_pack_kernel``: one program per (block of rows, block of words) quantizes ``PER = 32 // bits``
   codes per word and ORs them into place.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from qlab.packing import pack_int32
from qlab.quantize import QuantSpec, quantize

from ._launch import check_device, interpreted, register_op, traceable

SUPPORTED_BITS = (1, 2, 3, 4, 8)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class PackedWeight(NamedTuple):
    """What :func:`quantize_pack` returns: the arguments :func:`qlab.kernels.dequant_matmul` takes."""

    packed: torch.Tensor  #: int32 words [N, ceil(K / (32 // bits))]
    scale: torch.Tensor  #: float32 [N, K / group_size]
    zero: torch.Tensor | None  #: float32 [N, K / group_size], None when symmetric


@triton.jit
def _round_half_even(v):
    # torch.round rounds ties to even (2.5 -> 2, 3.5 -> 4). floor(v + 0.5) would not, and v + 0.5
    # can itself round up in fp32; v - floor(v) is exact, so compare the fraction instead.
    r = tl.floor(v)
    frac = v - r
    r_is_odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (frac > 0.5) | ((frac == 0.5) & r_is_odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _group_scale_kernel(
    w_ptr,  # [N, K] weight
    scale_ptr,  # [N, K / group_size] float32 out
    zero_ptr,  # [N, K / group_size] float32 out (unused when SYMMETRIC)
    N,
    group_size,
    stride_wn,
    stride_sn,
    QMAX: tl.constexpr,  # 2^b - 1 (asymmetric) or 2^(b-1) - 1 (symmetric)
    SYMMETRIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # Walk the group in BLOCK_K chunks (a per-channel "group" is a whole row), keeping a running
    # min and max per row. Masked lanes load 0, which never changes the result: the range is
    # widened to include 0 anyway.
    lo = tl.zeros((BLOCK_N,), dtype=tl.float32)
    hi = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, group_size, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k[None, :] < group_size)
        x = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + g * group_size + offs_k[None, :], mask=mask, other=0.0
        )
        x = x.to(tl.float32)
        lo = tl.minimum(lo, tl.min(x, axis=1))
        hi = tl.maximum(hi, tl.max(x, axis=1))
    # Divisions use tl.div_rn, IEEE round-to-nearest like torch: a plain `/` compiles to the GPU's
    # approximate division (div.full.f32, off by up to 2 ulp), which can flip a code next to a tie.
    if SYMMETRIC:
        scale = tl.div_rn(tl.maximum(hi, -lo), QMAX * 1.0)
    else:
        scale = tl.div_rn(hi - lo, QMAX * 1.0)
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(scale_ptr + offs_n * stride_sn + g, scale, mask=mask_n)
    if not SYMMETRIC:
        zero = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(-lo, scale)), 0.0), QMAX)
        tl.store(zero_ptr + offs_n * stride_sn + g, zero, mask=mask_n)


@triton.jit
def _pack_kernel(
    w_ptr,  # [N, K] weight
    scale_ptr,  # [N, K / group_size] from _group_scale_kernel
    zero_ptr,
    out_ptr,  # [N, KW] int32 words out
    N,
    K,
    KW,  # words per row, ceil(K / PER)
    group_size,
    stride_wn,
    stride_sn,
    stride_on,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    PER_POW2: tl.constexpr,  # codes per word rounded up to a power of 2 (3-bit: 10 -> 16)
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_w = tl.program_id(1)
    PER: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1 if not SYMMETRIC else (1 << (BITS - 1)) - 1
    QMIN: tl.constexpr = 0 if not SYMMETRIC else -((1 << (BITS - 1)) - 1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    j = tl.arange(0, PER_POW2)  # position of a code inside its word

    # A 3-D tile [rows, words, codes-in-word]: input k = word * PER + j.
    n3 = offs_n[:, None, None]
    k3 = offs_w[None, :, None] * PER + j[None, None, :]
    # Lanes past K (the zero padding of the last word) and the unused j >= PER of 3-bit words
    # must produce code 0, not the code of 0.0.
    valid = (n3 < N) & (k3 < K) & (j[None, None, :] < PER)
    x = tl.load(w_ptr + n3 * stride_wn + k3, mask=valid, other=0.0).to(tl.float32)
    g = k3 // group_size
    scale = tl.load(scale_ptr + n3 * stride_sn + g, mask=valid, other=1.0)
    q = _round_half_even(tl.div_rn(x, scale))
    if SYMMETRIC:
        # Signed codes, stored offset by 2^(b-1) so every stored code is unsigned.
        q = tl.minimum(tl.maximum(q, QMIN), QMAX) + (1 << (BITS - 1))
    else:
        zero = tl.load(zero_ptr + n3 * stride_sn + g, mask=valid, other=0.0)
        q = tl.minimum(tl.maximum(q + zero, QMIN), QMAX)
    codes = tl.where(valid, q.to(tl.int32), 0)

    # Shift code j to bits [BITS*j, BITS*(j+1)) and combine. The fields do not overlap, so a sum
    # is an OR; the top code of a word may set bit 31, making the int32 negative (two's complement
    # wrap-around is exactly the bit pattern we want).
    words = tl.sum(codes << (j[None, None, :] * BITS), axis=2)
    mask_out = (offs_n[:, None] < N) & (offs_w[None, :] < KW)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_w[None, :], words, mask=mask_out)


def quantize_pack(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> PackedWeight:
    """Group-wise RTN of ``w [N, K]`` into ``(packed int32 words, scale, zero)`` (module docstring).

    Checks its arguments (including that ``w`` is finite), then runs the operator
    ``torch.ops.qlab.quantize_pack``.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"w must be float16, bfloat16 or float32, got {w.dtype}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty 2-D weight [N, K], got shape {list(w.shape)}")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if symmetric and bits < 2:
        raise ValueError("symmetric quantization needs bits >= 2 (1-bit codes have no signed range)")
    n, k = w.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or k % group_size:
        raise ValueError(f"group_size must be a positive integer dividing K={k}, got {group_size!r}")
    if not w.is_contiguous():
        raise ValueError("w must be contiguous")
    check_device(w.device)
    # a data-dependent check: Dynamo cannot trace it, so compiled callers skip it (weights are finite
    # by the time anyone compiles a quantization step; eager callers get the clear error)
    if not torch.compiler.is_compiling() and not torch.isfinite(w).all():
        raise ValueError("w contains NaN or Inf; quantization needs finite values")

    packed, scale, zero = _quantize_pack_op(w, bits, group_size, symmetric)
    return PackedWeight(packed, scale, None if symmetric else zero)


def _quantize_pack_launch(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operator ``qlab::quantize_pack``: ``(packed, scale, zero)`` of a checked ``w [N, K]``.

    ``zero`` is an empty tensor when ``symmetric`` (an operator returns tensors, never None).
    """
    n, k = w.shape
    n_groups = k // group_size
    per = 32 // bits
    kw = math.ceil(k / per)
    scale = torch.empty((n, n_groups), device=w.device, dtype=torch.float32)
    zero = torch.empty((0,) if symmetric else (n, n_groups), device=w.device, dtype=torch.float32)
    zero_arg = scale if symmetric else zero  # never read when SYMMETRIC
    packed = torch.empty((n, kw), device=w.device, dtype=torch.int32)
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    block_n = 16
    block_k = min(triton.next_power_of_2(group_size), 256)
    traceable(interpreted(_group_scale_kernel, w.device))[(triton.cdiv(n, block_n), n_groups)](
        w, scale, zero_arg, n, group_size, w.stride(0), scale.stride(0),
        QMAX=qmax, SYMMETRIC=symmetric, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    block_w = 32
    traceable(interpreted(_pack_kernel, w.device))[(triton.cdiv(n, block_n), triton.cdiv(kw, block_w))](
        w, scale, zero_arg, packed, n, k, kw, group_size,
        w.stride(0), scale.stride(0), packed.stride(0),
        BITS=bits, SYMMETRIC=symmetric, PER_POW2=triton.next_power_of_2(per),
        BLOCK_N=block_n, BLOCK_W=block_w,
    )  # fmt: skip
    return packed, scale, zero


def _quantize_pack_fake(w, bits, group_size, symmetric):  # type: ignore[no-untyped-def]
    n, k = w.shape
    groups = k // group_size
    scale = w.new_empty((n, groups), dtype=torch.float32)
    zero = w.new_empty((0,) if symmetric else (n, groups), dtype=torch.float32)
    return w.new_empty((n, math.ceil(k / (32 // bits))), dtype=torch.int32), scale, zero


_quantize_pack_op = register_op("quantize_pack", _quantize_pack_launch, _quantize_pack_fake)


def quantize_pack_reference(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False
) -> PackedWeight:
    """What :func:`quantize_pack` must equal: qlab's torch quantizer, then :func:`qlab.packing.pack_int32`."""
    qt = quantize(w, QuantSpec.per_group(bits=bits, group_size=group_size, symmetric=symmetric))
    return PackedWeight(pack_int32(qt.unsigned_codes(), bits), qt.scale, qt.zero)
