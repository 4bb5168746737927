"""Every exercise check of lessons 01-03 accepts the reference solution and rejects a typical wrong answer.

The reference answers are computed here independently, in plain torch / arithmetic, from the formulas the
lessons teach (not by calling the qlab functions the checks use).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qlab.exercises import lesson01, lesson02, lesson03
from qlab.quantize import QuantSpec


# ---------------------------------------------------------------------------------------------- lesson 01
@pytest.mark.parametrize(
    ("value", "fmt", "fields"),
    [
        (-6.5, "fp16", (1, 17, 640)),  # 6.5 = 2^2 * 1.625; 2 + 15 = 17; 0.625 * 1024 = 640
        (1.0, "bf16", (0, 127, 0)),
        (0.15625, "fp32", (0, 124, 2097152)),  # 2^-3 * 1.25; 0.25 * 2^23
        (0.3, "fp8_e4m3", (0, 5, 2)),  # rounds to 0.3125 = 2^-2 * 1.25
    ],
)
def test_check_fields(value: float, fmt: str, fields: tuple[int, int, int]) -> None:
    assert lesson01.check_fields(value, fmt, *fields, quiet=True)
    s, e, m = fields
    assert not lesson01.check_fields(value, fmt, 1 - s, e, m, quiet=True)
    unbiased = {"fp16": 15, "bf16": 127, "fp32": 127, "fp8_e4m3": 7}[fmt]
    wrong = lesson01.check_fields(value, fmt, s, e - unbiased, m, quiet=True)  # forgot the bias
    assert not wrong and "bias" in wrong.message
    assert not lesson01.check_fields(value, fmt, s, e, m + 1, quiet=True)


def test_check_fields_matches_torch_bits() -> None:
    # independent reference: the raw fp16 bit pattern from torch
    code = int(torch.tensor([-6.5], dtype=torch.float16).view(torch.int16)) & 0xFFFF
    assert lesson01.check_fields(-6.5, "fp16", code >> 15, (code >> 10) & 0x1F, code & 0x3FF, quiet=True)


@pytest.mark.parametrize(
    ("fmt", "right", "wrong"),
    [
        ("fp16", (2 - 2**-10) * 2**15, 2**16),  # wrong: forgot that the top exponent means inf
        ("bf16", (2 - 2**-7) * 2**127, 2.0**127),
        ("fp8_e4m3", 448.0, 480.0),  # 480 uses the NaN code
        ("fp8_e5m2", 57344.0, 61440.0),
    ],
)
def test_check_format_max(fmt: str, right: float, wrong: float) -> None:
    assert lesson01.check_format_max(fmt, right, quiet=True)
    assert not lesson01.check_format_max(fmt, wrong, quiet=True)


@pytest.mark.parametrize(
    ("x", "fmt", "wrong"),
    [
        (2049.0, "fp16", 2050.0),  # a tie: spacing 2 above 2048, ties go to the even mantissa
        (1 + 2**-8, "bf16", 1 + 2**-7),
        (70000.0, "fp16", 65504.0),  # fp16 overflows to inf, it does not saturate
        (0.1, "fp8_e4m3", 0.1),
    ],
)
def test_check_rounded(x: float, fmt: str, wrong: float) -> None:
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}[fmt]
    right = float(torch.tensor(x, dtype=torch.float32).to(torch_dtype).float())
    assert lesson01.check_rounded(x, fmt, right, quiet=True)
    assert not lesson01.check_rounded(x, fmt, wrong, quiet=True)


def test_check_model_memory() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 1536), nn.GELU(), nn.Linear(1536, 384))
    n = sum(p.numel() for p in model.parameters())
    assert lesson01.check_model_memory(model, "bf16", 2 * n, quiet=True)
    assert lesson01.check_model_memory(model, "fp32", 4 * n, quiet=True)
    assert lesson01.check_model_memory(model, "fp8_e4m3", n, quiet=True)
    assert not lesson01.check_model_memory(model, "bf16", 16 * n, quiet=True)  # counted bits, not bytes
    assert not lesson01.check_model_memory(model, "bf16", 4 * n, quiet=True)


def test_check_model_memory_counts_tied_weights_once() -> None:
    emb = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert lesson01.check_model_memory(model, "fp16", 2 * 800, quiet=True)
    assert not lesson01.check_model_memory(model, "fp16", 2 * 1600, quiet=True)


def test_lesson01_bad_input() -> None:
    with pytest.raises(TypeError, match="fmt"):  # the lesson's own argument: an error
        lesson01.check_format_max("int8", 127, quiet=True)
    # the learner's answers: a hint, never a traceback
    half = lesson01.check_fields(1.0, "fp16", 0, 15.5, 0, quiet=True)
    assert not half and "exponent" in half.message and "whole number" in half.message
    text = lesson01.check_rounded(1.0, "fp16", "1.0", quiet=True)
    assert not text and "must be a number" in text.message
    placeholder = lesson01.check_format_max("fp16", ..., quiet=True)
    assert not placeholder and "placeholder" in placeholder.message
    many = lesson01.check_model_memory(nn.Linear(4, 4), "fp16", torch.ones(3), quiet=True)
    assert not many and "single number" in many.message


def test_check_fields_takes_tensors_and_numpy_ints() -> None:
    # fields computed with torch or numpy arrive as tensors or numpy ints: no TypeError, same verdict
    code = torch.tensor([-6.5], dtype=torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    s, e, m = code >> 15, (code >> 10) & 0x1F, code & 0x3FF  # one-element int64 tensors
    assert lesson01.check_fields(-6.5, "fp16", s, e, m, quiet=True)
    assert lesson01.check_fields(-6.5, "fp16", np.int64(1), np.int32(17), np.uint16(640), quiet=True)
    assert lesson01.check_fields(-6.5, "fp16", 1, 17.0, torch.tensor(640.0), quiet=True)  # whole floats
    wrong = lesson01.check_fields(-6.5, "fp16", s, e - 15, m, quiet=True)
    assert not wrong and "bias" in wrong.message


# ---------------------------------------------------------------------------------------------- lesson 02
def _x() -> torch.Tensor:
    return torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 0.05 + 0.02


def test_check_scale_zero() -> None:
    x = _x()
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / 255
    zero = round(-lo / scale)
    assert lesson02.check_scale_zero(x, scale, zero, quiet=True)
    assert not lesson02.check_scale_zero(x, (hi - lo) / 256, zero, quiet=True)  # 256 codes, 255 steps
    wrong_zero = lesson02.check_scale_zero(x, scale, -lo / scale, quiet=True)  # forgot to round
    assert not wrong_zero and "round" in wrong_zero.message


def test_check_symmetric_codes() -> None:
    x = _x()
    scale = x.abs().max() / 127
    q = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
    assert lesson02.check_symmetric_codes(x, q, quiet=True)
    assert lesson02.check_symmetric_codes(x, q.float(), quiet=True)  # any dtype holding the integers
    truncated = lesson02.check_symmetric_codes(x, torch.trunc(x / scale), quiet=True)
    assert not truncated and "truncate" in truncated.message
    assert not lesson02.check_symmetric_codes(x, torch.round(x / (x.abs().max() / 128)), quiet=True)
    assert not lesson02.check_symmetric_codes(x, q[:10], quiet=True)


def test_check_dequantize() -> None:
    assert lesson02.check_dequantize(lambda q, s, z: s * (q.float() - z), quiet=True)
    bug = lesson02.check_dequantize(lambda q, s, z: q.float() * s + z, quiet=True)
    assert not bug and "zero-point is a code" in bug.message
    assert not lesson02.check_dequantize(lambda q, s, z: s * q.float(), quiet=True)
    not_fn = lesson02.check_dequantize(3, quiet=True)  # type: ignore[arg-type]
    assert not not_fn and "must be a function" in not_fn.message
    raises = lesson02.check_dequantize(lambda q, s, z: q.foo(), quiet=True)  # the learner's code raises
    assert not raises and "raised AttributeError" in raises.message
    assert not lesson02.check_dequantize(lambda q, s, z: None, quiet=True)  # an unfinished body


def test_lesson02_malformed_answers_get_hints() -> None:
    x = _x()
    for result in (
        lesson02.check_scale_zero(x, ..., ..., quiet=True),
        lesson02.check_scale_zero(x, "0.01", 3, quiet=True),
        lesson02.check_symmetric_codes(x, [1, 2, 3], quiet=True),  # type: ignore[arg-type]
        lesson02.check_symmetric_codes(x, ..., quiet=True),  # type: ignore[arg-type]
    ):
        assert not result and result.message.startswith("❌")
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / 255
    # numpy and tensor numbers are fine
    assert lesson02.check_scale_zero(x, np.float32(scale), np.int64(round(-lo / scale)), quiet=True)
    assert lesson02.check_scale_zero(
        x, torch.tensor(scale), torch.tensor(float(round(-lo / scale))), quiet=True
    )


def test_check_error_bound() -> None:
    x = _x()
    scale = x.abs().max().item() / 127
    assert lesson02.check_error_bound(x, scale / 2, quiet=True)
    assert not lesson02.check_error_bound(x, scale, quiet=True)
    text = lesson02.check_error_bound(x, "0.1", quiet=True)
    assert not text and "bound" in text.message


# ---------------------------------------------------------------------------------------------- lesson 03
def test_check_block_size() -> None:
    shape = (1536, 384)
    assert lesson03.check_block_size(QuantSpec.per_tensor(8), shape, (1536, 384), quiet=True)
    assert lesson03.check_block_size(QuantSpec.per_channel(8), shape, (1, 384), quiet=True)
    assert lesson03.check_block_size(QuantSpec.per_group(4, 32), shape, (1, 32), quiet=True)
    assert not lesson03.check_block_size(QuantSpec.per_channel(8), shape, (1536, 1), quiet=True)  # columns
    assert not lesson03.check_block_size(QuantSpec.per_group(4, 32), shape, (32,), quiet=True)
    assert lesson03.check_block_size(QuantSpec.per_group(4, 32), shape, [np.int64(1), 32], quiet=True)
    assert lesson03.check_block_size(QuantSpec.per_group(4, 32), shape, torch.tensor([1, 32]), quiet=True)
    for malformed in (32, ..., (1, "32"), (1, 32.5)):
        result = lesson03.check_block_size(QuantSpec.per_group(4, 32), shape, malformed, quiet=True)
        assert not result and result.message.startswith("❌")


@pytest.mark.parametrize(
    ("spec", "right", "wrong"),
    [
        (QuantSpec.per_group(4, 128, symmetric=False, scale_dtype=torch.float16), 4 + 32 / 128, 4 + 16 / 128),
        (QuantSpec.per_group(4, 32, symmetric=True, scale_dtype=torch.float16), 4 + 16 / 32, 4.0),
        (QuantSpec.per_channel(8), 8 + 32 / 384, 8 + 32 / 1536),  # one scale per row of 384 inputs
        (QuantSpec.per_tensor(8), 8 + 32 / (1536 * 384), 8 + 32),
    ],
)
def test_check_bits_per_weight(spec: QuantSpec, right: float, wrong: float) -> None:
    assert lesson03.check_bits_per_weight(spec, (1536, 384), right, quiet=True)
    assert not lesson03.check_bits_per_weight(spec, (1536, 384), wrong, quiet=True)
    assert lesson03.check_bits_per_weight(
        spec, (1536, 384), torch.tensor(right, dtype=torch.float64), quiet=True
    )
    assert not lesson03.check_bits_per_weight(spec, (1536, 384), "4.25", quiet=True)


def _group_sqnr(w: torch.Tensor, bits: int, g: int) -> float:
    # independent asymmetric RTN per group in plain torch
    wg = w.reshape(w.shape[0], -1, g)
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(wg / s) + z, 0, 2**bits - 1)
    err = (s * (q - z)).reshape(w.shape) - w
    return 10 * torch.log10(w.pow(2).sum() / err.pow(2).sum()).item()


def test_check_group_size() -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    w[3, 17] = 40.0  # an outlier makes coarse groups much worse
    target = 18.0
    sizes = [g for g in (8, 16, 32, 64, 128, 256) if _group_sqnr(w, 4, g) >= target]
    right = max(sizes)
    assert right < 256  # the exercise is only interesting if some sizes fail
    assert lesson03.check_group_size(w, 4, target, right, quiet=True)
    too_small = lesson03.check_group_size(w, 4, target, 8, quiet=True)
    assert not too_small and "larger group" in too_small.message
    assert not lesson03.check_group_size(w, 4, target, 256, quiet=True)
    assert not lesson03.check_group_size(w, 4, target, 100, quiet=True)
    # a group size found by a torch or numpy search arrives as a tensor or numpy int: no TypeError
    assert lesson03.check_group_size(w, 4, target, torch.tensor(right), quiet=True)
    assert lesson03.check_group_size(w, 4, target, np.int64(right), quiet=True)
    assert lesson03.check_group_size(w, 4, target, float(right), quiet=True)
    assert not lesson03.check_group_size(w, 4, target, np.int64(8), quiet=True)
    for malformed in (..., "32", torch.tensor([right, 8]), right + 0.5):
        result = lesson03.check_group_size(w, 4, target, malformed, quiet=True)
        assert not result and result.message.startswith("❌")
    with pytest.raises(ValueError, match="target"):
        lesson03.check_group_size(w, 2, 60.0, 8, quiet=True)


def test_check_prints_without_answer(capsys: pytest.CaptureFixture[str]) -> None:
    x = _x()
    lesson02.check_error_bound(x, 1.0)
    out = capsys.readouterr().out
    assert out.startswith("❌") and f"{x.abs().max().item() / 254:.4g}" not in out
    lesson02.check_error_bound(x, x.abs().max().item() / 254)
    assert capsys.readouterr().out.startswith("✅")
