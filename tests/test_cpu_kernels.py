"""qlab.kernels.cpu: the C decode and prefill kernels against plain-torch references."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qlab.kernels import cpu

from qlab.codebooks import codebook_table
from qlab.packing import unpack

lib = cpu.load()
pytestmark = pytest.mark.skipif(lib is None, reason=f"CPU kernels unavailable: {cpu.status()}")


def reference_weight(codes, scale, zero, group_size, table=None) -> torch.Tensor:
    """``W = s (u - z)`` or ``s T[u]`` in fp32, scales broadcast per group: plain torch."""
    n, k = codes.shape
    s = scale.float().expand(n, -1).repeat_interleave(k // scale.shape[1], dim=1)
    if table is not None:
        return s * table.float()[codes.long()]
    z = zero.float().expand(n, -1).repeat_interleave(k // zero.shape[1], dim=1)
    return s * (codes.float() - z)


def make(bits, n, k, g, seed=0, codebook=None):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen).to(torch.uint8)
    scale = torch.rand(n, k // g, generator=gen) + 0.05
    zero = None if codebook else torch.randint(0, 2**bits, (n, k // g), generator=gen).float()
    table = codebook_table(codebook) if codebook else None
    return codes, scale, zero, table


def rel_err(y, ref) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


CASES = [(8, 64), (8, 256), (4, 32), (4, 128), (2, 64), (2, 32), (3, 64), (1, 128)]


@pytest.mark.parametrize("bits,g", CASES)
@pytest.mark.parametrize("m", [1, 3, 4, 6])
def test_gemv_matches_torch(bits, g, m):
    n, k = 48, 256
    codes, scale, zero, _ = make(bits, n, k, g, seed=bits * 100 + g + m)
    w = cpu.prepare(codes, bits, g, scale, zero)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    ref = x.double() @ reference_weight(codes, scale, zero, g).double().t()
    y = cpu.gemv(x, w)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # 8-bit codes meet fp32 x; 1- to 4-bit codes meet bf16 x (2^-9 relative per element)
    assert rel_err(y, ref) < (1e-5 if w.bits == 8 else 4e-3)
    if w.bits != 8:  # with the same bf16 x the kernel is exact up to fp32 summation order
        xb = x.to(torch.bfloat16).double()
        torch.testing.assert_close(y.double(), xb @ reference_weight(codes, scale, zero, g).double().t(),
                                   rtol=1e-5, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_codebook_gemv_and_tiles(name):
    n, k, g = 32, 256, 64
    codes, scale, _, table = make(4, n, k, g, codebook=name)
    w = cpu.prepare(codes, 4, g, scale, None, table)
    ref_w = reference_weight(codes, scale, None, g, table)
    x = torch.randn(2, k)
    # the kernel's lookup holds bf16(T[u]); that and bf16 x are its only roundings
    lut_w = reference_weight(codes, scale, None, g, table.to(torch.bfloat16))
    torch.testing.assert_close(
        cpu.gemv(x, w).double(), x.to(torch.bfloat16).double() @ lut_w.double().t(), rtol=1e-5, atol=1e-4
    )
    eye = torch.eye(k)
    assert torch.equal(cpu.tiled_matmul(eye, w, rows=8).t(), ref_w.to(torch.bfloat16))


@pytest.mark.parametrize("bits,g", CASES)
@pytest.mark.parametrize("rows", [7, 16, 512])
def test_tiled_dequantization_is_bit_exact(bits, g, rows):
    """x = I makes y = Wᵀ exactly: each tile equals torch's bf16 cast of the fp32 reference weight."""
    n, k = 40, 256
    codes, scale, zero, _ = make(bits, n, k, g, seed=bits + g)
    w = cpu.prepare(codes, bits, g, scale, zero)
    y = cpu.tiled_matmul(torch.eye(k), w, rows=rows)
    assert y.dtype == torch.bfloat16 and y.shape == (k, n)
    assert torch.equal(y.t(), reference_weight(codes, scale, zero, g).to(torch.bfloat16))


