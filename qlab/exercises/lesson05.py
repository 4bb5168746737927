"""Checks for lesson 05, int4: group-wise scales, packing two codes per byte, true bits per weight, the
MXFP4 shared scale.

Each check recomputes the answer with qlab (:mod:`qlab.quantize`, :mod:`qlab.packing`,
:mod:`qlab.codebooks`) and compares; a wrong answer gets a hint, never the number.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qlab.codebooks import quantize_nf4
from qlab.exercises import CheckResult, answer_check, as_function, as_number, as_tensor, call_answer, report
from qlab.packing import pack
from qlab.quantize import QuantSpec, compute_scale_zero
from qlab.scaled_floats import quantize_mxfp4


@answer_check("group-wise int4 scales")
def check_group_scales(
    w: torch.Tensor, group_size: int, scale: torch.Tensor, zero: torch.Tensor, *, quiet: bool = False
) -> CheckResult:
    """Exercise 1: asymmetric int4 ``scale`` and ``zero`` of ``w`` [rows, cols] for groups of ``group_size``.

    Expected shapes ``[rows, cols // group_size]``; scales to a relative 1e-5, zeros exactly.
    """
    scale, zero = as_tensor(scale, "scale"), as_tensor(zero, "zero")
    ref_s, ref_z = compute_scale_zero(w, QuantSpec.per_group(4, group_size))
    assert ref_z is not None
    if tuple(scale.shape) != tuple(ref_s.shape) or tuple(zero.shape) != tuple(ref_z.shape):
        hint = (
            f"one scale and one zero per group: shape [rows, cols // group_size] = {list(ref_s.shape)}; "
            f"got {list(scale.shape)} and {list(zero.shape)}. Reshape w to [rows, n_groups, group_size]."
        )
        return report(False, "group-wise int4 scales", hint, quiet=quiet)
    s_ok = torch.allclose(scale.float(), ref_s.float(), rtol=1e-5, atol=0)
    z_ok = torch.equal(zero.float(), ref_z.float())
    hint = (
        "per group: widen [min, max] to include 0, scale = (max - min) / 15 (16 codes, 15 steps)"
        if not s_ok
        else "zero = round(-min / scale) per group, with the widened min"
    )
    return report(s_ok and z_ok, "group-wise int4 scales", hint, quiet=quiet)


@answer_check("pack two 4-bit codes per byte")
def check_pack_4bit(fn: Callable[[torch.Tensor], torch.Tensor], *, quiet: bool = False) -> CheckResult:
    """Exercise 2: ``fn(codes)`` packs uint8 4-bit codes ``[..., n]`` (n even) into bytes ``[..., n/2]``.

    qlab's layout: the first code of each pair in the low nibble, ``byte = c[2i+1] << 4 | c[2i]``.
    Tried on several random tensors against :func:`qlab.packing.pack`.
    """
    fn = as_function(fn, "pack4", "(codes) -> packed bytes")
    gen = torch.Generator().manual_seed(5)
    for shape in ((2,), (3, 8), (2, 4, 16)):
        codes = torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8)
        got = call_answer(fn, "pack4", codes.clone())
        ref = pack(codes, 4)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(ref.shape):
            shape_got = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            hint = f"two codes per byte: codes of shape {shape} pack to {tuple(ref.shape)}, got {shape_got}"
            return report(False, "pack two 4-bit codes per byte", hint, quiet=quiet)
        if got.dtype != torch.uint8:
            hint = f"packed codes are bytes: return a torch.uint8 tensor, got {got.dtype}"
            return report(False, "pack two 4-bit codes per byte", hint, quiet=quiet)
        if not torch.equal(got.to(torch.int64), ref.to(torch.int64)):
            hint = (
                "take even and odd positions (codes[..., 0::2], codes[..., 1::2]); the odd one goes in the "
                "high nibble (shift left by 4), OR them together, keep uint8"
            )
            return report(False, "pack two 4-bit codes per byte", hint, quiet=quiet)
    return report(True, "pack two 4-bit codes per byte", "", quiet=quiet)


@answer_check("NF4 bits per weight")
def check_nf4_bits_per_weight(
    shape: tuple[int, int], block_size: int, double_quant: bool, answer: float, *, quiet: bool = False
) -> CheckResult:
    """Exercise 3: true bits per weight of NF4 with ``block_size`` (and double quantization) for ``shape``.

    Compared with ``quantize_nf4(...).bits_per_weight`` to a relative 1e-6.
    """
    a = as_number(answer, "answer (bits per weight)")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ref = quantize_nf4(w, block_size, double_quant=double_quant).bits_per_weight
    ok = abs(a - ref) <= 1e-6 * ref
    if double_quant:
        hint = (
            "4 bits per code + one int8 scale per block + per 256 scales one fp32 scale-of-scales "
            "(the scale count is padded up to a multiple of 256) + one fp32 offset for the whole tensor; "
            "divide the total bits by the number of weights"
        )
    else:
        hint = "4 bits per code + one fp32 (32-bit) absmax per block of block_size weights"
    return report(ok, "NF4 bits per weight", hint, quiet=quiet)


@answer_check("MXFP4 shared scale")
def check_mx_scale_code(fn: Callable[[torch.Tensor], torch.Tensor], *, quiet: bool = False) -> CheckResult:
    """Exercise 4: ``fn(blocks)`` returns the e8m0 byte of the MXFP4 shared scale of each row of ``blocks``
    ``[n, 32]`` (as integers ``[n]``): ``floor(log2(amax)) - 2 + 127`` by the OCP MX rule.

    Tried on blocks of many magnitudes (some with amax an exact power of two, some just below one) against
    :func:`qlab.scaled_floats.quantize_mxfp4`.
    """
    fn = as_function(fn, "mx_scale_code", "(blocks [n, 32]) -> e8m0 bytes [n]")
    gen = torch.Generator().manual_seed(7)
    blocks = torch.randn(24, 32, generator=gen) * 2.0 ** torch.randint(-20, 20, (24, 1), generator=gen)
    blocks[0, 0], blocks[1, 0] = 4.0, 3.999  # an exact power of two, and just below one
    ref = quantize_mxfp4(blocks).scale.reshape(-1).to(torch.int64)
    got = call_answer(fn, "mx_scale_code", blocks.clone())
    if not isinstance(got, torch.Tensor) or got.numel() != ref.numel() or got.is_complex():
        form = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        hint = f"return one integer per block: a tensor of {ref.numel()} values, got {form}"
        return report(False, "MXFP4 shared scale", hint, quiet=quiet)
    got = got.reshape(-1).double()
    if not bool(torch.isfinite(got).all()) or not torch.equal(got, got.round()):
        return report(False, "MXFP4 shared scale", "the byte is an integer: floor the exponent", quiet=quiet)
    got = got.to(torch.int64)
    log2 = torch.log2(blocks.double().abs().amax(1))
    if torch.equal(got, ref):
        hint = ""
    elif torch.equal(got, ref + 2):
        hint = "subtract emax of e2m1 (2), so that the largest element lands in [4, 8) before rounding"
    elif torch.equal(got, torch.round(log2).to(torch.int64) - 2 + 127):
        hint = "the spec rounds the exponent down (floor), not to the nearest integer"
    elif torch.equal(got, ref - 127):
        hint = "e8m0 stores the exponent plus a bias of 127"
    else:
        hint = (
            "per block, the exponent of amax = max |x| sets the scale X = 2^k: pick the integer k that puts "
            "amax / X in e2m1's top binade [4, 8), then store k with e8m0's bias"
        )
    return report(not hint, "MXFP4 shared scale", hint, quiet=quiet)
