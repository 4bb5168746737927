"""Roofline model of a linear layer: FLOPs, bytes, the two regimes, bad input (no triton needed)."""

from __future__ import annotations

import pytest
from qlab.kernels.roofline import (
    H100,
    H200,
    Accelerator,
    arithmetic_intensity,
    ideal_speedup,
    linear_bytes,
    linear_flops,
    roofline_time,
)


def test_counts_by_hand():
    assert linear_flops(2, 3, 4) == 48
    # fp16 weights 3*4*2 = 24 bytes, activations 2*4*2 = 16, outputs 2*3*2 = 12.
    assert linear_bytes(2, 3, 4) == 24 + 16 + 12
    # int4 g2 with 8-byte scale+zero per group: 6 bytes of codes, 6 groups * 8 bytes.
    assert linear_bytes(2, 3, 4, 4, group_size=2, bytes_per_group=8, act_bytes=0) == 6 + 48
    assert arithmetic_intensity(1, 64, 64, 16, act_bytes=0) == 1.0


def test_decode_is_memory_bound_and_prefill_compute_bound():
    n = k = 8192
    acc = Accelerator("toy", peak_flops=1000.0, bandwidth=10.0)
    assert acc.ridge == 100.0
    # M = 1: the time is the weight read, so 4-bit weights are 4x faster than fp16 (activations aside).
    assert ideal_speedup(acc, 1, n, k, 4, act_bytes=0) == pytest.approx(4.0)
    assert roofline_time(acc, 1, n, k, 16, act_bytes=0) == pytest.approx(n * k * 2 / 10.0)
    # M = 4096: compute-bound for both, no gain.
    assert ideal_speedup(acc, 4096, n, k, 4) == pytest.approx(1.0)
    assert roofline_time(acc, 4096, n, k, 4) == pytest.approx(2 * 4096 * n * k / 1000.0)


def test_h100_decode_speedups_match_the_issue_goals():
    n = k = 8192
    # The memory-bound ideal for int4 g128 with fp16 scale+zero is ~3.8x; with fp32 ~3.6x.
    assert 3.7 < ideal_speedup(H100, 1, n, k, 4, group_size=128, bytes_per_group=4) < 3.9
    assert 1.9 < ideal_speedup(H100, 1, n, k, 8, group_size=k, bytes_per_group=2) <= 2.0
    assert ideal_speedup(H100, 2048, n, k, 4, group_size=128, bytes_per_group=4) == pytest.approx(1.0)
    assert H200.ridge < H100.ridge  # same compute, more bandwidth


@pytest.mark.parametrize("bad", [{"m": 0}, {"n": 2.5}, {"k": True}])
def test_bad_sizes_are_named(bad):
    sizes = {"m": 1, "n": 2, "k": 3} | bad
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        linear_flops(**sizes)


def test_bad_bits_and_group():
    with pytest.raises(ValueError, match="weight_bits must be positive"):
        linear_bytes(1, 2, 3, 0)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        linear_bytes(1, 2, 4, 4, group_size=0)
