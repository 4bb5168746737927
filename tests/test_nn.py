"""QuantLinear and its forward dispatch: every path against the reference, storage, bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlab.codebooks import NF4_VALUES
from qlab.config import QuantConfig
from qlab.nn import (
    CPU_DEQUANT_MIN_ROWS,
    CPU_INT8DOT_MAX_ROWS,
    CPU_TILED_MIN_ROWS,
    CPU_W8A8_DOT_MAX_ROWS,
    FAST_PATH_RTOL,
    PATH_TABLE,
    PATHS,
    QuantLinear,
    dispatch,
    select_path,
    use_path,
)
from qlab.nn.dispatch import _cpu_kernels, cpu_kernel_speedups
from qlab.quantize import QuantSpec, quantize

K, N = 256, 64

# config -> the CPU paths it must take: (decode, prefill) with qlab's C kernels, and the path
# without them (no compiler). The dequantize-then-matmul reference is never the default.
SETTINGS = {
    "w8 per-channel": (QuantConfig("rtn", 8, None), ("cpu_int8dot", "cpu_tiled"), "torch_int8"),
    "w8 sym g64": (QuantConfig("rtn", 8, 64), ("cpu_int8dot", "cpu_tiled"), "torch_int8"),
    "w8 asym g64": (QuantConfig("rtn", 8, 64, symmetric=False), ("cpu_int8dot", "cpu_tiled"), "torch_int8"),
    "w4 g128": (QuantConfig("rtn", 4, 128), ("cpu_int8dot", "cpu_tiled"), "torch_int4"),
    "w4 g32": (QuantConfig("rtn", 4, 32), ("cpu_int8dot", "cpu_tiled"), "torch_int4"),
    "w4 sym per-channel": (
        QuantConfig("rtn", 4, None, symmetric=True),
        ("cpu_int8dot", "cpu_tiled"),
        "torch_int4",
    ),
    "w4 g32 float-zero": (
        QuantSpec.per_group(4, 32, zero_domain="float"),
        ("cpu_int8dot", "cpu_tiled"),
        "torch_int4",
    ),
    "w3 g64": (QuantConfig("rtn", 3, 64), ("cpu_int8dot", "cpu_tiled"), "torch_int4"),
    "w2 g64": (QuantConfig("rtn", 2, 64), ("cpu_int8dot", "cpu_tiled"), "torch_int4"),
    "w2 sym g32": (QuantConfig("rtn", 2, 32, symmetric=True), ("cpu_int8dot", "cpu_tiled"), "torch_int4"),
    "nf4 b64": (QuantConfig("nf4", 4, 64), ("cpu_int8dot", "cpu_tiled"), "torch_int8"),
    "fp4 b32": (QuantConfig("fp4", 4, 32), ("cpu_int8dot", "cpu_tiled"), "torch_int8"),
    "fp8": (QuantConfig("fp8", 8, None), ("cpu_gemv", "cpu_tiled"), "torch_fp8_bf16"),
    "w8a8": (QuantConfig("w8a8", 8, None), ("cpu_int8dot", "torch_int_mm"), "torch_int_mm"),
}
HAS_CPU_KERNELS = _cpu_kernels() is not None
#: Whether the C kernels here have AVX512-BF16 / AVX512-VNNI; without them torch's ops are preferred.
BF16_FAST, INT8_FAST = cpu_kernel_speedups()
#: torch._int_mm is slow without AVX-512's int8 dot products: W8A8 then takes torch_int8.
INT_MM_FAST = not dispatch._avx2_or_lower()


def expected_path(name: str, rows: int) -> str:
    _, with_kernels, without = SETTINGS[name]
    if name == "w8a8":
        if HAS_CPU_KERNELS and INT8_FAST and rows < CPU_W8A8_DOT_MAX_ROWS:
            return "cpu_int8dot"
        return "torch_int_mm" if INT_MM_FAST else "torch_int8"
    if not HAS_CPU_KERNELS:
        return without
    if with_kernels[0] == "cpu_int8dot":
        if INT8_FAST and rows < CPU_INT8DOT_MAX_ROWS:
            return "cpu_int8dot"
        if BF16_FAST:
            return "cpu_tiled" if rows >= CPU_INT8DOT_MAX_ROWS else "cpu_gemv"
        return without
    if BF16_FAST or name == "fp8":  # FP8 keeps the C kernels: torch's FP8 path is slower still
        return with_kernels[rows >= CPU_TILED_MIN_ROWS]
    return without


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def linear() -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(K, N, bias=True)
    with torch.no_grad():
        lin.weight[:, 7] *= 8  # an outlier input channel, as real models have
    return lin


@pytest.fixture(scope="module")
def layers(linear) -> dict[str, QuantLinear]:
    return {k: QuantLinear.from_linear(linear, cfg) for k, (cfg, *_) in SETTINGS.items()}


# ------------------------------------------------------------------------------------------------
# Parity of every forward path with the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, K), (16, K), (2, 3, K)])
def test_fast_path_matches_reference(layers, name, dtype, shape):
    layer = layers[name]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert select_path(layer, x) == expected_path(name, x.numel() // K)
    with torch.inference_mode():
        y = layer(x)
        with use_path("reference"):
            ref = layer(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], N)
    assert rel_err(y, ref) < FAST_PATH_RTOL


#: Paths that run on a CPU tensor when the machine offers them (triton needs CUDA).
CPU_PATHS = [p for p in PATHS if p not in ("reference", "triton")]


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("rows", [1, 16])
def test_every_path_matches_reference_when_forced(layers, name, path, rows):
    """Each path, forced by name, on every layer it fits: the torch fallbacks get a numerical check
    on machines with a C compiler too, and the C kernels at both shapes whatever the thresholds."""
    layer = layers[name]
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        with use_path("reference"):
            ref = layer(x)
        if not PATH_TABLE[path].fits(layer, x):
            with pytest.raises(ValueError, match=f"use_path\\('{path}'\\) cannot run"), use_path(path):
                layer(x)
            return
        with use_path(path):
            assert select_path(layer, x) == path
            y = layer(x)
    assert rel_err(y, ref) < FAST_PATH_RTOL


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="qlab's CPU kernels are not built here")
@pytest.mark.parametrize("bf16, int8", [(True, True), (True, False), (False, True), (False, False)])
def test_c_kernels_are_chosen_only_with_their_instructions(monkeypatch, layers, bf16, int8):
    """A portable build of the C kernels (no AVX512-BF16 / VNNI, as on most laptops) is correct but slower
    than torch's ops, so selection skips what it lacks; FP8 keeps them (torch's FP8 path is slower still),
    and W8A8 at decode leaves the int8-dot kernel for torch's ops."""
    monkeypatch.setattr(dispatch, "cpu_kernel_speedups", lambda: (bf16, int8))
    one, many = torch.randn(1, K), torch.randn(64, K)
    pick = {name: (select_path(layer, one), select_path(layer, many)) for name, layer in layers.items()}
    assert pick["w4 g128"] == (
        "cpu_int8dot" if int8 else "cpu_gemv" if bf16 else "torch_int4",
        "cpu_tiled" if bf16 else "torch_int4",
    )
    assert pick["nf4 b64"][1] == ("cpu_tiled" if bf16 else "torch_int8")
    assert pick["fp8"] == ("cpu_gemv", "cpu_tiled")
    w8a8_many = "torch_int_mm" if INT_MM_FAST else "torch_int8"
    assert pick["w8a8"] == ("cpu_int8dot" if int8 else w8a8_many, w8a8_many)
    for name, layer in layers.items():  # whatever is chosen matches the reference
        with torch.inference_mode():
            y = layer(many)
            with use_path("reference"):
                ref = layer(many)
        assert rel_err(y, ref) < FAST_PATH_RTOL, name