@settings(max_examples=25, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 3, 4, 8]),
    blocks=st.integers(1, 4),
    groups=st.integers(1, 3),
    n=st.integers(1, 40),
    m=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_gemv_and_tiles_property(bits, blocks, groups, n, m, seed):
    g = blocks * 16 * 8 // (cpu.kernel_bits(bits, 128) or 8)
    k = g * groups
    codes, scale, zero, _ = make(bits, n, k, g, seed=seed)
    w = cpu.prepare(codes, bits, g, scale, zero)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    wref = reference_weight(codes, scale, zero, g).double()
    xb = x.to(torch.bfloat16).double()  # what the tiles and the 1-4 bit decode kernel see
    ref = xb @ wref.t()
    size = xb.abs() @ wref.abs().t()  # the scale of each sum: error bounds must not depend on cancellation
    # decode: exact products of x (bf16; fp32 for 8-bit codes) and the codes, fp32 sums
    xd = x.double() if w.bits == 8 else xb
    assert bool(((cpu.gemv(x, w).double() - xd @ wref.t()).abs() <= 1e-5 * size + 1e-6).all())
    # prefill: W rounded to bf16 (2^-9) and the output rounded to bf16 (2^-9 of |y| <= size)
    tiled = cpu.tiled_matmul(x, w, rows=max(1, n // 3)).double()
    assert bool(((tiled - ref).abs() <= 2**-8 * size + 1e-6).all())


def test_per_tensor_and_per_channel_scales_broadcast():
    n, k = 16, 128
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    x = torch.randn(1, k)
    for scale, zero in (
        (torch.tensor([[0.3]]), torch.tensor([[7.0]])),
        (torch.rand(n, 1), torch.full((n, 1), 8.0)),
    ):
        w = cpu.prepare(codes, 4, k, scale, zero)
        ref = x.double() @ reference_weight(codes, scale, zero, k).double().t()
        assert rel_err(cpu.gemv(x, w), ref) < 4e-3


ROWS16_CASES = [(8, 4), (8, 256), (4, 8), (4, 128), (2, 16), (2, 64), (3, 32), (1, 64), (2, 8)]


@pytest.mark.parametrize("bits,g", ROWS16_CASES)
@pytest.mark.parametrize("m", [1, 5])
def test_int8dot_matches_torch(bits, g, m):
    n, k = 48, 256
    codes, scale, zero, _ = make(bits, n, k, g, seed=bits * 10 + g + m)
    w = cpu.prepare_rows16(codes, bits, g, scale, zero)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    wref = reference_weight(codes, scale, zero, g).double()
    y = cpu.gemv_int8dot(x, w)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert rel_err(y, x.double() @ wref.t()) < 2e-4
    # with x replaced by its two-plane split sx (q1 + q2/254), the kernel is exact up to fp32 rounding
    sx, q1, q2 = cpu.split_activations(x)
    assert (x - sx * (q1 + q2 / 254)).abs().max() <= (sx / 508).max() * (1 + 1e-6)
    xhat = sx.double() * (q1.double() + q2.double() / 254)
    assert rel_err(y, xhat @ wref.t()) < 2e-6


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_int8dot_codebooks(name):
    n, k, g = 32, 256, 64
    codes, scale, _, table = make(4, n, k, g, codebook=name)
    w = cpu.prepare_rows16(codes, 4, g, scale, None, table)
    levels = w.levels.double() - 128
    assert (127 * table.double() - (levels[:16] + levels[16:] / 254)).abs().max() <= 1 / 508 + 1e-12
    x = torch.randn(3, k)
    ref = x.double() @ reference_weight(codes, scale, None, g, table).double().t()
    assert rel_err(cpu.gemv_int8dot(x, w), ref) < 2e-4
    with pytest.raises(ValueError, match="a codebook needs 4-bit codes"):
        cpu.prepare_rows16(codes.clamp(max=3), 2, g, scale, None, table)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 3, 4, 8]),
    chunks=st.integers(1, 4),
    groups=st.integers(1, 3),
    blocks=st.integers(1, 3),
    m=st.integers(1, 6),
    codebook=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int8dot_property(bits, chunks, groups, blocks, m, codebook, seed):
    """Error bound of the two-plane split: |x - x̂| <= sx/508 per element, so |y - ŷ| <= sx/508 Σ|W|."""
    if codebook:
        bits = 4
    g = chunks * 4 * 8 // (cpu.rows16_bits(bits, 128) or 8)
    n, k = 16 * blocks, g * groups
    codes, scale, zero, table = make(bits, n, k, g, seed=seed, codebook="nf4" if codebook else None)
    w = cpu.prepare_rows16(codes, bits, g, scale, zero, table)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 10
    wref = reference_weight(codes, scale, zero, g, table).double()
    sx = x.abs().amax(-1, keepdim=True).double() / 127
    # fp32 slack scales with the terms before the zero-point cancels: s (u + z), not |s (u - z)|
    parts = reference_weight(codes, scale, None if zero is None else -zero, g, table).double().abs()
    bound = (1 / 508) * sx * wref.abs().sum(-1) + 1e-5 * (x.double().abs() @ parts.t()) + 1e-6
    if codebook:  # plus the table's own split, 127 T ≈ L1 + L2/254 within 1/508
        s_full = scale.repeat_interleave(g, dim=1).double()
        bound = bound + (1 / (127 * 508)) * (x.double().abs() @ s_full.t())
    assert bool(((cpu.gemv_int8dot(x, w).double() - x.double() @ wref.t()).abs() <= bound).all())


