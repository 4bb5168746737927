"""Memory accounting of whole models: bytes per layer type, now and before quantization.

Each tensor is counted once (tied weights and shared layers too); a quantized layer counts its stored
buffers, not the converted weights its fast paths cache (see ``QuantLinear.runtime_nbytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qlab.nn import LAYER_TYPES


@dataclass
class FootprintRow:
    kind: str
    count: int
    bytes_now: int
    bytes_float: int


@dataclass
class MemoryFootprint:
    """Bytes per layer type: now, and in float (what the quantized layers took before)."""

    rows: list[FootprintRow] = field(default_factory=list)

    @property
    def total_now(self) -> int:
        return sum(r.bytes_now for r in self.rows)

    @property
    def total_float(self) -> int:
        return sum(r.bytes_float for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.total_float / self.total_now if self.total_now else math.nan

    def __str__(self) -> str:
        lines = [f"{'layer type':<22}{'count':>7}{'float MB':>11}{'now MB':>10}"]
        for r in self.rows:
            lines.append(f"{r.kind:<22}{r.count:>7}{r.bytes_float / 1e6:>11.2f}{r.bytes_now / 1e6:>10.2f}")
        lines.append(f"{'total':<22}{'':>7}{self.total_float / 1e6:>11.2f}{self.total_now / 1e6:>10.2f}")
        lines.append(f"compression {self.ratio:.2f}x")
        return "\n".join(lines)


def memory_footprint(model: nn.Module) -> MemoryFootprint:
    """Bytes of ``model`` per layer type, now and in float, each tensor counted once (tied weights).

    A quantized layer (:class:`~qlab.nn.QuantLinear`, :class:`~qlab.nn.Int8Linear`) counts its stored
    buffers; its float size is what the layer it replaced took (``float_nbytes()``). Other modules count
    the parameters and buffers they own directly.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    quantized = tuple(LAYER_TYPES.values())
    seen: set[int] = set()
    rows: dict[str, FootprintRow] = {}

    def tensor_bytes(t: torch.Tensor) -> int:
        key = id(t) if t.device.type == "meta" else t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    for _name, mod in model.named_modules():
        kind = type(mod).__name__
        if isinstance(mod, quantized):
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            # Persistent buffers only: a codebook table is derived from the spec, not stored.
            stored = mod.named_buffers(recurse=False)
            now = sum(tensor_bytes(t) for n, t in stored if n not in mod._non_persistent_buffers_set)
            flt = mod.float_nbytes()
        else:
            own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
            if not own:
                continue
            now = sum(tensor_bytes(t) for t in own)
            flt = now
        if now == 0 and flt == 0:
            continue
        row = rows.setdefault(kind, FootprintRow(kind, 0, 0, 0))
        row.count += 1
        row.bytes_now += now
        row.bytes_float += flt
    return MemoryFootprint(sorted(rows.values(), key=lambda r: -r.bytes_float))