@pytest.mark.parametrize("avx2", [True, False])
@pytest.mark.parametrize("fast", [True, False])
def test_long_prompts_on_avx2_dequantize_to_fp32(monkeypatch, layers, avx2, fast):
    """Without AVX-512 (torch at AVX2) and without qlab's fast kernels, weight-only layers take one fp32
    GEMM on the dequantized weight from CPU_DEQUANT_MIN_ROWS rows: torch's int4/int8 ops fall behind
    there. W8A8 keeps its integer activations; fast C kernels keep their tiles."""
    monkeypatch.setattr(dispatch, "cpu_kernel_speedups", lambda: (fast, fast))
    monkeypatch.setattr(dispatch, "_avx2_or_lower", lambda: avx2)
    below, long = torch.randn(CPU_DEQUANT_MIN_ROWS - 1, K), torch.randn(CPU_DEQUANT_MIN_ROWS, K)
    for name in ("w4 g128", "nf4 b64", "w8 per-channel"):
        want = SETTINGS[name][2]
        if fast and HAS_CPU_KERNELS:
            want = "cpu_tiled"
        assert select_path(layers[name], below) == want, name
        assert select_path(layers[name], long) == (
            want if want == "cpu_tiled" or not avx2 else "reference"
        ), name
    assert select_path(layers["w8a8"], long) == ("torch_int8" if avx2 else "torch_int_mm")


