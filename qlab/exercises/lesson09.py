"""Checks for lesson 09, quantization in transformers: a GGUF Q4_0 block by hand, the size of LoRA
adapters, and which qlab specs a GGUF block type holds exactly.

Each check recomputes the answer independently (gguf-py's own ``dequantize`` for the block, PEFT's
shapes ``A: [r, in]``, ``B: [out, r]`` for the adapters, :func:`qlab.gguf.blocks.exact_type` on real
codes for the mapping) and says right or wrong; a wrong answer gets a hint, never the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qlab.exercises import (
    AnswerError,
    CheckResult,
    answer_check,
    as_function,
    as_int,
    call_answer,
    report,
)
from qlab.tensor import QuantSpec

#: Bytes of one Q4_0 block: ``d`` (fp16) then 16 bytes holding 32 four-bit codes.
Q4_0_BYTES = 18


def _block_bytes(raw: object) -> np.ndarray:
    """The lesson's block as uint8 numpy (it passes bytes, a numpy array or a tensor)."""
    if isinstance(raw, torch.Tensor):
        raw = raw.numpy()
    if isinstance(raw, (bytes, bytearray)):
        raw = np.frombuffer(bytes(raw), dtype=np.uint8)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.size != Q4_0_BYTES:
        raise ValueError(f"raw must be the {Q4_0_BYTES} bytes of one Q4_0 block, got {raw!r:.80}")
    return raw.reshape(-1)


