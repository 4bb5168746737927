"""The C kernels as torch operators (``torch.ops.qlab.*``), for :mod:`qlab.kernels.cpu`.

Each operator takes only tensors and ints, checks every size it turns into a pointer range, and calls
the C library (:mod:`qlab.kernels.cpu_library`) only in its CPU kernel; its fake kernel allocates the
output from shapes alone, so ``torch.compile`` and FakeTensor tracing never reach ctypes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch
from qlab.kernels.cpu_library import load, status

#: Rows of W dequantized per block by ``tiled_matmul`` (512 x 4096 bf16 = 4 MiB, the L2 of 2 cores).
TILE_ROWS = 512
_P = ctypes.c_void_p
_L = ctypes.c_long


def fits_fp8(in_features: int) -> bool:
    """Whether an FP8 weight with this many inputs runs on the kernels (32 codes per vector)."""
    return in_features >= 32 and in_features % 32 == 0


# ------------------------------------------------------------------------------------------------
# The kernels as torch operators: torch.ops.qlab.*
# ------------------------------------------------------------------------------------------------
# Each C entry point is one operator taking only tensors and ints, so torch.compile, export and
# FakeTensor tracing see it as one opaque node: the fake kernel (``register_fake``) allocates the
# output from shapes alone, and the ctypes call, which takes raw pointers, runs only in the CPU
# kernel, on tensors that own memory. The public functions below unpack a prepared weight into
# those tensors and ints and call the operator.
#
# The operators are defined with ``torch.library.Library`` rather than ``torch.library.custom_op``:
# the latter adds a Python autograd kernel in front of the CPU kernel (two trips from C++ into
# Python), measured at 9.3 µs a call against 2.9 µs here (benchmarks/bench_op_overhead.py),
# while a 576x576 int8-dot decode takes ~12 µs. The ops have no backward (qlab.nn takes its
# reference path whenever x requires grad); torch's default autograd fallback warns if one is
# ever differentiated through. Each kernel checks every size it turns into a pointer range, once.
_LIB = torch.library.Library("qlab", "FRAGMENT")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _require(lib: ctypes.CDLL | None) -> ctypes.CDLL:
    lib = lib or load()
    if lib is None:
        raise RuntimeError(f"qlab's CPU kernels are not available: {status()}")
    return lib


def _check_x(x: torch.Tensor, k: int) -> int:
    """``x``'s row count, after checking it is a 2-D CPU float tensor with ``k`` columns."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != k or not x.is_cpu:
        got = f"{list(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a CPU tensor of shape [M, {k}], got {got}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    return x.shape[0]