def test_every_torch_fallback_fits_some_layer(layers):
    """The fallbacks a machine without a C compiler runs are each exercised by the test above."""
    x = torch.randn(1, K)
    for path in ("torch_int4", "torch_int8", "torch_int_mm", "torch_fp8_bf16"):
        assert any(PATH_TABLE[path].fits(layer, x) for layer in layers.values()), path


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="qlab's CPU kernels are not built here")
@pytest.mark.parametrize("config", [QuantConfig("nf4", 4, 64), QuantConfig("rtn", 4, 64)])
def test_rows_not_multiple_of_16_use_the_other_decode_kernels(config):
    """40 output rows fill neither the int8-dot kernel's 16-row blocks nor torch's int4 op: the
    bf16-dot kernel takes them, and still matches the reference."""
    torch.manual_seed(3)
    layer = QuantLinear.from_linear(nn.Linear(K, 40), config)
    x = torch.randn(2, K)
    assert select_path(layer, x) == ("cpu_gemv" if BF16_FAST else SETTINGS["nf4 b64"][2])
    with torch.inference_mode():
        with use_path("cpu_gemv"):  # on every machine with the kernels, fast or portable
            y = layer(x)
        with use_path("reference"):
            ref = layer(x)
    assert rel_err(y, ref) < FAST_PATH_RTOL


@pytest.mark.parametrize("name", ["w4 g128", "nf4 b64", "w8a8"])
def test_no_grad_and_inference_mode_agree(layers, name):
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = layers[name](x)
    with torch.inference_mode():
        b = layers[name](x)
    assert torch.equal(a, b)


def test_reference_path_is_dequantize_then_linear(layers, linear):
    x = torch.randn(4, K)
    for name, layer in layers.items():
        if name == "w8a8":
            continue  # activations are quantized too: tested separately
        with use_path("reference"), torch.no_grad():
            y = layer(x)
        expected = F.linear(x, layer.dequantize(torch.float32), linear.bias.detach())
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_grad_flows_through_reference_path(layers):
    layer = layers["w4 g128"]
    x = torch.randn(3, K, requires_grad=True)
    assert select_path(layer, x) == "reference"
    layer(x).sum().backward()
    expected = layer.dequantize(torch.float32).sum(0).expand(3, K)
    torch.testing.assert_close(x.grad, expected)


def test_empty_batch(layers):
    with torch.no_grad():
        assert layers["w4 g128"](torch.zeros(0, K)).shape == (0, N)


# ------------------------------------------------------------------------------------------------
# Storage: packed codes, scales, zeros; dequantize against plain torch
# ------------------------------------------------------------------------------------------------
def test_int4_group_dequantize_matches_plain_torch(linear):
    w = linear.weight.detach()
    layer = QuantLinear.from_linear(linear, QuantConfig("rtn", 4, 64))
    # Independent group-wise asymmetric RTN: the range is widened to include 0.
    wg = w.reshape(N, K // 64, 64)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    q = (torch.round(wg / scale) + zero).clamp(0, 15)
    expected = ((q - zero) * scale).reshape(N, K)
    torch.testing.assert_close(layer.dequantize(), expected, rtol=0, atol=1e-6)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (N, K // 2)
    assert layer.scale.shape == (N, K // 64) and layer.zero.shape == (N, K // 64)
    low, high = layer.qweight[0, 0] & 0b1111, layer.qweight[0, 0] >> 4  # two codes per byte, c0 low
    assert (int(low), int(high)) == (int(q.reshape(N, K)[0, 0]), int(q.reshape(N, K)[0, 1]))


def test_nbytes_counts_packed_storage(layers):
    assert layers["w2 g64"].nbytes == N * K // 4 + 2 * 4 * N * (K // 64) + 4 * N
    assert layers["w8 per-channel"].nbytes == N * K + 4 * N + 4 * N
    assert layers["nf4 b64"].nbytes == N * K // 2 + 4 * N * (K // 64) + 4 * N


def test_from_quantized_keeps_the_quantized_tensor_exactly(linear):
    w = linear.weight.detach()
    for spec in (
        QuantSpec.per_group(3, 32),
        QuantSpec.per_channel(8),
        QuantSpec.per_tensor(4, symmetric=False),
    ):
        qt = quantize(w, spec)
        layer = QuantLinear.from_quantized((N, K), qt)
        assert torch.equal(layer.dequantize(), qt.dequantize())
        back = layer.quantized_tensor()
        assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale, qt.scale)


def test_input_scale_divides_x(linear):
    w = linear.weight.detach()
    s = torch.rand(K) + 0.5
    qt = quantize(w * s, QuantSpec.per_group(4, 64))
    layer = QuantLinear.from_quantized(linear, qt, input_scale=s)
    x = torch.randn(3, K)
    expected = F.linear(x / s, qt.dequantize(), linear.bias.detach())
    with torch.no_grad():
        assert rel_err(layer(x), expected) < FAST_PATH_RTOL
        with use_path("reference"):
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.effective_weight(), qt.dequantize() / s)


def test_fp8_weights_match_torch_cast(linear):
    w = linear.weight.detach()
    layer = QuantLinear.from_linear(linear, QuantConfig("fp8", 8, None))
    scale = w.abs().amax(1, keepdim=True) / 448
    expected = (w / scale).to(torch.float8_e4m3fn).float() * scale
    assert layer.qweight.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(layer.dequantize(), expected)


def test_w8a8_matches_plain_torch(linear):
    w = linear.weight.detach()
    layer = QuantLinear.from_linear(linear, QuantConfig("w8a8", 8, None))
    x = torch.randn(5, K)
    sw = w.abs().amax(1) / 127
    qw = torch.round(w / sw[:, None])
    sx = x.abs().amax(1, keepdim=True) / 127
    qx = torch.round(x / sx)
    expected = (qx @ qw.T) * sx * sw + linear.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
        with use_path("reference"):
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)


