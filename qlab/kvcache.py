"""Quantized key/value caches for transformers' ``generate`` and forward (KIVI-style).

A decoder keeps every past token's key and value, ``[batch, kv_heads, tokens, head_dim]`` per layer,
so the cache grows with the context. Here each state is stored as asymmetric integer codes with a
float scale and offset per group (the float-zero domain of :mod:`qlab.affine`)::

    x ≈ scale * q + m,   scale = (max - min) / (2^b - 1),   m = min,   q = round((x - m) / scale)

Two ways to group (``axis``):

* ``"token"``: one group is ``group_size`` consecutive channels of one token (default: the whole
  head). A token is quantized as soon as it leaves the float window.
* ``"channel"``: one group is ``group_size`` consecutive tokens of one channel, so a channel with
  large values (keys have such outlier channels) gets its own range. Tokens leave the float window
  ``group_size`` at a time.

KIVI (Liu et al. 2024) quantizes keys per channel and values per token, and keeps the most recent
``residual_length`` tokens in float. :class:`QuantizedKVCache` does the same: every token is quantized
exactly once, when it falls out of that window, and never re-quantized. Attention sees the
dequantized old tokens and the float recent ones; the dequantized copy is a temporary of each
``update`` (a fused kernel would read the codes directly), so :meth:`QuantizedKVCache.nbytes` counts
what the cache holds: packed codes, scales, offsets and the float window.

Why not transformers' ``QuantizedCache``: it picks its layer class from a closed list of backends
(quanto, hqq, fp8), and its ``QuantizedLayer.update`` quantizes the whole prompt at once and, each time
its float window fills, re-quantizes the entire dequantized cache. So right after the prompt no recent
token is in float, and old tokens go through the round trip again and again. The layers here
implement the same ``CacheLayerMixin`` interface and live in a plain transformers ``Cache``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

from qlab.affine import quantize_rtn
from qlab.packing import pack, unpack
from qlab.tensor import QuantizedTensor, QuantSpec

KVAxis = Literal["token", "channel"]
#: Bit widths a cache stores (qlab.packing packs them densely; 1 bit leaves no useful grid).
KV_BITS = (2, 3, 4, 8)
_FLOAT_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KVQuantSpec:
    """How keys or values are stored.

    Args:
        bits: code width, one of ``KV_BITS``.
        axis: ``"token"`` (groups of channels within one token) or ``"channel"`` (groups of tokens
            within one channel).
        group_size: channels per group for ``"token"`` (``None``: the whole head), tokens per group
            for ``"channel"`` (``None``: 32, KIVI's).
        scale_dtype: dtype of the stored scale and offset (fp16, as KIVI stores them).
    """

    bits: int = 4
    axis: KVAxis = "token"
    group_size: int | None = None
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in KV_BITS:
            raise ValueError(f"bits must be one of {KV_BITS}, got {self.bits!r}")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"axis must be 'token' or 'channel', got {self.axis!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(f"group_size must be a positive integer or None, got {g!r}")
        if self.axis == "channel" and g is None:
            object.__setattr__(self, "group_size", 32)
        if self.scale_dtype not in _FLOAT_SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {_FLOAT_SCALE_DTYPES}, got {self.scale_dtype!r}")

    @property
    def token_block(self) -> int:
        """Tokens that must leave the float window together (a whole group along the tokens)."""
        return int(self.group_size) if self.axis == "channel" else 1

    def group_spec(self, head_dim: int) -> QuantSpec:
        """The qlab spec of one stored chunk, grouped along its last dim (channels or tokens)."""
        g = self.group_size
        if self.axis == "token":
            g = head_dim if g is None else g
            if head_dim % g:
                raise ValueError(f"group_size={g} must divide head_dim={head_dim} for axis='token'")
        return QuantSpec.per_group(
            self.bits, int(g), symmetric=False, zero_domain="float", scale_dtype=self.scale_dtype
        )

    def describe(self) -> str:
        """Short label, e.g. ``int4 per-channel g32`` or ``int8 per-token``."""
        group = "" if self.group_size is None else f" g{self.group_size}"
        return f"int{self.bits} per-{self.axis}{group}"


@dataclass
class PackedKV:
    """One chunk of quantized states: packed codes plus fp16 scale and offset per group.

    ``axis="token"`` stores ``[B, H, T, head_dim]`` grouped along ``head_dim``; ``axis="channel"``
    stores the transpose ``[B, H, head_dim, T]`` grouped along ``T``. Batch is dim 0 either way, so
    beam search can reorder every tensor with one ``index_select``.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    spec: QuantSpec
    axis: KVAxis
    shape: torch.Size  # the stored (possibly transposed) shape
    dtype: torch.dtype

    @property
    def tokens(self) -> int:
        return self.shape[-2] if self.axis == "token" else self.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset))

    def dequantize(self) -> torch.Tensor:
        """The float states ``[B, H, T, head_dim]``: ``scale * q + m`` group by group."""
        codes = unpack(self.packed, self.spec.bits, self.shape[-1])
        qt = QuantizedTensor(codes, self.scale, self.offset, self.spec, self.shape, self.dtype)
        x = qt.dequantize()
        return x if self.axis == "token" else x.transpose(-1, -2)

    def index_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedKV:
        packed, scale, offset = fn(self.packed), fn(self.scale), fn(self.offset)
        shape = torch.Size((packed.shape[0], *self.shape[1:]))
        return PackedKV(packed, scale, offset, self.spec, self.axis, shape, self.dtype)


