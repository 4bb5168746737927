"""qlab.picker: memory estimates agree with QuantizedTensor.nbytes and with real model shapes; the rules."""

from __future__ import annotations

import math

import pytest
import torch

from qlab.codebooks import quantize_fp4, quantize_nf4
from qlab.picker import (
    MODELS,
    SCHEMES,
    ModelEntry,
    Scheme,
    estimate_memory,
    model_entry,
    recommend,
)
from qlab.quantize import QuantSpec, quantize


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec.per_channel(8),
        QuantSpec.per_channel(4, symmetric=False, scale_dtype=torch.float16),
        QuantSpec.per_group(4, 32, symmetric=False, scale_dtype=torch.float16),
        QuantSpec.per_group(4, 128),
        QuantSpec.per_group(3, 64, symmetric=True),
        QuantSpec.per_group(2, 64, symmetric=False, scale_dtype=torch.bfloat16),
    ],
    ids=lambda s: f"{s.describe()}-{s.scale_dtype}",
)
def test_scheme_bytes_equal_quantized_tensor_nbytes(spec):
    w = torch.randn(96, 256)
    scheme = Scheme.from_spec("x", spec)
    codes, overhead = scheme.linear_bytes(w.numel(), 256)
    assert codes + overhead == quantize(w, spec).nbytes


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("fn", [quantize_nf4, quantize_fp4])
@pytest.mark.parametrize("rows", [8, 300])  # 300 rows * 4 blocks = 1200 scales: double-quant pads to 1280
def test_scheme_bytes_equal_codebook_nbytes(fn, dq, rows):
    w = torch.randn(rows, 256)
    qt = fn(w, 64, dq)
    codes, overhead = Scheme.from_spec("x", qt.spec).linear_bytes(w.numel(), 256)
    assert codes + overhead == qt.nbytes


def test_scheme_from_spec_rejects_per_tensor_and_other_axes():
    with pytest.raises(ValueError, match="per-tensor"):
        Scheme.from_spec("x", QuantSpec.per_tensor(8))
    with pytest.raises(ValueError, match="axis"):
        Scheme.from_spec("x", QuantSpec.per_channel(8, axis=1))


def test_bits_per_weight_of_listed_schemes():
    bpw = {name: s.bits_per_weight() for name, s in SCHEMES.items()}
    assert bpw["fp32"] == 32 and bpw["bf16"] == 16
    assert bpw["int4 asym g128"] == pytest.approx(4 + 32 / 128)  # fp16 scale + fp16 zero per 128
    assert bpw["nf4 b64"] == pytest.approx(4 + 32 / 64)  # fp32 absmax per 64
    assert bpw["nf4 b64 double-quant"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert bpw["int2 asym g64"] == pytest.approx(2.5)
    assert bpw["int8 sym per-channel"] == pytest.approx(8 + 16 / 4096)


def test_estimate_memory_formula():
    m = MODELS["Llama-3-8B"]
    bf16 = estimate_memory(m, "bf16")
    assert bf16.total == 2 * m.n_params and bf16.overhead_bytes == 0
    int4 = estimate_memory(m, "int4 asym g128")
    assert int4.weight_bytes == m.n_linear // 2
    assert int4.overhead_bytes == m.n_linear // 128 * 4
    assert int4.other_bytes == 2 * (m.n_params - m.n_linear)
    # a bare count assumes a 7B-class shape
    assert estimate_memory(7 * 10**9, "bf16").total == 14 * 10**9
    with pytest.raises(ValueError, match="scheme"):
        estimate_memory(m, "int5")
    with pytest.raises(ValueError, match="model"):
        estimate_memory("GPT-5", "bf16")
    with pytest.raises(TypeError, match="model"):
        estimate_memory(-3, "bf16")
    with pytest.raises(ValueError, match="n_linear"):
        ModelEntry("bad", 10, 11, 4)


def _meta_model(name: str):
    transformers = pytest.importorskip("transformers")
    if name.startswith("all-MiniLM"):
        cfg = transformers.BertConfig(
            vocab_size=30522,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
        )
        cls = transformers.BertModel
    else:
        shapes = {
            "SmolLM2-135M": (30, 576, 9, 3, 1536, 49152, True),
            "Mistral-7B": (32, 4096, 32, 8, 14336, 32000, False),
            "Llama-3-8B": (32, 4096, 32, 8, 14336, 128256, False),
        }
        layers, hidden, heads, kv_heads, ffn, vocab, tied = shapes[name]
        cfg = transformers.LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=ffn,
            vocab_size=vocab,
            tie_word_embeddings=tied,
        )
        cls = transformers.LlamaForCausalLM
    with torch.device("meta"):
        return cls(cfg)


