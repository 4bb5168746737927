"""Write a Llama-architecture model (float, qlab-quantized, or loaded packed from GGUF) as a GGUF file.

:func:`save_gguf` walks the transformers ``LlamaForCausalLM`` layout and writes what llama.cpp's
``convert_hf_to_gguf.py`` would: GGUF tensor names, q/k rows permuted to ggml's rotary order, norms in
F32, the embedding as ``token_embd`` (and no ``output.weight`` when the head is tied to it), the
hyper-parameters under ``llama.*`` and the tokenizer under ``tokenizer.ggml.*``.

Each linear layer goes out in the first way that applies:

1. a :class:`~qlab.nn.QuantLinear` whose codes and scales *are* a GGUF block type
   (:func:`qlab.gguf.blocks.exact_type`: gguf-py's dequantize of the bytes equals qlab's weight bit for
   bit) is written code for code;
2. any other quantized layer is re-quantized by gguf-py from qlab's dequantized weight, to the nearest
   type of its width (or ``requantize_to``); when the layer's codes fit that type (int4 g64 with fp32
   scales, HQQ's fractional zeros ...) they may instead be kept with ``d`` (and ``m = -s z``) rounded to
   fp16, whichever is closer. A ``warnings.warn`` gives the SQNR of the written weight against qlab's:
   the error the export adds;
3. a float ``nn.Linear`` is written as ``float_type`` (F16 by default, F32 or any block type).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qlab.gguf.blocks import BLOCK_TYPES, encode, exact_type
from qlab.gguf.convert import GGUF_LAYER_NAMES
from qlab.metrics import sqnr
from qlab.nn import QuantLinear

__all__ = ["GGUF_TYPES", "permute_rotary", "save_gguf"]

#: Types :func:`save_gguf` writes (gguf-py quantizes all of them; the block types also code for code).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face's rotary order -> ggml's: the inverse of :func:`qlab.gguf.unpermute_rotary`.

    Row ``h*head_dim + r*head_dim/2 + j`` (``r`` in 0, 1) becomes row ``h*head_dim + 2j + r``, so ggml's
    rope, which rotates adjacent pairs, rotates the same pairs as ``rotate_half``. Rows may be raw block
    bytes: a block never crosses a row.
    """
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads: expected a positive int, got {n_heads!r}")
    if w.ndim < 1 or w.shape[0] % (2 * n_heads):
        raise ValueError(f"w: expected rows divisible by 2 * n_heads = {2 * n_heads}, got shape {w.shape}")
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_type(name: str, what: str) -> str:
    if name not in GGUF_TYPES:
        raise ValueError(f"{what}: expected one of {GGUF_TYPES}, got {name!r}")
    return name


def _quantize_float(w: torch.Tensor, name: str) -> tuple[np.ndarray, Any]:
    """``w`` (float, 1-D or 2-D) as gguf-py writes type ``name``: (array, raw type or None)."""
    from gguf import GGMLQuantizationType, quantize

    a = w.detach().float().contiguous().numpy()
    if name == "F32":
        return a, None
    if name == "F16":
        return a.astype(np.float16), None
    qtype = GGMLQuantizationType[name]
    return quantize(a, qtype), qtype


def _default_requant(layer: QuantLinear) -> str:
    """The block type nearest a layer's width: 8-bit -> Q8_0, 5-7 -> Q5_x, <= 4 -> Q4_x (``_1`` when the
    layer has an offset: asymmetric codes, a float zero, an NF4/FP4 table)."""
    bits = 8 if layer.mode != "weight" else layer.spec.bits
    if bits >= 8:
        return "Q8_0"
    sym = layer.spec.symmetric and layer.spec.codebook is None
    if bits >= 5:
        return "Q8_0" if bits > 5 else ("Q5_0" if sym else "Q5_1")
    return "Q4_0" if sym else "Q4_1"


def _cast(layer: QuantLinear, target: str) -> np.ndarray | None:
    """``target``'s bytes from the layer's own codes, its scales (and ``m = -s z`` or its float zero)
    rounded to fp16, when the spec has the target's form; else None."""
    bt = BLOCK_TYPES.get(target)
    spec = layer.spec
    if bt is None or layer.mode != "weight" or layer.input_scale is not None or spec.codebook is not None:
        return None
    if spec.bits != bt.bits or spec.symmetric == bt.has_min or (not spec.symmetric and target == "Q4_0"):
        return None
    block = spec.block_size((layer.out_features, layer.in_features))[1]
    if layer.in_features % 32 or (block % 32 and block != layer.in_features):
        return None
    return encode(layer.quantized_tensor(), target)


