"""qlab's native CPU kernels (``kernels/cpu.c``): quantized matmul that never builds the float weight.

Each layer's weight is laid out once (the ``prepare*`` functions; :mod:`qlab.nn` caches the result)
and then multiplied by one of:

* :func:`gemv_int8dot` — decode (few rows of ``x``), affine and NF4/FP4 codes in the ``rows16``
  layout: ``x`` split per row into two int8 planes (:func:`split_activations`,
  ``x ≈ sx (q1 + q2/254)``) and code × activation products summed exactly in int32
  (``vpdpbusd``), 16 output rows per vector; with ``planes=1`` it is W8A8::

      y[m, n] = sx Σ_g s[n, g] ((A1 + A2/254) - z[n, g] X[m, g]),   A = Σ_{k∈g} u q

* :func:`gemv` — decode for the "blocks" layout (layers whose rows do not come in 16s) and FP8:
  codes looked up (or e4m3 widened) as bf16 and multiplied with bf16 ``x`` (``vdpbf16ps``);
* :func:`tiled_matmul` — prefill (many rows): dequantizes ``rows`` rows of ``W`` at a time to bf16
  into one reused buffer (sized to stay in cache) and multiplies each block with torch's bf16 GEMM
  (oneDNN; AMX tiles where the CPU has them), so the whole float ``W`` never exists.

The C source is compiled with the system C compiler (``$CC``, else ``cc``) at
``-O3 -march=native -fopenmp`` into ``$QLAB_CACHE/kernels`` (else ``~/.cache/qlab/kernels``), keyed
by a hash of the source and flags, when this module is first imported (not lazily on the first
call: ``torch.compile`` must never trace the build); a later import only loads it.
``QLAB_CPU_KERNELS=0`` turns it off. Where no compiler works, :func:`load` returns None and
:mod:`qlab.nn` keeps its torch paths (the reason is in :func:`status`). It links the OpenMP runtime
torch already loaded (same soname), so it shares torch's threads instead of competing with them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from qlab.affine import quantize_rows_int8
from qlab.tensor import per_group

__all__ = [
    "ABI",
    "FLAGS",
    "OPS",
    "SOURCE",
    "TILE_ROWS",
    "CpuWeight",
    "Fp8Weight",
    "RowsWeight",
    "load",
    "status",
    "features",
    "build",
    "prepare",
    "prepare_rows16",
    "prepare_fp8",
    "split_activations",
    "fits_fp8",
    "fits",
    "fits_rows16",
    "gemv",
    "gemv_int8dot",
    "tiled_matmul",
    "kernel_bits",
]

from qlab.kernels import cpu_native
from qlab.kernels.cpu_library import ABI, FLAGS, SOURCE, build, features, load, load_default, status
from qlab.kernels.cpu_ops import (
    _FP8_GEMV,
    _FP8_TILED_MATMUL,
    _GEMV,
    _GEMV_INT8DOT,
    _TILED_MATMUL,
    OPS,
    TILE_ROWS,
    _check_rows,
    _fp8_gemv_kernel,
    _fp8_tiled_matmul_kernel,
    _gemv_int8dot_kernel,
    _gemv_kernel,
    _tiled_matmul_kernel,
    fits_fp8,
)


def _code_width(bits: int, group_size: int, unit_bytes: int) -> int | None:
    """The width (2, 4 or 8) a layout stores ``bits``-bit codes at, units of ``unit_bytes`` bytes.

    1/3-bit codes are valid 4-bit codes (2-bit too, when groups are too short for 2-bit units);
    5-7 bit codes run at 8. A group must hold whole units of ``unit_bytes * 8 / b`` inputs.
    """
    widths = {8: (8,), 4: (4,), 2: (2, 4)}.get(bits, (4,) if bits < 4 else (8,))
    return next((kb for kb in widths if group_size % (unit_bytes * 8 // kb) == 0), None)


def _check_codes(codes: torch.Tensor) -> tuple[int, int]:
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 2:
        got = (
            f"{codes.dtype} of shape {list(codes.shape)}" if isinstance(codes, torch.Tensor) else type(codes)
        )
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {got}")
    return codes.shape[0], codes.shape[1]


def _pack_slots(slots: torch.Tensor, kb: int) -> torch.Tensor:
    """OR the ``kb``-bit codes of dim -2 (slot ``i`` at bits ``[i kb, (i+1) kb)``) into bytes."""
    slots = slots.to(torch.int32)
    out = torch.zeros_like(slots.select(-2, 0))
    for i in range(slots.shape[-2]):
        out |= slots.select(-2, i) << (i * kb)
    return out.to(torch.uint8)


def kernel_bits(bits: int, group_size: int) -> int | None:
    """The code width the "blocks" layout runs ``bits``-bit codes at, or None (a block: 16 bytes)."""
    return _code_width(bits, group_size, 16)


def fits(bits: int, group_size: int, in_features: int) -> bool:
    """Whether a ``bits``-bit weight with this group size can run on these kernels."""
    return 1 <= bits <= 8 and in_features % group_size == 0 and kernel_bits(bits, group_size) is not None


@dataclass
class CpuWeight:
    """A weight laid out for the kernels: ``codes [N, K*bits/8]`` in 16-byte blocks (see ``cpu.c``).

    ``scale``, ``zero`` (None for codebooks) and ``sz = scale * zero`` are fp32 ``[N, K/g]``; ``lut``
    holds the bf16 value of each code (32 entries), ``table`` the fp32 codebook (or None).
    """

    codes: torch.Tensor
    bits: int
    group_size: int
    scale: torch.Tensor
    zero: torch.Tensor | None
    sz: torch.Tensor | None
    lut: torch.Tensor
    table: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 8 // self.bits

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(
            t for t in (self.codes, self.scale, self.zero, self.sz, self.lut, self.table) if t is not None
        )


def prepare(
    codes: torch.Tensor,
    bits: int,
    group_size: int,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    table: torch.Tensor | None = None,
) -> CpuWeight:
    """Lay out unsigned ``codes [N, K]`` (uint8, values < 2^bits) and their scales for the kernels.

    ``scale``/``zero`` are ``[N or 1, K/g or 1]`` (per-tensor and per-channel broadcast to groups);
    ``zero`` None means no zero-point (codebooks); ``table`` is a 16-entry codebook for 4-bit codes.
    """
    n, k = _check_codes(codes)
    if not fits(bits, group_size, k):
        raise ValueError(
            f"a {bits}-bit weight with group_size={group_size} and in_features={k} "
            "does not fit the CPU kernels (see kernel_bits)"
        )
    kb = kernel_bits(bits, group_size)
    assert kb is not None
    c = 8 // kb
    packed = _pack_slots(codes.reshape(n, k // (16 * c), c, 16), kb)  # [n, blocks, 16]
    groups = k // group_size
    s = per_group(scale, n, groups).contiguous()
    z = None if zero is None else per_group(zero, n, groups).contiguous()
    lut = torch.zeros(32, dtype=torch.float32)
    lut[:16] = torch.arange(16, dtype=torch.float32) if table is None else table.float()
    return CpuWeight(
        codes=packed.reshape(n, -1).contiguous(),
        bits=kb,
        group_size=group_size,
        scale=s,
        zero=z,
        sz=None if z is None else (s * z).contiguous(),
        lut=lut.to(torch.bfloat16).view(torch.int16).contiguous(),
        table=None if table is None else table.float().contiguous(),
    )


@dataclass
class Fp8Weight:
    """An FP8 e4m3 weight for the kernels: its bytes ``codes [N, K]`` (in order) and fp32 ``scale [N]``."""

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.codes, self.scale)


def prepare_fp8(weight: torch.Tensor, scale: torch.Tensor) -> Fp8Weight:
    """Wrap a float8_e4m3fn ``weight [N, K]`` and its row scales ``[N]`` / ``[N, 1]``: ``W = s * weight``."""
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} of shape {list(weight.shape)}"
        )
    n, k = weight.shape
    if not fits_fp8(k):
        raise ValueError(f"in_features must be a positive multiple of 32 for the FP8 kernels, got {k}")
    if scale.numel() != n:
        raise ValueError(f"scale must hold one value per row ({n}), got shape {list(scale.shape)}")
    return Fp8Weight(weight.contiguous().view(torch.uint8), scale.float().reshape(n).contiguous())


# ------------------------------------------------------------------------------------------------
# Decode with integer dot products (affine codes): the "rows16" layout
# ------------------------------------------------------------------------------------------------
def rows16_bits(bits: int, group_size: int) -> int | None:
    """The code width the "rows16" layout runs ``bits``-bit codes at, or None (a chunk: 4 bytes a row)."""
    return _code_width(bits, group_size, 4)


def fits_rows16(bits: int, group_size: int, in_features: int, out_features: int) -> bool:
    """Whether an affine weight can run on :func:`gemv_int8dot` (rows in blocks of 16)."""
    return (
        1 <= bits <= 8
        and out_features % 16 == 0
        and in_features % group_size == 0
        and rows16_bits(bits, group_size) is not None
    )


@dataclass
class RowsWeight:
    """A weight in the rows16 layout: ``codes [N/16, K/KB, 16, 4]`` (see ``cpu.c``).

    ``scale_t`` and ``zero_t`` are fp32 ``[N/16, K/g, 16]``: the scales of 16 rows side by side.
    Codebooks carry ``levels`` (uint8 ``[32]``: ``L1 + 128`` and ``L2 + 128`` with
    ``127 T ≈ L1 + L2 / 254``) and ``scale_t = s / 127``.
    """

    codes: torch.Tensor
    bits: int
    group_size: int
    n: int
    k: int
    scale_t: torch.Tensor
    zero_t: torch.Tensor | None
    levels: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.codes, self.scale_t, self.zero_t, self.levels) if t is not None)


def codebook_levels(table: torch.Tensor) -> torch.Tensor:
    """uint8 ``[32]``: ``L1 + 128`` then ``L2 + 128``, with ``127 T ≈ L1 + L2 / 254`` (within 1/508)."""
    t = table.double() * 127
    if table.numel() != 16 or t.abs().max() > 127:
        raise ValueError(f"table must hold 16 values in [-1, 1], got {table.numel()} values")
    l1 = torch.round(t)
    l2 = torch.round((t - l1) * 254).clamp(-127, 127)
    return (torch.cat([l1, l2]) + 128).to(torch.uint8)


def prepare_rows16(
    codes: torch.Tensor,
    bits: int,
    group_size: int,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    table: torch.Tensor | None = None,
) -> RowsWeight:
    """Lay out unsigned ``codes [N, K]`` and their scales/zeros (or 4-bit codebook) for :func:`gemv_int8dot`.

    Byte ``t`` of row ``j`` in a chunk holds, at bits ``[i b, (i+1) b)``, the code of input
    ``k0 + 4 i + t``: masking slot ``i`` gives each 32-bit lane 4 consecutive inputs of its row.
    """
    n, k = _check_codes(codes)
    if not fits_rows16(bits, group_size, k, n):
        raise ValueError(
            f"a {bits}-bit [{n}, {k}] weight with group_size={group_size} does not fit the int8-dot "
            "kernel (out_features must be a multiple of 16; see rows16_bits)"
        )
    if table is not None and bits != 4:
        raise ValueError(f"a codebook needs 4-bit codes, got bits={bits}")
    kb = rows16_bits(bits, group_size)
    assert kb is not None
    c = 8 // kb
    # [row block, chunk, row, slot, byte]: slot i of byte t is input k0 + 4 i + t
    packed = _pack_slots(codes.reshape(n // 16, 16, k // (4 * c), c, 4).permute(0, 2, 1, 3, 4), kb)
    groups = k // group_size

    def transposed(t: torch.Tensor) -> torch.Tensor:
        return per_group(t, n, groups).reshape(n // 16, 16, groups).transpose(1, 2).contiguous()

    return RowsWeight(
        codes=packed.contiguous(),
        bits=kb,
        group_size=group_size,
        n=n,
        k=k,
        scale_t=transposed(scale) if table is None else transposed(scale) / 127,
        zero_t=None if zero is None or table is not None else transposed(zero),
        levels=None if table is None else codebook_levels(table),
    )


def split_activations(x: torch.Tensor, planes: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation split of :func:`gemv_int8dot`, in plain torch: ``x ≈ sx (q1 + q2 / 254)`` per row.

    ``sx = max|x| / 127`` (``[M, 1]`` fp32), ``q1 = round(x / sx)``, ``q2 = round(254 (x / sx - q1))``
    (int8, ``|q| <= 127``; ``q2 = 0`` for ``planes=1``, which is W8A8's per-token int8). Rounding is
    half-to-even, all in fp32, as the C kernel computes it; an all-zero row gives ``sx = 0`` and zeros.
    """
    if planes not in (1, 2):
        raise ValueError(f"planes must be 1 or 2, got {planes!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D float tensor [M, K], got {getattr(x, 'shape', type(x).__name__)}")
    if planes == 1:  # W8A8's per-token int8: the one definition qlab.affine holds
        q, s = quantize_rows_int8(x)
        sx = torch.where(q.abs().amax(dim=1, keepdim=True) > 0, s, torch.zeros_like(s))
        return sx, q, torch.zeros_like(q)
    xf = x.float()
    sx = xf.abs().amax(dim=1, keepdim=True) / 127
    t = torch.where(sx > 0, xf / torch.where(sx > 0, sx, torch.ones_like(sx)), torch.zeros_like(xf))
    t = t.clamp(-127, 127)
    q1 = torch.round(t)
    q2 = torch.round((t - q1) * 254).clamp(-127, 127)
    return sx, q1.to(torch.int8), q2.to(torch.int8)