@pytest.mark.slow  # importing transformers alone takes ~10 s on 2 cores
@pytest.mark.parametrize("name", ["SmolLM2-135M", "all-MiniLM-L6-v2", "Mistral-7B", "Llama-3-8B"])
def test_model_counts_match_transformers_models(name):
    counted = model_entry(_meta_model(name), name)
    assert counted == MODELS[name]


def test_model_entry_skips_lm_head_and_counts_tied_weights_once():
    model = torch.nn.Sequential()
    model.add_module("embed", torch.nn.Embedding(10, 8))
    model.add_module("proj", torch.nn.Linear(8, 8, bias=False))
    model.add_module("lm_head", torch.nn.Linear(8, 10, bias=False))
    model.lm_head.weight = model.embed.weight
    entry = model_entry(model, "tiny")
    assert entry == ModelEntry("tiny", 80 + 64, 64, 8)
    with pytest.raises(TypeError, match="nn.Module"):
        model_entry("model", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("hardware", "bits", "calib", "finetune", "method", "group"),
    [
        ("cpu", 8, False, False, "rtn", None),
        ("consumer_gpu", 8, True, False, "rtn", None),
        ("datacenter_gpu", 8, False, False, "fp8", None),
        ("datacenter_gpu", 8, True, False, "smoothquant", None),
        ("cpu", 4, True, False, "awq", 128),
        ("consumer_gpu", 4, False, False, "hqq", 64),
        ("consumer_gpu", 3, True, False, "gptq", 64),
        ("cpu", 2, False, False, "rtn", 64),
        ("consumer_gpu", 3, False, False, "rtn", 64),
        ("consumer_gpu", 4, True, True, "nf4", 64),
        ("datacenter_gpu", 2, False, True, "nf4", 64),
        ("cpu", 8, False, True, "rtn", None),
    ],
)
def test_recommend_rules(hardware, bits, calib, finetune, method, group):
    rec = recommend(hardware, bits, calib, finetune, model="SmolLM2-135M")
    assert rec.method == method == rec.config.method
    assert rec.config.group_size == group
    expected_bits = 4 if method == "nf4" else bits
    assert rec.config.bits == expected_bits
    assert rec.reasons and all(isinstance(r, str) and r for r in rec.reasons)
    assert rec.fits  # 135M parameters fit anywhere
    # the memory shown is that of the scheme the config describes
    assert rec.memory == estimate_memory("SmolLM2-135M", rec.scheme)
    assert rec.scheme.bits == expected_bits


def test_recommend_data_free_reasons_follow_lesson_06():
    # lesson 06's data: HQQ beat RTN only at int4 g64; below 4 bits no data-free method held up
    four = recommend("cpu", 4, False, False, model="SmolLM2-135M")
    assert four.method == "hqq" and any("g64" in r and "lost" in r for r in four.reasons)
    for bits in (3, 2):
        low = recommend("cpu", bits, False, False, model="SmolLM2-135M")
        assert low.method == "rtn" and any("calibration data" in r for r in low.reasons)
        assert not any("survives" in r for r in low.reasons)


def test_recommend_memory_and_fit():
    rec = recommend("consumer_gpu", 8, False, False, model="Llama-3-70B")
    assert not rec.fits and rec.memory_limit == 24 * 10**9
    assert "exceed" in rec.reasons[-1] and "fewer bits" in rec.reasons[-1]  # 8 -> 4 bits would help
    assert "does NOT fit" in rec.summary()
    # at 2 bits, the fewest the picker offers, "pick fewer bits" would be advice the learner cannot follow
    floor = recommend("consumer_gpu", 2, True, False, model="Llama-3-70B")
    assert not floor.fits
    assert "fewer bits" not in floor.reasons[-1] and "smaller model or more memory" in floor.reasons[-1]
    small = recommend("consumer_gpu", 4, True, False, model="Llama-3-8B", memory_bytes=8 * 10**9)
    assert small.fits and "fits in 8.00 GB" in small.summary()
    assert small.memory.total == math.ceil(estimate_memory("Llama-3-8B", "int4 asym g128").total)


def test_recommend_bad_inputs():
    with pytest.raises(ValueError, match="hardware"):
        recommend("tpu", 4, True, False)
    with pytest.raises(ValueError, match="target_bits"):
        recommend("cpu", 5, True, False)
    with pytest.raises(TypeError, match="calibration"):
        recommend("cpu", 4, "yes", False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory_bytes"):
        recommend("cpu", 4, True, False, memory_bytes=0)
