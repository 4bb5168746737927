"""Forward dispatch of :class:`~qlab.nn.QuantLinear`: the one place that decides how a layer multiplies.

Every path is a row of :data:`PATH_TABLE`: a name, whether a layer can take it (``fits``), and the
implementation. :func:`select_path` picks one for a layer and an input; :func:`use_path` forces any
of them by name (tests check every path against the reference on every machine). The thresholds
between paths are named once, here:

=====================  ==========================================================================
path                   what it does
=====================  ==========================================================================
``reference``          dequantize to fp32, then ``F.linear`` (differentiable; any device)
``triton``             CUDA: ``qlab.kernels.dequant_matmul``, fused dequantize-matmul (never a float ``W``)
``cpu_int8dot``        qlab's C kernel, decode (rows < :data:`CPU_INT8DOT_MAX_ROWS`): ``x`` split into
                       two int8 planes ``x ≈ sx (q1 + q2/254)``, products summed exactly in int32
                       (``vpdpbusd``), 16 output rows per vector; W8A8 with one plane of ``x``
``cpu_gemv``           qlab's C kernel: codes looked up as bf16 times bf16 ``x`` (``vdpbf16ps``); FP8 and
                       layers whose rows do not come in blocks of 16, below :data:`CPU_TILED_MIN_ROWS`
``cpu_tiled``          qlab's C kernel, prefill: 512 rows of ``W`` at a time dequantized to bf16 into one
                       cache-sized buffer, multiplied by torch's bf16 GEMM (oneDNN, AMX)
``torch_int4``         torch's ``_weight_int4pack_mm_for_cpu`` for 1- to 4-bit affine codes
``torch_int8``         torch's ``_weight_int8pack_mm`` once per group, plus a rank-one zero-point term;
                       codebooks through their int8 table levels; W8A8 where ``torch._int_mm`` is
                       slow (its int8 activations as exact fp32 integers, fp32 sums)
``torch_int_mm``       W8A8: ``torch._int_mm``, a true int8 x int8 -> int32 product
``torch_fp8_bf16``     FP8 weights widened to bf16 (exact: e4m3 is a subset of bf16) and scaled
=====================  ==========================================================================

On CPU without a C compiler (or with ``QLAB_CPU_KERNELS=0``) the ``cpu_*`` paths do not fit and the
``torch_*`` ones run. Where the C kernels lack the instructions they are built around (AVX512-VNNI for
``cpu_int8dot``, AVX512-BF16 for ``cpu_gemv`` and ``cpu_tiled``: :func:`cpu_kernel_speedups`), they still
fit, but :func:`select_path` prefers torch's ops, which are faster there (FP8 excepted: torch's FP8 path is
slower still); and on a CPU without AVX-512 at all, long prompts (:data:`CPU_DEQUANT_MIN_ROWS`) dequantize
to fp32 for one fp32 GEMM, the ``reference`` path. The fast paths agree with the reference within bf16
arithmetic: a relative (Frobenius) output error below :data:`FAST_PATH_RTOL`. Their converted weights are
cached on the layer (``layer._cache``, built on first use, dropped by ``.to()`` and state loading): derived
data, never saved. Before ``torch.compile``, call :func:`prepare` on the model: it builds those caches
eagerly, so the compiled graph only reads them (built inside a graph, they would be traced, and the first
call after it would recompile on the changed cache).

This module knows a layer only by its tensors and spec (``qweight``, ``scale``, ``zero``, ``codebook``,
``spec``, ``mode``, shapes); it does not import the layer class, which calls it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from qlab.affine import quantize_rows_int8
from qlab.packing import unpack
from qlab.scaled_floats import BLOCK_SCALED_MODES
from qlab.tensor import per_group

#: Rows of ``x`` from which CPU weight-only layers dequantize-in-tiles for a bf16 GEMM (measured
#: crossover on a 2-core AVX-512/AMX machine, ``benchmarks/bench_linear.py``).
CPU_TILED_MIN_ROWS = 8
#: Rows of ``x`` below which affine layers take the int8-dot decode kernel instead (same benchmark).
CPU_INT8DOT_MAX_ROWS = 12
#: The same for W8A8 layers, whose alternative is torch._int_mm (AMX int8), not bf16 tiles.
CPU_W8A8_DOT_MAX_ROWS = 6
#: Rows of ``x`` below which W8A8 layers without fast ``torch._int_mm`` use torch's ``_weight_int8pack_mm``
#: on fp32 integer activations, and from which one fp32 GEMM on the widened weight (measured on an
#: AVX2-only CPU, 4096x4096: 13 vs 69 ms at one row, 160 vs 50 ms at eight).
W8A8_INT8PACK_MAX_ROWS = 4
#: Rows of ``x`` from which weight-only layers on a CPU without AVX-512 (torch's dispatch level AVX2 or
#: lower) dequantize to fp32 and run one fp32 GEMM (the ``reference`` path) instead of torch's int4/int8
#: ops: without bf16 or int8 matrix instructions those ops fall behind plain fp32 as rows grow. Measured
#: on an AVX2-only 2-core EPYC, SmolLM2's four layer shapes summed: 24.5 vs 25.2 ms at 256 rows, 31.7 vs
#: 55.2 ms at 512 (int4 g64), 12.7 vs 21.1 ms at 128.
CPU_DEQUANT_MIN_ROWS = 256
#: Relative Frobenius error the fast paths stay under, against the fp32 reference (bf16 arithmetic).
FAST_PATH_RTOL = 1e-2
#: Group sizes torch's int4 CPU op accepts.
INT4_OP_GROUPS = (32, 64, 128, 256)
#: Input dtypes the fast paths take; others run the reference.
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Layer = Any  # a qlab.nn.QuantLinear; typed loosely so that this module need not import it

_state = threading.local()


# ----------------------------------------------------------------------------------------------
# What the machine offers
# ----------------------------------------------------------------------------------------------
def _kernels() -> Any:
    """``qlab.kernels`` when it can run on CUDA here, else None (guarded: triton may be missing)."""
    try:
        import qlab.kernels as kernels
    except Exception:  # triton missing or broken: the torch paths still work
        return None
    ok = getattr(kernels, "available", None)
    return kernels if ok is not None and ok("cuda") else None


def _cpu_kernels() -> Any:
    """``qlab.kernels.cpu`` when its C library is built and loaded here, else None."""
    try:
        from qlab.kernels import cpu
    except Exception:  # a broken install keeps the torch paths
        return None
    return cpu if cpu.load() is not None else None


def cpu_kernel_speedups() -> tuple[bool, bool]:
    """``(bf16, int8)``: whether qlab's C kernels here carry the instructions their speed rests on.

    ``bf16``: AVX512-BF16, for the bf16-dot decode kernel and the bf16 tiles (whose torch GEMM is fast
    only where the CPU multiplies bf16 natively). ``int8``: AVX512-VNNI, for the int8-dot kernel. A
    portable build (an AVX2-only CPU, as in most laptops) is correct but slow: measured on one, 4096x4096,
    2 threads, its decode kernels took 12-35 ms where torch's int4 op took 1.6 ms and fp32 ``F.linear``
    3.5 ms, and its tiles 105 ms at 64 rows against 33 ms and 22 ms. :func:`select_path` then skips them
    (``use_path`` still runs them).
    """
    cpu = _cpu_kernels()
    if cpu is None:
        return False, False
    feats = cpu.features()
    return "avx512-bf16" in feats, "avx512-vnni" in feats


def _avx2_or_lower() -> bool:
    """Whether torch runs this CPU at AVX2 or below (no AVX-512). There ``torch._int_mm`` has no int8
    dot-product instructions to use (2.6 s for 64x4096x4096 on an AVX2-only CPU, 120x fp32 ``F.linear``),
    and long prompts run faster in fp32 (:data:`CPU_DEQUANT_MIN_ROWS`)."""
    return torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2")


def cache_tensors(cache: Any) -> Iterator[torch.Tensor]:
    """The tensors held in a layer's path cache (nested in tuples, lists, dicts and CPU weights too)."""
    if isinstance(cache, torch.Tensor):
        yield cache
    elif hasattr(cache, "tensors"):  # a qlab.kernels.cpu.CpuWeight
        for t in cache.tensors():
            yield from cache_tensors(t)
    elif isinstance(cache, dict):
        for v in cache.values():
            yield from cache_tensors(v)
    elif isinstance(cache, (tuple, list)):
        for v in cache:
            yield from cache_tensors(v)


