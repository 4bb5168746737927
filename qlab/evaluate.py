"""Model quality: perplexity of a causal LM, agreement of two sentence encoders, greedy generation.

All three are deterministic (no sampling, no shuffling) and run under ``torch.inference_mode``. Their
default text is the held-out evaluation split of :func:`qlab.models.shakespeare_text`, which no calibration
sample touches.

CPU cost, measured on 2 cores: one fp32 SmolLM2-135M forward pass over 512 tokens takes about 0.75 s, so
:func:`perplexity` with its defaults (32 windows of 512 tokens, 16k scored tokens) takes about 25 s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qlab import models

__all__ = ["perplexity", "window_starts", "embedding_cosine", "default_sentences", "generate"]


def _positive_int(argname: str, value: Any, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        kind = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{argname}: expected {kind}, got {value!r}")
    return value


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, vocab]`` logits from a transformers causal LM or from any module returning them."""
    hf = getattr(getattr(model, "config", None), "use_cache", None) is not None
    out = model(ids, use_cache=False) if hf else model(ids)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def window_starts(n_tokens: int, seq_len: int, stride: int, max_windows: int | None) -> list[int]:
    """Start offsets of the windows :func:`perplexity` scores (exposed so the choice can be inspected).

    All windows that fit: ``0, stride, 2*stride, ...`` while ``start + seq_len <= n_tokens``. When there are
    more than ``max_windows``, keep ``max_windows`` of them evenly spaced from the first to the last, so the
    sample covers the whole text rather than its beginning.
    """
    if n_tokens < seq_len:
        raise ValueError(f"seq_len: the text has {n_tokens} tokens, fewer than seq_len={seq_len}")
    count = (n_tokens - seq_len) // stride + 1
    chosen = range(count)
    if max_windows is not None and count > max_windows:
        if max_windows == 1:
            chosen = [0]
        else:
            chosen = sorted({round(i * (count - 1) / (max_windows - 1)) for i in range(max_windows)})
    return [k * stride for k in chosen]


def perplexity(
    model: torch.nn.Module,
    tokenizer_or_ids: Any,
    text: str | None = None,
    *,
    seq_len: int = 512,
    stride: int | None = None,
    max_windows: int | None = 32,
    progress: bool = True,
) -> float:
    """Perplexity of a causal language model: ``exp(mean over scored tokens of -log p(token | context))``.

    What exactly is computed:

    1. ``ids``: the text tokenized without special tokens (no BOS), or the 1-D int tensor you pass instead of
       a tokenizer. ``text=None`` with a tokenizer means the evaluation plays
       (``qlab.models.shakespeare_text("evaluation")``, ~81k SmolLM2 tokens).
    2. Windows of ``seq_len`` tokens start at ``0, stride, 2*stride, ...`` (``stride=None``: ``seq_len``, i.e.
       non-overlapping); a last window that would not fit is dropped. If there are more than
       ``max_windows``, that many evenly spaced windows are kept (see :func:`window_starts`); ``None`` keeps
       all (157 windows of 512 on the evaluation plays, ~2 minutes for fp32 SmolLM2 on 2 CPU cores).
    3. Each window is one independent forward pass (batch 1, no cache between windows). In the first window
       every token after the first is scored; in later windows the tokens at positions
       ``>= max(1, seq_len - stride)``, so each scored token sees at least ``seq_len - stride`` tokens of
       context and, when all windows are kept, no token is scored twice.
    4. Negative log-likelihoods come from ``log_softmax`` of the logits in float32 and are summed in float64.

    Defaults (32 windows x 512 tokens: 16,352 scored tokens) take about 25 s for fp32 SmolLM2 on 2 CPU
    cores. Comparisons between models are paired (the same windows), so they are much more precise than
    the absolute value. The model is switched to eval mode for the call and restored afterwards.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _positive_int("seq_len", seq_len)
    if seq_len < 2:
        raise ValueError("seq_len: must be at least 2 (one token of context, one to predict)")
    stride = seq_len if stride is None else _positive_int("stride", stride)
    if stride > seq_len:
        raise ValueError(f"stride: must be at most seq_len={seq_len} (tokens would be skipped), got {stride}")
    _positive_int("max_windows", max_windows, allow_none=True)

    if isinstance(tokenizer_or_ids, torch.Tensor):
        if text is not None:
            raise ValueError("text: give either token ids or a tokenizer and text, not ids and text")
        ids = tokenizer_or_ids
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                "tokenizer_or_ids: expected a 1-D integer tensor of token ids, "
                f"got {ids.dtype} of shape {tuple(ids.shape)}"
            )
        ids = ids.long()
    elif callable(tokenizer_or_ids):
        if text is None:
            text = models.shakespeare_text("evaluation")
        if not isinstance(text, str):
            raise ValueError(f"text: expected str or None, got {type(text).__name__}")
        ids = models.tokenize(tokenizer_or_ids, text)
    else:
        raise ValueError(
            "tokenizer_or_ids: expected a tokenizer or a tensor of token ids, "
            f"got {type(tokenizer_or_ids).__name__}"
        )

    starts = window_starts(len(ids), seq_len, stride, max_windows)
    device = _device(model)
    nll_sum, n_scored = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
                window = ids[start : start + seq_len].to(device)
                first = 1 if start == 0 else max(1, seq_len - stride)
                logits = _logits(model, window[None])[0]  # [seq_len, vocab]
                # logits at position p - 1 predict the token at position p
                logp = F.log_softmax(logits[first - 1 : seq_len - 1].float(), dim=-1)
                nll = -logp.gather(-1, window[first:, None]).squeeze(-1)
                nll_sum += nll.double().sum().item()
                n_scored += nll.numel()
    finally:
        model.train(was_training)
    return math.exp(nll_sum / n_scored)


def perplexity_label(ppl: float, vocab_size: int) -> str:
    """``ppl`` as a reader should see it: ``"72.3"``, or ``"collapsed (worse than uniform guessing, 49,152)"``
    once it exceeds ``vocab_size``, the perplexity of guessing every token uniformly.

    Past that point the model is useless and its perplexity is noise in every digit: it moves with the
    kernel, the thread count and the summation order, so printing it would teach nothing and would not
    reproduce.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    if not math.isfinite(ppl) or ppl > vocab_size:
        return f"collapsed (worse than uniform guessing, {vocab_size:,})"
    return f"{ppl:.1f}"