def _check(name: str, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise unless ``t`` (None passes) is a contiguous CPU ``dtype`` tensor of ``shape``: the C
    kernel reads ``prod(shape)`` elements from its pointer, so nothing else is safe."""
    if t is not None and (t.dtype != dtype or t.shape != shape or not t.is_cpu or not t.is_contiguous()):
        raise ValueError(
            f"{name} must be a contiguous CPU {dtype} tensor of shape {list(shape)}, "
            f"got {t.dtype} of shape {list(t.shape)} on {t.device}"
        )


def _define(schema: str, kernel: Callable[..., torch.Tensor], fake: Callable[..., torch.Tensor]) -> Any:
    """Define ``qlab::<schema>`` with a CPU kernel and a fake kernel; return its OpOverload."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, kernel, "CPU")
    torch.library.register_fake(f"qlab::{name}", fake, lib=_LIB)
    return getattr(torch.ops.qlab, name).default


# --- int8-dot decode (rows16 layout) ------------------------------------------------------------
def _int8dot_shapes(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale_t: torch.Tensor,
    zero_t: torch.Tensor | None,
    levels: torch.Tensor | None,
    bits: int,
    group_size: int,
    planes: int,
) -> tuple[int, int, int]:
    if bits not in (2, 4, 8) or codes.dim() != 4:
        raise ValueError(f"codes must be a 4-D rows16 layout of 2-, 4- or 8-bit codes, got bits={bits}")
    n, k = codes.shape[0] * 16, codes.shape[1] * (32 // bits)
    if group_size < 1 or k % group_size or group_size % (32 // bits):
        raise ValueError(f"group_size={group_size} does not fit K={k} in {bits}-bit rows16 chunks")
    if planes not in (1, 2) or (planes == 1 and (bits != 8 or levels is not None)):
        raise ValueError(f"planes must be 2, or 1 for 8-bit affine codes; got planes={planes!r}, bits={bits}")
    m = _check_x(x, k)
    _check("codes", codes, (n // 16, k * bits // 32, 16, 4), torch.uint8)
    _check("scale_t", scale_t, (n // 16, k // group_size, 16), torch.float32)
    _check("zero_t", zero_t, (n // 16, k // group_size, 16), torch.float32)
    _check("levels", levels, (32,), torch.uint8)
    if levels is not None and bits != 4:
        raise ValueError(f"codebook levels need 4-bit codes, got bits={bits}")
    return m, n, k


def _gemv_int8dot_kernel(
    lib: ctypes.CDLL | None,
    x: torch.Tensor,
    codes: torch.Tensor,
    scale_t: torch.Tensor,
    zero_t: torch.Tensor | None,
    levels: torch.Tensor | None,
    bits: int,
    group_size: int,
    planes: int,
) -> torch.Tensor:
    m, n, k = _int8dot_shapes(x, codes, scale_t, zero_t, levels, bits, group_size, planes)
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return y
    lib = _require(lib)
    xf = x.float().contiguous()
    # scratch for the C side: two int8 planes of x, then per row its group sums X and its scale sx
    work = torch.empty(2 * m * k + 4 * m * (k // group_size + 1), dtype=torch.uint8)
    rc = lib.qlab_gemv_i8(
        m, n, k, bits, group_size, planes, _ptr(xf), _ptr(codes), _ptr(scale_t), _ptr(zero_t), _ptr(levels),
        _ptr(y), _ptr(work), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"qlab_gemv_i8 rejected M={m} N={n} K={k} bits={bits} g={group_size}")
    return y


def _gemv_int8dot_fake(x, codes, scale_t, zero_t, levels, bits, group_size, planes):  # type: ignore[no-untyped-def]
    m, n, _ = _int8dot_shapes(x, codes, scale_t, zero_t, levels, bits, group_size, planes)
    return x.new_empty((m, n), dtype=torch.float32)


_GEMV_INT8DOT = _define(
    "gemv_int8dot(Tensor x, Tensor codes, Tensor scale_t, Tensor? zero_t, Tensor? levels, "
    "int bits, int group_size, int planes) -> Tensor",
    lambda *a: _gemv_int8dot_kernel(None, *a),
    _gemv_int8dot_fake,
)


# --- bf16-dot decode (blocks layout) ------------------------------------------------------------
def _blocks_shapes(
    x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int
) -> tuple[int, int, int]:
    """``(M, N, K)`` of a product with a blocks-layout weight, after checking codes, scale and x."""
    if bits not in (2, 4, 8) or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D blocks layout of 2-, 4- or 8-bit codes, got bits={bits}")
    n, k = codes.shape[0], codes.shape[1] * 8 // bits
    if group_size < 1 or k % group_size or group_size % (128 // bits):
        raise ValueError(f"group_size={group_size} does not fit K={k} in {bits}-bit 16-byte blocks")
    m = _check_x(x, k)
    _check("codes", codes, (n, k * bits // 8), torch.uint8)
    _check("scale", scale, (n, k // group_size), torch.float32)
    return m, n, k


def _gemv_shapes(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    sz: torch.Tensor | None,
    lut: torch.Tensor,
    bits: int,
    group_size: int,
) -> tuple[int, int, int]:
    m, n, k = _blocks_shapes(x, codes, scale, bits, group_size)
    _check("sz", sz, (n, k // group_size), torch.float32)
    _check("lut", lut, (32,), torch.int16)
    return m, n, k


def _gemv_kernel(
    lib: ctypes.CDLL | None,
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    sz: torch.Tensor | None,
    lut: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    m, n, k = _gemv_shapes(x, codes, scale, sz, lut, bits, group_size)
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return y
    lib = _require(lib)
    xk = (x.float() if bits == 8 else x.to(torch.bfloat16)).contiguous()
    # the zero-point term uses the same (rounded) x the products see
    xsum = None if sz is None else xk.float().reshape(m, k // group_size, group_size).sum(-1).contiguous()
    rc = lib.qlab_gemv(
        m, n, k, bits, group_size, _ptr(xk), _ptr(xsum), _ptr(codes), _ptr(scale), _ptr(sz), _ptr(lut),
        _ptr(y), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"qlab_gemv rejected shapes M={m} N={n} K={k} bits={bits} g={group_size}")
    return y


def _gemv_fake(x, codes, scale, sz, lut, bits, group_size):  # type: ignore[no-untyped-def]
    m, n, _ = _gemv_shapes(x, codes, scale, sz, lut, bits, group_size)
    return x.new_empty((m, n), dtype=torch.float32)


_GEMV = _define(
    "gemv(Tensor x, Tensor codes, Tensor scale, Tensor? sz, Tensor lut, int bits, int group_size) -> Tensor",
    lambda *a: _gemv_kernel(None, *a),
    _gemv_fake,
)


# --- FP8 decode -----------------------------------------------------------------------------------
def _fp8_shapes(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> tuple[int, int, int]:
    if codes.dim() != 2 or not fits_fp8(codes.shape[1]):
        raise ValueError(f"codes must be e4m3 bytes [N, K] with K a multiple of 32, got {list(codes.shape)}")
    n, k = codes.shape
    m = _check_x(x, k)
    _check("codes", codes, (n, k), torch.uint8)
    _check("scale", scale, (n,), torch.float32)
    return m, n, k


def _fp8_gemv_kernel(
    lib: ctypes.CDLL | None, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    m, n, k = _fp8_shapes(x, codes, scale)
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return y
    lib = _require(lib)
    xb = x.to(torch.bfloat16).contiguous()
    rc = lib.qlab_fp8_gemv(m, n, k, _ptr(xb), _ptr(codes), _ptr(scale), _ptr(y), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"qlab_fp8_gemv rejected M={m} N={n} K={k}")
    return y


def _fp8_gemv_fake(x, codes, scale):  # type: ignore[no-untyped-def]
    m, n, _ = _fp8_shapes(x, codes, scale)
    return x.new_empty((m, n), dtype=torch.float32)


_FP8_GEMV = _define(
    "fp8_gemv(Tensor x, Tensor codes, Tensor scale) -> Tensor",
    lambda *a: _fp8_gemv_kernel(None, *a),
    _fp8_gemv_fake,
)


# --- prefill: bf16 tiles of W times torch's GEMM ------------------------------------------------
def _tiles(
    lib: ctypes.CDLL | None,
    x: torch.Tensor,
    n: int,
    k: int,
    rows: int,
    dequant: Callable[[ctypes.CDLL, int, int, torch.Tensor, int], int],
) -> torch.Tensor:
    """``yᵀ`` block by block: ``dequant(lib, n0, n1, buf, threads)`` writes rows ``[n0, n1)`` of ``W``
    in bf16 to ``buf``, then ``y[:, n0:n1] = x buf[:n1-n0]ᵀ`` (torch's bf16 GEMM, fp32 accumulation)."""
    m = x.shape[0]
    yt = torch.empty(n, m, dtype=torch.bfloat16)  # yᵀ: each block's output rows are contiguous
    if m == 0:
        return yt.t()
    lib = _require(lib)
    xb = x.to(torch.bfloat16).contiguous()
    rows = min(rows, n)
    buf = torch.empty(rows, k, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    for n0 in range(0, n, rows):
        n1 = min(n0 + rows, n)
        if dequant(lib, n0, n1, buf, threads) != 0:
            raise RuntimeError(f"the CPU dequantize kernel rejected rows {n0}:{n1} of N={n} K={k}")
        torch.mm(buf[: n1 - n0], xb.t(), out=yt[n0:n1])
    return yt.t()


def _check_rows(rows: int) -> None:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive integer, got {rows!r}")


def _tiled_fake_out(x: torch.Tensor, m: int, n: int) -> torch.Tensor:
    # the kernel returns yᵀ transposed back: [M, N] with strides (1, M), and the fake must match
    return x.new_empty_strided((m, n), (1, m), dtype=torch.bfloat16)


def _tiled_shapes(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    table: torch.Tensor | None,
    bits: int,
    group_size: int,
    rows: int,
) -> tuple[int, int, int]:
    # the blocks layout of gemv; zero is the zero-point itself here (gemv takes scale * zero)
    if table is not None and bits != 4:
        raise ValueError(f"a codebook table needs 4-bit codes, got bits={bits}")
    _check_rows(rows)
    m, n, k = _blocks_shapes(x, codes, scale, bits, group_size)
    _check("zero", zero, (n, k // group_size), torch.float32)
    _check("table", table, (16,), torch.float32)
    return m, n, k


def _tiled_matmul_kernel(
    lib: ctypes.CDLL | None,
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    table: torch.Tensor | None,
    bits: int,
    group_size: int,
    rows: int,
) -> torch.Tensor:
    _, n, k = _tiled_shapes(x, codes, scale, zero, table, bits, group_size, rows)
    pc, ps, pz, pt = _ptr(codes), _ptr(scale), _ptr(zero), _ptr(table)

    def dequant(lib: ctypes.CDLL, n0: int, n1: int, buf: torch.Tensor, threads: int) -> int:
        return lib.qlab_dequant_bf16(n0, n1, k, bits, group_size, pc, ps, pz, pt, buf.data_ptr(), threads)

    return _tiles(lib, x, n, k, rows, dequant)


def _tiled_matmul_fake(x, codes, scale, zero, table, bits, group_size, rows):  # type: ignore[no-untyped-def]
    m, n, _ = _tiled_shapes(x, codes, scale, zero, table, bits, group_size, rows)
    return _tiled_fake_out(x, m, n)


_TILED_MATMUL = _define(
    "tiled_matmul(Tensor x, Tensor codes, Tensor scale, Tensor? zero, Tensor? table, "
    "int bits, int group_size, int rows) -> Tensor",
    lambda *a: _tiled_matmul_kernel(None, *a),
    _tiled_matmul_fake,
)


def _fp8_tiled_matmul_kernel(
    lib: ctypes.CDLL | None, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, rows: int
) -> torch.Tensor:
    _check_rows(rows)
    _, n, k = _fp8_shapes(x, codes, scale)
    pc, ps = _ptr(codes), _ptr(scale)

    def dequant(lib: ctypes.CDLL, n0: int, n1: int, buf: torch.Tensor, threads: int) -> int:
        return lib.qlab_fp8_dequant_bf16(n0, n1, k, pc, ps, buf.data_ptr(), threads)

    return _tiles(lib, x, n, k, rows, dequant)


def _fp8_tiled_matmul_fake(x, codes, scale, rows):  # type: ignore[no-untyped-def]
    _check_rows(rows)
    m, n, _ = _fp8_shapes(x, codes, scale)
    return _tiled_fake_out(x, m, n)


_FP8_TILED_MATMUL = _define(
    "fp8_tiled_matmul(Tensor x, Tensor codes, Tensor scale, int rows) -> Tensor",
    lambda *a: _fp8_tiled_matmul_kernel(None, *a),
    _fp8_tiled_matmul_fake,
)

#: The operators this module registers (``torch.ops.qlab.<name>``), for tests and tooling.
OPS = ("gemv_int8dot", "gemv", "fp8_gemv", "tiled_matmul", "fp8_tiled_matmul")
