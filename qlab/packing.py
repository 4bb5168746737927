"""Bit packing: store ``bits``-bit unsigned codes densely in bytes (or 32-bit words).

The layout (shared by the torch code, the Triton kernels and the lessons) packs along the **last
dimension**, **least-significant bits first**: consecutive codes fill a byte from bit 0 upwards.
For 4-bit codes ``c0, c1`` the byte is ``c1 << 4 | c0``::

    byte:  b7 b6 b5 b4 | b3 b2 b1 b0
           ---- c1 ---   ---- c0 ---

    2-bit: c3 c2 c1 c0 (c0 in 0b0000_0011, c1 in 0b0000_1100, c2 in 0b0011_0000, c3 in 0b1100_0000)
    1-bit: c7 ... c0
    3-bit: 8 codes form one 24-bit little-endian word stored in 3 bytes (c0 in bits 0-2 of byte 0,
           c2 straddles bytes 0 and 1, ...)

So for widths that divide 8, viewing the packed bytes as little-endian int32 gives the int32 layout
(``32 / bits`` codes per word, code ``j`` at bits ``[bits*j, bits*(j+1))``) that GPU kernels
prefer: :func:`pack_int32` is exactly that. 3-bit int32 words hold 10 codes (bits 30-31 unused).

A last dimension that is not a multiple of the codes per unit is padded with zero codes;
``unpack`` takes the original length ``n`` and drops the padding.
"""

from __future__ import annotations

import math
import sys

import torch

#: Bit widths qlab packs.
PACK_BITS = (1, 2, 3, 4, 8)

# Masks written in binary so the layout is visible.
MASKS = {
    1: 0b0000_0001,
    2: 0b0000_0011,
    3: 0b0000_0111,
    4: 0b0000_1111,
    8: 0b1111_1111,
}


def _check(codes: torch.Tensor, bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits!r}")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes must be a uint8 tensor of unsigned codes, got {got}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension (packing runs along the last dim)")


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    n = x.shape[-1]
    pad = (-n) % multiple
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x


def packed_length(n: int, bits: int) -> int:
    """Bytes that :func:`pack` uses for ``n`` codes of ``bits`` bits."""
    if bits == 3:
        return 3 * math.ceil(n / 8)
    return math.ceil(n * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (uint8, values < 2^bits) along the last dim into uint8."""
    _check(codes, bits)
    if codes.numel() and int(codes.max()) > MASKS[bits]:
        raise ValueError(f"codes must be < 2**{bits} = {2**bits}, got max {int(codes.max())}")
    if bits == 8:
        return codes.clone()
    if bits == 3:
        return _pack3(codes)
    per = 8 // bits
    c = _pad_last(codes, per)
    # One strided pass per slot of the byte: code j of every byte goes to bits [bits*j, bits*(j+1)).
    out = c[..., 0::per].clone()
    for j in range(1, per):
        out |= c[..., j::per] << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``n`` codes per row of the last dim, as uint8."""
    _check(packed, bits)
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(
            f"packed last dim is {packed.shape[-1]} bytes, expected {packed_length(n, bits)} "
            f"for n={n} codes of {bits} bits"
        )
    if bits == 8:
        return packed.clone()
    if bits == 3:
        return _unpack3(packed, n)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    c = (packed.unsqueeze(-1) >> shifts) & MASKS[bits]
    return c.reshape(*packed.shape[:-1], -1)[..., :n].contiguous()


def _pack3(codes: torch.Tensor) -> torch.Tensor:
    c = _pad_last(codes, 8).reshape(*codes.shape[:-1], -1, 8).to(torch.int32)
    shifts = torch.arange(8, dtype=torch.int32, device=codes.device) * 3
    word = (c << shifts).sum(dim=-1)  # 24 bits per 8 codes
    byte_shifts = torch.tensor([0, 8, 16], dtype=torch.int32, device=codes.device)
    b = (word.unsqueeze(-1) >> byte_shifts) & 0b1111_1111
    return b.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def _unpack3(packed: torch.Tensor, n: int) -> torch.Tensor:
    b = packed.reshape(*packed.shape[:-1], -1, 3).to(torch.int32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device) * 3
    c = (word.unsqueeze(-1) >> shifts) & MASKS[3]
    return c.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8).contiguous()


def codes_per_int32(bits: int) -> int:
    """Codes in one int32 word: 32 // bits (10 for 3-bit)."""
    if bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits!r}")
    return 32 // bits


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along the last dim into int32 words, code ``j`` of a word at bits ``[bits*j, bits*(j+1))``."""
    _check(codes, bits)
    if codes.numel() and int(codes.max()) > MASKS[bits]:
        raise ValueError(f"codes must be < 2**{bits} = {2**bits}, got max {int(codes.max())}")
    per = codes_per_int32(bits)
    if bits != 3 and sys.byteorder == "little":  # the byte layout read as little-endian words
        return pack(_pad_last(codes, per), bits).view(torch.int32)
    c = _pad_last(codes, per).reshape(*codes.shape[:-1], -1, per).to(torch.int64)
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(dim=-1)
    # Reinterpret the low 32 bits as signed int32 (the top code may set the sign bit).
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32:
        raise ValueError("packed must be an int32 tensor")
    per = codes_per_int32(bits)
    if packed.shape[-1] != math.ceil(n / per):
        raise ValueError(
            f"packed last dim is {packed.shape[-1]} words, expected {math.ceil(n / per)} for n={n}"
        )
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    c = (packed.unsqueeze(-1) >> shifts) & MASKS[bits]
    return c.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8).contiguous()
