"""A decode step compiled ahead of time: ``torch.export``, then AOTInductor, with no Python per token.

``torch.compile`` turns a decode step into one graph, but every call still passes through Python:
Dynamo's frame hook and cache lookup, then Inductor's Python wrapper, which calls each generated
kernel and each ``torch.ops.qlab`` operator in turn. On a 2-core CPU and a 135M model that is a
third of a compiled token (``benchmarks/profile_decode.py``). AOTInductor compiles the same graph to
a shared library whose C++ wrapper runs the whole step; one call per token crosses into it.

The step is exported with its state as named buffers: the model's parameters and buffers, the KV
cache's tensors, and the converted weights that :func:`qlab.nn.prepare` built
(:func:`qlab.nn.dispatch.converted_tensors`, which export would otherwise bake in as anonymous
constants). The library is built without weights (``package_constants_in_so=False``) and then
given those very tensors as user-managed constants, so nothing is copied: the step reads the
model's weights and writes the same cache that an eager prompt pass fills.

What it cannot see: the exported graph is the model as it was when it was built. :class:`AotStep`
keeps a fingerprint (modules, tensors, the forced path) and :meth:`AotStep.stale` says when it no
longer matches; :class:`qlab.generate.Generator` then builds a new one, as Dynamo would recompile.
Weights changed in place are seen without a rebuild (they are the same tensors). Building one has a
cost elsewhere: a strict ``torch.export`` makes every ``torch.compile``'d function in the process
compile again on its next call (measured: any strict export does; a non-strict one does not, but it
cannot see the cache's tensors as the module's buffers and bakes them in as constants).

Needs what Inductor needs on CPU (a C++ compiler), and time: 41-55 s for SmolLM2-135M here (export, then a
C++ build of the step), plus about 10 s once per machine for the C++ decode operator.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

from qlab.kernels import cpu_native
from qlab.nn.dispatch import converted_tensors, forced_path

__all__ = ["AotStep", "fingerprint"]

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CACHE_TENSORS = ("keys", "values", "cumulative_length")


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    """The tensors of a transformers ``StaticCache`` (each layer's keys, values and length)."""
    found = []
    for layer in getattr(cache, "layers", ()):
        for name in CACHE_TENSORS:
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                found.append(t)
    return found


def fingerprint(model: nn.Module, cache: Any) -> tuple[Hashable, ...]:
    """What an exported step depends on beyond its inputs: the module tree (names and types), the
    identity of every parameter, buffer, converted weight and cache tensor, and the forced path."""
    return (
        tuple((name, type(m)) for name, m in model.named_modules()),
        tuple(id(t) for t in model.parameters()),
        tuple(id(t) for t in model.buffers()),
        tuple(id(t) for t in converted_tensors(model)),
        tuple(id(t) for t in _cache_tensors(cache)),
        forced_path(),
    )


class _Exportable(nn.Module):
    """``step`` as a module whose buffers name all the state it reads and writes."""

    def __init__(self, step: Step, model: nn.Module, cache: Any) -> None:
        super().__init__()
        self.model = model
        self._step = step
        own = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
        extra = [t for t in (*_cache_tensors(cache), *converted_tensors(model)) if id(t) not in own]
        for i, t in enumerate(extra):
            self.register_buffer(f"state_{i}", t, persistent=False)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self._step(token, pos)


def _compile(program: torch.export.ExportedProgram, path: str, packaged: bool) -> Any:
    """AOTInductor's runner for ``program``; its constants inside the library only with ``packaged``."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation, not ours
        path = torch._inductor.aoti_compile_and_package(
            program,
            package_path=path,
            # The constants are runtime state here: Inductor's folding of uniform-valued constants
            # baked the cache's length (a 0-dim tensor, 8 after an 8-token prompt) into the code,
            # and every step wrote its keys to slot 8.
            inductor_configs={
                "aot_inductor.package_constants_in_so": packaged,
                "joint_graph_constant_folding": False,
            },
        )
        return torch._inductor.aoti_load_package(path)


class AotStep:
    """``step(token [1, 1], pos [1]) -> token [1, 1]``, exported and compiled by AOTInductor.

    Args:
        step: the eager step (reads ``model``, writes ``cache``); traced once, here.
        model: the module whose state ``step`` reads.
        cache: the transformers ``StaticCache`` it writes, already initialized (one prompt pass).
    """

    def __init__(self, step: Step, model: nn.Module, cache: Any) -> None:
        if not _cache_tensors(cache):
            raise ValueError("cache must be an initialized StaticCache: run one prompt pass before exporting")
        self.fingerprint = fingerprint(model, cache)
        module = _Exportable(step, model, cache)
        example = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        with torch.no_grad(), warnings.catch_warnings():
            # Dynamo reports the fused projections' per-call scratch attributes as side effects; they
            # are reset within the step (qlab.nn.fused), so the graph does not depend on them.
            warnings.simplefilter("ignore")
            # The int8-dot decode kernel as a C++ operator: with no Python wrapper left, the Python
            # operator's own checks and ctypes call were a quarter of a SmolLM2 token (7.0 vs 5.3 ms).
            with cpu_native.preferred():
                program = torch.export.export(module, example, strict=True)
        state = {**program.state_dict, **program.constants}
        with tempfile.TemporaryDirectory(prefix="qlab-aot-") as tmp:
            # First without any constant inside the library, every one shared. Inductor can add
            # constants of its own (on torch's int4/int8 paths, with the C kernels off): no tensor of
            # ours to share, so then the library is built again holding them, and shares the rest.
            for packaged in (False, True):
                self._runner = _compile(program, os.path.join(tmp, f"step{int(packaged)}.pt2"), packaged)
                names = self._runner.get_constant_fqns()
                self.packaged = [n for n in names if n not in state]
                if not self.packaged:
                    break
        # The runner keeps only pointers: holding the tensors here keeps them alive as long as it.
        self._state = {n: state[n] for n in names if n in state}
        self._runner.load_constants(self._state, check_full_update=not self.packaged, user_managed=True)

    @property
    def constants(self) -> dict[str, torch.Tensor]:
        """The tensors the compiled step reads and writes, by name: the model's and the cache's own.
        (``packaged`` lists the constants Inductor made itself, held inside the library instead.)"""
        return dict(self._state)

    def stale(self, model: nn.Module, cache: Any) -> bool:
        """Whether ``model`` or ``cache`` has changed since the step was built (see the module doc)."""
        return fingerprint(model, cache) != self.fingerprint

    def __call__(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self._runner(token, pos)