def _linear_tensor(
    module: nn.Module, name: str, requantize_to: str | None, float_type: str
) -> tuple[np.ndarray, Any, str]:
    """The GGUF form of one linear layer: (array, raw type or None, type name). Warns when it re-quantizes."""
    from gguf import dequantize

    if getattr(module, "bias", None) is not None:
        raise ValueError(f"model: {name} has a bias; the llama GGUF layout written here has none")
    if isinstance(module, QuantLinear):
        if module.input_scale is None and module.mode != "fp8":
            exact = exact_type(module.quantized_tensor())
            if exact is not None and (requantize_to is None or requantize_to == exact[0]):
                kind, raw = exact
                return raw, BLOCK_TYPES[kind].ggml, kind
        target = requantize_to or _default_requant(module)
        w = module.effective_weight(torch.float32)
        arr, qtype = _quantize_float(w, target)
        back = torch.from_numpy(dequantize(arr, qtype) if qtype is not None else arr.astype(np.float32))
        db, how = sqnr(w, back.reshape(w.shape)), "re-quantized"
        cast = _cast(module, target)
        if cast is not None:  # the layer's own codes with d (and m) rounded to fp16: often closer
            cast_db = sqnr(w, torch.from_numpy(dequantize(cast, BLOCK_TYPES[target].ggml)).reshape(w.shape))
            if cast_db > db:
                arr, qtype, db, how = cast, BLOCK_TYPES[target].ggml, cast_db, "cast (codes kept, fp16 d/m)"
        warnings.warn(
            f"{name}: {module.describe()} has no exact GGUF type; {how} to {target}, "
            f"SQNR {db:.1f} dB against qlab's weight (what this export adds)",
            stacklevel=3,
        )
        return arr, qtype, target
    if isinstance(module, nn.Linear):
        arr, qtype = _quantize_float(module.weight, float_type)
        return arr, qtype, float_type
    raise TypeError(f"model: {name} is a {type(module).__name__}; expected nn.Linear or QuantLinear")


def _permuted(arr: np.ndarray, part: str, n_heads: int, n_kv: int) -> np.ndarray:
    if part == "attn_q":
        return np.ascontiguousarray(permute_rotary(arr, n_heads))
    if part == "attn_k":
        return np.ascontiguousarray(permute_rotary(arr, n_kv))
    return arr


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    rope_type = params.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None)
    scaled = isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"
    if rope_type != "default" or scaled:
        raise ValueError(f"model: rope type {rope_type!r} / scaling {scaling!r} is not written by save_gguf")
    if theta is None:
        raise ValueError("model: its config has no rope_theta")
    return float(theta)


def _tokenizer_fields_from_gguf(path: Path) -> list[tuple[str, Any, Any, Any]]:
    """``tokenizer.*`` fields of a GGUF file as (key, value, type, sub_type), ready for ``add_key_value``."""
    from gguf import GGUFValueType

    reader = _open_reader(path, "tokenizer_from")
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.model" for k, *_ in out):
        raise ValueError(f"tokenizer_from: {path} holds no tokenizer.ggml.* metadata")
    return out


