"""Scaled floats (qlab.scaled_floats) against the OCP MX spec v1.0, torch's float8 casts and plain Python."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qlab
from qlab.nn import QuantLinear, use_path
from qlab.nn.dispatch import FAST_PATH_RTOL, PATH_TABLE, PATHS
from qlab.scaled_floats import (
    MXFP4,
    MXFP8,
    NVFP4,
    SCALED_FORMATS,
    ScaledTensor,
    decode_e8m0,
    encode_e8m0,
    quantize_fp8,
    quantize_mxfp4,
    quantize_nvfp4,
    quantize_scaled,
)
from qlab.tensor import QuantizedTensor

# OCP Microscaling Formats (MX) v1.0, section 5.3.3 (FP4 E2M1): the value of each bit pattern S.EE.M.
SPEC_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_e2m1_table_is_the_spec_table():
    t = MXFP4.table()
    assert t.tolist() == SPEC_E2M1
    assert torch.equal(torch.signbit(t[8:]), torch.ones(8, dtype=torch.bool))  # codes 8.. are negative


def test_e8m0_decoding_matches_torch_and_the_spec():
    codes = torch.arange(256, dtype=torch.uint8)
    ours = decode_e8m0(codes)
    ref = codes.view(torch.float8_e8m0fnu).float()  # torch's own decoder
    assert torch.equal(ours[:255], ref[:255]) and math.isnan(ours[255]) and math.isnan(ref[255])
    assert ours[0].item() == 2.0**-127 and ours[254].item() == 2.0**127 and ours[127].item() == 1.0
    assert torch.equal(
        encode_e8m0(torch.tensor([-127, 0, 127])), torch.tensor([0, 127, 254], dtype=torch.uint8)
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: decode_e8m0(torch.zeros(3)), "uint8"),
        (lambda: encode_e8m0(torch.tensor([128])), "-127..127"),
        (lambda: encode_e8m0(torch.tensor([1.0])), "integer"),
    ],
)
def test_e8m0_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def _block(*values: float) -> torch.Tensor:
    return torch.tensor([list(values) + [0.0] * (32 - len(values))])


@pytest.mark.parametrize(
    "values, exponent, expected",
    [
        # amax 5: floor(log2 5) = 2, minus emax(e2m1) = 2 -> X = 1; ties go to the even mantissa.
        ((5.0, 2.5, 0.25, 0.75, 1.25, 1.75, -2.5, 4.0), 0, (4.0, 2.0, 0.0, 1.0, 1.0, 2.0, -2.0, 4.0)),
        # amax 7 -> X = 1, and 7 > 6 saturates: the spec's rule clips the top of the binade.
        ((7.0, -7.0, 3.0), 0, (6.0, -6.0, 3.0)),
        # amax 0.3 -> floor(log2 0.3) = -2 -> X = 2^-4; 0.3 * 16 = 4.8 -> 4, 0.1 * 16 = 1.6 -> 1.5.
        ((0.3, 0.1), -4, (0.25, 0.09375)),
        # amax 1 -> X = 2^-2: 1 / X = 4 exactly.
        ((1.0, -0.5), -2, (1.0, -0.5)),
    ],
)
def test_mx_scale_rule_on_hand_made_blocks(values, exponent, expected):
    st_ = quantize_mxfp4(_block(*values))
    assert st_.scale.tolist() == [[exponent + 127]]
    out = st_.dequantize()[0, : len(expected)].tolist()
    assert out == list(expected)


def test_mx_zero_and_tiny_blocks_take_the_smallest_scale():
    st_ = quantize_mxfp4(torch.cat([torch.zeros(1, 32), torch.full((1, 32), 2.0**-140)], dim=1))
    assert st_.scale.tolist() == [[0, 0]]  # 2^-127: 2^-140 - 2 is below the e8m0 range, so it clamps
    assert torch.equal(st_.dequantize(), torch.zeros(1, 64))


def _mx_reference(x: list[float], emax: int, table: list[float]) -> list[float]:
    """OCP MX v1.0 section 6.3 in plain Python: X = 2^(floor(log2 amax) - emax), nearest element (ties
    to the even code), saturating."""
    amax = max(abs(v) for v in x)
    if amax == 0:
        return [0.0] * len(x)
    X = 2.0 ** max(-127, math.floor(math.log2(amax)) - emax)
    grid = sorted(set(abs(t) for t in table))
    out = []
    for v in x:
        a = min(abs(v) / X, grid[-1])
        best = min(grid, key=lambda g: (abs(g - a), table.index(g) % 2))  # tie: even code (mantissa 0)
        out.append(math.copysign(best * X, v) if best else 0.0)
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-30, 30))
def test_mxfp4_matches_a_plain_python_spec_reference(seed, log_scale):
    x = torch.randn(2, 32, generator=_gen(seed), dtype=torch.float64) * 2.0**log_scale
    x = x.float()
    got = quantize_mxfp4(x).dequantize().double()
    for row in range(2):
        ref = _mx_reference(x[row].double().tolist(), 2, SPEC_E2M1[:8])
        assert got[row].tolist() == pytest.approx(ref, rel=0, abs=0)


def _half_step(v: torch.Tensor, mantissa_bits: int, emin: int) -> torch.Tensor:
    """Half the gap between neighbouring element values around magnitude ``v`` (subnormals included)."""
    e = torch.floor(torch.log2(v.clamp(min=2.0**emin))).clamp(min=emin)
    return 2.0 ** (e - mantissa_bits) / 2


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["mxfp4", "nvfp4", "mxfp8", "fp8_e4m3_row"]))
def test_error_within_half_a_local_step(seed, name):
    fmt = SCALED_FORMATS[name]
    x = torch.randn(4, 64, generator=_gen(seed)) * torch.rand(4, 1, generator=_gen(seed + 1)) * 10
    st_ = quantize_scaled(x, fmt)
    s = st_.scales().repeat_interleave(64 // st_.scales().shape[1], dim=1).double()
    v = x.double().abs() / s
    err = (st_.dequantize().double() - x.double()).abs() / s
    inside = v <= fmt.element.max
    bound = _half_step(v, fmt.element.mantissa_bits, fmt.element.emin)
    assert bool((err[inside] <= bound[inside] * (1 + 1e-6)).all())
    # beyond the top value (MX's rounded-down exponent, NVFP4's rounded scale) the element saturates
    top = (fmt.element.max * s)[~inside]  # the fp32 product the decoder forms: one rounding from it
    assert torch.allclose(st_.dequantize().double().abs()[~inside], top, rtol=2**-23, atol=0)


def test_nvfp4_follows_the_two_level_recipe():
    x = torch.randn(8, 64, generator=_gen(3))
    st_ = quantize_nvfp4(x)
    g = x.abs().max() / (6 * 448)
    assert st_.global_scale.item() == pytest.approx(g.item(), rel=1e-7)
    amax_b = x.abs().reshape(8, 4, 16).amax(-1)
    ref_scale = (amax_b / (6 * st_.global_scale)).to(torch.float8_e4m3fn)  # torch's e4m3 cast
    assert torch.equal(st_.scale, ref_scale.view(torch.uint8))
    assert torch.equal(st_.scales(), ref_scale.float() * st_.global_scale)


def test_nvfp4_static_global_scale_and_bad_values():
    x = torch.randn(2, 32, generator=_gen(4))
    st_ = quantize_nvfp4(x, global_scale=1e-3)
    assert st_.global_scale.item() == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="global_scale must be positive"):
        quantize_nvfp4(x, global_scale=-1.0)


@pytest.mark.parametrize("gran", ["tensor", "row"])
@pytest.mark.parametrize("elem, dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_dynamic_fp8_matches_torch_casts(gran, elem, dtype):
    x = torch.randn(16, 48, generator=_gen(5)) * 3
    st_ = quantize_fp8(x, gran, element=elem)
    amax = x.abs().amax() if gran == "tensor" else x.abs().amax(dim=1, keepdim=True)
    s = amax / torch.finfo(dtype).max
    assert torch.equal(st_.scales().expand_as(x), s.expand_as(x))
    ref = (x / s).to(dtype).float() * s
    assert torch.equal(st_.dequantize(), ref)
    assert st_.bits_per_weight == 8 + 32 * (1 if gran == "tensor" else 16) / x.numel()


def test_static_fp8_scale_saturates_what_calibration_did_not_see():
    calib = torch.randn(64, 32, generator=_gen(6))
    s = calib.abs().max() / 448  # static: fixed from calibration data
    x = calib.clone()
    x[0, 0] = 10 * calib.abs().max()  # an activation larger than anything calibrated
    st_ = quantize_fp8(x, "tensor", scale=s)
    assert st_.dequantize()[0, 0].item() == pytest.approx(448 * s.item(), rel=1e-6)
    dyn = quantize_fp8(x, "tensor")
    assert dyn.dequantize()[0, 0].item() == pytest.approx(x[0, 0].item(), rel=2**-4)
    per_row = quantize_fp8(x, "row", scale=torch.full((64,), s.item()))
    assert torch.equal(per_row.dequantize(), st_.dequantize())


def test_mxfp8_elements_match_torch_e4m3_cast():
    x = torch.randn(4, 64, generator=_gen(7))
    st_ = quantize_scaled(x, MXFP8)
    X = decode_e8m0(st_.scale).repeat_interleave(32, dim=1)
    ref = (x / X).clamp(-448, 448).to(torch.float8_e4m3fn).float() * X
    assert torch.equal(st_.dequantize(), ref)


def test_packing_order_two_codes_per_byte_low_nibble_first():
    x = _block(0.5, 1.0, -6.0, 6.0)  # X = 1: codes 1, 2, 15, 7
    p = quantize_mxfp4(x).pack()
    assert p["codes"][0, :2].tolist() == [0x21, 0x7F] and p["codes"].shape == (1, 16)
    assert p["scale"].dtype == torch.uint8 and p["scale"].tolist() == [[127]]


@pytest.mark.parametrize("name", sorted(SCALED_FORMATS))
def test_pack_unpack_round_trip(name):
    x = torch.randn(6, 64, generator=_gen(8))
    st_ = quantize_scaled(x, name)
    back = ScaledTensor.unpack(st_.pack(), name, x.shape)
    assert torch.equal(back.codes, st_.codes) and torch.equal(back.dequantize(), st_.dequantize())
    assert isinstance(back, QuantizedTensor)


def test_bits_per_weight():
    x = torch.randn(64, 256, generator=_gen(9))
    assert quantize_mxfp4(x).bits_per_weight == 4.25
    assert quantize_nvfp4(x).bits_per_weight == 4.5 + 32 / x.numel()
    assert MXFP4.bits_per_weight() == 4.25 and NVFP4.bits_per_weight(1 << 20) == 4.5 + 32 / (1 << 20)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: quantize_mxfp4(torch.ones(2, 30)), "multiple of its block 32"),
        (lambda: quantize_mxfp4(torch.ones(2, 32, dtype=torch.int32)), "floating-point"),
        (lambda: quantize_mxfp4(torch.tensor([[math.nan] * 32])), "NaN or Inf"),
        (lambda: quantize_scaled(torch.ones(2, 32), "mxfp4", scale=1.0), "static scale"),
        (lambda: quantize_scaled(torch.ones(2, 32), "mxfp4", global_scale=1.0), "global_scale"),
        (lambda: quantize_scaled(torch.ones(2, 32), "mxfp5"), "fmt must be one of"),
        (lambda: quantize_fp8(torch.ones(2, 32), "group"), "granularity must be"),
        (lambda: quantize_fp8(torch.ones(2, 32), scale=0.0), "scale must be positive"),
        (lambda: quantize_fp8(torch.ones(2, 32), "row", scale=torch.ones(3)), "one per block"),
    ],
)
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
def test_quant_linear_paths_and_storage(mode):
    lin = nn.Linear(128, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 128, generator=_gen(10)) * 0.05)
    layer = QuantLinear.from_linear(lin, qlab.QuantSpec(), mode=mode)
    ref_w = quantize_scaled(lin.weight.detach(), mode).dequantize()
    assert torch.equal(layer.dequantize(torch.float32), ref_w)
    fmt = SCALED_FORMATS[mode]
    expected = 48 * 128 // 2 + 48 * 128 // fmt.block + (4 if fmt.global_scale else 0) + 48 * 4
    assert layer.nbytes == expected  # codes + scale bytes (+ global) + bias
    x = torch.randn(5, 128, generator=_gen(11))
    ref = x @ ref_w.T + lin.bias.detach()
    with use_path("reference"):
        assert torch.allclose(layer(x), ref, atol=1e-5, rtol=1e-5)
    for path in PATHS:
        if path != "reference" and PATH_TABLE[path].fits(layer, x):
            with use_path(path), torch.no_grad():
                y = layer(x)
            assert float((y - ref).norm() / ref.norm()) < FAST_PATH_RTOL, path


def test_quant_linear_rejects_a_nan_scale_byte():
    layer = QuantLinear.from_linear(nn.Linear(64, 16), qlab.QuantSpec(), mode="mxfp4")
    layer.scale[0, 0] = 0xFF
    with pytest.raises(ValueError, match="scale holds 1 NaN"):
        layer.check_finite()


@pytest.mark.parametrize("method", ["mxfp4", "nvfp4"])
def test_quantize_model_save_and_load(tmp_path, method):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    torch.manual_seed(0)
    q = qlab.quantize_model(model, qlab.QuantConfig(method, 4))
    assert all(m.mode == method for m in q.modules() if isinstance(m, QuantLinear))
    path = qlab.save_quantized(q, tmp_path / "m.safetensors")
    back = qlab.load_quantized(path, lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)))
    x = torch.randn(3, 64, generator=_gen(12))
    with use_path("reference"):
        assert torch.equal(back(x), q(x))
    for a, b in zip(q.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)


_TRITON_SCRIPT = """
import torch, qlab
import qlab.kernels as kernels
from qlab.nn import QuantLinear, dispatch
assert kernels.available("cpu")
dispatch._kernels = lambda: kernels  # the path's CUDA gate, opened for the interpreter
for mode in ("mxfp4", "nvfp4"):
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=torch.Generator().manual_seed(13)))
    layer = QuantLinear.from_linear(lin, qlab.QuantConfig(mode, 4))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(14))
    ref = x @ layer.dequantize(torch.float32).T
    y = dispatch._triton_forward(layer, x)
    print(mode, float((y - ref).norm() / ref.norm()))
"""


def test_triton_path_runs_mx_layers_as_an_fp4_codebook():
    """The CUDA path's kernel, run in Triton's interpreter in a fresh process (TRITON_INTERPRET must be set
    before triton is imported), on the arguments the dispatch builds for MXFP4 / NVFP4 layers."""
    import os
    import subprocess
    import sys

    from qlab.kernels import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    errors = dict(line.split() for line in out.stdout.strip().splitlines())
    assert set(errors) == {"mxfp4", "nvfp4"}
    assert all(float(e) < 1e-5 for e in errors.values()), errors  # fp32 accumulation of the same values


def test_a_scaled_tensor_checks_its_scales_against_its_format():
    st_ = quantize_nvfp4(torch.randn(2, 32, generator=_gen(15)))
    with pytest.raises(ValueError, match="needs a global_scale"):
        ScaledTensor(st_.codes, st_.scale, None, st_.spec, st_.shape, codebook=st_.codebook, fmt=NVFP4)
    with pytest.raises(ValueError, match="must be uint8 bytes"):
        ScaledTensor(st_.codes, st_.scales(), None, st_.spec, st_.shape, codebook=st_.codebook, fmt=MXFP4)
