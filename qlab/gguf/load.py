"""Read a llama GGUF file into a transformers ``LlamaForCausalLM`` without widening its weights.

:func:`load_gguf` builds the model on the ``meta`` device (no float weights are ever allocated) and fills
it tensor by tensor:

* ``Q8_0``, ``Q4_0`` and ``Q4_1`` linears become :class:`~qlab.nn.QuantLinear` layers holding the file's
  codes and its fp16 ``d`` (and ``m``) as they are (:func:`qlab.gguf.blocks.decode`); ``Q4_1`` uses the
  float zero-point domain, ``x = d*q + m``, so writing the layer back gives the same bytes;
* a quantized embedding stays packed: :class:`QuantEmbedding` dequantizes only the rows it looks up, and
  when the file has no ``output.weight`` the head *is* the same packed layer (llama.cpp's tied embedding);
* F32/F16/BF16 tensors are float already and load as float (norms, float linears);
* any other type (K-quants, IQ, Q5) is dequantized by gguf-py and re-quantized with ``requantize`` (a
  :class:`~qlab.tensor.QuantSpec` or :class:`~qlab.QuantConfig`), with a warning that gives the SQNR.

Peak memory is then about the file's size (plus one tensor's unpacked codes), where the fp32 conversion
(:func:`qlab.gguf.convert_gguf_llama`) holds every weight in fp32: ~8x a 4-bit file.
"""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qlab.cache import transformers as _transformers
from qlab.gguf.blocks import BLOCK_TYPES, decode
from qlab.gguf.convert import GGUF_LAYER_NAMES, gguf_field, llama_config, unpermute_rotary
from qlab.metrics import sqnr
from qlab.nn import QuantEmbedding, QuantLinear
from qlab.tensor import QuantizedTensor, QuantSpec

__all__ = ["gguf_tokenizer", "load_gguf", "open_gguf"]

#: Types that are float already: loaded as float, never re-quantized.
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def open_gguf(path: str | os.PathLike[str], what: str = "path") -> Any:
    """A ``gguf.GGUFReader`` on ``path``, with clear errors (naming ``what``) for a missing, truncated or
    corrupt file and for a tensor of a type gguf-py does not know."""
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading GGUF needs `gguf`: pip install 'qlab[models]'") from e
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no GGUF file at {path}")
    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):
            raise ValueError(f"{what}: {path} has a tensor of an unknown GGML type ({e})") from e
        if "block size" in str(e):
            raise ValueError(f"{what}: {path} has rows its block size does not divide ({e})") from e
        raise ValueError(f"{what}: {path} is truncated or not a GGUF file ({e})") from e
    except Exception as e:  # struct/index errors from a cut header
        raise ValueError(f"{what}: {path} is truncated or not a GGUF file ({type(e).__name__}: {e})") from e
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(
                f"{what}: {path} is truncated: tensor {t.name!r} needs bytes up to "
                f"{t.data_offset + t.n_bytes}, the file has {size}"
            )
    return reader


def gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer transformers rebuilds from a GGUF file's ``tokenizer.ggml.*`` metadata."""
    path = Path(path)
    return _transformers().AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _requantize_layer(w: torch.Tensor, name: str, kind: str, requantize: Any) -> QuantLinear:
    from qlab.driver import quantize_layer

    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    if isinstance(requantize, QuantSpec):
        layer = QuantLinear.from_linear(linear, requantize)
    else:
        layer = quantize_layer(linear, requantize)
    warnings.warn(
        f"{name}: GGUF type {kind} has no exact qlab layout; dequantized and re-quantized as "
        f"{layer.describe()}, SQNR {sqnr(w, layer.dequantize(torch.float32)):.1f} dB against the file",
        stacklevel=3,
    )
    return layer


