"""GGUF's 32-wide block types and qlab's specs: which map exactly, and the bytes of each block.

llama.cpp stores a quantized row as blocks of 32 consecutive inputs, each with fp16 parameters
(``ggml-common.h``; gguf-py's ``gguf.quants`` reads and writes them):

=========  ===============================  =====================  =====================================
type       bytes of one block               value of element ``i`` qlab spec holding it exactly
=========  ===============================  =====================  =====================================
``Q8_0``   ``d`` fp16, 32 × int8 ``q``      ``d * q``              int8 symmetric, group 32
``Q4_0``   ``d`` fp16, 16 bytes of nibbles  ``d * (u - 8)``        int4 symmetric g32 (``u = q + 8``),
                                                                   or int4 asym g32 with ``zero == 8``
``Q4_1``   ``d``, ``m`` fp16, 16 bytes      ``d * u + m``          int4 g32, ``zero_domain="float"``
                                                                   (``scale = d``, ``zero = m``)
=========  ===============================  =====================  =====================================

In the 16 bytes of nibbles, byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in its
high nibble (not qlab's LSB-first neighbours: 0 and 1 share qlab's byte 0). ``Q5_0``/``Q5_1`` (a fifth
bit in a 32-bit word) are targets for re-quantization only: a :class:`~qlab.nn.QuantLinear` packs 1, 2, 3, 4
or 8 bits.

**What "exact" means here.** A layer maps exactly to a type when gguf-py's own ``dequantize`` of the bytes
we write equals qlab's ``dequantize()`` of the layer *bit for bit* (float32). :func:`encode` builds the
bytes from the layer's codes and scales (never from its float weight), and :func:`exact_type` runs that
comparison, so the table above is a list of candidates and the check is the definition. Groups that are
a multiple of 32 (and per-channel scales) are exact too: each 32-block repeats its group's scale.
``Q4_1`` from an *integer* zero-point (``d = s``, ``m = -s z``) is exact only when ``s``, ``-s z`` are fp16
values and the two roundings agree, which the check decides block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qlab.tensor import QuantizedTensor, QuantSpec, per_group

__all__ = ["BLOCK", "BLOCK_TYPES", "BlockType", "decode", "encode", "exact_type", "spec_for"]

BLOCK = 32


@dataclass(frozen=True)
class BlockType:
    """One of GGUF's 32-wide block types: its name (a ``gguf.GGMLQuantizationType`` member name), code
    width, block bytes, and whether it has a float offset ``m`` (``d * u + m``) or a fixed code offset
    (``d * (u - offset)``)."""

    name: str
    bits: int
    block_bytes: int
    has_min: bool
    offset: int

    @property
    def ggml(self):  # -> gguf.GGMLQuantizationType (imported lazily: gguf is optional)
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.name]


#: The block types qlab reads and writes code for code.
BLOCK_TYPES: dict[str, BlockType] = {
    "Q8_0": BlockType("Q8_0", 8, 34, False, 0),
    "Q4_0": BlockType("Q4_0", 4, 18, False, 8),
    "Q4_1": BlockType("Q4_1", 4, 20, True, 0),
}


def spec_for(name: str) -> QuantSpec:
    """The qlab spec that holds blocks of type ``name`` exactly (``d`` and ``m`` in fp16, as in the file)."""
    if name == "Q8_0":
        return QuantSpec.per_group(8, BLOCK, symmetric=True, scale_dtype=torch.float16)
    if name == "Q4_0":
        return QuantSpec.per_group(4, BLOCK, symmetric=True, scale_dtype=torch.float16)
    if name == "Q4_1":
        return QuantSpec.per_group(4, BLOCK, zero_domain="float", scale_dtype=torch.float16)
    raise ValueError(
        f"name: no exact qlab spec for GGUF type {name!r}; expected one of {sorted(BLOCK_TYPES)}"
    )


# ------------------------------------------------------------------------------------------------
# bytes -> codes and scales (import)
# ------------------------------------------------------------------------------------------------
def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., 16]`` bytes -> ``[..., 32]`` 4-bit codes: low nibbles are elements 0-15, high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode(raw: np.ndarray, name: str, shape: tuple[int, int]) -> QuantizedTensor:
    """The codes and scales of a ``[rows, cols]`` tensor of type ``name`` stored as ``raw`` bytes.

    ``raw`` is ``[rows, cols / 32 * block_bytes]`` uint8 (a row of blocks per weight row). Nothing is
    widened: codes come out as integers, ``d`` and ``m`` as the file's fp16 values.
    """
    bt = BLOCK_TYPES.get(name)
    if bt is None:
        raise ValueError(
            f"name: GGUF type {name!r} has no exact qlab layout; expected one of {sorted(BLOCK_TYPES)}"
        )
    rows, cols = shape
    if cols % BLOCK:
        raise ValueError(f"shape: a row of {cols} values does not divide into {name} blocks of {BLOCK}")
    nb = cols // BLOCK
    if raw.dtype != np.uint8 or raw.size != rows * nb * bt.block_bytes:
        raise ValueError(
            f"raw: expected {rows * nb * bt.block_bytes} bytes for a [{rows}, {cols}] {name} tensor, "
            f"got {raw.size} of {raw.dtype}"
        )
    blocks = np.ascontiguousarray(raw).reshape(rows, nb, bt.block_bytes)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16).reshape(rows, nb))
    zero = None
    if name == "Q8_0":
        codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(rows, cols))
    else:
        head = 4 if bt.has_min else 2
        u = torch.from_numpy(_nibbles(blocks[..., head:]).reshape(rows, cols))
        if bt.has_min:
            zero = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16).reshape(rows, nb))
            codes = u
        else:
            codes = (u.to(torch.int8) - bt.offset).to(torch.int8)
    return QuantizedTensor(codes=codes, scale=d, zero=zero, spec=spec_for(name), shape=torch.Size(shape))


# ------------------------------------------------------------------------------------------------
# codes and scales -> bytes (export)
# ------------------------------------------------------------------------------------------------
def _candidate(spec: QuantSpec) -> str | None:
    """The block type whose formula has the spec's form (exactness is then checked on the values)."""
    if spec.codebook is not None:
        return None
    if spec.bits == 8 and spec.symmetric:
        return "Q8_0"
    if spec.bits == 4 and (spec.symmetric or not spec.float_zero):
        return "Q4_0" if spec.symmetric else "Q4_1"  # asymmetric int zeros: Q4_0 if all are 8 (below)
    if spec.bits == 4 and spec.float_zero:
        return "Q4_1"
    return None


