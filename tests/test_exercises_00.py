"""Lesson 00's checks: each reference solution passes, a typical wrong answer fails with a hint."""

from __future__ import annotations

import numpy as np
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


@pytest.mark.parametrize(
    ("bits", "words"),
    [
        ("0 1111 0000000000", "holds 15"),  # one exponent bit short: a hint, not a traceback
        ("0 01111", "16 bits"),
        ("0 01111 00000000002", "only the digits 0 and 1"),
        ("0 01111 000000000O", "only the digits 0 and 1"),
        (0b0011110000000000, "string of 0s and 1s"),
        (..., "string of 0s and 1s"),
    ],
)
def test_fp16_bits_malformed_answers_get_a_hint(bits, words):
    result = check_fp16_bits(1.0, bits, quiet=True)
    assert not result and words in result.message and result.message.startswith("❌")


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
    as_text = check_model_bytes("SmolLM2-135M", "bf16", "269 MB", quiet=True)  # type: ignore[arg-type]
    assert not as_text and "must be a number" in as_text.message
    assert not check_model_bytes("SmolLM2-135M", "bf16", ..., quiet=True)  # type: ignore[arg-type]
    # numbers of any kind are fine: a tensor or a numpy int holding the right count
    assert check_model_bytes("SmolLM2-135M", "bf16", torch.tensor(2 * n), quiet=True)
    assert check_model_bytes("SmolLM2-135M", "bf16", np.int64(2 * n), quiet=True)


def test_method_reference_passes_and_rtn_fails():
    # reference solutions (lesson 00)
    assert check_method("consumer_gpu", 4, True, False, "awq", quiet=True)
    assert check_method("cpu", 4, False, False, " HQQ ", quiet=True)
    assert check_method("cpu", 2, False, False, " RTN ", quiet=True)  # lesson 06: no data-free method held up
    low = check_method("cpu", 2, False, False, "hqq", quiet=True)
    assert not low and "lesson 06" in low.message
    wrong = check_method("consumer_gpu", 4, True, False, "rtn", quiet=True)
    assert not wrong and "calibration data" in wrong.message
    qlora = check_method("consumer_gpu", 4, True, True, "awq", quiet=True)
    assert not qlora and "QLoRA" in qlora.message
    no_name = check_method("cpu", 4, True, False, None, quiet=True)  # type: ignore[arg-type]
    assert not no_name and "method name" in no_name.message
    with pytest.raises(ValueError, match="hardware"):
        check_method("tpu", 4, True, False, "awq")


def test_method_accepts_gptq_where_the_hint_points_at_it():
    # the hint for calibration data names both methods that use it: GPTQ (error-compensating) is right too
    gptq = check_method("consumer_gpu", 4, calibration=True, finetune=False, method="gptq", quiet=True)
    assert gptq and "picker takes awq" in gptq.message
    assert check_method("cpu", 3, calibration=True, finetune=False, method="awq", quiet=True)
    # ... but not where there is no data to use, or where fine-tuning wants NF4
    assert not check_method("consumer_gpu", 4, calibration=False, finetune=False, method="gptq", quiet=True)
    assert not check_method("consumer_gpu", 4, calibration=True, finetune=True, method="gptq", quiet=True)
    assert not check_method("consumer_gpu", 8, calibration=True, finetune=False, method="gptq", quiet=True)


def test_checks_print_one_line(capsys):
    check_fp16_bits(1.0, "0 01111 0000000000")
    assert capsys.readouterr().out.strip() == "✅ fp16 bits of 1: correct."


def test_a_check_ending_a_cell_prints_its_line_once():
    # a check as the last line of a notebook cell: its printed line, and no second one from the result
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    shell = InteractiveShell.instance()
    with capture_output() as cap:
        shell.run_cell("from qlab.exercises.lesson00 import check_fp16_bits")
        shell.run_cell("check_fp16_bits(1.0, '0 01111 0000000000')")
        shell.run_cell("check_fp16_bits(1.0, '0 1111 0000000000')")
    assert cap.stdout.count("✅ fp16 bits of 1: correct.") == 1
    assert cap.stdout.count("❌ fp16 bits: not yet.") == 1
    assert not cap.outputs  # (a terminal shell prints an empty "Out[n]:" prompt; Jupyter sends nothing)
    assert repr(check_fp16_bits(1.0, "0 01111 0000000000", quiet=True)) == "CheckResult(ok=True)"