def test_nf4_codebook_and_cache(layers):
    layer = layers["nf4 b64"]
    assert torch.equal(layer.codebook, NF4_VALUES)
    layer.clear_cache()
    assert layer.runtime_nbytes() == 0
    with torch.no_grad():
        layer(torch.randn(1, K))
    assert layer.runtime_nbytes() > 0
    assert "nf4 b64" in repr(layer) and "4.50 bits/weight" in repr(layer)


def test_cache_follows_loaded_state(linear):
    a = QuantLinear.from_linear(linear, QuantConfig("rtn", 4, 64))
    b = QuantLinear.from_linear(nn.Linear(K, N), QuantConfig("rtn", 4, 64))
    x = torch.randn(2, K)
    with torch.no_grad():
        b(x)  # builds b's cache
        b.load_state_dict(a.state_dict())
        assert torch.equal(b(x), a(x))


def test_conv1d_is_supported():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(N, K)  # GPT-2: weight [in, out]
    torch.nn.init.normal_(conv.weight)
    layer = QuantLinear.from_linear(conv, QuantConfig("rtn", 8, None))
    x = torch.randn(2, 3, K)
    with torch.no_grad():
        assert rel_err(layer(x), conv(x)) < 0.02


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------
def test_bad_inputs(linear, layers):
    layer = layers["w4 g128"]
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 256\]"):
        layer(torch.randn(2, K + 1))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, K, dtype=torch.int64))
    with pytest.raises(ValueError, match="spec.bits must be one of"):
        QuantLinear(K, N, QuantSpec.per_group(6, 64))
    with pytest.raises(ValueError, match="in_features"):
        QuantLinear(0, N, QuantSpec.per_group(4, 64))
    with pytest.raises(TypeError, match="linear"):
        QuantLinear.from_linear(nn.ReLU(), QuantConfig())
    with pytest.raises(ValueError, match="calibration"):
        QuantLinear.from_linear(linear, QuantConfig("gptq", 4, 128))
    qt = quantize(linear.weight.detach(), QuantSpec.per_group(4, 64))
    with pytest.raises(ValueError, match="expected the layer"):
        QuantLinear.from_quantized((N + 1, K), qt)
    with pytest.raises(ValueError, match="input_scale must have shape"):
        QuantLinear.from_quantized(linear, qt, input_scale=torch.ones(K + 1))
    with pytest.raises(ValueError, match="axis=0"):
        QuantLinear(K, N, QuantSpec.per_channel(8, axis=1))
    with pytest.raises(ValueError, match="double-quantized"):
        QuantLinear.from_linear(
            linear, QuantSpec(4, False, "group", group_size=64, codebook="nf4", double_quant=True)
        )
    with pytest.raises(ValueError, match="path must be"):
        with use_path("fast"):
            pass
    with pytest.raises(ValueError, match="path must be"), use_path("int4"):  # renamed: torch_int4
        pass
    with pytest.raises(TypeError, match="QuantSpec or a QuantConfig"):
        QuantLinear.from_linear(linear, "rtn")
    with pytest.raises(ValueError, match="builds a Int8Linear"):
        QuantLinear.from_linear(linear, QuantConfig("llm_int8", 8, None))


