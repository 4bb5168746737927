"""Fused dequantize-matmul kernel: parity with plain torch, the unpacking, the NF4 lookup, bad input.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set here before
triton is imported; only on machines without CUDA, so a GPU run tests the compiled kernel).
The interpreter does not compute bf16 correctly, so bf16 is tested on a GPU only.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (Linux only): qlab.kernels cannot run")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from qlab.kernels import available, dequant_matmul, dequant_matmul_reference  # noqa: E402

from qlab import packing  # noqa: E402
from qlab.codebooks import FP4_VALUES, NF4_VALUES, quantize_fp4, quantize_nf4  # noqa: E402
from qlab.quantize import QuantSpec, quantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_ONLY = pytest.mark.skipif(
    DEVICE != "cuda", reason="bf16 needs a GPU: Triton's interpreter mis-computes bf16"
)


def plain_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Independent reference: the product in float64 (so it is the exact answer to compare with)."""
    return x.double() @ w.double().T


def assert_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """``y`` matches ``x @ w.T`` within the rounding of its dtype.

    fp32: only the order of the fp32 sums differs. fp16/bf16: the kernel rounds each dequantized
    weight to the activation dtype before the product (half an ulp, ``2^-11`` / ``2^-8`` relative)
    and rounds the output once; the bound scales with ``|x| @ |w|^T``, the size of the terms.
    """
    exact = plain_matmul(x, w)
    size = x.double().abs() @ w.double().abs().T
    unit = {torch.float32: 2.0**-20, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[y.dtype]
    bound = unit * size + unit * exact.abs() + 1e-30
    err = (y.double() - exact).abs()
    assert y.dtype == x.dtype
    assert bool((err <= bound).all()), (
        f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"
    )


def affine_case(n, k, bits, group_size, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    qt = quantize(w, QuantSpec.per_group(bits=bits, group_size=group_size, symmetric=symmetric))
    packed = packing.pack_int32(qt.unsigned_codes(), bits)
    return qt, packed


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8, 1, 3]),
    symmetric=st.booleans(),
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([8, 16, 32, 24, None]),  # None: per-channel (one group = all of k)
    dtype=st.sampled_from([torch.float16, torch.float32]),
    path=st.sampled_from(["auto", "decode", "prefill"]),
    uint8_bytes=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_affine_matches_torch_and_qlab(
    bits, symmetric, m, n, groups, group_size, dtype, path, uint8_bytes, seed
):
    if symmetric and bits == 1:
        symmetric = False
    k = groups * (group_size or 13)  # per-channel rows of 13, 26, 39 inputs: ragged everywhere
    group_size = group_size or k
    qt, packed = affine_case(n, k, bits, group_size, symmetric, seed)
    if uint8_bytes and bits != 3:  # the uint8 layout of qlab.packing.pack is accepted too
        packed = packing.pack(qt.unsigned_codes(), bits)
    zero = None if symmetric else qt.zero
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    args = dict(bits=bits, group_size=group_size, n=n, k=k)
    on = (t.to(DEVICE) if t is not None else None for t in (x, packed, qt.scale, zero))
    y = dequant_matmul(*on, path=path, **args).cpu()
    assert y.shape == (m, n)
    assert_close(y, x, qt.dequantize())  # against qlab's own dequantize
    ref = dequant_matmul_reference(x, packed, qt.scale, zero, **args)  # against the file's reference
    torch.testing.assert_close(
        y.float(), ref.float(), rtol=0, atol=float(assert_tol(x, qt.dequantize(), dtype))
    )


def assert_tol(x, w, dtype):
    unit = {torch.float32: 2.0**-20, torch.float16: 2.0**-9}[dtype]
    return unit * (x.double().abs() @ w.double().abs().T).max() + 1e-6