def quantize_kv(states: torch.Tensor, spec: KVQuantSpec) -> PackedKV:
    """Quantize ``[B, H, T, head_dim]`` states with ``spec`` (for ``"channel"``, ``T`` must be a
    multiple of ``group_size``)."""
    if not isinstance(states, torch.Tensor) or states.dim() != 4 or not states.is_floating_point():
        got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        raise ValueError(f"states must be a float tensor [batch, heads, tokens, head_dim], got {got}")
    qspec = spec.group_spec(states.shape[-1])
    if spec.axis == "channel" and states.shape[-2] % int(spec.group_size):
        raise ValueError(
            f"axis='channel' quantizes whole groups of {spec.group_size} tokens, got {states.shape[-2]}"
        )
    x = states if spec.axis == "token" else states.transpose(-1, -2)
    qt = quantize_rtn(x.contiguous(), qspec)
    assert qt.zero is not None  # asymmetric float-zero specs always store an offset
    return PackedKV(pack(qt.codes, spec.bits), qt.scale, qt.zero, qspec, spec.axis, qt.shape, states.dtype)


def dequantize_kv(chunk: PackedKV) -> torch.Tensor:
    """Inverse of :func:`quantize_kv` up to rounding: float ``[B, H, T, head_dim]``."""
    return chunk.dequantize()


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's cache: old tokens quantized in :class:`PackedKV` chunks, the most recent
    ``residual_length`` (or a few more, up to a whole token group) in float in ``keys``/``values``.

    ``update`` returns the states attention needs *before* moving tokens out of the float window, so
    the tokens just added (a prompt or a chunk of one) always see each other in float.
    """

    is_croppable = False

    def __init__(self, key: KVQuantSpec, value: KVQuantSpec, residual_length: int = 128) -> None:
        super().__init__()
        for name, s in (("key", key), ("value", value)):
            if not isinstance(s, KVQuantSpec):
                raise TypeError(f"{name} must be a KVQuantSpec, got {type(s).__name__}")
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length must be a non-negative integer, got {residual_length!r}")
        self.key_spec, self.value_spec = key, value
        self.residual_length = residual_length
        # Keys and values leave the window together, in whole groups of both.
        self.block = math.lcm(key.token_block, value.token_block)
        self.cumulative_length = 0
        self.key_chunks: list[PackedKV] = []
        self.value_chunks: list[PackedKV] = []

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape != value_states.shape or key_states.dim() != 4:
            raise ValueError(
                "key_states and value_states must both be [batch, heads, tokens, head_dim], got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if not self.is_initialized:
            for spec in (self.key_spec, self.value_spec):
                spec.group_spec(key_states.shape[-1])  # a group that does not fit the head fails now
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys = torch.cat([*(c.dequantize() for c in self.key_chunks), self.keys], dim=-2)
        values = torch.cat([*(c.dequantize() for c in self.value_chunks), self.values], dim=-2)
        n = (self.keys.shape[-2] - self.residual_length) // self.block * self.block
        if n > 0:
            self.key_chunks.append(quantize_kv(self.keys[..., :n, :], self.key_spec))
            self.value_chunks.append(quantize_kv(self.values[..., :n, :], self.value_spec))
            # clone: a slice would keep the whole float tensor alive
            self.keys = self.keys[..., n:, :].clone()
            self.values = self.values[..., n:, :].clone()
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    @property
    def quantized_tokens(self) -> int:
        """Tokens stored as codes (the rest are in the float window)."""
        return sum(c.tokens for c in self.key_chunks)

    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and offsets of every chunk, plus the float window."""
        n = sum(c.nbytes for c in (*self.key_chunks, *self.value_chunks))
        if self.is_initialized:
            n += sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return n

    def reset(self) -> None:
        super().reset()
        self.key_chunks, self.value_chunks = [], []

    def crop(self, tokens_to_remove: int) -> None:
        # Quantized groups span several tokens, so dropping the last tokens is not a slice here.
        raise NotImplementedError("QuantizedKVLayer cannot be cropped (assisted decoding needs a float one)")

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.get_seq_length() == 0:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.key_chunks = [c.index_batch(fn) for c in self.key_chunks]
        self.value_chunks = [c.index_batch(fn) for c in self.value_chunks]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` whose layers are :class:`QuantizedKVLayer`: pass it to
    ``model.generate(..., cache=cache)`` or ``model(..., cache=cache)`` (``past_key_values=`` is the
    older, deprecated name of that argument in transformers 5).

    Args:
        config: the model's config (its decoder's ``num_hidden_layers``); only full-attention models.
        key, value: how keys and values are stored (defaults: int4, KIVI's per-channel keys in groups
            of 32 tokens and per-token values).
        residual_length: recent tokens kept in float (KIVI and transformers use 128).
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        key: KVQuantSpec | None = None,
        value: KVQuantSpec | None = None,
        residual_length: int = 128,
    ) -> None:
        if not isinstance(config, PreTrainedConfig):
            raise TypeError(f"config must be a transformers PreTrainedConfig, got {type(config).__name__}")
        text = config.get_text_config(decoder=True)
        n_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"config has no positive num_hidden_layers (got {n_layers!r})")
        types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if getattr(text, "sliding_window", None) is not None or types != {"full_attention"}:
            raise ValueError(
                f"QuantizedKVCache supports full-attention models only; this config has layer types {types}"
                + (" and a sliding window" if getattr(text, "sliding_window", None) is not None else "")
            )
        key = KVQuantSpec(4, "channel", 32) if key is None else key
        value = KVQuantSpec(4, "token") if value is None else value
        super().__init__(layers=[QuantizedKVLayer(key, value, residual_length) for _ in range(n_layers)])

    def nbytes(self) -> int:
        """Bytes the cache holds, over all layers (see :meth:`QuantizedKVLayer.nbytes`)."""
        return sum(layer.nbytes() for layer in self.layers)


def cache_nbytes(cache: Cache) -> int:
    """Bytes a transformers cache holds: its own count for :class:`QuantizedKVCache`, the key and
    value tensors for a ``DynamicCache``."""
    if isinstance(cache, QuantizedKVCache):
        return cache.nbytes()
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a transformers Cache, got {type(cache).__name__}")
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def streamed_nll(
    model: torch.nn.Module, ids: torch.Tensor, cache: Cache, chunk_size: int = 64
) -> tuple[float, int]:
    """Feed one window ``ids`` (``[1, T]``) through ``model`` ``chunk_size`` tokens at a time, each
    chunk attending to ``cache`` (so to quantized past states), and return the summed negative
    log-likelihood of tokens 2..T and their count. ``exp(sum / count)`` is the window's perplexity.

    With a ``DynamicCache`` this equals one full forward up to float reassociation.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(f"ids must be a [1, T] token tensor with T >= 2, got {getattr(ids, 'shape', ids)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    total, count = 0.0, 0
    prev_last: torch.Tensor | None = None  # the logits of the previous chunk's last token
    for start in range(0, ids.shape[1], chunk_size):
        chunk = ids[:, start : start + chunk_size]
        logits = model(chunk, cache=cache, use_cache=True).logits.float()
        pred = logits[:, :-1] if prev_last is None else torch.cat([prev_last, logits[:, :-1]], dim=1)
        target = chunk if prev_last is not None else chunk[:, 1:]
        total += float(torch.nn.functional.cross_entropy(pred[0], target[0], reduction="sum"))
        count += target.shape[1]
        prev_last = logits[:, -1:]
    return total, count
