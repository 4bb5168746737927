"""Checks for lesson 03, granularity.

Every check recomputes the answer with :mod:`qlab.quantize` and :mod:`qlab.metrics` and compares; a wrong
answer gets a hint that points at the idea, never the number.
"""

from __future__ import annotations

import torch

from qlab.exercises import AnswerError, CheckResult, answer_check, as_int, as_number, report
from qlab.metrics import sqnr
from qlab.quantize import QuantSpec, quantize


def _check_spec(spec: object) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    return spec


@answer_check("block size")
def check_block_size(
    spec: QuantSpec, shape: tuple[int, ...], answer: tuple[int, ...], *, quiet: bool = False
) -> CheckResult:
    """Exercise 1: the ``block_size`` (elements of each dim sharing one scale) of ``spec`` for ``shape``."""
    spec = _check_spec(spec)
    ref = spec.block_size(tuple(shape))
    if isinstance(answer, torch.Tensor):
        answer = answer.tolist()
    if not isinstance(answer, (tuple, list, torch.Size)):
        raise AnswerError(f"give a tuple of ints, one per dimension, such as (1, 8); got {answer!r}.")
    got = tuple(as_int(n, "each entry of the block size") for n in answer)
    hint = (
        "a block spans the elements that share one scale: all of them for per-tensor, one whole row "
        "(1 along axis 0) for per-channel, and group_size consecutive inputs of one row for per-group."
    )
    return report(got == ref, f"block size of {spec.describe()} for {tuple(shape)}", hint, quiet=quiet)


@answer_check("bits per weight")
def check_bits_per_weight(
    spec: QuantSpec, shape: tuple[int, ...], answer: object, *, quiet: bool = False
) -> CheckResult:
    """Exercise 2: average storage bits per weight of ``spec`` on a tensor of ``shape`` (within 1e-6).

    Compared with ``QuantizedTensor.bits_per_weight``: packed codes plus every stored scale and zero.
    """
    spec = _check_spec(spec)
    a = as_number(answer, "answer (bits per weight)")
    w = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0))
    ref = quantize(w, spec).bits_per_weight
    ok = abs(a - ref) <= 1e-6
    hint = (
        f"start from {spec.bits} bits per code, then share out the metadata: each block stores a scale "
        f"({torch.finfo(spec.scale_dtype).bits} bits)"
        f"{'' if spec.symmetric else ' and a zero of the same dtype'}; "
        "divide by the elements per block."
    )
    return report(ok, f"bits per weight of {spec.describe()}", hint, quiet=quiet)


def candidate_group_sizes(n: int) -> list[int]:
    """Powers of two from 8 up to ``n`` that divide ``n``: the group sizes exercise 3 considers."""
    return [g for g in (2**k for k in range(3, 16)) if g <= n and n % g == 0]


def largest_group_reaching(w: torch.Tensor, bits: int, target_db: float) -> int | None:
    """Largest candidate group size whose asymmetric RTN quantization of ``w`` reaches ``target_db``."""
    best = None
    for g in candidate_group_sizes(w.shape[-1]):
        qt = quantize(w, QuantSpec.per_group(bits=bits, group_size=g, symmetric=False))
        if sqnr(w, qt.dequantize()) >= target_db:
            best = g
    return best


@answer_check("group size")
def check_group_size(
    w: torch.Tensor, bits: int, target_db: float, answer: object, *, quiet: bool = False
) -> CheckResult:
    """Exercise 3: the largest power-of-two group size (>= 8) whose asymmetric ``bits``-bit quantization
    of ``w`` still reaches an SQNR of ``target_db`` dB: the cheapest scheme that is good enough.

    The answer may be a Python or numpy int, a whole float or a one-element tensor."""
    ref = largest_group_reaching(w, bits, target_db)
    if ref is None:
        raise ValueError(f"no group size reaches {target_db} dB at {bits} bits; pick a lower target")
    answer = as_int(answer, "answer (a group size)")
    if answer not in candidate_group_sizes(w.shape[-1]):
        hint = f"try powers of two from 8 that divide the row length {w.shape[-1]}."
    elif answer < ref:
        hint = "that one reaches the target, but a larger group (fewer scales, fewer bits) does too."
    else:
        hint = "that group is too coarse: measure the SQNR of every group size, keep those above the target."
    return report(answer == ref, f"group size for {target_db:g} dB at {bits} bits", hint, quiet=quiet)
