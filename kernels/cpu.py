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
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlab.quantize import per_group

__all__ = [
    "CpuWeight",
    "Fp8Weight",
    "RowsWeight",
    "load",
    "status",
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

SOURCE = Path(__file__).with_name("cpu.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
ABI = 6  # must match QLAB_CPU_ABI in cpu.c
#: Rows of W dequantized per block by :func:`tiled_matmul` (512 x 4096 bf16 = 4 MiB, the L2 of 2 cores).
TILE_ROWS = 512

_lib: ctypes.CDLL | None = None
_status = "not loaded yet"
_P = ctypes.c_void_p
_L = ctypes.c_long


def _cache_root() -> Path:
    env = os.environ.get("QLAB_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "qlab") / "kernels"


def build(out_dir: str | os.PathLike[str] | None = None, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile ``cpu.c`` with ``flags`` into ``out_dir`` (default: the cache) and return the library's path.

    The file name carries a hash of the source, flags and compiler, so a changed source rebuilds and
    concurrent builders (pytest workers) each write a temporary file and rename it into place.
    Raises RuntimeError with the compiler's message when it fails.
    """
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + repr((flags, cc)).encode()).hexdigest()[:16]
    root = Path(out_dir) if out_dir is not None else _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"qlab_cpu_{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.qlab_cpu_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.qlab_cpu_abi()}, expected {ABI}")
    i32 = ctypes.c_int
    # (M, N, K, bits, g, then pointers, threads); see the C signatures
    lib.qlab_gemv.argtypes = [i32, _L, _L, i32, _L] + [_P] * 7 + [i32]
    lib.qlab_gemv_i8.argtypes = [i32, _L, _L, i32, _L, i32] + [_P] * 7 + [i32]
    lib.qlab_dequant_bf16.argtypes = [_L, _L, _L, i32, _L] + [_P] * 5 + [i32]
    lib.qlab_fp8_gemv.argtypes = [i32, _L, _L] + [_P] * 4 + [i32]
    lib.qlab_fp8_dequant_bf16.argtypes = [_L, _L, _L] + [_P] * 3 + [i32]
    for fn in (
        lib.qlab_gemv,
        lib.qlab_gemv_i8,
        lib.qlab_dequant_bf16,
        lib.qlab_fp8_gemv,
        lib.qlab_fp8_dequant_bf16,
    ):
        fn.restype = i32
    return lib


def _load_default() -> None:
    """Build (or find in the cache) and bind the default library, once, when this module is imported.

    At import rather than on the first kernel call, so that ``torch.compile`` never traces into the
    build (a lock, a subprocess, file I/O): Dynamo cannot, and with ``fullgraph=True`` a QuantLinear
    compiled before its first eager call failed there.
    """
    global _lib, _status
    if os.environ.get("QLAB_CPU_KERNELS", "1") == "0":
        _status = "disabled by QLAB_CPU_KERNELS=0"
        return
    try:
        lib = _bind(build())
        feats = [
            f for f, on in (("avx512-bf16", lib.qlab_cpu_bf16()), ("avx512-vnni", lib.qlab_cpu_vnni())) if on
        ]
        _lib, _status = lib, ", ".join(feats) or "portable C"
    except (OSError, RuntimeError) as err:
        _status = f"unavailable: {err}"


def load(path: str | os.PathLike[str] | None = None) -> ctypes.CDLL | None:
    """The compiled kernels (built when this module is first imported), or None where they cannot be
    built or are disabled.

    With ``path``, load that library instead (tests use it for a portable, non-AVX-512 build).
    """
    if path is not None:
        return _bind(Path(path))
    return _lib


def status() -> str:
    """How the CPU kernels stand: the vector extensions compiled in (``"avx512-bf16, avx512-vnni"``),
    ``"portable C"``, or why they are unavailable."""
    return _status


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


def fits_fp8(in_features: int) -> bool:
    """Whether an FP8 weight with this many inputs runs on the kernels (32 codes per vector)."""
    return in_features >= 32 and in_features % 32 == 0


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
    xf = x.float()
    sx = xf.abs().amax(dim=1, keepdim=True) / 127
    t = torch.where(sx > 0, xf / torch.where(sx > 0, sx, torch.ones_like(sx)), torch.zeros_like(xf))
    t = t.clamp(-127, 127)
    q1 = torch.round(t)
    q2 = torch.round((t - q1) * 254).clamp(-127, 127) if planes == 2 else torch.zeros_like(q1)
    return sx, q1.to(torch.int8), q2.to(torch.int8)


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
    activations of :func:`qlab.nn.quantize_tokens_int8`, multiplied exactly with the int8 weights.
    Runs ``torch.ops.qlab.gemv_int8dot``; with ``lib`` (another build of ``cpu.c``) it calls that
    library directly instead.
    """
    args = (x, w.codes, w.scale_t, w.zero_t, w.levels, w.bits, w.group_size, planes)
    return _GEMV_INT8DOT(*args) if lib is None else _gemv_int8dot_kernel(lib, *args)


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


_load_default()
