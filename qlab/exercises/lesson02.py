"""Checks for lesson 02, int8 linear quantization.

Every check recomputes the answer with :mod:`qlab.quantize` and compares; a wrong answer gets a hint that
points at the formula, never the number.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qlab.exercises import CheckResult, answer_check, as_function, as_number, as_tensor, call_answer, report
from qlab.quantize import QuantSpec, compute_scale_zero, quantize


@answer_check("scale and zero-point")
def check_scale_zero(x: torch.Tensor, scale: object, zero: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 1: the asymmetric uint8 per-tensor ``scale`` and ``zero`` of ``x``.

    qlab's rule: ``scale = (max - min) / 255`` over the range widened to include 0, and
    ``zero = round(-min / scale)``. The scale must match to a relative 1e-5, the zero-point exactly.
    """
    ref_scale, ref_zero = compute_scale_zero(x, QuantSpec.per_tensor(bits=8, symmetric=False))
    assert ref_zero is not None
    s, z = as_number(scale, "scale"), as_number(zero, "zero")
    s_ok = abs(s - float(ref_scale)) <= 1e-5 * float(ref_scale)
    z_ok = z == float(ref_zero)
    if not s_ok:
        hint = (
            "the scale spreads the whole range [min, max] (with 0 inside it) over the 256 codes 0..255: "
            "how many steps lie between code 0 and code 255?"
        )
    else:
        hint = (
            "the zero-point is the code that 0.0 maps to: solve min = scale * (0 - zero) for zero, "
            "then round."
        )
    return report(s_ok and z_ok, "scale and zero-point", hint, quiet=quiet)


@answer_check("symmetric codes")
def check_symmetric_codes(x: torch.Tensor, codes: torch.Tensor, *, quiet: bool = False) -> CheckResult:
    """Exercise 2: int8 symmetric per-tensor codes of ``x`` (restricted range [-127, 127]).

    Compared with ``qlab.quantize.quantize(x, QuantSpec.per_tensor(8))`` by value (any integer dtype).
    """
    codes = as_tensor(codes, "codes")
    ref = quantize(x, QuantSpec.per_tensor(bits=8, symmetric=True)).codes
    if codes.shape != ref.shape:
        return report(
            False, "symmetric codes", f"codes must have the shape of x, {tuple(ref.shape)}", quiet=quiet
        )
    if codes.is_floating_point() and not torch.equal(codes, codes.round()):
        return report(False, "symmetric codes", "codes are integers: round x / scale.", quiet=quiet)
    ok = torch.equal(codes.to(torch.int64), ref.to(torch.int64))
    if ok:
        hint = ""
    elif codes.min() < -127 or codes.max() > 127:
        hint = "clamp the codes to the symmetric range [-127, 127]."
    elif torch.equal(codes.to(torch.int64), torch.trunc(x / (x.abs().max() / 127)).to(torch.int64)):
        hint = "round to the nearest integer (torch.round), do not truncate."
    else:
        hint = "the symmetric scale maps max|x| to code 127: scale = max|x| / 127, q = round(x / scale)."
    return report(ok, "symmetric codes", hint, quiet=quiet)


@answer_check("dequantize")
def check_dequantize(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], *, quiet: bool = False
) -> CheckResult:
    """Exercise 3: ``fn(q, scale, zero)`` must reconstruct floats as ``scale * (q - zero)``.

    Tried on asymmetric uint8 codes of a few tensors (including a nonzero zero-point, where the common
    ``q * scale + zero`` bug shows).
    """
    fn = as_function(fn, "dequantize", "(q, scale, zero) -> floats")
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(64, generator=gen) * 0.1 + 0.3, torch.rand(64, generator=gen) * 2.0 - 0.5]
    ok = True
    for x in cases:
        qt = quantize(x, QuantSpec.per_tensor(bits=8, symmetric=False))
        assert qt.zero is not None
        got = call_answer(fn, "dequantize", qt.codes.clone(), qt.scale.clone(), qt.zero.clone())
        if not isinstance(got, torch.Tensor) or got.shape != x.shape:
            ok = False
            break
        if not torch.allclose(got.float(), qt.dequantize(torch.float32), rtol=1e-5, atol=1e-7):
            ok = False
            break
    hint = (
        "the zero-point is a code, not a float offset: subtract it from the codes first, then multiply by "
        "the scale. Also mind uint8 arithmetic: convert q to float before subtracting."
    )
    return report(ok, "dequantize", hint, quiet=quiet)


@answer_check("error bound")
def check_error_bound(x: torch.Tensor, bound: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 4: the largest possible rounding error of int8 symmetric per-tensor quantization of ``x``.

    Every in-range value lands at most half a step from its code: the answer is ``scale / 2``.
    """
    qt = quantize(x, QuantSpec.per_tensor(bits=8, symmetric=True))
    ref = float(qt.scale) / 2
    b = as_number(bound, "bound")
    ok = abs(b - ref) <= 1e-5 * ref
    hint = "rounding to the nearest code moves a value by at most half the distance between two codes."
    return report(ok, "error bound", hint, quiet=quiet)
