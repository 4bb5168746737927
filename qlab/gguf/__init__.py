"""GGUF, llama.cpp's model file, for Llama-architecture models: both directions, exactly where possible.

* :mod:`qlab.gguf.convert`: the Llama GGUF conventions (metadata, tensor names, shapes, rotary order,
  block layouts) and :func:`convert_gguf_llama`, which widens a file into an fp32 transformers folder
  (how the course's SmolLM2 baseline is made);
* :mod:`qlab.gguf.blocks`: GGUF's 32-wide block types (Q8_0, Q4_0, Q4_1) and the qlab specs that hold
  them code for code; the mapping table and its exactness check;
* :mod:`qlab.gguf.load`: :func:`load_gguf`, a file into a model whose linears keep the file's codes;
* :mod:`qlab.gguf.export`: :func:`save_gguf`, a float or qlab-quantized Llama model into a file llama.cpp
  and transformers load, re-quantizing (with a warning giving the SQNR) only what has no exact type.

Depends on numpy, torch, ``gguf`` (gguf-py, imported when used) and transformers; it never imports
:mod:`qlab.models`.
"""

from qlab.gguf.blocks import BLOCK_TYPES, decode, encode, exact_type, spec_for
from qlab.gguf.convert import GGUF_LAYER_NAMES, convert_gguf_llama, llama_config, unpermute_rotary
from qlab.gguf.export import GGUF_TYPES, permute_rotary, save_gguf
from qlab.gguf.load import gguf_tokenizer, load_gguf, open_gguf
from qlab.nn import QuantEmbedding  # the packed embedding load_gguf installs

__all__ = [
    "BLOCK_TYPES",
    "GGUF_LAYER_NAMES",
    "GGUF_TYPES",
    "QuantEmbedding",
    "convert_gguf_llama",
    "decode",
    "encode",
    "exact_type",
    "gguf_tokenizer",
    "llama_config",
    "load_gguf",
    "open_gguf",
    "permute_rotary",
    "save_gguf",
    "spec_for",
    "unpermute_rotary",
]
