"""Lesson 09: each check accepts the right answer, and typical wrong and malformed answers get a hint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, quantize  # noqa: E402

from qlab.exercises import lesson09 as L9  # noqa: E402
from qlab.tensor import QuantSpec  # noqa: E402


@pytest.fixture
def block() -> np.ndarray:
    """One Q4_0 block written by gguf-py itself from 32 seeded values."""
    x = np.random.default_rng(0).normal(size=(1, 32)).astype(np.float32)
    return quantize(x, GGMLQuantizationType.Q4_0).reshape(-1)


def by_hand(raw: np.ndarray) -> torch.Tensor:
    """The block decoded from the spec in plain numpy: d, then low nibbles = 0..15, high = 16..31."""
    d = np.float32(raw[:2].view(np.float16)[0])
    qs = raw[2:18]
    u = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.float32)
    return torch.from_numpy(d * (u - 8))


def test_q4_0_block_right_answers(block):
    assert L9.check_q4_0_block(block, by_hand(block), quiet=True)
    assert L9.check_q4_0_block(bytes(block), by_hand(block).numpy(), quiet=True)  # bytes in, array out
    assert L9.check_q4_0_block(torch.from_numpy(block), by_hand(block).tolist(), quiet=True)


def test_q4_0_block_typical_wrong_answers(block):
    d = np.float32(block[:2].view(np.float16)[0])
    qs = block[2:]
    neighbours = np.stack([qs & 0x0F, qs >> 4], axis=-1).reshape(-1).astype(np.float32)
    wrong = L9.check_q4_0_block(block, d * (neighbours - 8), quiet=True)
    assert not wrong and "j + 16" in wrong.message
    no_offset = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.float32) * d
    assert "subtract 8" in L9.check_q4_0_block(block, no_offset, quiet=True).message
    reversed_ = by_hand(block).flip(0)
    assert "order" in L9.check_q4_0_block(block, reversed_, quiet=True).message
    assert "float16" in L9.check_q4_0_block(block, torch.zeros(32), quiet=True).message


def test_q4_0_block_malformed_answers(block):
    assert "placeholder" in L9.check_q4_0_block(block, ..., quiet=True).message
    assert "32" in L9.check_q4_0_block(block, torch.zeros(16), quiet=True).message
    assert "32 numbers" in L9.check_q4_0_block(block, "d * (u - 8)", quiet=True).message
    with pytest.raises(ValueError, match="raw must be"):
        L9.check_q4_0_block(block[:10], torch.zeros(32), quiet=True)


SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def test_lora_parameters_right_answer():
    # independent count: build the two matrices and count their elements
    want = sum(torch.empty(8, i).numel() + torch.empty(o, 8).numel() for o, i in SHAPES)
    assert L9.check_lora_parameters(SHAPES, 8, want, quiet=True)
    assert L9.check_lora_parameters(SHAPES, 8, torch.tensor(want), quiet=True)
    assert L9.check_lora_parameters(SHAPES, 8, float(want), quiet=True)


def test_lora_parameters_typical_wrong_answers():
    full = sum(o * i for o, i in SHAPES)
    assert "thin matrices" in L9.check_lora_parameters(SHAPES, 8, full, quiet=True).message
    assert "thin matrices" in L9.check_lora_parameters(SHAPES, 8, 8 * full, quiet=True).message
    one = 8 * (576 + 576)
    assert "every adapted layer" in L9.check_lora_parameters(SHAPES, 8, one, quiet=True).message
    only_a = sum(8 * i for _, i in SHAPES)
    assert "both matrices" in L9.check_lora_parameters(SHAPES, 8, only_a, quiet=True).message
    double = 2 * L9.lora_parameters(SHAPES, 8)
    assert "counted once" in L9.check_lora_parameters(SHAPES, 8, double, quiet=True).message
    assert not L9.check_lora_parameters(SHAPES, 8, 12345, quiet=True)


def test_lora_parameters_malformed():
    assert "placeholder" in L9.check_lora_parameters(SHAPES, 8, ..., quiet=True).message
    assert "number" in L9.check_lora_parameters(SHAPES, 8, "8 * (in + out)", quiet=True).message
    assert "whole number" in L9.check_lora_parameters(SHAPES, 8, 1.5, quiet=True).message
    with pytest.raises(ValueError, match="r must be"):
        L9.check_lora_parameters(SHAPES, 0, 1)
    with pytest.raises(ValueError, match="shapes"):
        L9.check_lora_parameters([576], 8, 1)


def reference_mapping(spec: QuantSpec) -> str | None:
    """The mapping in words (GGUF's block formulas), written independently of qlab.gguf."""
    if spec.codebook is not None or spec.scale_dtype != torch.float16:
        return None
    if spec.granularity == "group" and spec.group_size % 32:
        return None
    if spec.bits == 8 and spec.symmetric:
        return "Q8_0"
    if spec.bits == 4 and spec.symmetric:
        return "Q4_0"
    if spec.bits == 4 and spec.float_zero:
        return "Q4_1"
    return None


def test_gguf_cases_follow_the_block_formulas():
    """The check's truth (exact_type on real codes) agrees with the formulas, case by case."""
    for spec, _ in L9.GGUF_CASES:
        assert L9.exact_gguf_type(spec) == reference_mapping(spec), spec.describe()


def test_gguf_type_right_and_wrong_answers():
    assert L9.check_gguf_type(reference_mapping, quiet=True)

    def every_4bit_is_q4_1(spec):
        return {8: "Q8_0", 4: "Q4_1"}.get(spec.bits)

    wrong = L9.check_gguf_type(every_4bit_is_q4_1, quiet=True)
    assert not wrong and "int4 sym g32" in wrong.message and "no offset" in wrong.message

    def ignores_scale_dtype(spec):
        return reference_mapping(QuantSpec(**{**spec.__dict__, "scale_dtype": torch.float16}))

    assert "fp16" in L9.check_gguf_type(ignores_scale_dtype, quiet=True).message


def test_gguf_type_malformed_answers():
    assert "placeholder" in L9.check_gguf_type(None, quiet=True).message
    assert "function" in L9.check_gguf_type("Q4_0", quiet=True).message
    assert "'Q8_0', 'Q4_0', 'Q4_1' or None" in L9.check_gguf_type(lambda s: "q4_0", quiet=True).message
    assert "raised ZeroDivisionError" in L9.check_gguf_type(lambda s: 1 / 0, quiet=True).message