@settings(max_examples=15, deadline=None)
@given(
    table=st.sampled_from(["nf4", "fp4"]),
    m=st.integers(1, 24),
    n=st.integers(1, 33),
    blocks=st.integers(1, 2),
    block=st.sampled_from([16, 64]),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_codebook_matches_torch_and_qlab(table, m, n, blocks, block, dtype, seed):
    k = blocks * block
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qt = (quantize_nf4 if table == "nf4" else quantize_fp4)(w, block_size=block)
    values = NF4_VALUES if table == "nf4" else FP4_VALUES
    packed = packing.pack_int32(qt.codes, 4)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y = dequant_matmul(
        x.to(DEVICE),
        packed.to(DEVICE),
        qt.scale.to(DEVICE),
        None,
        bits=4,
        group_size=block,
        n=n,
        k=k,
        codebook=values.to(DEVICE),
    ).cpu()
    assert_close(y, x, qt.dequantize())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_identity_input_reads_back_every_weight_exactly(bits, symmetric):
    """``eye(k) @ W^T = W^T``: each output is one product, so unpacking must be exact, bit for bit."""
    n, k = 20, 48
    qt, packed = affine_case(n, k, bits, 16, symmetric, seed=bits)
    eye = torch.eye(k, device=DEVICE)
    zero = None if symmetric else qt.zero.to(DEVICE)
    y = dequant_matmul(eye, packed.to(DEVICE), qt.scale.to(DEVICE), zero, bits=bits, group_size=16, n=n, k=k)
    assert torch.equal(y.cpu(), qt.dequantize().T)


def test_nf4_lookup_is_exact():
    """Row ``r`` uses code ``r % 16`` everywhere with absmax 1: reading back gives the NF4 table itself."""
    n, k = 32, 64
    codes = (torch.arange(n) % 16).to(torch.uint8)[:, None].expand(n, k).contiguous()
    packed = packing.pack_int32(codes, 4).to(DEVICE)
    scale = torch.ones(n, 1, device=DEVICE)
    y = dequant_matmul(
        torch.eye(k, device=DEVICE),
        packed,
        scale,
        None,
        bits=4,
        group_size=k,
        n=n,
        k=k,
        codebook=NF4_VALUES.to(DEVICE),
    ).cpu()
    assert torch.equal(y[0], NF4_VALUES[torch.arange(n) % 16])
    assert torch.equal(y, NF4_VALUES[codes.long()].T)
    # A different absmax per block of 16 scales the looked-up value, nothing else.
    scale = torch.arange(1, 5, dtype=torch.float32).repeat(n, 1)
    y = dequant_matmul(
        torch.eye(k, device=DEVICE),
        packed,
        scale.to(DEVICE),
        None,
        bits=4,
        group_size=16,
        n=n,
        k=k,
        codebook=NF4_VALUES.to(DEVICE),
    ).cpu()
    assert torch.equal(y, (NF4_VALUES[codes.long()] * scale.repeat_interleave(16, dim=1)).T)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_words_with_the_sign_bit_set_unpack_to_high_codes(bits):
    """An all-ones word is int32 -1: arithmetic shifts drag the sign in, and the mask must clear it."""
    n, k = 16, 64
    packed = torch.full((n, k * bits // 32), -1, dtype=torch.int32, device=DEVICE)
    zero = torch.zeros(n, 1, device=DEVICE)
    y = dequant_matmul(
        torch.eye(k, device=DEVICE),
        packed,
        torch.ones(n, 1, device=DEVICE),
        zero,
        bits=bits,
        group_size=k,
        n=n,
        k=k,
    ).cpu()
    assert torch.equal(y, torch.full((k, n), float(2**bits - 1)))


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_accumulates_in_fp32(path):
    """3072 products of 1 and then 1024 of 1/32 in fp16: the exact sum is 3104.

    fp16 is spaced by 2 between 2048 and 4096, so an fp16 running sum would swallow each tile's
    +1 (32 products of 1/32) and stop at 3072. (n = 128 gives enough output tiles that the
    decode path runs without splitting K, so one accumulator sees the whole sum.)
    """
    n, k = 128, 4096
    codes = torch.ones(n, k, dtype=torch.uint8)  # 2-bit code 1, zero 0, scale 1: w = 1
    packed = packing.pack_int32(codes, 2).to(DEVICE)
    x = torch.ones(1, k, dtype=torch.float16)
    x[:, 3072:] = 1 / 32
    ones, zeros = torch.ones(n, 1, device=DEVICE), torch.zeros(n, 1, device=DEVICE)
    y = dequant_matmul(x.to(DEVICE), packed, ones, zeros, bits=2, group_size=k, n=n, k=k, path=path)
    assert y.dtype == torch.float16
    assert torch.equal(y.cpu(), torch.full((1, n), 3104.0, dtype=torch.float16))


def test_any_leading_shape_and_empty_batch():
    n, k = 24, 32
    qt, packed = affine_case(n, k, 4, 32, False, seed=3)
    x = torch.randn(2, 3, k)
    args = (packed.to(DEVICE), qt.scale.to(DEVICE), qt.zero.to(DEVICE))
    y = dequant_matmul(x.to(DEVICE), *args, bits=4, group_size=32, n=n, k=k).cpu()
    assert y.shape == (2, 3, n)
    assert_close(y.reshape(6, n), x.reshape(6, k), qt.dequantize())
    # A non-contiguous x (a transposed view) gives the same answer.
    xt = x.reshape(6, k).T.contiguous().T
    assert not xt.is_contiguous()
    assert torch.equal(
        dequant_matmul(xt.to(DEVICE), *args, bits=4, group_size=32, n=n, k=k).cpu(), y.reshape(6, n)
    )
    empty = dequant_matmul(torch.randn(0, k, device=DEVICE), *args, bits=4, group_size=32, n=n, k=k)
    assert empty.shape == (0, n)


@CUDA_ONLY
@pytest.mark.parametrize("m", [1, 64])
def test_bf16_activations_on_gpu(m):
    n, k = 256, 512
    qt, packed = affine_case(n, k, 4, 128, False, seed=5)
    x = torch.randn(m, k).to(torch.bfloat16)
    y = dequant_matmul(
        x.cuda(), packed.cuda(), qt.scale.cuda(), qt.zero.cuda(), bits=4, group_size=128, n=n, k=k
    )
    assert_close(y.cpu(), x, qt.dequantize())


def test_available_follows_triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not available("cpu")
    assert available("cuda") == torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dequant_matmul(
            torch.randn(1, 8),
            torch.zeros(2, 1, dtype=torch.int32),
            torch.ones(2, 1),
            None,
            bits=4,
            group_size=8,
            n=2,
            k=8,
        )


def _good():
    n, k = 4, 32
    qt, packed = affine_case(n, k, 4, 16, False, seed=0)
    return dict(x=torch.randn(2, k), packed=packed, scale=qt.scale, zero=qt.zero), dict(
        bits=4, group_size=16, n=n, k=k
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"bits": 5}, ValueError, "bits must be one of"),
        ({"bits": True}, ValueError, "bits must be one of"),
        ({"group_size": 12}, ValueError, "must divide k"),
        ({"n": 0}, ValueError, "n must be a positive integer"),
        ({"x": [[1.0]]}, TypeError, "x must be a torch.Tensor"),
        ({"x": torch.ones(2, 32, dtype=torch.int32)}, ValueError, "x must be float16"),
        ({"x": torch.randn(2, 31)}, ValueError, r"x must have shape \[..., k\]"),
        ({"packed": torch.zeros(4, 3, dtype=torch.int32)}, ValueError, "packed int32 must have shape"),
        ({"packed": torch.zeros(4, 4, dtype=torch.int64)}, ValueError, "packed must be int32 words"),
        ({"packed": torch.zeros(4, 15, dtype=torch.uint8)}, ValueError, "packed uint8 must have shape"),
        ({"packed": torch.zeros(4, 8, dtype=torch.int32)[:, ::2]}, ValueError, "packed must be contiguous"),
        ({"scale": torch.ones(4, 1)}, ValueError, "scale must have shape"),
        ({"scale": torch.ones(4, 2, dtype=torch.int32)}, ValueError, "scale must be a floating-point"),
        ({"zero": torch.zeros(2, 4)}, ValueError, "zero must have shape"),
        ({"codebook": NF4_VALUES}, ValueError, "zero must be None with a codebook"),
        ({"zero": None, "codebook": NF4_VALUES[:8]}, ValueError, "codebook must hold 2"),
        ({"scale": torch.ones(4, 2, device="meta")}, ValueError, "one device"),
        ({"path": "fast"}, ValueError, "path must be"),
    ],
)
def test_bad_input_is_named(change, error, match):
    tensors, kw = _good()
    for key, value in change.items():
        (tensors if key in tensors else kw)[key] = value
    with pytest.raises(error, match=match):
        dequant_matmul(tensors["x"], tensors["packed"], tensors["scale"], tensors["zero"], **kw)
