"""Fused dequantize + matmul: ``y = x @ dequant(W)^T`` for packed int8/int4/int2 (and NF4) weights.

The weight ``W`` of a linear layer has shape ``[N, K]`` (``N`` outputs, ``K`` inputs). It is stored as

* ``packed``: int32 words ``[N, ceil(K / per)]`` with ``per = 32 // bits`` codes each, packed along
  ``K``, code ``j`` of a word at bits ``[bits*j, bits*(j+1))`` (:func:`qlab.packing.pack_int32`;
  the uint8 layout of :func:`qlab.packing.pack` viewed as little-endian int32 is the same thing);
* ``scale`` (and ``zero``): ``[N, K / group_size]``, one per group of ``group_size`` inputs
  (per-channel is ``group_size = K``).

Dequantization of one element, for unsigned codes ``u = W_codes[n, k]`` and ``g = k // group_size``::

    affine:    w = scale[n, g] * (u - zero[n, g])      (zero=None: symmetric, zero = 2^(bits-1))
    codebook:  w = scale[n, g] * table[u]               (NF4: table = qlab.codebooks.NF4_VALUES)

The kernel never writes ``W`` in floating point to memory: each program loads a tile of packed
words, unpacks and dequantizes it in registers, and multiplies it into an fp32 accumulator. That is
the point of weight-only quantization: a GPU at batch 1 is limited by the bytes it reads, and 4-bit
words are 4x fewer bytes than fp16.

Two launch shapes share the one kernel:

* **prefill** (large ``M``): a 2-D grid of ``[BLOCK_M, BLOCK_N]`` output tiles, each walking all of
  ``K`` (the classic tiled matmul of Triton's tutorial 03);
* **decode** (``M <= 16``): there are few output tiles (``N / BLOCK_N``), too few to keep every
  streaming multiprocessor busy reading weights, so the reduction over ``K`` is also split in
  ``SPLIT_K`` chunks: program ``(n, s)`` handles inputs ``[s*K/SPLIT_K, (s+1)*K/SPLIT_K)`` and writes
  an fp32 partial sum; the partials are added afterwards (deterministic, unlike atomics).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import triton
import triton.language as tl

from qlab.packing import unpack_int32

from ._launch import check_device, interpreted, num_sms, register_op, traceable

#: Bit widths the kernel unpacks (the widths :mod:`qlab.packing` packs).
SUPPORTED_BITS = (1, 2, 3, 4, 8)
#: Activation dtypes; accumulation is always fp32.
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: At or below this many rows, ``path="auto"`` takes the split-K decode path.
DECODE_MAX_M = 16


@triton.jit
def _dequant_matmul_kernel(
    # Pointers. x: [M, K] activations; w: [N, KW] int32 words; scale, zero: [N, K / group_size];
    # table: 2^BITS codebook entries; y: [SPLIT_K, M, N] output (SPLIT_K = 1: the result itself).
    x_ptr,
    w_ptr,
    scale_ptr,
    zero_ptr,
    table_ptr,
    y_ptr,
    # Sizes.
    M,
    N,
    K,
    group_size,
    k_per_split,  # inputs each split handles, a multiple of BLOCK_K
    # Strides (elements) of the row dimension of each 2-D operand, and of y's split dimension.
    stride_xm,
    stride_wn,
    stride_sn,
    stride_zn,
    stride_ys,
    stride_ym,
    # Compile-time switches: one compiled kernel per combination.
    BITS: tl.constexpr,
    HAS_ZERO: tl.constexpr,  # affine with explicit zeros (asymmetric, HQQ)
    HAS_TABLE: tl.constexpr,  # codebook lookup (NF4, FP4) instead of an affine map
    FP32_DOT: tl.constexpr,  # fp32 activations: ask for an exact fp32 product, not TF32
    GROUP_ALIGNED: tl.constexpr,  # group_size % BLOCK_K == 0: one scale per row per K tile
    FAN_OUT: tl.constexpr,  # PER = 32 // BITS is a power of two dividing BLOCK_K: load each word once
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Which output tile (rows m, columns n) and which chunk of the reduction this program owns.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    PER: tl.constexpr = 32 // BITS  # codes per int32 word
    MASK: tl.constexpr = (1 << BITS) - 1  # the low BITS bits, e.g. 0b1111 for int4
    SYM_ZERO: tl.constexpr = 1 << (BITS - 1)  # symmetric codes are stored offset by 2^(bits-1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K  # the last tile may hang over the end of K: masked lanes read 0

        # Activations tile [BLOCK_M, BLOCK_K].
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )

        # Weight tile, laid out [BLOCK_K, BLOCK_N] (W transposed) so that x @ w is the product.
        # Input k of row n lives in word k // PER of that row, at bit (k % PER) * BITS: shift the
        # code down to bit 0 and mask its neighbours away. (An arithmetic shift of a negative word
        # drags copies of the sign bit in from the left; the mask removes them too.)
        mask_kn = mask_k[:, None] & mask_n[None, :]
        if FAN_OUT:
            # Load each word once: a [BLOCK_K / PER, BLOCK_N] tile of words, then fan every word out
            # into its PER codes ([words, PER, BLOCK_N]) and flatten words x PER back into BLOCK_K.
            offs_kw = k0 // PER + tl.arange(0, BLOCK_K // PER)
            words = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + offs_kw[:, None],
                mask=(offs_kw[:, None] * PER < K) & mask_n[None, :],
                other=0,
            )
            shifts = tl.arange(0, PER) * BITS
            codes = (words[:, None, :] >> shifts[None, :, None]) & MASK
            codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
        else:
            # 3-bit words hold 10 codes, not a power of two: each lane loads the word holding its
            # code (the lanes sharing a word hit the cache).
            words = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + (offs_k[:, None] // PER), mask=mask_kn, other=0
            )
            codes = (words >> ((offs_k[:, None] % PER) * BITS)) & MASK

        # Group g = k // group_size of row n holds this element's scale (and zero).
        if GROUP_ALIGNED:
            # BLOCK_K divides group_size, so the whole K tile lies inside one group: each row n
            # needs one scale, loaded once as a [1, BLOCK_N] row instead of per element.
            g = k0 // group_size
            scale = tl.load(scale_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0)[None, :]
            if HAS_ZERO:
                zero = tl.load(zero_ptr + offs_n * stride_zn + g, mask=mask_n, other=0.0)[None, :]
        else:
            g = offs_k[:, None] // group_size
            scale = tl.load(scale_ptr + offs_n[None, :] * stride_sn + g, mask=mask_kn, other=0.0)
            if HAS_ZERO:
                zero = tl.load(zero_ptr + offs_n[None, :] * stride_zn + g, mask=mask_kn, other=0.0)
        if HAS_TABLE:
            # Codebook: the code is an index into a 2^BITS-entry table (16 values for NF4).
            values = tl.load(table_ptr + codes)
        elif HAS_ZERO:
            values = codes.to(tl.float32) - zero.to(tl.float32)
        else:
            values = codes.to(tl.float32) - SYM_ZERO
        w = values * scale.to(tl.float32)

        # Multiply in the activations' dtype (tensor cores take fp16/bf16), accumulate in fp32.
        if FP32_DOT:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)

    # One tile of y (or of this split's partial sums); the store casts to y's dtype.
    y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _as_words(packed: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """``packed`` as int32 words ``[n, ceil(k / per)]``; uint8 bytes are reinterpreted (zero-copy)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    per = 32 // bits
    n_words = math.ceil(k / per)
    if packed.dtype == torch.uint8:
        # qlab.packing.pack bytes: 4 little-endian bytes form one pack_int32 word. A row whose byte
        # count is not a multiple of 4 is padded with zero codes, exactly as pack_int32 pads.
        if bits == 3:
            raise ValueError(
                "packed uint8 3-bit bytes (8 codes per 3 bytes) differ from the int32 "
                "layout (10 codes per word): pass qlab.packing.pack_int32 words"
            )
        if packed.dim() != 2 or packed.shape[0] != n or packed.shape[1] != math.ceil(k * bits / 8):
            raise ValueError(
                f"packed uint8 must have shape [n, ceil(k*bits/8)] = [{n}, {math.ceil(k * bits / 8)}], "
                f"got {list(packed.shape)}"
            )
        if not packed.is_contiguous():
            raise ValueError("packed must be contiguous (row-major); call .contiguous() once at load time")
        pad = 4 * n_words - packed.shape[1]
        if pad:
            packed = torch.nn.functional.pad(packed, (0, pad))
        return packed.view(torch.int32)
    if packed.dtype != torch.int32:
        raise ValueError(
            f"packed must be int32 words (qlab.packing.pack_int32) or uint8 bytes, got {packed.dtype}"
        )
    if packed.dim() != 2 or tuple(packed.shape) != (n, n_words):
        raise ValueError(
            f"packed int32 must have shape [n, ceil(k/{per})] = [{n}, {n_words}] for {bits}-bit codes, "
            f"got {list(packed.shape)}"
        )
    if not packed.is_contiguous():
        raise ValueError("packed must be contiguous (row-major); call .contiguous() once at load time")
    return packed


