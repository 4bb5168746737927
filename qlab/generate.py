"""Greedy generation with a static KV cache and a compiled one-token step, for transformers decoders.

In the spirit of gpt-fast's ``generate.py``: the prompt runs once (prefill), then every new token is
one call of a single function, ``decode_step(token, position) -> next token``, over a KV cache of
fixed size (transformers' ``StaticCache``). Shapes never change from one token to the next (one
token in, the cache written in place at ``position``), so ``torch.compile`` traces the step once and
replays it: the ~400 Python module calls of a SmolLM2 token become one compiled graph whose nodes
are mostly the matmuls (``torch.ops.qlab.*`` for quantized layers, opaque to the compiler).

Why not ``model.generate(..., cache_implementation="static")``: transformers compiles its forward
there only on accelerators (on CPU only with a private flag, ``CompileConfig._compile_all_devices``),
in ``mode="reduce-overhead"`` (CUDA graphs), and keeps its logits processors and stopping criteria
in Python around every token. This loop is the same computation with nothing around the step but
the argmax, and works with any ``*ForCausalLM`` that accepts ``past_key_values`` and
``cache_position``.

Quantized layers are prepared (:func:`qlab.nn.prepare`) before compiling, so that the compiled
graph only reads their converted weights.

``compile="aot"`` goes one step further: the step is exported and compiled ahead of time by
AOTInductor (:mod:`qlab.aot`), so a token runs no Python between its kernels and no Dynamo guard.

    per token (compiled):  t = t_step ≈ Σ_layers t_matmul + t_attention + t_glue
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from qlab.aot import AotStep
from qlab.nn import prepare

__all__ = ["Generated", "Generator", "generate"]

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
COMPILE_MODES = (False, True, "aot")


@dataclass
class Generated:
    """What :meth:`Generator.generate` returns: ``ids`` ``[1, prompt + new]`` (prompt included) and the
    wall times of the prompt pass and of each decode step, in seconds."""

    ids: torch.Tensor
    prefill_s: float
    step_s: list[float] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return len(self.step_s) + 1  # the prefill yields the first new token

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time their steps took."""
        return len(self.step_s) / sum(self.step_s) if self.step_s else float("nan")

    @property
    def prefill_tokens_per_s(self) -> float:
        return (self.ids.shape[1] - self.new_tokens) / self.prefill_s