def _as_values(answer: object) -> np.ndarray:
    """The learner's 32 values as float32 numpy (a tensor, an array or a list)."""
    if answer is Ellipsis or answer is None:
        raise AnswerError("replace the placeholder with the 32 values of the block.")
    if isinstance(answer, torch.Tensor):
        answer = answer.detach().float().numpy()
    try:
        values = np.asarray(answer, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as err:
        raise AnswerError(
            f"the block's values must be 32 numbers (a tensor or array), got {answer!r:.60}"
        ) from err
    if values.size != 32:
        raise AnswerError(f"a Q4_0 block holds 32 values, got {values.size}.")
    return values


@answer_check("decode a Q4_0 block")
def check_q4_0_block(raw: object, values: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 1: ``values`` are the 32 weights stored in the Q4_0 block ``raw`` (18 bytes).

    The reference is gguf-py's ``dequantize`` (llama.cpp's layout: ``d`` fp16, then byte ``j`` holds
    element ``j`` in its low nibble and element ``j + 16`` in its high nibble, value ``d * (u - 8)``).
    Exact equality: every value is ``d`` times a small integer, computed in float32.
    """
    from gguf import GGMLQuantizationType, dequantize

    raw = _block_bytes(raw)
    got = _as_values(values)
    want = dequantize(raw, GGMLQuantizationType.Q4_0).reshape(-1).astype(np.float32)
    if np.array_equal(got, want):
        return report(True, "decode a Q4_0 block", "", quiet=quiet)
    d = np.float32(raw[:2].view(np.float16)[0])
    qs = raw[2:]
    low, high = (qs & 0x0F).astype(np.float32), (qs >> 4).astype(np.float32)
    neighbours = np.stack([low, high], axis=-1).reshape(-1)  # qlab's LSB-first pairs, not GGUF's
    if np.array_equal(got, d * (neighbours - 8)):
        hint = (
            "the values are right but in the wrong places: byte j holds element j (low nibble) and element "
            "j + 16 (high nibble), not two neighbours."
        )
    elif np.array_equal(got, d * np.concatenate([low, high])) or np.array_equal(got, d * neighbours):
        hint = "the codes are stored as u = q + 8 (0..15): subtract 8 before multiplying by d."
    elif np.array_equal(np.sort(got), np.sort(want)):
        hint = "the values are right but in the wrong order: low nibbles are elements 0-15, high 16-31."
    else:
        hint = "d is the first 2 bytes read as one float16; 16 bytes of codes follow; value = d * (u - 8)."
    return report(False, "decode a Q4_0 block", hint, quiet=quiet)


def lora_parameters(shapes: Sequence[tuple[int, int]], r: int) -> int:
    """Trainable parameters of rank-``r`` LoRA on layers of ``shapes`` ``(out, in)``: ``A`` is
    ``[r, in]`` and ``B`` is ``[out, r]``, so ``r * (in + out)`` per layer."""
    return sum(r * (i + o) for o, i in shapes)


def _check_shapes(shapes: object, r: object) -> list[tuple[int, int]]:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    try:
        out = [(int(o), int(i)) for o, i in shapes]  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"shapes must be a list of (out_features, in_features) pairs, got {shapes!r:.80}"
        ) from err
    if not out or any(o < 1 or i < 1 for o, i in out):
        raise ValueError(f"shapes must be a non-empty list of positive (out, in) pairs, got {out!r:.80}")
    return out


@answer_check("LoRA trainable parameters")
def check_lora_parameters(shapes: object, r: int, answer: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 2: ``answer`` is the number of parameters rank-``r`` LoRA trains on layers of ``shapes``
    (a list of ``(out_features, in_features)``), exactly."""
    pairs = _check_shapes(shapes, r)
    got = as_int(answer, "answer")
    want = lora_parameters(pairs, r)
    if got == want:
        return report(True, "LoRA trainable parameters", "", quiet=quiet)
    full = sum(o * i for o, i in pairs)
    if got in (full, r * full):
        hint = (
            "LoRA never trains an [out, in] update: it trains two thin matrices, A [r, in] and B [out, r], "
            "whose product is the update."
        )
    elif got == r * (pairs[0][0] + pairs[0][1]) and len(pairs) > 1:
        hint = "that is one layer's adapters; add up every adapted layer."
    elif got in (sum(r * i for _, i in pairs), sum(r * o for o, _ in pairs)):
        hint = "count both matrices: A [r, in] and B [out, r]."
    elif got == 2 * want:
        hint = "each layer has one A and one B, counted once each."
    else:
        hint = "per layer: A [r, in] plus B [out, r] parameters; sum over the layers in shapes."
    return report(False, "LoRA trainable parameters", hint, quiet=quiet)


F16 = torch.float16
#: Specs the mapping check tries, with the reason a wrong guess misses (the hint).
GGUF_CASES: tuple[tuple[QuantSpec, str], ...] = (
    (
        QuantSpec.per_group(8, 32, symmetric=True, scale_dtype=F16),
        "int8 symmetric codes, one fp16 scale per 32: d and 32 signed bytes.",
    ),
    (
        QuantSpec.per_channel(8, symmetric=True, scale_dtype=F16),
        "one fp16 scale per row is one d repeated in every 32-block of that row.",
    ),
    (
        QuantSpec.per_group(4, 32, symmetric=True, scale_dtype=F16),
        "symmetric int4 has no offset: the block type with d only (codes stored as q + 8).",
    ),
    (
        QuantSpec.per_group(4, 32, zero_domain="float", scale_dtype=F16),
        "a float zero is llama.cpp's m: value = d * u + m.",
    ),
    (
        QuantSpec.per_group(4, 64, zero_domain="float", scale_dtype=F16),
        "a group of 64 is two blocks of 32 that repeat the same d and m.",
    ),
    (
        QuantSpec.per_group(4, 32, symmetric=True, scale_dtype=torch.float32),
        "a GGUF block stores d in fp16: fp32 scales do not survive the trip exactly.",
    ),
    (
        QuantSpec.per_group(4, 16, symmetric=True, scale_dtype=F16),
        "blocks are 32 wide with one d each: groups of 16 need two scales per block.",
    ),
    (
        QuantSpec.per_group(3, 32, scale_dtype=F16),
        "only 4- and 8-bit codes have a block type here (Q4_0, Q4_1, Q8_0).",
    ),
    (
        QuantSpec.per_group(4, 32, codebook="nf4"),
        "NF4 codes index a table of levels; GGUF's blocks are affine (d * q or d * u + m).",
    ),
)


def exact_gguf_type(spec: QuantSpec, seed: int = 0) -> str | None:
    """The GGUF block type that holds a weight quantized with ``spec`` exactly (None if none), decided on
    real codes: a seeded ``[4, 128]`` weight quantized with ``spec``, then :func:`qlab.gguf.exact_type`
    (gguf-py's dequantize of the bytes equals qlab's weight bit for bit)."""
    from qlab.gguf.blocks import exact_type
    from qlab.quantize import quantize

    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(seed))
    exact = exact_type(quantize(w, spec))
    return None if exact is None else exact[0]


@answer_check("which GGUF type holds a spec exactly")
def check_gguf_type(fn: object, *, quiet: bool = False) -> CheckResult:
    """Exercise 3: ``fn(spec)`` returns ``"Q8_0"``, ``"Q4_0"``, ``"Q4_1"`` or None: the block type that
    holds ``spec``'s codes and scales exactly. Tried on every spec of :data:`GGUF_CASES`."""
    fn = as_function(fn, "gguf_type", "(spec) -> 'Q8_0' | 'Q4_0' | 'Q4_1' | None")
    for spec, reason in GGUF_CASES:
        want = exact_gguf_type(spec)
        got = call_answer(fn, "gguf_type", spec)
        if got == want:
            continue
        if got is not None and got not in ("Q8_0", "Q4_0", "Q4_1"):
            hint = f"return 'Q8_0', 'Q4_0', 'Q4_1' or None, got {got!r}."
        else:
            label = spec.describe() + f" ({str(spec.scale_dtype).removeprefix('torch.')} scales)"
            hint = f"{label}: you said {got!r}. {reason}"
        return report(False, "which GGUF type holds a spec exactly", hint, quiet=quiet)
    return report(True, "which GGUF type holds a spec exactly", "", quiet=quiet)
