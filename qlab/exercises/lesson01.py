"""Checks for lesson 01, floating point.

Every check recomputes the answer with :mod:`qlab.formats` and compares; a wrong answer gets a hint that
points at the formula, never the number.
"""

from __future__ import annotations

import math

from torch import nn

from qlab.exercises import CheckResult, answer_check, as_int, as_number, report
from qlab.formats import FloatFormat, bits_of, get_format, model_bytes, round_to


def _float_format(fmt: FloatFormat | str) -> FloatFormat:
    f = get_format(fmt)
    if not isinstance(f, FloatFormat):
        raise TypeError(f"fmt must be a float format such as 'fp16' or 'bf16', got {f.name}")
    return f


@answer_check("fields")
def check_fields(
    value: float, fmt: FloatFormat | str, sign: int, exponent: int, mantissa: int, *, quiet: bool = False
) -> CheckResult:
    """Exercise 1: the sign, (biased) exponent and mantissa fields of ``value`` stored in ``fmt``.

    ``value = (-1)^s * 2^(e - bias) * (1 + m / 2^M)``; compared with :func:`qlab.formats.bits_of`. Each field
    may be any whole number: a Python or numpy int, a whole float, or a one-element tensor.
    """
    f = _float_format(fmt)
    sign, exponent, mantissa = (
        as_int(v, f"{arg} (the field read as an unsigned integer)")
        for arg, v in (("sign", sign), ("exponent", exponent), ("mantissa", mantissa))
    )
    ref = bits_of(float(value), f)
    want = (int(ref.sign), int(ref.exponent), int(ref.mantissa))
    if sign != want[0]:
        hint = "the sign bit is 1 for negative numbers and 0 for positive ones."
    elif exponent != want[1]:
        hint = (
            f"write |value| = 2^k * (1 + fraction) with the fraction in [0, 1); the stored exponent is "
            f"k plus the bias ({f.bias})."
        )
    elif mantissa != want[2]:
        hint = f"the mantissa field is the fraction times 2^{f.mantissa_bits}, an integer."
    else:
        hint = ""
    return report((sign, exponent, mantissa) == want, f"fields of {value:g} in {f.name}", hint, quiet=quiet)


@answer_check("largest value")
def check_format_max(fmt: FloatFormat | str, answer: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 2: the largest finite value of ``fmt`` (exact)."""
    f = _float_format(fmt)
    a = as_number(answer, "answer")
    if f.has_inf:
        hint = (
            "the all-ones exponent is reserved for inf and NaN, so the largest finite value uses the next "
            "exponent down, with every mantissa bit set."
        )
    else:
        hint = (
            "this format has no inf: its all-ones exponent holds numbers, but all-ones exponent AND "
            "mantissa is NaN."
        )
    return report(a == f.max, f"largest {f.name}", hint, quiet=quiet)


@answer_check("rounded value")
def check_rounded(x: float, fmt: FloatFormat | str, answer: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 3: the value ``x`` becomes after a cast to ``fmt`` (exact, as ``torch`` casts)."""
    f = _float_format(fmt)
    a = as_number(answer, "answer")
    ref = float(round_to(float(x), f))
    ok = a == ref or (math.isnan(a) and math.isnan(ref))
    hint = (
        f"find the binade [2^k, 2^(k+1)) that holds x; there neighbouring {f.name} values are 2^(k - "
        f"{f.mantissa_bits}) apart. Round to the nearest one, ties to the even mantissa, and mind the "
        "maximum."
    )
    return report(ok, f"{x:g} cast to {f.name}", hint, quiet=quiet)


@answer_check("model memory")
def check_model_memory(
    model: nn.Module, fmt: FloatFormat | str, answer: object, *, quiet: bool = False
) -> CheckResult:
    """Exercise 4: the bytes the parameters of ``model`` take in ``fmt`` (within 0.5%).

    Compared with :func:`qlab.formats.model_bytes` (tied parameters count once, buffers do not count).
    """
    f = _float_format(fmt)
    a = as_number(answer, "answer")
    ref = model_bytes(model, f)
    ok = abs(a - ref) <= 0.005 * ref
    hint = f"count the parameters (sum of p.numel()) and multiply by the bytes one {f.name} value takes."
    return report(ok, f"model memory in {f.name}", hint, quiet=quiet)