def _packed_layer(qt: QuantizedTensor) -> QuantLinear:
    """``QuantLinear.from_quantized(qt)`` for 4- and 8-bit codes, packed here with numpy: qlab's LSB-first
    layout puts inputs ``2j`` and ``2j + 1`` in byte ``j`` (4 bits), one code a byte at 8 bits."""
    rows, cols = qt.shape
    layer = QuantLinear(cols, rows, qt.spec, device="meta")
    codes = qt.codes.numpy()
    u = codes.view(np.uint8) ^ np.uint8(0x80) if codes.dtype == np.int8 and qt.spec.bits == 8 else None
    if u is None:
        u = qt.unsigned_codes().numpy()  # int8 q + 128 == q XOR 0x80 above, without an int16 copy
    packed = u if qt.spec.bits == 8 else (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    layer.qweight = torch.from_numpy(np.ascontiguousarray(packed))
    layer.scale = qt.scale
    layer.zero = qt.zero
    layer.after_load()
    return layer


def load_gguf(
    path: str | os.PathLike[str],
    *,
    requantize: Any = None,
) -> nn.Module:
    """A transformers ``LlamaForCausalLM`` whose weights are the GGUF file's, kept packed.

    Args:
        path: a llama-architecture ``.gguf`` file.
        requantize: how to hold linears of types without an exact qlab layout (K-quants, IQ, Q5): a
            :class:`~qlab.tensor.QuantSpec` or a :class:`qlab.QuantConfig` (default: int8 symmetric,
            groups of 32, fp16 scales, i.e. Q8_0's layout). They are dequantized first, with a warning.

    Raises a ValueError naming ``path`` for a truncated file, another architecture, an unknown tensor
    type, or a row length its block size does not divide. The tokenizer: :func:`gguf_tokenizer`.
    """
    from gguf import GGML_QUANT_SIZES, dequantize

    transformers = _transformers()
    reader = open_gguf(path, "path")
    arch = gguf_field(reader, "general.architecture", None)
    if arch != "llama":
        raise ValueError(f"path: {path} holds a {arch!r} model; load_gguf reads the 'llama' architecture")
    if requantize is None:
        requantize = QuantSpec.per_group(8, 32, symmetric=True, scale_dtype=torch.float16)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"path: {path} has no token_embd.weight")
    for t in reader.tensors:
        block = GGML_QUANT_SIZES[t.tensor_type][0]
        if int(t.shape[0]) % block:
            raise ValueError(
                f"path: tensor {t.name!r} has rows of {int(t.shape[0])} values, which blocks of {block} "
                f"({t.tensor_type.name}) do not divide"
            )
    vocab = int(tensors["token_embd.weight"].shape[1])
    tied = "output.weight" not in tensors
    cfg = llama_config(reader, vocab_size=vocab, tied=tied)
    # The metadata is read; its parsed fields (the tokenizer's ~100k strings as numpy views, ~150 MB for
    # SmolLM2) are dropped before transformers' modeling code and the weights come in.
    reader.fields.clear()
    gc.collect()
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def rows_of(t: Any) -> tuple[int, int]:
        return int(t.shape[1]), int(t.shape[0])  # GGUF lists ne[0] (columns) first

    def linear(t: Any, name: str, n_rot: int | None = None) -> nn.Module:
        rows, cols = rows_of(t)
        kind = t.tensor_type.name
        raw = np.asarray(t.data)
        if kind in BLOCK_TYPES:
            raw = raw.reshape(rows, -1)
            if n_rot is not None:
                raw = unpermute_rotary(raw, n_rot)  # rows of blocks: the codes move with their scales
            return _packed_layer(decode(raw, kind, (rows, cols)))
        w = torch.from_numpy(np.ascontiguousarray(dequantize(raw, t.tensor_type).reshape(rows, cols)))
        if n_rot is not None:
            w = torch.from_numpy(np.ascontiguousarray(unpermute_rotary(w.numpy(), n_rot)))
        if kind in FLOAT_TYPES:
            layer = nn.Linear(cols, rows, bias=False)
            layer.weight = nn.Parameter(w.float(), requires_grad=False)
            return layer
        return _requantize_layer(w.float(), name, kind, requantize)

    def vector(name: str) -> nn.Parameter:
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"path: {path} has no tensor {name!r}")
        w = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(-1)
        return nn.Parameter(torch.from_numpy(w.copy()), requires_grad=False)

    inner = model.model
    head = linear(tensors["token_embd.weight"], "token_embd")
    if isinstance(head, QuantLinear):
        inner.embed_tokens = QuantEmbedding(head)
    else:
        inner.embed_tokens = nn.Embedding(vocab, cfg["hidden_size"], device="meta")
        inner.embed_tokens.weight = head.weight  # one tensor, as transformers ties them
    model.lm_head = head if tied else linear(tensors["output.weight"], "output")
    inner.norm.weight = vector("output_norm.weight")
    for i, block in enumerate(inner.layers):
        for part, module_name in GGUF_LAYER_NAMES.items():
            gguf_name = f"blk.{i}.{part}.weight"
            if part.endswith("_norm"):
                block.get_submodule(module_name).weight = vector(gguf_name)
                continue
            if gguf_name not in tensors:
                raise ValueError(f"path: {path} has no tensor {gguf_name!r}")
            n_rot = {"attn_q": n_heads, "attn_k": n_kv}.get(part)
            parent, _, child = module_name.rpartition(".")
            setattr(block.get_submodule(parent), child, linear(tensors[gguf_name], gguf_name, n_rot))
    inner.rotary_emb = type(inner.rotary_emb)(config=config)  # its inv_freq was built on meta
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"path: {path} left model tensors unset: {left[:5]}")
    model.eval()
    return model