def default_sentences(n: int = 64) -> list[str]:
    """``n`` fixed passages from the evaluation plays, for comparing sentence embeddings.

    Paragraphs (speeches, see :func:`qlab.models.strip_play_markup`) of 8 to 60 words, lines joined by spaces,
    ``n`` of them evenly spaced through the evaluation text. Deterministic.
    """
    _positive_int("n", n)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", models.shakespeare_text("evaluation"))]
    pool = [p for p in paragraphs if 8 <= len(p.split()) <= 60]
    if n > len(pool):
        raise ValueError(f"n: only {len(pool)} passages are available, asked for {n}")
    return [pool[i * len(pool) // n] for i in range(n)]


def embedding_cosine(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    tokenizer: Any,
    sentences: Sequence[str] | None = None,
) -> float:
    """Mean cosine similarity between two encoders' embeddings of the same sentences.

    ``mean_i <e_a(s_i), e_b(s_i)>`` with :func:`qlab.models.embed` (mean pooling, unit norm). 1.0 means the
    two models (say fp32 MiniLM and a quantized copy) embed every sentence identically. ``sentences=None``
    uses :func:`default_sentences` (64 passages from the evaluation plays).
    """
    for argname, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, torch.nn.Module):
            raise ValueError(f"{argname}: expected a torch.nn.Module, got {type(m).__name__}")
    if sentences is None:
        sentences = default_sentences()
    ea = models.embed(model_a, tokenizer, sentences)
    eb = models.embed(model_b, tokenizer, sentences)
    return (ea * eb).sum(-1).mean().item()


def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of ``prompt`` (the new text only, special tokens dropped). Deterministic.

    Uses the model's ``generate`` (with its KV cache) when it has one, with sampling off; otherwise a plain
    loop that appends the argmax token, stopping early at the tokenizer's EOS token.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt: expected a non-empty str, got {prompt!r}")
    _positive_int("max_new_tokens", max_new_tokens)
    device = _device(model)
    ids = torch.as_tensor(tokenizer(prompt)["input_ids"], dtype=torch.int64)[None].to(device)
    eos = getattr(tokenizer, "eos_token_id", None)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if hasattr(model, "generate"):
                pad = getattr(tokenizer, "pad_token_id", None)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad if pad is not None else eos,
                )
            else:
                out = ids
                for _ in range(max_new_tokens):
                    nxt = _logits(model, out)[:, -1].argmax(-1, keepdim=True)
                    out = torch.cat([out, nxt], dim=1)
                    if eos is not None and nxt.item() == eos:
                        break
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