def _check_args(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    n: int,
    k: int,
    codebook: torch.Tensor | None,
) -> torch.Tensor:
    """Validate every argument of :func:`dequant_matmul`; return the int32 words."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    for name, v in (("n", n), ("k", k), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if k % group_size:
        raise ValueError(f"group_size={group_size} must divide k={k}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., k] with k={k}, got {list(x.shape)}")
    words = _as_words(packed, bits, n, k)
    expected = (n, k // group_size)
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise ValueError("scale must be a floating-point tensor")
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale must have shape [n, k/group_size] = {list(expected)}, got {list(scale.shape)}"
        )
    if not scale.is_contiguous():
        raise ValueError("scale must be contiguous")
    if zero is not None:
        if codebook is not None:
            raise ValueError("zero must be None with a codebook (w = scale * table[q] has no zero-point)")
        if not isinstance(zero, torch.Tensor) or not zero.is_floating_point():
            raise ValueError("zero must be None (symmetric) or a floating-point tensor")
        if tuple(zero.shape) != expected:
            raise ValueError(f"zero must have shape {list(expected)} like scale, got {list(zero.shape)}")
        if not zero.is_contiguous():
            raise ValueError("zero must be contiguous")
    if codebook is not None:
        if not isinstance(codebook, torch.Tensor) or not codebook.is_floating_point():
            raise ValueError("codebook must be a floating-point tensor (e.g. qlab.codebooks.NF4_VALUES)")
        if codebook.dim() != 1 or codebook.numel() != 2**bits:
            raise ValueError(
                f"codebook must hold 2**bits = {2**bits} values, got shape {list(codebook.shape)}"
            )
    tensors = {"x": x, "packed": packed, "scale": scale, "zero": zero, "codebook": codebook}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    check_device(x.device)
    return words


def _plan(m: int, n: int, k: int, group_size: int, device: torch.device, path: str) -> dict[str, int]:
    """Tile sizes and split-K for one call.

    On a GPU these are starting points (no GPU was available to tune them: see kernels/README.md).
    In the interpreter, bigger tiles mean fewer Python-level programs, so we keep them as large as
    the ragged-edge tests allow.
    """
    decode = path == "decode" or (path == "auto" and m <= DECODE_MAX_M)
    if device.type != "cuda":
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
        if not decode:
            cfg["BLOCK_M"] = 32
        target_programs = 4
    elif decode:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
        target_programs = 4 * num_sms(device)
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
        target_programs = 0
    if group_size % cfg["BLOCK_K"] and group_size >= 16 and group_size & (group_size - 1) == 0:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group_size)  # keep each K tile inside one group
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = 1
    if decode:
        # Enough splits to give every SM several programs, but each split at least one K tile.
        split = max(1, min(triton.cdiv(target_programs, tiles), triton.cdiv(k, cfg["BLOCK_K"])))
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    cfg["SPLIT_K"] = triton.cdiv(k, k_per_split)  # rounding k_per_split up may need fewer splits
    cfg["k_per_split"] = k_per_split
    return cfg


def dequant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    n: int,
    k: int,
    codebook: torch.Tensor | None = None,
    path: Literal["auto", "decode", "prefill"] = "auto",
) -> torch.Tensor:
    """``y = x @ dequant(W)^T`` without materializing ``W`` (see the module docstring for the layout).

    Args:
        x: activations ``[..., k]``, float16 / bfloat16 / float32 (any leading shape).
        packed: codes of ``W [n, k]``: int32 words from :func:`qlab.packing.pack_int32`, or the
            uint8 bytes of :func:`qlab.packing.pack` (bits 1, 2, 4, 8). Unsigned codes
            (:meth:`qlab.quantize.QuantizedTensor.unsigned_codes`).
        scale: ``[n, k // group_size]`` scales (absmax for a codebook), any float dtype.
        zero: ``[n, k // group_size]`` zero-points, or None: symmetric codes, ``zero = 2^(bits-1)``
            (or no zero at all with a codebook).
        bits, group_size, n, k: the code width, inputs per scale (``k`` for per-channel) and ``W``'s shape.
        codebook: a ``2^bits``-entry table for lookup formats (NF4: ``qlab.codebooks.NF4_VALUES``).
        path: ``"decode"`` (split-K), ``"prefill"`` (tiled) or ``"auto"`` (decode when at most 16 rows).

    Returns:
        ``y`` of shape ``[..., n]`` in ``x.dtype``, accumulated in fp32.

    The checks and reshapes run here; the launch is the operator ``torch.ops.qlab.dequant_matmul``
    (a ``triton_op`` on a GPU, so ``torch.compile`` traces through it).
    """
    if path not in ("auto", "decode", "prefill"):
        raise ValueError(f"path must be 'auto', 'decode' or 'prefill', got {path!r}")
    words = _check_args(x, packed, scale, zero, bits, group_size, n, k, codebook)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n)
    table = codebook.to(device=x.device, dtype=torch.float32).contiguous() if codebook is not None else None
    y = _dequant_matmul_op(x2, words, scale, zero, table, bits, group_size, n, k, path)
    return y.reshape(*lead, n)


def _dequant_matmul_launch(
    x: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    table: torch.Tensor | None,
    bits: int,
    group_size: int,
    n: int,
    k: int,
    path: str,
) -> torch.Tensor:
    """The operator ``qlab::dequant_matmul``: ``y [M, n] = x [M, k] @ dequant(W)^T`` in ``x.dtype``.

    Arguments as :func:`dequant_matmul` has checked and prepared them: ``x`` 2-D with unit stride
    along ``k``, ``words`` int32 ``[n, ceil(k / (32 // bits))]``, ``table`` the fp32 codebook (or None).
    """
    m = x.shape[0]
    cfg = _plan(m, n, k, group_size, x.device, path)
    split = cfg.pop("SPLIT_K")
    k_per_split = cfg.pop("k_per_split")
    # One split writes y [m, n] directly (the store casts to x.dtype); several write fp32 partial
    # sums [split, m, n]. (Not y[0] of a [1, m, n]: an operator must not return a view of a temporary.)
    if split == 1:
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        y = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    kernel = traceable(interpreted(_dequant_matmul_kernel, x.device))
    kernel[grid](
        x, words, scale, zero if zero is not None else scale, table if table is not None else scale, y,
        m, n, k, group_size, k_per_split,
        x.stride(0), words.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0,
        0 if split == 1 else y.stride(0), y.stride(-2),
        BITS=bits,
        HAS_ZERO=zero is not None,
        HAS_TABLE=table is not None,
        FP32_DOT=x.dtype == torch.float32,
        GROUP_ALIGNED=group_size % cfg["BLOCK_K"] == 0,
        FAN_OUT=bits != 3 and cfg["BLOCK_K"] % (32 // bits) == 0,
        **cfg,
    )  # fmt: skip
    return y if split == 1 else y.sum(dim=0).to(x.dtype)


def _dequant_matmul_fake(x, words, scale, zero, table, bits, group_size, n, k, path):  # type: ignore[no-untyped-def]
    return x.new_empty((x.shape[0], n))


_dequant_matmul_op = register_op("dequant_matmul", _dequant_matmul_launch, _dequant_matmul_fake)


def dequantize_reference(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    n: int,
    k: int,
    codebook: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W [n, k]`` in fp32 from the same arguments, in plain torch (via :mod:`qlab.packing`)."""
    if packed.dtype == torch.uint8:
        packed = _as_words(packed, bits, n, k)
    codes = unpack_int32(packed, bits, k).long()  # [n, k] unsigned codes
    s = scale.float().repeat_interleave(group_size, dim=1)
    if codebook is not None:
        return codebook.float().to(codes.device)[codes] * s
    z = zero.float().repeat_interleave(group_size, dim=1) if zero is not None else 2 ** (bits - 1)
    return (codes.float() - z) * s


def dequant_matmul_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    n: int,
    k: int,
    codebook: torch.Tensor | None = None,
) -> torch.Tensor:
    """What :func:`dequant_matmul` must equal: ``W`` and the product in fp32, cast to ``x.dtype``."""
    w = dequantize_reference(
        packed, scale, zero, bits=bits, group_size=group_size, n=n, k=k, codebook=codebook
    )
    return (x.float() @ w.T).to(x.dtype)