def test_float_zero_layer_is_scale_times_code_plus_offset(linear):
    """``zero_domain="float"``: the layer stores ``m`` and computes ``s q + m`` (llama.cpp's Q4_1), and
    a block with ``s = 0`` (every weight equal to ``m``, which no integer zero-point can hold) still
    comes out right on every path that fits it."""
    spec = QuantSpec.per_group(4, 32, zero_domain="float")
    w = linear.weight.detach().clone()
    w[3, :32] = 0.25  # a constant block: RTN gives it scale 1 and codes 0, i.e. m = 0.25 exactly
    qt = quantize(w, spec)
    assert torch.equal(qt.zero, w.reshape(N, -1, 32).amin(-1))  # m is the block minimum
    codes, s, m = qt.codes.float().reshape(N, -1, 32), qt.scale.reshape(N, -1, 1), qt.zero.reshape(N, -1, 1)
    assert torch.equal(qt.dequantize(), (codes * s + m).reshape(N, K))
    layer = QuantLinear.from_quantized((N, K), qt)
    with torch.no_grad():
        layer.scale[3, 0] = 0.0  # the Q4_1 form of a constant block: d = 0, m = value
    assert torch.equal(layer.dequantize()[3, :32], torch.full((32,), 0.25))
    x = torch.randn(16, K, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        with use_path("reference"):
            ref = layer(x)
        for path in CPU_PATHS:
            if PATH_TABLE[path].fits(layer, x):
                with use_path(path):
                    assert rel_err(layer(x), ref) < FAST_PATH_RTOL, path


def test_float_zero_spec_round_trips_and_rejects_symmetric():
    spec = QuantSpec.per_group(4, 32, zero_domain="float")
    assert spec.to_dict()["zero_domain"] == "float" and QuantSpec.from_dict(spec.to_dict()) == spec
    assert "zero_domain" not in QuantSpec.per_group(4, 32).to_dict()  # old files read as before
    with pytest.raises(ValueError, match="zero_domain"):
        QuantSpec.per_group(4, 32, symmetric=True, zero_domain="float")
    with pytest.raises(ValueError, match="zero_domain"):
        QuantSpec.per_group(4, 32, zero_domain="half")


@pytest.mark.parametrize("group_size", [2, 4, 8, 24, 40, 16, 48])
def test_torch_int8_path_only_takes_group_widths_its_op_handles(group_size):
    # torch 2.13's CPU _weight_int8pack_mm returns garbage when the reduction width is not a multiple of
    # 16 (and crashes below 8): the dispatch must never hand it such a group, forced or automatic.
    torch.manual_seed(0)
    linear = nn.Linear(240, 32)
    layer = QuantLinear.from_linear(linear, QuantSpec.per_group(bits=8, group_size=group_size))
    x = torch.randn(3, 240)
    fits = group_size % 16 == 0
    assert PATH_TABLE["torch_int8"].fits(layer, x) == fits
    with use_path("reference"), torch.no_grad():
        ref = layer(x)
    if fits:
        with use_path("torch_int8"), torch.no_grad():
            torch.testing.assert_close(layer(x), ref, rtol=2e-2, atol=2e-2)  # bf16 activations
    else:
        with pytest.raises(ValueError, match="use_path\\('torch_int8'\\) cannot run"), use_path("torch_int8"):
            layer(x)
    assert select_path(layer, x) != "torch_int8" or fits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_path_returns_a_row_major_output(dtype):
    """Row-major like ``F.linear``, whatever the path: the tiles' product is a transposed view, and a
    column-major output sent SDPA from its flash kernel to the math path (a 512-token SmolLM2 prompt ran
    at 749 instead of 896 tokens/s)."""
    from qlab.driver import quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128))
    quantize_model(model, QuantConfig("rtn", 4, 32), progress=False)
    layer = model[0]
    x = torch.randn(2, 16, 64, dtype=dtype)
    ran = []
    for path in PATHS:
        if PATH_TABLE[path].fits(layer, x.reshape(-1, 64)):
            with use_path(path):
                y = layer(x)
            assert y.shape == (2, 16, 128) and y.dtype == dtype and y.is_contiguous(), (path, y.stride())
            ran.append(path)
    assert "reference" in ran and (_cpu_kernels() is None or "cpu_tiled" in ran)
