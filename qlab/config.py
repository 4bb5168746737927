"""What to quantize in a model, and how: the one config that ``quantize_model``, the methods and
the CLI share."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qlab.quantize import QuantSpec

#: Method names ``quantize_model`` understands.
METHODS = ("rtn", "nf4", "fp4", "fp8", "w8a8", "hqq", "gptq", "awq", "smoothquant", "llm_int8")


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
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool | None = None
    skip: tuple[str, ...] = ("lm_head", "*embed*")
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method in ("nf4", "fp4") and self.bits != 4:
            raise ValueError(f"method {self.method!r} is 4-bit; got bits={self.bits}")
        if self.method in ("fp8", "w8a8", "smoothquant", "llm_int8") and self.bits != 8:
            raise ValueError(f"method {self.method!r} is 8-bit; got bits={self.bits}")
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

    def spec(self) -> QuantSpec:
        """The weight :class:`QuantSpec` for this config (codebook specs for nf4/fp4)."""
        if self.method in ("nf4", "fp4"):
            from qlab.codebooks import DEFAULT_BLOCK_SIZE, codebook_spec

            return codebook_spec(self.method, self.group_size or DEFAULT_BLOCK_SIZE)
        symmetric = self.symmetric if self.symmetric is not None else self.bits == 8
        if self.group_size is None:
            return QuantSpec.per_channel(self.bits, symmetric=symmetric, axis=0)
        return QuantSpec.per_group(self.bits, self.group_size, symmetric=symmetric)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields: {sorted(unknown)}")
        return cls(**{**d, "skip": tuple(d.get("skip", ("lm_head", "*embed*")))})


def describe_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