# --- the public functions: unpack a prepared weight, call the operator ----------------------------
def gemv_int8dot(
    x: torch.Tensor, w: RowsWeight, planes: int = 2, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """``y = x Wᵀ`` (fp32 ``[M, N]``) for affine or codebook codes, ``x`` split into two int8 planes per row.

    ``x ≈ sx (q1 + q2 / 254)`` (``sx = max|x| / 127``; every element within ``sx / 508``) and
    ``Σ u q`` sums exactly in int32 (``vpdpbusd``), so the only roundings are that split and the
    final fp32 scaling::

        y[m, n] = sx Σ_g s[n, g] ((A1 + A2/254) - z[n, g] X[m, g]),   A = Σ_{k∈g} u q

    A row of ``x`` holding an inf or a nan gives a row of NaN.

    ``planes=1`` (8-bit codes only) is W8A8: one plane, ``q1 = round(x / sx)``, the per-token int8
    activations of :func:`qlab.affine.quantize_rows_int8`, multiplied exactly with the int8 weights.
    Runs ``torch.ops.qlab.gemv_int8dot``, or ``torch.ops.qlab.gemv_int8dot_native`` within
    :func:`qlab.kernels.cpu_native.preferred`; with ``lib`` (another build of ``cpu.c``) it
    calls that library directly instead.
    """
    args = (x, w.codes, w.scale_t, w.zero_t, w.levels, w.bits, w.group_size, planes)
    if lib is not None:
        return _gemv_int8dot_kernel(lib, *args)
    # in a cpu_native.preferred() block (qlab.aot's export), the C++ operator: same kernel and checks
    return torch.ops.qlab.gemv_int8dot_native(*args) if cpu_native.active() else _GEMV_INT8DOT(*args)


def gemv(x: torch.Tensor, w: CpuWeight | Fp8Weight, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """``y = x Wᵀ`` (fp32 ``[M, N]``) for ``x [M, K]`` on the CPU: the bf16-dot decode kernel.

    Per row, with the zero-point out of the inner loop (``v = lut[u]``: the code, or its codebook
    value, in bf16; ``x`` in bf16, fp32 for 8-bit codes)::

        y[m, n] = Σ_g s[n, g] (x[m, g] · v[n, g]) - s[n, g] z[n, g] Σ x[m, g]

    FP8 weights: ``y[m, n] = s[n] (bf16(x[m]) · e4m3(w[n]))``. Runs ``torch.ops.qlab.gemv`` /
    ``torch.ops.qlab.fp8_gemv``; with ``lib`` it calls that library directly instead.
    """
    if isinstance(w, Fp8Weight):
        return _FP8_GEMV(x, w.codes, w.scale) if lib is None else _fp8_gemv_kernel(lib, x, w.codes, w.scale)
    args = (x, w.codes, w.scale, w.sz, w.lut, w.bits, w.group_size)
    return _GEMV(*args) if lib is None else _gemv_kernel(lib, *args)


def tiled_matmul(
    x: torch.Tensor, w: CpuWeight | Fp8Weight, rows: int = TILE_ROWS, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """``y = x Wᵀ`` (bf16 ``[M, N]``, fp32 accumulation inside the GEMM), ``rows`` rows of ``W`` at a time.

    Each block ``W[n0:n1] = bf16(s (u - z))`` (or ``bf16(s T[u])``, ``bf16(s e4m3)``) is written to one
    reused buffer and multiplied by torch's bf16 GEMM, so the float ``W`` never exists whole. The
    result is a transposed view (strides ``(1, M)``). Runs ``torch.ops.qlab.tiled_matmul`` /
    ``torch.ops.qlab.fp8_tiled_matmul``; with ``lib`` it calls that library directly instead.
    """
    _check_rows(rows)
    if isinstance(w, Fp8Weight):
        fargs = (x, w.codes, w.scale, rows)
        return _FP8_TILED_MATMUL(*fargs) if lib is None else _fp8_tiled_matmul_kernel(lib, *fargs)
    args = (x, w.codes, w.scale, w.zero, w.table, w.bits, w.group_size, rows)
    return _TILED_MATMUL(*args) if lib is None else _tiled_matmul_kernel(lib, *args)


load_default()