class Generator:
    """A model, a static KV cache and a (compiled) decode step, reused across calls.

    Args:
        model: a transformers causal LM (``LlamaForCausalLM`` ...), in eval mode; float or quantized.
        max_len: the cache length: prompt plus new tokens of any call must fit in it. Every step
            attends over all ``max_len`` slots (static shapes, padding masked), so size it to the
            longest call: on SmolLM2 int4, compiled, a 513-slot cache made a token of a 96-token
            call about 4 ms slower (13.5 vs 9.4 ms) than a 97-slot one.
        compile: ``False`` runs the step eagerly; ``True`` compiles it with
            ``torch.compile(fullgraph=True, dynamic=False)``; ``"aot"`` exports it and compiles it
            ahead of time with AOTInductor (:class:`qlab.aot.AotStep`: no Dynamo, no Python between a
            token's kernels, weights and cache shared with the model; 41-55 s to build for SmolLM2-135M,
            against 10 s for ``True``, and 9.0 -> 5.0 ms a token for int4 g64 there, side by side).
        compile_prefill: compile the prompt pass too (one graph per prompt length).
        backend: the ``torch.compile`` backend (``"inductor"``; tests use ``"aot_eager"``); an
            ``"aot"`` step always uses AOTInductor (the prompt pass, with ``compile_prefill``, this).

    The compiled step is built once, on the first call, and kept: later calls with prompts of any
    length (up to ``max_len``) reuse it without recompiling. A model changed between calls is
    followed: Dynamo recompiles on its guards, and an ``"aot"`` step is rebuilt when
    :meth:`qlab.aot.AotStep.stale` says the model or cache is no longer the one it was built from.
    """

    def __init__(
        self,
        model: nn.Module,
        max_len: int,
        *,
        compile: bool | str = False,
        compile_prefill: bool = False,
        backend: str = "inductor",
    ) -> None:
        from transformers import StaticCache

        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an integer >= 2, got {max_len!r}")
        if not (isinstance(compile, bool) or compile == "aot"):
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        self.model = model.eval()
        self.max_len = max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        # transformers >= 5.2x names the cache argument ``cache`` (``past_key_values`` is deprecated)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        prepare(model)  # quantized layers: converted weights built now, outside any graph
        self._compiled = compile is True  # a Dynamo-compiled step (guards to skip)
        self._aot = compile == "aot"
        self._aot_step: AotStep | None = None  # built on the first call, after the cache is initialized
        self._step: Step = self._decode_step
        self._prefill: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = self._prefill_logits
        if compile is True:
            self._step = torch.compile(self._decode_step, fullgraph=True, dynamic=False, backend=backend)
        if compile_prefill:
            self._prefill = torch.compile(
                self._prefill_logits, fullgraph=True, dynamic=False, backend=backend
            )

    def _prefill_logits(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The prompt's last logits ``[1, vocab]``, writing its keys and values to the cache."""
        out = self.model(
            input_ids=ids, cache_position=pos, position_ids=pos[None], use_cache=True, logits_to_keep=1,
            **{self._cache_kw: self.cache},
        )  # fmt: skip
        return out.logits[:, -1]

    def _decode_step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token ``[1, 1]`` at cache position ``pos`` ``[1]`` -> the greedy next token ``[1, 1]``."""
        out = self.model(
            input_ids=token, cache_position=pos, position_ids=pos[None], use_cache=True,
            **{self._cache_kw: self.cache},
        )  # fmt: skip
        return out.logits[:, -1].argmax(dim=-1, keepdim=True)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
    ) -> Generated:
        """Greedy continuation of ``input_ids`` ``[1, T]`` by up to ``max_new_tokens`` tokens.

        Stops early after ``eos_token_id`` (kept in the output). Greedy decoding is deterministic, so
        the compiled and eager steps give the same text wherever their logits rank alike.
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have shape [1, T] (batch 1), got {list(input_ids.shape)}")
        t = input_ids.shape[1]
        if max_new_tokens < 1 or t + max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({t}) + max_new_tokens ({max_new_tokens}) must be in 1..max_len={self.max_len}"
            )
        self.cache.reset()
        t0 = time.perf_counter()
        logits = self._prefill(input_ids, torch.arange(t))
        token = logits.argmax(dim=-1, keepdim=True)
        out = Generated(ids=input_ids, prefill_s=time.perf_counter() - t0)
        step = self._step
        if self._aot and max_new_tokens > 1:
            if self._aot_step is None or self._aot_step.stale(self.model, self.cache):
                prepare(self.model)  # a model changed since: its layers may have dropped their caches
                self._aot_step = AotStep(self._decode_step, self.model, self.cache)
            step = self._aot_step
        tokens = [token]
        for i in range(max_new_tokens - 1):
            if eos_token_id is not None and int(token) == eos_token_id:
                break
            t0 = time.perf_counter()
            # Dynamo checks its guards (every parameter and module of the model) before each call;
            # skipping them saved 0.9 ms of an 11.8 ms SmolLM2 int4 token (measured round-robin).
            # The first step of this call has just passed them, and until this loop returns no code
            # can change the model, the cache objects or the inputs' shapes and dtypes.
            # (set_stance takes effect when constructed, so build it only where it is entered.)
            skip = self._compiled and i > 0
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if skip else contextlib.nullcontext():
                token = step(token.clone(), torch.tensor([t + i]))
            out.step_s.append(time.perf_counter() - t0)
            tokens.append(token)
        out.ids = torch.cat([input_ids, *tokens], dim=1)
        return out


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    compile: bool | str = False,
    eos_token_id: int | None = None,
    backend: str = "inductor",
) -> torch.Tensor:
    """Greedy ``input_ids`` ``[1, T]`` + up to ``max_new_tokens`` tokens, through a static cache and, with
    ``compile``, a compiled one-token step (see :class:`Generator`, which keeps the compiled step across
    calls; this function builds a new one each time)."""
    gen = Generator(model, input_ids.shape[1] + max_new_tokens, compile=compile, backend=backend)
    return gen.generate(input_ids, max_new_tokens, eos_token_id).ids
