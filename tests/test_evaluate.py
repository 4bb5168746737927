"""qlab.evaluate: perplexity, embedding agreement and greedy generation.

Fast tests use tiny models whose answers are known in closed form; tests marked ``slow`` use the real
SmolLM2 and MiniLM (fetched once by a module fixture; a no-op when the cache is warm).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlab import evaluate as E
from qlab import models as M


class Uniform(torch.nn.Module):
    """Predicts every token with probability 1/vocab: perplexity exactly ``vocab``."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) + self.dummy


class Successor(torch.nn.Module):
    """Predicts ``token + 1 (mod vocab)`` with probability ``p``; the rest spread evenly."""

    def __init__(self, vocab: int, p: float):
        super().__init__()
        self.vocab, self.p = vocab, p
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        probs = torch.full((*ids.shape, self.vocab), (1 - self.p) / (self.vocab - 1))
        probs.scatter_(-1, ((ids + 1) % self.vocab)[..., None], self.p)
        return probs.log() + self.dummy


class CharTokenizer:
    """One token per character (code point mod 256); EOS is 0."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [ord(c) % 256 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


# --------------------------------------------------------------------------------------------------------
# window_starts
# --------------------------------------------------------------------------------------------------------
def test_window_starts():
    assert E.window_starts(10, 4, 4, None) == [0, 4]  # the last 2 tokens do not fill a window
    assert E.window_starts(12, 4, 4, None) == [0, 4, 8]
    assert E.window_starts(12, 4, 2, None) == [0, 2, 4, 6, 8]
    assert E.window_starts(100, 10, 10, 3) == [0, 40, 90]  # evenly spaced, first and last kept
    assert E.window_starts(100, 10, 10, 1) == [0]
    with pytest.raises(ValueError, match="seq_len"):
        E.window_starts(3, 4, 4, None)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.integers(2, 64), st.integers(1, 64), st.one_of(st.none(), st.integers(1, 20)))
def test_window_starts_properties(n, seq_len, stride, max_windows):
    stride = min(stride, seq_len)
    if n < seq_len:
        return
    starts = E.window_starts(n, seq_len, stride, max_windows)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert all(s % stride == 0 and s + seq_len <= n for s in starts)
    full = E.window_starts(n, seq_len, stride, None)
    assert set(starts) <= set(full) and full[-1] + stride + seq_len > n
    if max_windows is not None:
        assert len(starts) == min(max_windows, len(full))
        if max_windows > 1 and len(full) > 1:
            assert starts[-1] == full[-1]


# --------------------------------------------------------------------------------------------------------
# perplexity on models with known answers
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "seq_len,stride,max_windows", [(16, None, None), (16, 4, None), (8, 8, 3), (64, 1, 2)]
)
def test_perplexity_of_uniform_model_is_vocab(seq_len, stride, max_windows):
    ids = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0))
    ppl = E.perplexity(
        Uniform(50), ids, seq_len=seq_len, stride=stride, max_windows=max_windows, progress=False
    )
    assert ppl == pytest.approx(50, rel=1e-6)


def test_perplexity_closed_form():
    """A model right with probability p on every token: ppl = exp(-log p) on a perfectly predictable text."""
    vocab, p = 10, 0.8
    ids = torch.arange(200) % vocab
    ppl = E.perplexity(Successor(vocab, p), ids, seq_len=32, progress=False)
    assert ppl == pytest.approx(1 / p, rel=1e-6)
    # on a text it never predicts right, every token costs (1 - p) / (vocab - 1)
    wrong = torch.zeros(200, dtype=torch.int64)
    ppl = E.perplexity(Successor(vocab, p), wrong, seq_len=32, progress=False)
    assert ppl == pytest.approx((vocab - 1) / (1 - p), rel=1e-6)


def test_perplexity_scores_each_token_once_with_stride():
    """With all windows kept, strided perplexity scores tokens 1..end of the covered text exactly once."""
    vocab, p = 10, 0.5
    ids = torch.arange(100) % vocab
    ids[[5, 37, 73]] = 0  # three surprises; with seq_len 20, stride 5 every token 1..99 is scored once
    expected_nll = 3 * -math.log((1 - p) / (vocab - 1)) + 3 * -math.log((1 - p) / (vocab - 1))
    expected_nll += (99 - 6) * -math.log(p)  # each surprise also spoils the prediction of the next token
    ppl = E.perplexity(Successor(vocab, p), ids, seq_len=20, stride=5, progress=False)
    assert ppl == pytest.approx(math.exp(expected_nll / 99), rel=1e-6)


def test_perplexity_accepts_tokenizer_and_text_and_restores_mode():
    model = Uniform(256).train()
    ppl = E.perplexity(model, CharTokenizer(), "to be or not to be " * 20, seq_len=32, progress=False)
    assert ppl == pytest.approx(256) and model.training
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    assert E.perplexity(Uniform(7), ids, seq_len=3, progress=False) == pytest.approx(7)  # [1, n] is fine


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"seq_len": 1}, "seq_len"),
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": 8.0}, "seq_len"),
        ({"stride": 0}, "stride"),
        ({"stride": 17}, "stride"),
        ({"max_windows": 0}, "max_windows"),
        ({"max_windows": True}, "max_windows"),
        ({"seq_len": 1000}, "seq_len"),  # longer than the text
    ],
)
def test_perplexity_rejects_bad_arguments(kwargs, arg):
    ids = torch.arange(100)
    with pytest.raises(ValueError, match=arg):
        E.perplexity(Uniform(100), ids, **{"seq_len": 16, **kwargs}, progress=False)


def test_perplexity_rejects_bad_inputs():
    with pytest.raises(ValueError, match="model"):
        E.perplexity(lambda x: x, torch.arange(10), seq_len=4)
    with pytest.raises(ValueError, match="text"):
        E.perplexity(Uniform(10), torch.arange(10), "and text", seq_len=4)
    with pytest.raises(ValueError, match="tokenizer_or_ids"):
        E.perplexity(Uniform(10), torch.rand(10), seq_len=4)
    with pytest.raises(ValueError, match="tokenizer_or_ids"):
        E.perplexity(Uniform(10), torch.zeros(2, 10, dtype=torch.long), seq_len=4)
    with pytest.raises(ValueError, match="tokenizer_or_ids"):
        E.perplexity(Uniform(10), [1, 2, 3], seq_len=2)
    with pytest.raises(ValueError, match="text"):
        E.perplexity(Uniform(10), CharTokenizer(), b"bytes", seq_len=2)


# --------------------------------------------------------------------------------------------------------
# generate and embedding_cosine on tiny models
# --------------------------------------------------------------------------------------------------------
def test_generate_greedy_loop():
    # the successor of 'a' is 'b', ...; the plain loop (no .generate) appends the argmax token
    assert E.generate(Successor(256, 0.9), CharTokenizer(), "a", max_new_tokens=5) == "bcdef"
    # it stops at EOS (token 0, dropped from the text): 254 -> 255 -> 0
    assert E.generate(Successor(256, 0.9), CharTokenizer(), chr(254), max_new_tokens=5) == chr(255)


def test_generate_rejects_bad_arguments():
    for kwargs, arg in [
        ({"prompt": ""}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"max_new_tokens": 0}, "max_new"),
    ]:
        with pytest.raises(ValueError, match=arg):
            E.generate(Successor(256, 0.9), CharTokenizer(), **{"prompt": "a", **kwargs})


class BagOfChars(torch.nn.Module):
    """A toy encoder: last_hidden_state = one-hot of each character (with a scale to perturb)."""

    def __init__(self, scale=None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(8) if scale is None else scale)

    def forward(self, input_ids, attention_mask=None):
        return (torch.nn.functional.one_hot(input_ids, 8).float() * self.scale,)


class PaddingCharTokenizer:
    def __call__(self, sentences, padding, truncation, max_length, return_tensors):
        from transformers import BatchEncoding

        n = max(len(s) for s in sentences)
        ids = [[ord(c) % 8 for c in s] + [0] * (n - len(s)) for s in sentences]
        mask = [[1] * len(s) + [0] * (n - len(s)) for s in sentences]
        return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})


def test_embedding_cosine_on_toy_encoders():
    sentences = ["abc", "aab", "hello world"]
    tok = PaddingCharTokenizer()
    assert E.embedding_cosine(BagOfChars(), BagOfChars(), tok, sentences) == pytest.approx(1.0)
    other = BagOfChars(torch.tensor([1.0, 1, 1, 1, 1, 1, 1, -1]))
    cos = E.embedding_cosine(BagOfChars(), other, tok, sentences)
    assert -1 <= cos < 1
    with pytest.raises(ValueError, match="model_b"):
        E.embedding_cosine(BagOfChars(), "model", tok, sentences)
    with pytest.raises(ValueError, match="sentences"):
        E.embedding_cosine(BagOfChars(), BagOfChars(), tok, "abc")


# --------------------------------------------------------------------------------------------------------
# Real models
# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_perplexity_on_evaluation_text(smollm2, capsys):
    model, tokenizer = smollm2
    t0 = time.perf_counter()
    ppl = E.perplexity(model, tokenizer, max_windows=4, progress=False)
    with capsys.disabled():
        print(f"\nfp32 SmolLM2 perplexity, 4 windows of 512: {ppl:.2f} ({time.perf_counter() - t0:.1f} s)")
    assert math.isfinite(ppl) and 5 < ppl < 100
    # one window (the first 512 tokens) agrees with transformers' own loss on the same tokens
    ids = M.tokenize(tokenizer, M.shakespeare_text("evaluation"))
    one = E.perplexity(model, tokenizer, max_windows=1, progress=False)
    with torch.inference_mode():
        loss = model(ids[None, :512], labels=ids[None, :512]).loss
    assert one == pytest.approx(math.exp(loss.item()), rel=1e-4)
    # Shakespeare is harder than its own repetition: the second copy of a window is nearly free
    window = ids[:128]
    assert E.perplexity(model, torch.cat([window, window]), seq_len=256, progress=False) < ppl


@pytest.mark.slow
def test_smollm2_generate_paris(smollm2):
    model, tokenizer = smollm2
    text = E.generate(model, tokenizer, "The capital of France is", max_new_tokens=4)
    assert text.startswith(" Paris")
    assert E.generate(model, tokenizer, "The capital of France is", max_new_tokens=4) == text


@pytest.mark.slow
def test_minilm_embedding_cosine(fetched):
    model, tokenizer = M.load_minilm()
    sentences = E.default_sentences()
    assert len(sentences) == 64 and len(set(sentences)) == 64
    assert sentences == E.default_sentences()
    evaluation = M.shakespeare_text("evaluation")
    assert all(s.split()[0] in evaluation for s in sentences)
    assert E.embedding_cosine(model, model, tokenizer) == pytest.approx(1.0, abs=1e-5)
    noisy, _ = M.load_minilm()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.02 * p.std())
    cos = E.embedding_cosine(model, noisy, tokenizer, sentences[:16])
    assert 0.5 < cos < 1
