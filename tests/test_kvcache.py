"""qlab.kvcache: quantized key/value caches, checked against plain torch and transformers' DynamicCache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig

from qlab.kvcache import (
    KVQuantSpec,
    QuantizedKVCache,
    cache_nbytes,
    dequantize_kv,
    quantize_kv,
    streamed_nll,
)


def reference_round_trip(x: torch.Tensor, bits: int, axis: str, group: int) -> torch.Tensor:
    """Plain torch: asymmetric min/max groups, ``x ≈ s q + min`` (fp32 scale and offset)."""
    y = x if axis == "token" else x.transpose(-1, -2)
    g = y.reshape(*y.shape[:-1], y.shape[-1] // group, group)
    lo = g.amin(-1, keepdim=True)
    s = (g.amax(-1, keepdim=True) - lo) / (2**bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((g - lo) / s).clamp(0, 2**bits - 1)
    out = (q * s + lo).reshape(y.shape)
    return out if axis == "token" else out.transpose(-1, -2)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    axis=st.sampled_from(["token", "channel"]),
    groups=st.integers(1, 3),
    group=st.sampled_from([2, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_matches_plain_torch(bits, axis, groups, group, seed):
    g = torch.Generator().manual_seed(seed)
    tokens, head_dim = (groups * group, 8) if axis == "channel" else (5, groups * group)
    x = torch.randn(2, 3, tokens, head_dim, generator=g) * 3
    x[..., 0] += 10  # an outlier channel
    spec = KVQuantSpec(bits, axis, group, scale_dtype=torch.float32)
    got = dequantize_kv(quantize_kv(x, spec))
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(got, reference_round_trip(x, bits, axis, group))


def test_fp16_scales_stay_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 64, 32, generator=g) * 5
    for spec in (KVQuantSpec(4, "token", 16), KVQuantSpec(4, "channel", 32), KVQuantSpec(8, "token")):
        chunk = quantize_kv(x, spec)
        assert chunk.scale.dtype == torch.float16 and chunk.offset.dtype == torch.float16
        y = x if spec.axis == "token" else x.transpose(-1, -2)
        gs = spec.group_size or 32
        grouped = y.reshape(*y.shape[:-1], -1, gs)
        step = (grouped.amax(-1) - grouped.amin(-1)) / (2**spec.bits - 1)
        # half a step, plus the fp16 rounding of the offset (2^-11 relative) and of the scale
        bound = step / 2 + grouped.abs().amax(-1) * 2**-10 + 1e-6
        err = (dequantize_kv(chunk) - x).abs()
        err = err if spec.axis == "token" else err.transpose(-1, -2)
        assert (err.reshape(grouped.shape).amax(-1) <= bound).all(), spec


def test_per_channel_keeps_an_outlier_channel_from_swamping_the_others():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 64, 64, generator=g)
    x[..., 3] *= 40  # a key-like outlier channel
    rest = [c for c in range(64) if c != 3]
    err_token = (dequantize_kv(quantize_kv(x, KVQuantSpec(4, "token"))) - x)[..., rest].pow(2).mean()
    err_channel = (dequantize_kv(quantize_kv(x, KVQuantSpec(4, "channel", 32))) - x)[..., rest].pow(2).mean()
    assert err_channel < err_token / 10


def test_packed_bytes_are_what_the_codes_and_scales_need():
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(3))
    tok = quantize_kv(x, KVQuantSpec(4, "token", 16))
    # 2*3*64*32 codes at 4 bits, plus an fp16 scale and an fp16 offset per 16 channels
    assert tok.nbytes == 2 * 3 * 64 * 32 // 2 + 2 * 3 * 64 * 2 * 2 * 2
    ch = quantize_kv(x, KVQuantSpec(8, "channel", 32))
    assert ch.nbytes == 2 * 3 * 64 * 32 + 2 * 3 * 32 * 2 * 2 * 2
    assert tok.packed.dtype == torch.uint8 and tok.packed.numel() == 2 * 3 * 64 * 16


# --- the cache inside a real (tiny, random) Llama ---


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return cfg, LlamaForCausalLM(cfg).eval()


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def _chunked(model, ids, cache, chunk=16):
    with torch.inference_mode():
        return torch.cat(
            [model(ids[:, i : i + chunk], cache=cache).logits for i in range(0, ids.shape[1], chunk)], 1
        )


def test_inside_the_float_window_logits_equal_dynamic_cache(tiny):
    cfg, model = tiny
    ids = _ids(80)
    ref = _chunked(model, ids, DynamicCache(config=cfg))
    cache = QuantizedKVCache(cfg, KVQuantSpec(2, "token"), KVQuantSpec(2, "token"), residual_length=80)
    assert torch.equal(_chunked(model, ids, cache), ref)
    assert all(layer.quantized_tokens == 0 for layer in cache.layers)
    assert cache.get_seq_length() == 80


def test_outside_the_window_each_token_is_quantized_once(tiny):
    cfg, model = tiny
    ids = _ids(100, seed=1)
    dyn = DynamicCache(config=cfg)
    _chunked(model, ids, dyn)
    key, value = KVQuantSpec(4, "channel", 8, scale_dtype=torch.float32), KVQuantSpec(8, "token")
    cache = QuantizedKVCache(cfg, key, value, residual_length=20)
    _chunked(model, ids, cache)
    for layer in cache.layers:
        # (100 - 20) // 8 * 8 = 80 tokens left the window, in chunks as the window overflowed
        assert layer.quantized_tokens == 80 and layer.keys.shape[-2] == 20
    # layer 0's states depend on the embeddings alone, so they equal the float run's; its chunks hold
    # exactly the reference quantization of those keys (float32 scales), each token quantized once
    layer, ref = cache.layers[0], dyn.layers[0]
    k = torch.cat([dequantize_kv(c) for c in layer.key_chunks], -2)
    assert torch.equal(k, reference_round_trip(ref.keys[..., :80, :], 4, "channel", 8))
    assert torch.equal(layer.keys, ref.keys[..., 80:, :])
    v = torch.cat([dequantize_kv(c) for c in layer.value_chunks], -2)
    assert (v - ref.values[..., :80, :]).abs().max() < 0.01 * ref.values.abs().max()


def test_quantized_logits_stay_close_and_int8_beats_int4(tiny):
    cfg, model = tiny
    ids = _ids(96, seed=2)
    ref = _chunked(model, ids, DynamicCache(config=cfg))
    errs = {}
    for bits in (8, 4):
        cache = QuantizedKVCache(cfg, KVQuantSpec(bits, "channel", 16), KVQuantSpec(bits), residual_length=0)
        errs[bits] = float((_chunked(model, ids, cache) - ref).abs().max())
    scale = float(ref.abs().max())
    assert 0 < errs[8] < 0.01 * scale
    assert errs[8] < errs[4] < 0.2 * scale


def test_greedy_generate_runs_through_the_cache(tiny):
    cfg, model = tiny
    prompt = _ids(12, seed=3)
    with torch.inference_mode():
        plain = model.generate(prompt, max_new_tokens=20, do_sample=False)
        wide = QuantizedKVCache(cfg, residual_length=64)
        same = model.generate(prompt, max_new_tokens=20, do_sample=False, cache=wide)
        tight = QuantizedKVCache(cfg, KVQuantSpec(8, "channel", 4), KVQuantSpec(8), residual_length=4)
        quant = model.generate(prompt, max_new_tokens=20, do_sample=False, cache=tight)
    assert torch.equal(same, plain)  # nothing left the float window
    assert quant.shape == plain.shape and torch.equal(quant[:, :12], prompt)
    assert tight.layers[0].quantized_tokens > 0
    assert tight.get_seq_length() == 31  # the last new token is never fed back


def test_beam_reorder_moves_codes_with_their_rows(tiny):
    cfg, model = tiny
    ids = torch.cat([_ids(40, seed=4), _ids(40, seed=5)])
    cache = QuantizedKVCache(cfg, KVQuantSpec(4, "channel", 8), KVQuantSpec(4), residual_length=8)
    with torch.inference_mode():
        model(ids, cache=cache)
    layer = cache.layers[0]
    before = torch.cat([*(dequantize_kv(c) for c in layer.key_chunks), layer.keys], -2)
    cache.reorder_cache(torch.tensor([1, 0]))
    after = torch.cat([*(dequantize_kv(c) for c in layer.key_chunks), layer.keys], -2)
    assert torch.equal(after, before.flip(0))


def test_cache_bytes_count_codes_scales_and_the_float_window(tiny):
    cfg, model = tiny
    ids = _ids(100, seed=6)
    cache = QuantizedKVCache(cfg, KVQuantSpec(4, "channel", 32), KVQuantSpec(4, "token"), residual_length=16)
    dyn = DynamicCache(config=cfg)
    _chunked(model, ids, cache)
    _chunked(model, ids, dyn)
    heads, head_dim, layers = 2, 16, 2
    quant, window = 64, 36  # (100 - 16) // 32 * 32 tokens left the window
    keys = heads * head_dim * quant // 2 + heads * head_dim * (quant // 32) * 2 * 2
    values = heads * quant * head_dim // 2 + heads * quant * 2 * 2
    floats = 2 * heads * window * head_dim * 4
    assert cache.nbytes() == cache_nbytes(cache) == layers * (keys + values + floats)
    assert cache_nbytes(dyn) == layers * 2 * heads * 100 * head_dim * 4


def test_streamed_nll_equals_one_forward_with_a_dynamic_cache(tiny):
    cfg, model = tiny
    ids = _ids(50, seed=7)
    with torch.inference_mode():
        logits = model(ids).logits
    want = float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
    total, count = streamed_nll(model, ids, DynamicCache(config=cfg), chunk_size=16)
    assert count == 49
    assert total == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 5}, "bits must be one of"),
        ({"bits": True}, "bits must be one of"),
        ({"axis": "head"}, "axis must be 'token' or 'channel'"),
        ({"group_size": 0}, "group_size must be a positive integer"),
        ({"scale_dtype": torch.int8}, "scale_dtype must be one of"),
    ],
)
def test_bad_specs_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVQuantSpec(**kwargs)


def test_bad_cache_arguments_are_named(tiny):
    cfg, model = tiny
    with pytest.raises(ValueError, match="residual_length must be a non-negative integer"):
        QuantizedKVCache(cfg, residual_length=-1)
    with pytest.raises(TypeError, match="config must be a transformers PreTrainedConfig"):
        QuantizedKVCache({"num_hidden_layers": 2})
    with pytest.raises(TypeError, match="key must be a KVQuantSpec"):
        QuantizedKVCache(cfg, key=4)
    with pytest.raises(ValueError, match="full-attention models only"):
        QuantizedKVCache(MistralConfig(num_hidden_layers=2, sliding_window=16))
    with pytest.raises(ValueError, match=r"group_size=12 must divide head_dim=16"):
        _chunked(model, _ids(20), QuantizedKVCache(cfg, value=KVQuantSpec(4, "token", 12), residual_length=0))
    with pytest.raises(ValueError, match="states must be a float tensor"):
        quantize_kv(torch.zeros(3, 4, 8), KVQuantSpec())
    with pytest.raises(ValueError, match="whole groups of 32 tokens"):
        quantize_kv(torch.zeros(1, 1, 20, 8), KVQuantSpec(4, "channel"))
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        QuantizedKVCache(cfg).layers[0].crop(-1)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        streamed_nll(model, _ids(10), DynamicCache(config=cfg), chunk_size=0)
