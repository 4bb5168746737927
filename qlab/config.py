"""What to quantize in a model, and how: the one config that ``quantize_model``, the transformers
backend and the CLI share. Its method facts (bits allowed, kwargs, spec) come from :mod:`qlab.registry`."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from qlab.registry import METHOD_NAMES, Method, get_method
from qlab.tensor import QuantSpec

#: Method names ``quantize_model`` understands (the keys of :data:`qlab.registry.METHODS`).
METHODS = METHOD_NAMES


@dataclass
class QuantConfig:
    """Model-level quantization settings.

    Args:
        method: one of :data:`METHODS`. ``rtn`` is round-to-nearest affine integers.
        bits: weight bits (``rtn``/``hqq``/``gptq``/``awq``: 1..8; ``nf4``/``fp4``: 4; ``fp8``/``w8a8``: 8).
        group_size: elements per scale along the input dim; ``None`` means per output channel.
        symmetric: signed codes without zero-point (default: asymmetric below 8 bits, symmetric at 8).
        skip: module-name glob patterns left in float (``lm_head`` and embeddings by default).
        overrides: ``{glob pattern: {field: value}}`` applied to matching module names, in order.
        method_kwargs: extra arguments for the method (e.g. ``{"damp": 0.01}`` for GPTQ).
        quantize_embeddings: also quantize the input embedding and, when tied to it, the output head,
            storing the table once (:class:`qlab.nn.QuantEmbedding`), whatever ``skip`` says. Its
            settings are this config's, with the overrides matching ``"lm_head"`` applied (calibrated
            methods fall back to ``rtn`` there). Off by default: the table stays float.
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool | None = None
    skip: tuple[str, ...] = ("lm_head", "*embed*")
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    quantize_embeddings: bool = False

    def __post_init__(self) -> None:
        m = get_method(self.method)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in m.bits:
            if len(m.bits) == 1:
                allowed = f"bits={m.bits[0]}"
            else:
                allowed = f"bits must be an integer in {m.bits[0]}..{m.bits[-1]}"
            raise ValueError(f"bits: method {self.method!r} takes {allowed}, got {self.bits!r}")
        if self.symmetric and not m.allows_symmetric:
            raise ValueError(f"symmetric: method {self.method!r} needs asymmetric codes (a zero-point)")
        if not isinstance(self.method_kwargs, dict):
            raise TypeError(f"method_kwargs must be a dict, got {type(self.method_kwargs).__name__}")
        unknown = set(self.method_kwargs) - m.kwargs
        if unknown:
            raise ValueError(
                f"method_kwargs: {sorted(unknown)} not understood by {self.method!r}; "
                f"it accepts {sorted(m.kwargs) or 'none'}"
            )
        if isinstance(self.skip, str):
            raise TypeError(f"skip must be a sequence of glob patterns, got the string {self.skip!r}")
        if not isinstance(self.skip, tuple):
            self.skip = tuple(self.skip)
        # Validates bits/group_size early, with the QuantSpec's own error messages.
        self.spec()

    def is_skipped(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name.split(".")[-1], p) for p in self.skip)

    def for_module(self, name: str) -> QuantConfig:
        """This config with the overrides whose pattern matches ``name`` applied."""
        cfg = self
        for pattern, changes in self.overrides.items():
            if fnmatch.fnmatch(name, pattern):
                cfg = QuantConfig(**{**asdict(cfg), "overrides": {}, **changes})
        return cfg

    @property
    def entry(self) -> Method:
        """The method's registry entry."""
        return get_method(self.method)

    def spec(self) -> QuantSpec:
        """The weight :class:`QuantSpec` for this config (codebook specs for nf4/fp4)."""
        return self.entry.spec(self.bits, self.group_size, self.symmetric)

    def build_layer(self, linear: nn.Module, name: str = "") -> nn.Module:
        """Quantize one linear layer with a data-free method (its overrides for ``name`` applied)."""
        cfg = self.for_module(name) if name else self
        m = cfg.entry
        if m.build is None:
            raise ValueError(
                f"method {cfg.method!r} needs the whole model and calibration data: use qlab.quantize_model"
            )
        return m.build(linear, cfg.spec(), cfg.method_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields: {sorted(unknown)}")
        return cls(**{**d, "skip": tuple(d.get("skip", ("lm_head", "*embed*")))})