def _tokenizer_fields_from_hf(tokenizer: Any) -> list[tuple[str, Any, Any, Any]]:
    """A byte-level BPE tokenizer (transformers fast tokenizer) as ``tokenizer.ggml.*`` fields (``gpt2``).

    Tokens in id order, the merges, token types (1 normal, 3 control for special added tokens, 4 user
    defined for other added tokens) and the special ids, as ``convert_hf_to_gguf.py`` writes them.
    """
    from gguf import GGUFValueType as T

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError("tokenizer_from: expected a fast (tokenizers-backed) BPE tokenizer or a GGUF path")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer_from: only BPE tokenizers are written, got {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED until filled
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = (3 if added[tok].get("special") else 4) if tok in added else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields: list[tuple[str, Any, Any, Any]] = [
        ("tokenizer.ggml.model", "gpt2", T.STRING, None),
        ("tokenizer.ggml.pre", "default", T.STRING, None),
        ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
    ]
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):  # fmt: skip
        value = getattr(tokenizer, attr, None)
        if value is not None:
            fields.append((f"tokenizer.ggml.{key}_token_id", int(value), T.UINT32, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields.append(("tokenizer.chat_template", template, T.STRING, None))
    return fields


def _open_reader(path: Path, what: str) -> Any:
    from qlab.gguf.load import open_gguf

    return open_gguf(path, what)


def save_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    tokenizer_from: Any,
    requantize_to: str | None = None,
    float_type: str = "F16",
    embedding_type: str = "Q8_0",
    name: str | None = None,
) -> Path:
    """Write ``model`` (a transformers ``LlamaForCausalLM``, float or quantized by qlab) as a GGUF file.

    Args:
        model: the model. Its linears may be ``nn.Linear`` or :class:`~qlab.nn.QuantLinear`.
        path: the ``.gguf`` file to write.
        tokenizer_from: a GGUF file whose ``tokenizer.*`` metadata is copied (SmolLM2's own), or a
            transformers fast BPE tokenizer to describe.
        requantize_to: the GGUF type for quantized layers without an exact mapping (default: the block
            type of their width, see :func:`_default_requant`); a layer with an exact mapping to another
            type is re-quantized to this one too. Re-quantizing warns with the SQNR it costs.
        float_type: the type for float linear layers (``"F16"``; ``"F32"`` or a block type).
        embedding_type: the type for a float embedding (``"Q8_0"`` as SmolLM2's file; a packed
            embedding from :func:`qlab.gguf.load_gguf` is written code for code).
        name: ``general.name`` (default: the model config's ``_name_or_path`` or ``"qlab model"``).

    Returns the path written.
    """
    from gguf import GGUFWriter

    from qlab.nn import QuantEmbedding

    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama" or not hasattr(model, "model"):
        raise ValueError(f"model: expected a transformers LlamaForCausalLM, got {type(model).__name__}")
    for value, what in ((requantize_to, "requantize_to"), (float_type, "float_type"),
                        (embedding_type, "embedding_type")):  # fmt: skip
        if value is not None:
            _check_type(value, what)
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("model: attention or MLP biases are not written by save_gguf")
    path = Path(path)
    if isinstance(tokenizer_from, (str, os.PathLike)):
        tok_fields = _tokenizer_fields_from_gguf(Path(tokenizer_from))
    else:
        tok_fields = _tokenizer_fields_from_hf(tokenizer_from)

    n_heads, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_heads)
    inner = model.model
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(name or str(getattr(config, "_name_or_path", "") or "qlab model"))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    for key, value, vtype, sub in tok_fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)

    counts: dict[str, int] = {}

    def add(gguf_name: str, arr: np.ndarray, qtype: Any, kind: str, shape: tuple[int, ...]) -> None:
        # quantized arrays are uint8 [rows, row bytes]: gguf-py derives the element shape from the type
        if qtype is not None and arr.dtype != np.uint8:
            arr = arr.view(np.uint8)
        writer.add_tensor(gguf_name, arr, raw_dtype=qtype)
        counts[kind] = counts.get(kind, 0) + int(np.prod(shape))

    # embedding (and the head when it is tied to it)
    emb, head = inner.embed_tokens, getattr(model, "lm_head", None)
    vocab = int(config.vocab_size)
    if isinstance(emb, QuantEmbedding):
        if emb.linear.input_scale is not None or emb.linear.mode != "weight":
            raise ValueError("model: the packed embedding must be a plain weight-only layer")
        exact = exact_type(emb.linear.quantized_tensor())
        if exact is None:
            raise ValueError(f"model: the packed embedding ({emb.linear.describe()}) has no exact GGUF type")
        add("token_embd.weight", exact[1], BLOCK_TYPES[exact[0]].ggml, exact[0], (vocab, hidden))
        tied = head is emb.linear
    else:
        arr, qtype = _quantize_float(emb.weight, embedding_type)
        add("token_embd.weight", arr, qtype, embedding_type, (vocab, hidden))
        tied = isinstance(head, nn.Linear) and head.weight is emb.weight
    if not tied:
        if head is None:
            raise ValueError("model: no lm_head")
        arr, qtype, kind = _linear_tensor(head, "lm_head", requantize_to, float_type)
        add("output.weight", arr, qtype, kind, (vocab, hidden))
    add("output_norm.weight", inner.norm.weight.detach().float().numpy(), None, "F32", (hidden,))

    for i, block in enumerate(inner.layers):
        for part, module_name in GGUF_LAYER_NAMES.items():
            module = block.get_submodule(module_name)
            gguf_name = f"blk.{i}.{part}.weight"
            if part.endswith("_norm"):
                add(gguf_name, module.weight.detach().float().numpy(), None, "F32", (hidden,))
                continue
            where = f"model.layers.{i}.{module_name}"
            arr, qtype, kind = _linear_tensor(module, where, requantize_to, float_type)
            shape = (int(module.out_features), int(module.in_features))
            add(gguf_name, _permuted(arr, part, n_heads, n_kv), qtype, kind, shape)

    linear_kinds = {k: v for k, v in counts.items() if k != "F32"} or {"F32": 1}
    writer.add_file_type(_FILE_TYPE[max(linear_kinds, key=lambda k: linear_kinds[k])])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