def test_split_activations_reference():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 96, generator=gen) * torch.tensor([[1.0], [1e-3], [50.0], [0.0]])
    sx, q1, q2 = cpu.split_activations(x)
    assert sx.shape == (4, 1) and q1.dtype == q2.dtype == torch.int8
    # Exact arithmetic puts every element within sx/508; the split itself runs in fp32 (x / sx and
    # the remainder), which may add a few ulps of |x| on top. The error is measured in float64.
    err = (x.double() - sx.double() * (q1.double() + q2.double() / 254)).abs()
    eps = torch.finfo(torch.float32).eps
    assert bool((err <= sx.double() / 508 + 4 * eps * x.double().abs()).all())
    assert torch.equal(q1[3], torch.zeros(96, dtype=torch.int8)) and float(sx[3]) == 0.0
    from qlab.affine import quantize_rows_int8

    qw, _ = quantize_rows_int8(x[:3])
    _, p1, p2 = cpu.split_activations(x[:3], planes=1)
    assert torch.equal(p1, qw) and not p2.any()
    with pytest.raises(ValueError, match="planes must be 1 or 2"):
        cpu.split_activations(x, planes=0)
    with pytest.raises(ValueError, match="x must be a 2-D float tensor"):
        cpu.split_activations(torch.ones(3, dtype=torch.int32))


def test_one_plane_is_w8a8_integer_arithmetic():
    """planes=1 quantizes x exactly as qlab.affine.quantize_rows_int8 and multiplies like torch._int_mm."""
    from qlab.config import QuantConfig
    from qlab.nn import QuantLinear
    from qlab.nn.dispatch import _w8a8_forward

    torch.manual_seed(5)
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 48, bias=False), QuantConfig("w8a8", 8, None))
    codes = unpack(layer.qweight, 8, 256)
    w = cpu.prepare_rows16(codes, 8, 256, layer.scale, torch.full((1, 1), 128.0))
    x = torch.randn(5, 256)
    x[1] = 0.0
    x[2, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.0, -3.0, 6.35]) * (x[2].abs().max() / 127)  # ties
    y = cpu.gemv_int8dot(x, w, planes=1)
    ref = _w8a8_forward(layer, x, "int_mm")  # torch._int_mm on the same integers
    assert rel_err(y, ref) < 1e-6
    assert torch.equal(y[1], torch.zeros(48))
    with pytest.raises(ValueError, match="planes must be 2, or 1 for 8-bit"):
        cpu.gemv_int8dot(x, cpu.prepare_rows16(codes.clamp(max=15), 4, 32, torch.rand(48, 8), None), planes=1)
    with pytest.raises(ValueError, match="planes must be"):
        cpu.gemv_int8dot(x, w, planes=3)


def test_int8dot_symmetric_codes_and_special_rows():
    n, k, g = 32, 128, 32
    codes, scale, _, _ = make(4, n, k, g)
    w = cpu.prepare_rows16(codes, 4, g, scale, torch.full((1, 1), 8.0))
    x = torch.randn(4, k)
    x[1] = 0.0  # an all-zero row: sx = 0
    x[2, 5] = float("inf")
    x[3, 9] = float("nan")
    y = cpu.gemv_int8dot(x, w)
    ref = x[:1].double() @ reference_weight(codes, scale, torch.full((1, 1), 8.0), g).double().t()
    assert rel_err(y[:1], ref) < 2e-4
    assert torch.equal(y[1], torch.zeros(n))
    assert bool(y[2:].isnan().all())