def cache_nbytes(cache: Any) -> int:
    """Bytes of the converted weights held in a layer's path cache (nested tuples and lists too)."""
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


#: The scale a float-zero block with ``scale = 0`` (every value equal to its offset ``m``) takes in
#: the integer zero domain: ``s' = 2^-64``, ``z' = -m / s'``, so ``s' (q - z') = m + 2^-64 q``.
TINY_SCALE = 2.0**-64


def _scale_zero(layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's scales and the zero-point of its stored (unsigned) codes, ``w = s (u - z)``: ``zero``,
    ``2^(bits-1)`` for symmetric codes (stored offset by it), or None for codebooks.

    Every fast path computes ``s (u - z)``. A float-zero-domain layer (``w = s u + m``) is handed to
    them as ``z = -m / s`` (fp32, one rounding of ``m``: far below the paths' bf16 error), with
    :data:`TINY_SCALE` standing in for a zero scale. MXFP4 / NVFP4 layers (scale bytes) are handed over
    as an FP4 codebook layer: ``e2m1(q) * s = (6 s) * fp4_table[q]``.
    """
    if layer.mode in BLOCK_SCALED_MODES:
        # e2m1 values are 6x the FP4 table's: the paths see an FP4 codebook layer with fp32 scales 6 s.
        return layer.block_scales() * 6, None
    if layer.zero is not None and layer.spec.float_zero:
        s, m = layer.scale.float(), layer.zero.float()
        s = torch.where(s == 0, torch.full_like(s, TINY_SCALE), s)
        return s, -m / s
    if layer.zero is not None or layer.codebook is not None:
        return layer.scale, layer.zero
    return layer.scale, torch.full((1, 1), 2.0 ** (layer.spec.bits - 1))


def _codebook_int8_planes(table: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """Integer levels and divisors with ``table = Σ L_i / R_i``: one plane, exact, when ``12 t`` are
    integers (FP4); otherwise two, ``127 t ≈ L1 + L2/254`` (NF4: within ``1/(127·508)`` of a table value,
    as the C kernels split it)."""
    t = table.double()
    if torch.equal(t * 12, (t * 12).round()):
        return [((t * 12).round().to(torch.int8), 12.0)]
    l1 = (t * 127).round()
    l2 = ((t * 127 - l1) * 254).round()
    return [(l1.to(torch.int8), 127.0), (l2.to(torch.int8), 127.0 * 254)]


# ----------------------------------------------------------------------------------------------
# Which paths a layer fits (fixed by spec and shape: cached)
# ----------------------------------------------------------------------------------------------
def _int4_group(layer: Layer) -> int | None:
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


def _cpu_fit(layer: Layer) -> tuple[bool, bool]:
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


# ----------------------------------------------------------------------------------------------
# Implementations: (layer, x2 [rows, in]) -> [rows, out]
# ----------------------------------------------------------------------------------------------
def _reference_forward(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Dequantize to fp32, then ``F.linear`` in fp32 (differentiable in ``x``)."""
    bias = None if layer.bias is None else layer.bias.float()
    if layer.mode == "w8a8":
        lead = x.shape[:-1]
        y = _w8a8_forward(layer, x.reshape(-1, layer.in_features), "float")
        y = y.reshape(*lead, layer.out_features)
        return y if bias is None else y + bias
    return F.linear(x.float(), layer.dequantize(torch.float32), bias)


def _w8a8_codes(layer: Layer) -> torch.Tensor:
    """A W8A8 layer's weight as signed int8 ``[N, K]`` (stored offset by 128)."""
    return (unpack(layer.qweight, 8, layer.in_features).to(torch.int16) - 128).to(torch.int8)


def _w8a8_forward(
    layer: Layer, x2: torch.Tensor, how: Literal["float", "int_mm", "int8pack"]
) -> torch.Tensor:
    """``y = (qx qwᵀ) ⊙ sx ⊙ sw`` on per-token int8 activations ``qx``, the integer products formed by
    ``how``: ``"int_mm"``, torch's exact int8 x int8 -> int32 ``_int_mm``; ``"int8pack"``, for CPUs where
    that is slow, ``qx`` as exact fp32 integers with fp32 sums (torch's ``_weight_int8pack_mm`` below
    :data:`W8A8_INT8PACK_MAX_ROWS` rows, one fp32 GEMM on the widened weight from there, where that op's
    fp32 route is slower); ``"float"``, the reference: fp32 codes from the layer, nothing cached."""
    qx, sx = quantize_rows_int8(x2)
    sw = layer.scale.float().reshape(1, -1)
    if how == "int_mm":
        wt = layer._cache.get("int_mm")
        if wt is None:
            wt = layer._cache["int_mm"] = _w8a8_codes(layer).t().contiguous()  # [K, N] as _int_mm wants
        acc = torch._int_mm(qx, wt).float()
    elif how == "int8pack":
        entry = layer._cache.get("int8_w8a8")
        if entry is None:
            qw = _w8a8_codes(layer).contiguous()
            entry = layer._cache["int8_w8a8"] = (qw, torch.ones(qw.shape[0]))  # unit scales: sw comes after
        qw, ones = entry
        if x2.shape[0] < W8A8_INT8PACK_MAX_ROWS:
            acc = torch.ops.aten._weight_int8pack_mm(qx.float(), qw, ones)
        else:
            acc = F.linear(qx.float(), qw.float())
    else:
        codes = layer.quantized_tensor().codes.float()
        acc = qx.float() @ codes.t()
    return acc * sx * sw


def _cpu_weight(layer: Layer, layout: Literal["blocks", "rows16"] = "blocks") -> Any:
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
            entry = prepare(codes, bits, layer.group_size, *_scale_zero(layer), layer.codebook)
        layer._cache[key] = entry
    return entry


def _int4_forward(layer: Layer, x2: torch.Tensor) -> torch.Tensor:
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
        scale, zero = _scale_zero(layer)
        s = per_group(scale, n, groups)
        z = per_group(zero, n, groups)
        sz = torch.stack([s, s * (8 - shift - z)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        entry = (packed, sz, g)
        layer._cache["int4"] = entry
    packed, sz, g = entry
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, g, sz)


def _int8_groups_forward(layer: Layer, x2: torch.Tensor) -> torch.Tensor:
    """``y = Σ_g s_g ⊙ (x_g c_gᵀ) + (Σ_{k∈g} x_k) s_g (o - zero_g)`` with int8 codes ``c = u - o``.

    One ``_weight_int8pack_mm`` per group of inputs (one call for per-channel); the second term is a
    small ``[M, G] x [G, N]`` product that puts the zero-point back. The codes are centred,
    ``o = 2^(b-1)``, so that the zero term stays small: the op returns bf16, and a large term that the
    zero-point cancels would lose the output's digits. Codebooks use the table's int8 levels,
    ``c = L[u]`` with scale ``s / R`` (no zero term), in two planes where one int8 level is too coarse.
    """
    entry = layer._cache.get("int8")
    n, k = layer.out_features, layer.in_features
    if entry is None:
        u = unpack(layer.qweight, layer.spec.bits, k)
        groups = layer.scale.shape[1]
        scale, zero = _scale_zero(layer)
        s = per_group(scale, n, groups)
        g = k // groups
        corr = None
        if layer.codebook is not None:
            parts = [
                (lv.to(u.device)[u.long()], s / r) for lv, r in _codebook_int8_planes(layer.codebook.cpu())
            ]
        else:
            o = 2 ** (layer.spec.bits - 1)
            parts = [((u.to(torch.int16) - o).to(torch.int8), s)]
            z = per_group(zero, n, groups)
            if bool((z != o).any()):
                corr = (s * (o - z)).t().contiguous()  # [G, N]
        planes = [
            (
                c.reshape(n, groups, g).transpose(0, 1).contiguous(),  # [G, N, g]
                sc.t().contiguous().to(torch.bfloat16),  # [G, N]
            )
            for c, sc in parts
        ]
        entry = (planes, corr)
        layer._cache["int8"] = entry
    planes, corr = entry
    groups, g = planes[0][0].shape[0], planes[0][0].shape[2]
    xb = x2.to(torch.bfloat16)
    y = torch.zeros(x2.shape[0], n, dtype=torch.float32, device=x2.device)
    for i in range(groups):
        xi = xb.contiguous() if groups == 1 else xb[:, i * g : (i + 1) * g].contiguous()
        for cg, sg in planes:
            y += torch.ops.aten._weight_int8pack_mm(xi, cg[i], sg[i]).float()
    if corr is not None:
        y += x2.float().reshape(-1, groups, g).sum(dim=-1) @ corr
    return y


def _triton_forward(layer: Layer, x2: torch.Tensor) -> torch.Tensor:
    kernels = _kernels()
    assert kernels is not None
    n, k = layer.out_features, layer.in_features
    # symmetric layers pass zero=None (the kernel knows their offset); float zeros as integer-domain ones
    scaled = layer.spec.float_zero or layer.mode in BLOCK_SCALED_MODES
    scale, zero = _scale_zero(layer) if scaled else (layer.scale, layer.zero)
    scale = scale if scale.shape[0] == n else scale.expand(n, -1).contiguous()
    if zero is not None and zero.shape[0] != n:
        zero = zero.expand(n, -1).contiguous()
    return kernels.dequant_matmul(
        x2, layer.qweight, scale, zero, bits=layer.spec.bits, group_size=layer.group_size, n=n, k=k,
        codebook=layer.codebook,
    )  # fmt: skip


def _fp8_bf16_forward(layer: Layer, x2: torch.Tensor) -> torch.Tensor:
    w = layer.qweight.to(torch.bfloat16) * layer.scale.to(torch.bfloat16)
    return F.linear(x2.to(torch.bfloat16), w)


def _cpu_int8dot_forward(layer: Layer, x2: torch.Tensor) -> torch.Tensor:
    planes = 1 if layer.mode == "w8a8" else 2
    return _cpu_kernels().gemv_int8dot(x2, _cpu_weight(layer, "rows16"), planes=planes)


def _cpu_gemv_forward(layer: Layer, x2: torch.Tensor) -> torch.Tensor:
    return _cpu_kernels().gemv(x2, _cpu_weight(layer))


def _cpu_tiled_forward(layer: Layer, x2: torch.Tensor) -> torch.Tensor:
    return _cpu_kernels().tiled_matmul(x2, _cpu_weight(layer))


def _int_mm_forward(layer: Layer, x2: torch.Tensor) -> torch.Tensor:
    return _w8a8_forward(layer, x2, "int_mm")


def _torch_int8_forward(layer: Layer, x2: torch.Tensor) -> torch.Tensor:
    if layer.mode == "w8a8":
        return _w8a8_forward(layer, x2, "int8pack")
    return _int8_groups_forward(layer, x2)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Path:
    """One forward path: ``fits(layer, x)`` says whether it can run this layer on this input;
    ``run(layer, x2)`` computes ``x2 Ŵᵀ`` for ``x2`` of shape ``[rows, in]`` (no bias, no input scale)."""

    name: str
    fits: Callable[[Layer, torch.Tensor], bool]
    run: Callable[[Layer, torch.Tensor], torch.Tensor]
    doc: str


def _on_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def _weight_mode(layer: Layer) -> bool:
    """Weight-only layers: integer or codebook codes, MXFP4 and NVFP4 (an FP4 codebook to the paths)."""
    return layer.mode == "weight" or layer.mode in BLOCK_SCALED_MODES


def _int8pack_fits(layer: Layer) -> bool:
    """torch's CPU ``_weight_int8pack_mm`` (torch 2.13) reads past the row when the reduction width is not
    a multiple of 16: garbage at K = 8, 24, 40, a segfault below 8. So each group of inputs must be."""
    if not _weight_mode(layer) and layer.mode != "w8a8":
        return False
    groups = layer.scale.shape[1] if layer.scale.dim() == 2 else 1
    return layer.in_features % groups == 0 and (layer.in_features // groups) % 16 == 0


PATH_TABLE: dict[str, Path] = {
    p.name: p
    for p in (
        Path("reference", lambda layer, x: True, None, "dequantize to fp32, then F.linear"),  # type: ignore[arg-type]
        Path(
            "triton",
            lambda layer, x: x.device.type == "cuda" and _weight_mode(layer) and layer.spec.bits != 3
            and _kernels() is not None,
            _triton_forward,
            "fused dequantize-matmul Triton kernel (CUDA)",
        ),
        Path(
            "cpu_int8dot", lambda layer, x: _on_cpu(x) and _cpu_fit(layer)[1], _cpu_int8dot_forward,
            "C kernel: int8 planes of x times codes, exact int32 sums (decode)",
        ),
        Path(
            "cpu_gemv",
            lambda layer, x: _on_cpu(x) and layer.mode != "w8a8" and _cpu_fit(layer)[0],
            _cpu_gemv_forward,
            "C kernel: bf16 dot products of looked-up codes (decode)",
        ),
        Path(
            "cpu_tiled",
            lambda layer, x: _on_cpu(x) and layer.mode != "w8a8" and _cpu_fit(layer)[0],
            _cpu_tiled_forward,
            "C kernel: bf16 tiles of W times x in torch's bf16 GEMM (prefill)",
        ),
        Path(
            "torch_int4",
            lambda layer, x: _on_cpu(x) and _int4_group(layer) is not None,
            _int4_forward,
            "torch._weight_int4pack_mm_for_cpu",
        ),
        Path(
            "torch_int8", lambda layer, x: _on_cpu(x) and _int8pack_fits(layer), _torch_int8_forward,
            "torch._weight_int8pack_mm per group + zero-point term",
        ),
        Path(
            "torch_int_mm", lambda layer, x: _on_cpu(x) and layer.mode == "w8a8", _int_mm_forward,
            "torch._int_mm on per-token int8 activations (W8A8)",
        ),
        Path(
            "torch_fp8_bf16", lambda layer, x: layer.mode == "fp8", _fp8_bf16_forward,
            "FP8 widened to bf16, scaled, F.linear",
        ),
    )
}  # fmt: skip
#: Every forward path, by name.
PATHS: tuple[str, ...] = tuple(PATH_TABLE)


@contextlib.contextmanager
def use_path(path: str) -> Iterator[None]:
    """Force every :class:`~qlab.nn.QuantLinear` in this thread to take ``path`` (a name from
    :data:`PATHS`), or ``"auto"`` to let :func:`select_path` choose.

    A forced path that cannot run a layer raises a ValueError naming both. Inputs that need a gradient
    still take the reference (the fused ops have no backward).
    """
    if path != "auto" and path not in PATH_TABLE:
        raise ValueError(f"path must be 'auto' or one of {PATHS}, got {path!r}")
    old = getattr(_state, "forced", None)
    _state.forced = None if path == "auto" else path
    try:
        yield
    finally:
        _state.forced = old


def forced_path() -> str | None:
    """The path :func:`use_path` forces in this thread, or None."""
    return getattr(_state, "forced", None)


def select_path(layer: Layer, x: torch.Tensor) -> str:
    """Which forward path ``layer`` takes for input ``x`` (a key of :data:`PATH_TABLE`)."""
    if x.requires_grad and torch.is_grad_enabled():
        return "reference"  # the fused ops have no backward
    forced = forced_path()
    if forced is not None:
        if not PATH_TABLE[forced].fits(layer, x):
            raise ValueError(
                f"use_path({forced!r}) cannot run this layer ({layer.describe()}, "
                f"{layer.out_features}x{layer.in_features}) on a {x.device.type} {x.dtype} input"
            )
        return forced
    if x.dtype not in FAST_DTYPES:
        return "reference"
    if x.device.type == "cuda":
        return "triton" if PATH_TABLE["triton"].fits(layer, x) else "reference"
    if x.device.type != "cpu":
        return "reference"
    tiles, rows16 = _cpu_fit(layer)
    bf16_fast, int8_fast = cpu_kernel_speedups()
    rows = x.numel() // layer.in_features
    if layer.mode == "w8a8":  # one int8 plane of x: the same integers as torch._int_mm, faster at decode
        if rows16 and int8_fast and rows < CPU_W8A8_DOT_MAX_ROWS:
            return "cpu_int8dot"
        return "torch_int8" if _avx2_or_lower() and _int8pack_fits(layer) else "torch_int_mm"
    if rows16 and int8_fast and rows < CPU_INT8DOT_MAX_ROWS:
        return "cpu_int8dot"
    # FP8 keeps the C kernels even without BF16: torch's FP8 path widens all of W every call, slower still
    # (measured on the AVX2 CPU above: 85 ms at one row, against the portable kernel's 23 ms)
    if tiles and (bf16_fast or layer.mode == "fp8"):
        return "cpu_tiled" if rows >= (CPU_INT8DOT_MAX_ROWS if rows16 else CPU_TILED_MIN_ROWS) else "cpu_gemv"
    if layer.mode == "fp8":
        return "torch_fp8_bf16"
    if rows >= CPU_DEQUANT_MIN_ROWS and _weight_mode(layer) and _avx2_or_lower():
        return "reference"
    if _int4_group(layer) is not None:
        return "torch_int4"
    return "torch_int8" if _int8pack_fits(layer) else "reference"


#: Input rows :func:`prepare` builds caches for by default: one token (decode) and a prompt (prefill).
PREPARE_ROWS: tuple[int, ...] = (1, 64)


def _is_layer(module: Any) -> bool:
    """A module this dispatch runs (a QuantLinear, known by its buffers and path cache)."""
    return hasattr(module, "_cache") and hasattr(module, "qweight") and hasattr(module, "spec")


def converted_tensors(module: Any) -> list[torch.Tensor]:
    """Every tensor the path caches of the layers in ``module`` hold (what :func:`prepare` built), each
    once, in module order. Compiled code reads them as constants: ``qlab.generate``'s ahead-of-time
    step names them so that it can share them with the model instead of copying them."""
    seen: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        if _is_layer(sub):
            for t in cache_tensors(sub._cache):
                seen.setdefault(id(t), t)
    return list(seen.values())


@torch.no_grad()
def prepare(module: Any, paths: Iterable[str] | None = None) -> Any:
    """Build now, eagerly, the converted weights a layer's fast paths cache; return ``module``.

    ``module`` is a :class:`~qlab.nn.QuantLinear` or any module holding some (a whole model: every
    layer inside is prepared once). ``paths`` defaults to the paths :func:`select_path` picks here
    for :data:`PREPARE_ROWS` rows of input, plus the one :func:`use_path` forces, if any. Each path
    runs once on a row of zeros, which builds exactly what that path reads.

    Why: ``torch.compile`` of a layer with cold caches traces the conversion into its graph and
    recompiles on the next call (Dynamo guards on the cache's keys), and some conversions branch on
    tensor values, which ``fullgraph=True`` cannot trace. Prepared, the compiled graph only reads the
    cache. A layer whose weights change later (``.to()``, state loading) drops its cache: prepare it
    again before compiling again.
    """
    if not _is_layer(module):
        seen: set[int] = set()
        for sub in module.modules():
            if _is_layer(sub) and id(sub) not in seen:
                seen.add(id(sub))
                prepare(sub, paths)
        return module
    layer = module
    device = layer.qweight.device
    if paths is None:
        wanted = {select_path(layer, torch.zeros(r, layer.in_features, device=device)) for r in PREPARE_ROWS}
        forced = forced_path()
        if forced is not None:
            wanted.add(forced)
    else:
        wanted = set(paths)
    for path in sorted(wanted):
        if path not in PATH_TABLE:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if path != "reference":
            run(layer, torch.zeros(1, layer.in_features, device=device), path)
    return layer


def run(layer: Layer, x: torch.Tensor, path: str) -> torch.Tensor:
    """``layer(x)`` along ``path``: input scale, the path's product, bias, back to ``x``'s dtype."""
    if layer.input_scale is not None:
        x = x / layer.input_scale.to(x.dtype)
    if path == "reference":
        return _reference_forward(layer, x).to(x.dtype)
    impl = PATH_TABLE[path].run
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    y2 = x2.new_zeros(0, layer.out_features) if x2.shape[0] == 0 else impl(layer, x2)
    y = y2.reshape(*lead, layer.out_features)
    if layer.bias is not None:
        y = y.float() + layer.bias.float()
    if not y.is_contiguous():
        # Row-major, as F.linear returns: the tiles' product is a transposed view, and a column-major
        # output made every later op copy and sent SDPA from its flash kernel to the math path.
        # (``Tensor.to(memory_format=...)`` keeps the strides when the dtype does not change.)
        return torch.empty(y.shape, dtype=x.dtype, device=y.device).copy_(y)
    return y.to(x.dtype)
