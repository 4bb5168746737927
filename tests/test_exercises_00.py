"""Lesson 00's checks: each reference solution passes, a typical wrong answer fails with a hint."""

from __future__ import annotations

import pytest
import torch

from qlab.exercises.lesson00 import check_fp16_bits, check_method, check_model_bytes


def _torch_fp16_bits(value: float) -> str:
    return format(int(torch.tensor([value]).half().view(torch.int16).item()) & 0xFFFF, "016b")


def test_fp16_bits_reference_passes_and_wrong_answers_get_field_hints():
    # reference solution (lesson 00): 1.0 = 2^0 * (1 + 0): exponent 0 + 15 = 01111, mantissa 0
    assert check_fp16_bits(1.0, "0 01111 0000000000", quiet=True)
    assert check_fp16_bits(-2.5, _torch_fp16_bits(-2.5), quiet=True)
    wrong_sign = check_fp16_bits(-1.0, "0 01111 0000000000", quiet=True)
    assert not wrong_sign and "sign" in wrong_sign.message
    unbiased = check_fp16_bits(1.0, "0 00000 0000000000", quiet=True)  # forgot the bias
    assert not unbiased and "k + 15" in unbiased.message
    leading_one = check_fp16_bits(1.0, "0 01111 1000000000", quiet=True)  # stored the implicit 1
    assert not leading_one and "leading 1" in leading_one.message
    assert "0000000000" not in leading_one.message  # the hint never gives the answer
    with pytest.raises(ValueError, match="16 binary digits"):
        check_fp16_bits(1.0, "0 01111")
    with pytest.raises(TypeError, match="bits"):
        check_fp16_bits(1.0, 0b0011110000000000)  # type: ignore[arg-type]


def test_model_bytes_reference_passes_and_fp32_count_fails():
    n = 134_515_008  # SmolLM2-135M, counted in lesson 00 from the loaded model
    assert check_model_bytes("SmolLM2-135M", "bf16", 2 * n, quiet=True)
    wrong = check_model_bytes("SmolLM2-135M", "bf16", 4 * n, quiet=True)  # fp32's 4 bytes per parameter
    assert not wrong and "bytes one takes" in wrong.message
    bits_not_bytes = check_model_bytes("SmolLM2-135M", "bf16", 16 * n, quiet=True)
    assert not bits_not_bytes
    int4 = check_model_bytes("SmolLM2-135M", "int4 asym g128", n / 2, quiet=True)  # forgot scales + rest
    assert not int4 and "scales" in int4.message
    with pytest.raises(ValueError, match="model"):
        check_model_bytes("GPT-5", "bf16", 1)
    with pytest.raises(TypeError, match="answer"):
        check_model_bytes("SmolLM2-135M", "bf16", "269 MB")  # type: ignore[arg-type]


def test_method_reference_passes_and_rtn_fails():
    # reference solutions (lesson 00)
    assert check_method("consumer_gpu", 4, True, False, "awq", quiet=True)
    assert check_method("cpu", 2, False, False, " HQQ ", quiet=True)
    wrong = check_method("consumer_gpu", 4, True, False, "rtn", quiet=True)
    assert not wrong and "calibration data" in wrong.message
    qlora = check_method("consumer_gpu", 4, True, True, "awq", quiet=True)
    assert not qlora and "QLoRA" in qlora.message
    with pytest.raises(TypeError, match="method"):
        check_method("cpu", 4, True, False, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hardware"):
        check_method("tpu", 4, True, False, "awq")


def test_checks_print_one_line(capsys):
    check_fp16_bits(1.0, "0 01111 0000000000")
    assert capsys.readouterr().out.strip() == "✅ fp16 bits of 1: correct."
