"""Checks for lesson 00, welcome: a first look at bits, bytes and methods.

Each check recomputes the answer with qlab (:mod:`qlab.plots`, :mod:`qlab.picker`) and says right or wrong;
a wrong answer gets a hint towards the reasoning, never the number.
"""

from __future__ import annotations

from qlab.exercises import AnswerError, CheckResult, answer_check, as_number, report
from qlab.formats import describe_bits
from qlab.picker import MODELS, SCHEMES, estimate_memory, recommend


@answer_check("fp16 bits")
def check_fp16_bits(value: float, bits: str, *, quiet: bool = False) -> CheckResult:
    """Exercise 1: the 16-bit pattern of ``value`` in fp16, sign first (spaces allowed: ``"0 01111 ..."``).

    ``value = (-1)^s * 2^(e - 15) * (1 + m / 2^10)``. A string of the wrong length or with other characters
    gets a hint about the form (1 sign + 5 exponent + 10 mantissa bits), not an error.
    """
    if not isinstance(bits, str):
        raise AnswerError(
            f"write the bits as a string of 0s and 1s, such as '0 00000 0000000000'; got {bits!r}."
        )
    given = bits.replace(" ", "").replace("_", "")
    if set(given) - {"0", "1"}:
        raise AnswerError(f"use only the digits 0 and 1 (spaces allowed), got {bits!r}.")
    if len(given) != 16:
        raise AnswerError(f"fp16 has 16 bits (1 sign, 5 exponent, 10 mantissa); {bits!r} holds {len(given)}.")
    want = describe_bits(float(value), "fp16").bits
    if given[0] != want[0]:
        hint = "the first bit is the sign: 0 for positive numbers, 1 for negative ones."
    elif given[1:6] != want[1:6]:
        hint = "write |value| = 2^k * (1 + fraction); the 5 exponent bits hold k + 15 in binary."
    else:
        hint = "the 10 mantissa bits hold the fraction times 2^10, in binary (the leading 1 is not stored)."
    return report(given == want, f"fp16 bits of {value:g}", hint, quiet=quiet)


@answer_check("bytes of a model")
def check_model_bytes(model: str, scheme: str, answer: float, *, quiet: bool = False) -> CheckResult:
    """Exercise 2: bytes to store ``model`` (a name in :data:`qlab.picker.MODELS`) in ``scheme``; within 1%.

    For plain float schemes: parameters times bytes per parameter.
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    a = as_number(answer, "answer (a number of bytes)")
    want = estimate_memory(model, scheme).total
    ok = abs(a - want) <= 0.01 * want
    if ok:
        hint = ""
    elif SCHEMES[scheme].is_float:
        hint = f"count the parameters (MODELS[{model!r}].n_params) and multiply by the bytes one takes."
    else:
        hint = "quantized linear weights take bits/8 bytes each plus their scales; the rest stays 16-bit."
    return report(ok, f"bytes of {model} in {scheme}", hint, quiet=quiet)


@answer_check("method choice")
def check_method(
    hardware: str, target_bits: int, calibration: bool, finetune: bool, method: str, *, quiet: bool = False
) -> CheckResult:
    """Exercise 3: the method :func:`qlab.picker.recommend` picks for a situation (``"awq"``, ...).

    With calibration data and no fine-tuning below 8 bits, both methods that use the data (AWQ, activation-
    aware; GPTQ, error-compensating) are right, since the hint names both; the line says which one the picker
    takes.
    """
    if not isinstance(method, str):
        raise AnswerError(f"give a method name as a string, such as 'rtn', got {method!r}.")
    want = recommend(hardware, target_bits, calibration, finetune).method
    given = method.strip().lower()
    accepted = {want}
    if calibration and not finetune and target_bits != 8:
        accepted |= {"awq", "gptq"}
    if finetune and target_bits != 8:
        hint = "fine-tuning a quantized base has one standard recipe (QLoRA); which format does it use?"
    elif target_bits == 8:
        hint = "at 8 bits plain rounding is nearly lossless; what does the hardware run natively?"
    elif calibration:
        hint = "with calibration data, pick the method that uses it (activation-aware or error-compensating)."
    elif target_bits >= 4:
        hint = "without calibration data only a data-free method can do better than plain rounding."
    else:
        hint = "below 4 bits without data, lesson 06 found no data-free method that beats plain rounding."
    name = "method choice"
    if given in accepted and given != want:
        name += f" ({given} uses the calibration data too; qlab's picker takes {want})"
    return report(given in accepted, name, hint, quiet=quiet)