def test_int8dot_bad_inputs():
    codes, scale, zero, _ = make(4, 24, 64, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu.prepare_rows16(codes, 4, 32, scale, zero)
    codes, scale, zero, _ = make(4, 32, 64, 32)
    with pytest.raises(ValueError, match="codes must be a 2-D uint8"):
        cpu.prepare_rows16(codes.float(), 4, 32, scale, zero)
    w = cpu.prepare_rows16(codes, 4, 32, scale, zero)
    with pytest.raises(ValueError, match=r"x must be a CPU tensor of shape \[M, 64\]"):
        cpu.gemv_int8dot(torch.randn(3, 32), w)


def test_fp8_decode_is_exact_and_gemv_matches_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    codes[[0x7F, 0xFF]] = 0  # the two nan patterns never occur in quantized weights
    w8 = codes.repeat(48, 1)[:, :256].contiguous().view(torch.float8_e4m3fn)  # every code, 48 rows
    scale = torch.rand(48) + 0.5
    w = cpu.prepare_fp8(w8, scale)
    wref = w8.float() * scale[:, None]
    # tiles: bf16(s * e4m3) equals torch's casts bit for bit (x = I makes y = Wᵀ exactly)
    assert torch.equal(cpu.tiled_matmul(torch.eye(256), w, rows=20).t(), wref.to(torch.bfloat16))
    x = torch.randn(5, 256)
    xb = x.to(torch.bfloat16).double()
    size = xb.abs() @ wref.double().abs().t()
    assert bool(((cpu.gemv(x, w).double() - xb @ wref.double().t()).abs() <= 1e-5 * size + 1e-6).all())


def test_fp8_bad_inputs():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        cpu.prepare_fp8(torch.zeros(4, 64), torch.ones(4))
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu.prepare_fp8(torch.zeros(4, 48).to(torch.float8_e4m3fn), torch.ones(4))
    with pytest.raises(ValueError, match="one value per row"):
        cpu.prepare_fp8(torch.zeros(4, 64).to(torch.float8_e4m3fn), torch.ones(3))
    assert cpu.fits_fp8(64) and not cpu.fits_fp8(16) and not cpu.fits_fp8(80)


def test_kernel_bits_and_fits():
    assert cpu.kernel_bits(4, 32) == 4 and cpu.kernel_bits(4, 16) is None
    assert cpu.kernel_bits(2, 64) == 2 and cpu.kernel_bits(2, 32) == 4
    assert cpu.kernel_bits(3, 64) == 4 and cpu.kernel_bits(1, 128) == 4
    assert cpu.kernel_bits(8, 16) == 8 and cpu.kernel_bits(8, 8) is None
    assert cpu.fits(4, 64, 256) and not cpu.fits(4, 64, 250) and not cpu.fits(9, 64, 256)
    assert cpu.rows16_bits(2, 16) == 2 and cpu.rows16_bits(2, 8) == 4 and cpu.rows16_bits(8, 4) == 8
    assert cpu.rows16_bits(4, 4) is None and cpu.rows16_bits(3, 8) == 4
    assert cpu.fits_rows16(4, 32, 256, 48) and not cpu.fits_rows16(4, 32, 256, 40)


def test_bad_inputs_are_named():
    codes, scale, zero, _ = make(4, 8, 64, 32)
    with pytest.raises(ValueError, match="codes must be a 2-D uint8"):
        cpu.prepare(codes.int(), 4, 32, scale, zero)
    with pytest.raises(ValueError, match="group_size=16"):
        cpu.prepare(codes, 4, 16, torch.rand(8, 4), torch.rand(8, 4))
    w = cpu.prepare(codes, 4, 32, scale, zero)
    with pytest.raises(ValueError, match=r"x must be a CPU tensor of shape \[M, 64\]"):
        cpu.gemv(torch.randn(2, 63), w)
    with pytest.raises(ValueError, match=r"x must be a CPU tensor of shape \[M, 64\]"):
        cpu.tiled_matmul(torch.randn(64), w)
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        cpu.tiled_matmul(torch.randn(2, 64), w, rows=0)


def test_operators_equal_the_direct_calls():
    """The public functions run torch.ops.qlab.*; with ``lib=`` they call the library directly: same bits."""
    codes, scale, zero, _ = make(4, 32, 256, 64, seed=9)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(9))
    w16, wb = cpu.prepare_rows16(codes, 4, 64, scale, zero), cpu.prepare(codes, 4, 64, scale, zero)
    w8 = cpu.prepare_fp8(torch.randn(32, 256).to(torch.float8_e4m3fn), torch.rand(32))
    for fn, w in ((cpu.gemv_int8dot, w16), (cpu.gemv, wb), (cpu.gemv, w8), (cpu.tiled_matmul, wb),
                  (cpu.tiled_matmul, w8)):  # fmt: skip
        y, direct = fn(x, w), fn(x, w, lib=lib)
        assert y.stride() == direct.stride() and torch.equal(y, direct)
    assert cpu.gemv_int8dot(x[:0], w16).shape == (0, 32)  # an empty batch never reaches C


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_portable_build_matches_the_native_one(tmp_path):
    """The non-AVX-512 branch of cpu.c (what other CPUs run) computes the same results."""
    flags = tuple(f if f != "-march=native" else "-march=x86-64-v2" for f in cpu.FLAGS)
    portable = cpu.load(cpu.build(tmp_path, flags))
    assert portable.qlab_cpu_avx512() == portable.qlab_cpu_bf16() == portable.qlab_cpu_vnni() == 0
    for bits, g in CASES:
        codes, scale, zero, _ = make(bits, 24, 256, g, seed=g)
        w = cpu.prepare(codes, bits, g, scale, zero)
        x = torch.randn(5, 256)
        assert rel_err(cpu.gemv(x, w, lib=portable), cpu.gemv(x, w)) < 1e-5  # fp32 summation order
        torch.testing.assert_close(
            cpu.tiled_matmul(x, w, lib=portable), cpu.tiled_matmul(x, w), rtol=0, atol=0
        )
    codes, scale, _, table = make(4, 24, 256, 64, codebook="nf4")
    w = cpu.prepare(codes, 4, 64, scale, None, table)
    x = torch.randn(3, 256)
    assert rel_err(cpu.gemv(x, w, lib=portable), cpu.gemv(x, w)) < 1e-5
    for bits, g in ROWS16_CASES:
        codes, scale, zero, _ = make(bits, 32, 256, g, seed=g)
        w = cpu.prepare_rows16(codes, bits, g, scale, zero)
        x = torch.randn(3, 256)
        assert rel_err(cpu.gemv_int8dot(x, w, lib=portable), cpu.gemv_int8dot(x, w)) < 1e-6
    codes, scale, _, table = make(4, 32, 256, 64, codebook="nf4")
    w = cpu.prepare_rows16(codes, 4, 64, scale, None, table)
    x = torch.randn(3, 256)
    assert rel_err(cpu.gemv_int8dot(x, w, lib=portable), cpu.gemv_int8dot(x, w)) < 1e-6
    w8 = torch.randn(32, 256).to(torch.float8_e4m3fn)
    w = cpu.prepare_fp8(w8, torch.rand(32))
    assert rel_err(cpu.gemv(x, w, lib=portable), cpu.gemv(x, w)) < 1e-5
    assert torch.equal(cpu.tiled_matmul(x, w, lib=portable), cpu.tiled_matmul(x, w))


def test_build_reports_compiler_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(RuntimeError, match="failed to build cpu.c"):
        cpu.build(tmp_path)


def test_status_names_the_build():
    assert cpu.status() in ("avx512-bf16, avx512-vnni", "avx512-bf16", "avx512-vnni", "portable C")


def test_disabled_kernels_fall_back_to_torch_paths():
    """QLAB_CPU_KERNELS=0 (or no compiler) keeps every layer on torch's ops, with the reason in status()."""
    code = (
        "import torch; from qlab.kernels import cpu; from qlab.nn import QuantLinear, select_path;"
        "from qlab.config import QuantConfig;"
        "l = QuantLinear.from_linear(torch.nn.Linear(256, 32), QuantConfig('nf4', 4, 64));"
        "print(cpu.status(), select_path(l, torch.randn(1, 256)), select_path(l, torch.randn(64, 256)))"
    )
    env = {**os.environ, "QLAB_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "disabled by QLAB_CPU_KERNELS=0 torch_int8 torch_int8"
