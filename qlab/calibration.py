"""Calibration plumbing shared by the data-driven methods (GPTQ, AWQ, SmoothQuant).

Data-driven quantizers need to see what each linear layer is fed. This module gives them:

* :func:`check_calibration`: validate a calibration batch (token ids ``[n_samples, seq_len]`` for a
  language model, or float inputs ``[n_samples, ...]`` for any other model), with clear errors;
* :func:`capture_inputs`: forward pre-hooks that record the inputs of chosen modules during one run;
* :class:`HessianAccumulator`: ``H = 2/n · Σ x xᵀ`` over the captured rows, the proxy Hessian of
  the layer-output error ``||X Wᵀ - X Ŵᵀ||²`` that GPTQ minimizes;
* :func:`decoder_layers` / :func:`layer_inputs` / :func:`run_layer`: walk a transformers decoder
  block by block, so that only one block's activations are alive at a time.

Everything is deterministic: calibration batches come from :func:`qlab.models.calibration_batches`
with a fixed seed, and nothing here draws random numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: Seed used for calibration batches when the caller gives none.
DEFAULT_SEED = 0


def check_calibration(
    calibration: Any, *, min_samples: int = 1, method: str = "this method", name: str = "calibration"
) -> torch.Tensor:
    """Return ``calibration`` if it is a usable batch, else raise a ValueError/TypeError.

    A batch is a tensor whose first dim counts samples: int64 token ids ``[n, seq_len]`` for a
    language model, or floats ``[n, features...]``. ``min_samples`` guards against statistics (a
    Hessian, channel maxima) estimated from too little data.
    """
    if calibration is None:
        raise ValueError(
            f"{name}: {method} needs calibration data (token ids [n_samples, seq_len] or float inputs); "
            "got None. Use qlab.models.calibration_batches(tokenizer, n_samples, seq_len) for text."
        )
    if not isinstance(calibration, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(calibration).__name__}")
    if calibration.dim() < 2:
        raise ValueError(
            f"{name}: expected at least 2 dims [n_samples, ...], got shape {tuple(calibration.shape)}"
        )
    if calibration.dtype == torch.bool:
        raise ValueError(f"{name}: expected token ids (int) or float inputs, got bool")
    if calibration.is_floating_point() and not torch.isfinite(calibration).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    if calibration.shape[0] < min_samples:
        raise ValueError(
            f"{name}: {method} needs at least {min_samples} calibration samples, got {calibration.shape[0]}"
        )
    return calibration


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., features]`` -> ``[rows, features]`` in float32: one row per token (or sample)."""
    return x.detach().reshape(-1, x.shape[-1]).float()


@dataclass
class Captured:
    """Inputs a module received during a run: one ``[rows, features]`` tensor per call."""

    rows: list[torch.Tensor] = field(default_factory=list)
    #: ``data_ptr`` of the first input tensor, to tell which modules were fed the very same tensor.
    source: int | None = None

    def cat(self) -> torch.Tensor:
        return torch.cat(self.rows) if len(self.rows) > 1 else self.rows[0]


@contextmanager
def capture_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, Captured]]:
    """Record the first positional input of each module while the ``with`` body runs.

    Example::

        with capture_inputs({"fc": model.fc}) as seen:
            model(x)
        X = seen["fc"].cat()   # [rows, in_features]
    """
    seen: dict[str, Captured] = {name: Captured() for name in modules}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def pre(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if seen[name].source is None:
                seen[name].source = x.data_ptr()
            seen[name].rows.append(flatten_rows(x))

        return pre

    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(hook(name)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class HessianAccumulator:
    """Running ``H = (2/n) Σ_rows x xᵀ`` in float64 (float32 sums of many rows lose digits)."""

    def __init__(self, features: int) -> None:
        self.H = torch.zeros(features, features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = flatten_rows(x).double()
        if x.shape[1] != self.H.shape[0]:
            raise ValueError(f"x: expected {self.H.shape[0]} features, got {x.shape[1]}")
        self.H += 2 * x.T @ x
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no rows were added: the layer never ran on the calibration data")
        return (self.H / self.n).float()


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``H = (2/n) Xᵀ X`` for inputs ``x`` of shape ``[..., features]`` (rows = all leading dims)."""
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.value()


def linear_modules(
    module: nn.Module, skip: Callable[[str], bool] = lambda name: False
) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` under ``module`` (names relative to it), in registration order."""
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear) and n and not skip(n)}


# ------------------------------------------------------------------------------------------------
# Block-by-block traversal of transformers decoders
# ------------------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder blocks of a transformers causal LM (``model.model.layers`` and the like).

    Returns ``(prefix, layers)`` with ``prefix`` the dotted name of the ModuleList, or ``None`` when
    the model has no such list (then methods treat the whole model as one block).
    """
    for prefix in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj: Any = model
        for part in prefix.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return prefix, obj
    return None


class _StopForward(Exception):
    """Raised by the catcher hook once the first block's inputs are recorded."""


@dataclass
class LayerInputs:
    """What block 0 receives: the hidden states and the keyword arguments (masks, rotary tables)."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def model_call(model: nn.Module, calibration: torch.Tensor) -> Any:
    """Run ``model`` on a calibration batch: token ids as ``input_ids`` (no KV cache), floats as-is."""
    if calibration.is_floating_point():
        return model(calibration)
    return model(input_ids=calibration, use_cache=False)


@torch.no_grad()
def layer_inputs(model: nn.Module, layers: Sequence[nn.Module], calibration: torch.Tensor) -> LayerInputs:
    """Run ``model`` on ``calibration`` only up to the first block and return that block's inputs."""
    got: dict[str, Any] = {}

    def catcher(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        got.update(hidden=hidden, args=tuple(args[1:]), kwargs=dict(kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        model_call(model, calibration)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not got:
        raise ValueError("model: the first decoder block never ran on the calibration batch")
    kwargs = got["kwargs"]
    kwargs["use_cache"] = False
    for key in ("cache", "past_key_values", "past_key_value"):
        if key in kwargs:
            kwargs[key] = None
    return LayerInputs(got["hidden"], got["args"], kwargs)


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
    """One block forward with block 0's extra arguments; returns the new hidden states."""
    out = layer(hidden, *inputs.args, **inputs.kwargs)
    return out[0] if isinstance(out, tuple) else out
