"""qlab: neural-network quantization, taught and tested.

The layers, bottom first (a lower one never imports a higher one):

1. core: ``formats``, ``packing``, ``tensor`` (QuantSpec, QuantizedTensor), ``affine``, ``codebooks``,
   the ``quantize`` API, ``metrics``;
2. ``methods``: HQQ, GPTQ, AWQ, SmoothQuant, and the calibrated passes over a model;
3. ``nn``: the quantized modules and their forward dispatch;
4. ``registry`` (one entry per method), ``config`` (QuantConfig), ``driver`` (quantize_model),
   ``footprint``;
5. formats and apps: ``io``, ``models``, ``evaluate``, ``compare``, ``plots``, ``widgets``, ``picker``,
   ``cli``, ``exercises``.

The core imports only torch and numpy. Everything else is imported on first use, so ``import qlab``
works without transformers, triton, matplotlib or ipywidgets installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from qlab import codebooks, formats, metrics, packing
from qlab.codebooks import quantize_fp4, quantize_nf4
from qlab.quantize import QuantizedTensor, QuantSpec, dequantize, fake_quantize, quantize

__version__ = "0.1.0"

# name -> module that defines it, imported lazily on first attribute access.
_LAZY = {
    "QuantConfig": "qlab.config",
    "QuantLinear": "qlab.nn",
    "Int8Linear": "qlab.nn",
    "quantize_model": "qlab.driver",
    "quantize_layer": "qlab.driver",
    "dequantize_model": "qlab.driver",
    "memory_footprint": "qlab.footprint",
    "save_quantized": "qlab.io",
    "load_quantized": "qlab.io",
}
_SUBMODULES = {
    "tensor",
    "affine",
    "nn",
    "registry",
    "config",
    "driver",
    "footprint",
    "compare",
    "io",
    "models",
    "cache",
    "gguf",
    "text",
    "evaluate",
    "methods",
    "calibration",
    "plots",
    "widgets",
    "picker",
    "exercises",
    "kernels",
    "cli",
}

__all__ = [
    "QuantSpec",
    "QuantizedTensor",
    "codebooks",
    "dequantize",
    "fake_quantize",
    "formats",
    "metrics",
    "packing",
    "quantize",
    "quantize_fp4",
    "quantize_nf4",
    *_LAZY,
    *sorted(_SUBMODULES),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"qlab.{name}")
    raise AttributeError(f"module 'qlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