def _per_block(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A scale or zero tensor of any granularity as fp32 ``[rows, cols / 32]``."""
    return per_group(t, rows, cols // BLOCK)


def encode(qt: QuantizedTensor, name: str) -> np.ndarray:
    """The GGUF bytes (``[rows, cols / 32 * block_bytes]`` uint8) of ``qt``'s codes as type ``name``.

    ``d`` is ``scale`` rounded to fp16; for ``Q4_1``, ``m`` is the float zero rounded to fp16 (or
    ``-scale * zero`` for an integer zero-point). The codes are written as they are; whether the result is
    exact is :func:`exact_type`'s question.
    """
    bt = BLOCK_TYPES[name]
    rows, cols = qt.shape
    if len(qt.shape) != 2 or cols % BLOCK:
        raise ValueError(
            f"qt: expected a [rows, cols] tensor with cols divisible by {BLOCK}, got {tuple(qt.shape)}"
        )
    block = qt.spec.block_size(qt.shape)
    if block[1] % BLOCK and block[1] != cols:
        raise ValueError(f"qt: its groups of {block[1]} do not split into blocks of {BLOCK}")
    if qt.spec.bits != bt.bits or qt.spec.codebook is not None:
        raise ValueError(f"qt: a {qt.spec.describe()} tensor cannot be written as {name}")
    nb = cols // BLOCK
    s = _per_block(qt.scale, rows, cols)
    d = s.to(torch.float16).numpy().view(np.uint8).reshape(rows, nb, 2)
    u = qt.unsigned_codes().reshape(rows, nb, BLOCK).numpy()
    if name == "Q8_0":
        q = (u.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        parts = [d, q]
    else:
        if qt.spec.symmetric:
            u = u.astype(np.int16) - 2 ** (qt.spec.bits - 1) + bt.offset  # signed codes, stored as q + 8
            if u.min() < 0 or u.max() > 15:
                raise ValueError(f"qt: codes out of the 4-bit range of {name}")
            u = u.astype(np.uint8)
        qs = (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)
        parts = [d]
        if bt.has_min:
            assert qt.zero is not None
            z = _per_block(qt.zero, rows, cols)
            m = z if qt.spec.float_zero else -s * z
            parts.append(m.to(torch.float16).numpy().view(np.uint8).reshape(rows, nb, 2))
        parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(rows, nb * bt.block_bytes)


def exact_type(qt: QuantizedTensor) -> tuple[str, np.ndarray] | None:
    """``(type name, bytes)`` when ``qt`` has an exact GGUF block type, else None.

    Exact means gguf-py's ``dequantize`` of the bytes equals ``qt.dequantize(torch.float32)`` element for
    element; the candidate type is the one whose formula has the spec's form (see the module table).
    """
    from gguf import dequantize

    name = _candidate(qt.spec)
    if name is None or len(qt.shape) != 2 or qt.shape[1] % BLOCK:
        return None
    block = qt.spec.block_size(qt.shape)
    if block[1] % BLOCK and block[1] != qt.shape[1]:
        return None
    if name == "Q4_1" and not qt.spec.float_zero and qt.zero is not None and bool((qt.zero == 8).all()):
        name = "Q4_0"
    raw = encode(qt, name)
    mine = qt.dequantize(torch.float32).numpy()
    theirs = dequantize(raw, BLOCK_TYPES[name].ggml).reshape(mine.shape)
    return (name, raw) if np.array_equal(mine, theirs) else None
