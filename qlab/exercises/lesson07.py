"""Checks for lesson 07, Triton kernels.

1. :func:`check_unpack` — write the kernel's unpacking (shift, then mask) for int32 words.
2. :func:`check_decode_intensity` — FLOPs per weight byte of a weight-only quantized layer.
3. :func:`check_ridge_batch` — the batch size at which that layer stops being memory-bound.
4. :func:`check_split_planes` — split activations into the two int8 planes of qlab's CPU kernel.

Each check recomputes the answer with :mod:`qlab.packing`, :mod:`qlab.kernels.roofline` or
:func:`qlab.kernels.cpu.split_activations` and gives a hint, never the number.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qlab.exercises import CheckResult, answer_check, as_function, as_number, call_answer, report
from qlab.kernels.cpu import split_activations
from qlab.kernels.roofline import Accelerator, linear_bytes, linear_flops
from qlab.packing import pack_int32, unpack_int32


@answer_check("unpack")
def check_unpack(unpack: Callable[[torch.Tensor, int], torch.Tensor], *, quiet: bool = False) -> CheckResult:
    """Exercise 1: ``unpack(words, bits) -> codes``, codes ``[rows, words * (32 // bits)]``.

    ``words`` are int32 (:func:`qlab.packing.pack_int32`); code ``j`` of a word sits at bits
    ``[bits*j, bits*(j+1))``. Tried for bits 2, 4 and 8 on words whose top bit is set (negative
    int32), against :func:`qlab.packing.unpack_int32`; compared by value, any integer dtype.
    """
    unpack = as_function(unpack, "unpack", "(words, bits) -> codes")
    g = torch.Generator().manual_seed(7)
    for bits in (2, 4, 8):
        per = 32 // bits
        codes = torch.randint(0, 2**bits, (3, 4 * per), generator=g, dtype=torch.uint8)
        codes[:, per - 1] = 2**bits - 1  # every first word has its sign bit set
        words = pack_int32(codes, bits)
        got = call_answer(unpack, "unpack", words.clone(), bits)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(codes.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return report(
                False,
                "unpack",
                f"for {bits}-bit codes the result should have shape {tuple(codes.shape)} (rows, words * "
                f"{per}), got {shape}: put the {per} codes of each word next to each other.",
                quiet=quiet,
            )
        want = unpack_int32(words, bits, codes.shape[-1])
        if not torch.equal(got.long(), want.long()):
            wrong_sign = torch.equal(got.long() & (2**bits - 1), want.long())
            hint = (
                "right codes once masked: a right shift of a negative int32 copies the sign bit in from "
                "the left, so keep only the low bits with & (2**bits - 1)."
                if wrong_sign
                else f"code j of a word is (word >> (bits * j)) & mask; with bits={bits} the first code "
                "is in the lowest bits, and the codes of word 0 come before those of word 1."
            )
            return report(False, "unpack", hint, quiet=quiet)
    return report(True, "unpack", "", quiet=quiet)


def decode_intensity(m: int, bits: float) -> float:
    """FLOPs per weight byte: ``2 M N K / (N K bits / 8) = 16 M / bits`` (activations not counted)."""
    n = k = 4096  # the sizes cancel
    return linear_flops(m, n, k) / linear_bytes(m, n, k, bits, act_bytes=0)


@answer_check("arithmetic intensity")
def check_decode_intensity(m: int, bits: float, answer: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 2: FLOPs per byte of weight read for ``M`` rows of activations and ``bits``-bit weights.

    Count ``2`` FLOPs (multiply + add) per weight per row, and only the weights' bytes. Relative
    tolerance 1e-3.
    """
    ref = decode_intensity(m, bits)
    got = as_number(answer, "answer")
    ok = abs(got - ref) <= 1e-3 * ref
    if abs(got - 2 * m) <= 1e-3 * 2 * m:
        hint = "you counted weights, not bytes: one weight of `bits` bits is bits / 8 bytes."
    elif abs(got - ref / 2) <= 1e-3 * ref:
        hint = "a multiply-add is 2 FLOPs: 2 * M * N * K in all."
    else:
        hint = "divide the FLOPs (2 per weight per row of x) by the bytes of one weight (bits / 8)."
    return report(ok, "arithmetic intensity", hint, quiet=quiet)


def ridge_batch(acc: Accelerator, bits: float) -> float:
    """Rows ``M`` at which :func:`decode_intensity` reaches the ridge ``peak / bandwidth``."""
    return acc.ridge * bits / 16


@answer_check("ridge batch size")
def check_ridge_batch(acc: Accelerator, bits: float, answer: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 3: the batch ``M`` (a real number) where ``bits``-bit weights make the layer compute-bound.

    Same weight-only intensity as exercise 2, set equal to ``acc.ridge``; relative tolerance 1%.
    """
    ref = ridge_batch(acc, bits)
    got = as_number(answer, "answer")
    ok = abs(got - ref) <= 0.01 * ref
    if abs(got - acc.ridge) <= 0.01 * acc.ridge:
        hint = "that is the ridge in FLOPs per byte; now solve 16 * M / bits = ridge for M."
    elif abs(got - acc.ridge * 16 / bits) <= 0.01 * acc.ridge * 16 / bits:
        hint = (
            "upside down: fewer bytes per weight mean more FLOPs per byte, so the ridge comes at a smaller M."
        )
    else:
        hint = "intensity grows linearly with M (16 * M / bits FLOPs per byte): where does it meet the ridge?"
    return report(ok, "ridge batch size", hint, quiet=quiet)


@answer_check("split_planes")
def check_split_planes(
    split: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, quiet: bool = False
) -> CheckResult:
    """Exercise 4: ``split(x) -> (sx, q1, q2)`` with ``x ≈ sx (q1 + q2 / 254)`` per row of ``x [M, K]``.

    Compared with :func:`qlab.kernels.cpu.split_activations`: ``sx`` ``[M, 1]`` (rtol 1e-6), ``q1`` and
    ``q2`` equal as integers on at least 99.9% of the elements (a different but valid rounding of an
    exact tie may differ by one), and every element within ``sx / 508`` of ``x``.
    """
    split = as_function(split, "split_planes", "x -> (sx, q1, q2)")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 256, generator=g) * torch.tensor([[1.0], [0.01], [30.0], [1.0], [5.0], [0.2]])
    x[3, 17] = 40.0  # an outlier sets its row's scale
    ref_sx, ref_q1, ref_q2 = split_activations(x)
    got = call_answer(split, "split_planes", x.clone())
    if not isinstance(got, tuple) or len(got) != 3 or not all(isinstance(t, torch.Tensor) for t in got):
        return report(False, "split_planes", "return a tuple of three tensors (sx, q1, q2).", quiet=quiet)
    sx, q1, q2 = got
    if (
        tuple(sx.reshape(-1).shape) != (x.shape[0],)
        or tuple(q1.shape) != tuple(x.shape)
        or q1.shape != q2.shape
    ):
        return report(
            False,
            "split_planes",
            f"sx needs one value per row ({x.shape[0]}), q1 and q2 the shape of x {tuple(x.shape)}.",
            quiet=quiet,
        )
    if not torch.allclose(sx.reshape(-1, 1).float(), ref_sx, rtol=1e-6, atol=0):
        return report(False, "split_planes", "sx is the largest |x| of each row divided by 127.", quiet=quiet)
    if not torch.equal(q1.round(), q1) or not torch.equal(q2.round(), q2):
        return report(False, "split_planes", "q1 and q2 must hold whole numbers (round them).", quiet=quiet)
    if (q1.abs() > 127).any() or (q2.abs() > 127).any():
        return report(False, "split_planes", "q1 and q2 must fit in int8's [-127, 127].", quiet=quiet)
    same1 = (q1.long() == ref_q1.long()).float().mean().item()
    if same1 < 0.999:
        return report(False, "split_planes", "q1 is x / sx rounded to the nearest integer.", quiet=quiet)
    xhat = sx.reshape(-1, 1).double() * (q1.double() + q2.double() / 254)
    within = bool(((x.double() - xhat).abs() <= ref_sx.double() / 508 * (1 + 1e-6)).all())
    same2 = (q2.long() == ref_q2.long()).float().mean().item()
    if not within or same2 < 0.999:
        return report(
            False,
            "split_planes",
            "q2 quantizes what q1 left over, x / sx - q1 (between -1/2 and 1/2), on a grid 254 times finer.",
            quiet=quiet,
        )
    return report(True, "split_planes", "", quiet=quiet)
