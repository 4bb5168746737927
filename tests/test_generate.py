"""A whole quantized decoder under torch.compile, and qlab.generate's static-cache greedy loop.

One tiny Llama (1 layer, width 64, vocabulary 256, tied embedding), quantized int4 g32, compiled
once per module with ``fullgraph=True`` and the ``aot_eager`` backend: Dynamo and AOT tracing with
fake tensors, as Inductor gets them, without its C++ code generation (half a minute on two busy
cores). Compiled code calls the same ``torch.ops.qlab`` operators on the same tensors as eager code,
so logits are equal bit for bit and greedy text is identical.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator

import pytest
import torch
from qlab.kernels import cpu

from qlab.config import QuantConfig
from qlab.driver import quantize_model
from qlab.generate import Generator, generate
from qlab.nn import prepare, select_path, use_path

transformers = pytest.importorskip("transformers")

NEEDS_C = pytest.mark.skipif(cpu.load() is None, reason=f"CPU kernels unavailable: {cpu.status()}")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(model, QuantConfig("rtn", 4, 32), progress=False)
    return model


@pytest.fixture(scope="module")
def model() -> Iterator[torch.nn.Module]:
    torch._dynamo.reset()
    yield tiny_llama()
    torch._dynamo.reset()


def _ids(t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, t), generator=torch.Generator().manual_seed(seed))


def test_prepare_builds_every_cache_the_forward_reads(model):
    fresh = tiny_llama(seed=1)
    q = fresh.model.layers[0].self_attn.q_proj
    assert q._cache == {}
    assert prepare(fresh) is fresh
    keys = set(q._cache)
    assert {"cpu_fit"} <= keys
    with torch.no_grad():
        fresh(_ids(3, 0))
        fresh(_ids(70, 0))
    assert set(q._cache) == keys  # nothing new built by a decode or a prefill forward
    with pytest.raises(ValueError, match="path must be one of"):
        prepare(q, ["nope"])


@NEEDS_C
def test_compiled_quantized_llama_fullgraph_no_recompile(model, c_kernel_paths):
    """fullgraph compile of the whole quantized model: equal to eager, and a second call with another
    input of the same shape reuses the graph (the prepared caches leave Dynamo nothing to guard on)."""
    prepare(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for seed in (1, 2):
            ids = _ids(6, seed)
            assert torch.equal(compiled(ids).logits, model(ids).logits)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert frames == 1, dict(torch._dynamo.utils.counters["stats"])
        # a forced path is read at trace time and guarded on (the thread-local's value): one more
        # graph, equal to eager under the same path
        with use_path("torch_int8"):
            prepare(model)
            ids = _ids(6, 3)
            assert torch.equal(compiled(ids).logits, model(ids).logits)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert select_path(model.model.layers[0].mlp.up_proj, torch.zeros(6, 64)) == "cpu_int8dot"


@NEEDS_C
def test_compiled_greedy_text_equals_eager_and_transformers(model):
    ids = _ids(8, 4)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, ids, 10), want)
    gen = Generator(model, 24, compile=True, backend="aot_eager")
    out = gen.generate(ids, 10)
    assert torch.equal(out.ids, want)
    assert out.new_tokens == 10 and len(out.step_s) == 9
    # another prompt length reuses the compiled step (the step's shapes never change)
    torch._dynamo.utils.counters.clear()
    ids5 = _ids(5, 5)
    with torch.no_grad():
        want5 = model.generate(ids5, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(gen.generate(ids5, 10).ids, want5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


class Negate(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def test_compiled_steps_follow_a_model_changed_between_calls():
    # After its first step a call skips Dynamo's guards (qlab.generate); the first step still checks
    # them, so a model changed between calls recompiles and the later steps run the new graph.
    m = tiny_llama(seed=3)
    gen = Generator(m, 24, compile=True, backend="aot_eager")
    ids = _ids(6, 7)
    before = gen.generate(ids, 8).ids
    assert torch.equal(before, generate(m, ids, 8))
    norm = m.model.norm
    m.model.norm = torch.nn.Sequential(norm, Negate())  # another graph: greedy picks the least likely token
    after = gen.generate(ids, 8).ids
    assert torch.equal(after, generate(m, ids, 8))
    assert not torch.equal(after, before)


def test_generate_checks_its_arguments(model):
    gen = Generator(model, 8)
    with pytest.raises(ValueError, match="max_len"):
        gen.generate(_ids(6, 0), 5)
    with pytest.raises(ValueError, match=r"shape \[1, T\]"):
        gen.generate(torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_len must be"):
        Generator(model, 1)
    with pytest.raises(ValueError, match="compile must be one of"):
        Generator(model, 8, compile="jit")
    out = gen.generate(_ids(3, 0), 4, eos_token_id=int(gen.generate(_ids(3, 0), 1).ids[0, -1]))
    assert out.ids.shape[1] == 4  # stopped after the end token, which is kept


# ------------------------------------------------------------------------------------------------
# Quantized tied embedding + head, fused projections
# ------------------------------------------------------------------------------------------------
def _float_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig("rtn", 8, None, quantize_embeddings=True),
        QuantConfig("rtn", 4, 48, quantize_embeddings=True),  # 48 does not divide 64: the table uses 32
        QuantConfig("nf4", 4, 32, quantize_embeddings=True),
        QuantConfig(
            "rtn", 4, 32, quantize_embeddings=True, overrides={"lm_head": {"bits": 8, "group_size": None}}
        ),
    ],
    ids=["int8", "int4-fit", "nf4", "int4-int8head"],
)
def test_quantized_embedding_is_the_tied_head(config):
    """One stored table: the head *is* the embedding's QuantLinear; a lookup gives the dequantized rows
    (of exactly those ids), and the float embedding is gone."""
    from qlab.nn import QuantEmbedding, QuantLinear

    model = _float_llama()
    w = model.model.embed_tokens.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(model, config, progress=False)
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert model.lm_head is emb.linear
    assert not any(isinstance(m, torch.nn.Embedding) for m in model.modules())
    spec = config.for_module("lm_head")
    assert emb.linear.spec.bits == spec.bits
    ids = torch.tensor([[3, 255, 0, 3], [17, 42, 42, 1]])
    table = emb.linear.dequantize(torch.float32)
    assert torch.equal(emb(ids), table[ids])
    rel = (table - w).norm() / w.norm()
    assert rel < (0.01 if spec.bits == 8 else 0.15)
    with torch.no_grad():
        h = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(model.lm_head(h), h @ table.t(), rtol=1e-2, atol=1e-2 * float(h.norm()))
        want = model(ids).logits
    from qlab.driver import dequantize_model

    dequantize_model(model)  # back to float modules, still tied, computing the same table
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert model.model.embed_tokens.weight is model.lm_head.weight
    assert torch.equal(model.lm_head.weight, table)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, want, rtol=1e-2, atol=1e-2)


def test_quantize_embeddings_default_off_and_roundtrips_config():
    model = _float_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(model, QuantConfig("rtn", 4, 32), progress=False)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    cfg = QuantConfig("rtn", 4, 32, quantize_embeddings=True)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_fused_projections_equal_separate_layers(model):
    """q/k/v and gate/up stacked: the same logits bit for bit, at decode (int8-dot) and prefill (tiles),
    eager and compiled, and the same greedy text."""
    import copy

    from qlab.fuse import fuse_projections
    from qlab.nn.fused import FusedMLP, ProjectionView

    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == {"qkv": 1, "gate_up": 1}
    block = fused.model.layers[0]
    assert isinstance(block.mlp, FusedMLP) and isinstance(block.self_attn.k_proj, ProjectionView)
    assert fuse_projections(fused) == {"qkv": 0, "gate_up": 0}  # nothing left to fuse
    with torch.no_grad():
        for t in (1, 3, 20):
            ids = _ids(t, t)
            assert torch.equal(fused(ids).logits, model(ids).logits)
        ids = _ids(7, 9)
        want = Generator(model, 20).generate(ids, 8).ids
        assert torch.equal(Generator(fused, 20, compile=True, backend="aot_eager").generate(ids, 8).ids, want)


# ------------------------------------------------------------------------------------------------
# The ahead-of-time step (qlab.aot)
# ------------------------------------------------------------------------------------------------
NEEDS_CXX = pytest.mark.skipif(
    not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")),
    reason="AOTInductor needs a C++ compiler",
)


def _cache_state(gen: Generator) -> list[torch.Tensor]:
    return [t for layer in gen.cache.layers for t in (layer.keys, layer.values, layer.cumulative_length)]


@NEEDS_CXX
@pytest.mark.slow
def test_aot_step_equals_eager_and_follows_the_model(c_kernel_paths):
    """``compile="aot"`` on the fastest recipe (int4 body, int8 tied head, fused projections; 2 layers):
    eager's greedy text and the same KV cache (every slot, and the length) for two prompt lengths from one
    build; the compiled step reads the model's own tensors (nothing copied); weights changed in place are
    seen without a rebuild, a changed module tree rebuilds it."""
    from qlab.aot import AotStep
    from qlab.fuse import fuse_projections
    from qlab.nn.dispatch import converted_tensors

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    recipe = QuantConfig(
        "rtn", 4, 32, quantize_embeddings=True, overrides={"lm_head": {"bits": 8, "group_size": None}}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(model, recipe, progress=False)
    fuse_projections(model)
    eager, aot = Generator(model, 24), Generator(model, 24, compile="aot")

    def same(ids: torch.Tensor) -> torch.Tensor:
        want = eager.generate(ids, 10).ids
        assert torch.equal(aot.generate(ids, 10).ids, want)
        for e, a in zip(_cache_state(eager), _cache_state(aot), strict=True):
            assert torch.allclose(e.float(), a.float(), rtol=1e-5, atol=1e-5)  # compiled RoPE: last bits
        return want

    before = same(_ids(8, 4))
    step = aot._aot_step
    assert isinstance(step, AotStep)
    same(_ids(5, 5))  # another prompt length: the same step
    assert aot._aot_step is step
    own = [*model.parameters(), *model.buffers(), *converted_tensors(model), *_cache_state(aot)]
    ptrs = {t.data_ptr() for t in own}
    assert step.constants and all(t.data_ptr() in ptrs for t in step.constants.values())
    if cpu.load() is not None:  # with the C kernels, every constant is shared (none copied into the library)
        assert step.packaged == []

    with torch.no_grad():
        model.model.norm.weight.mul_(-1)  # in place: the step reads it where it is
    flipped = same(_ids(8, 4))
    assert aot._aot_step is step and not torch.equal(flipped, before)

    model.model.norm = torch.nn.Sequential(model.model.norm, Negate())  # a new module tree: rebuilt
    assert torch.equal(same(_ids(8, 4)), before)
    assert aot._aot_step is not step
