"""qlab: neural-network quantization, taught and tested.

The core (formats, quantize, codebooks, packing, metrics, config) imports only torch and numpy.
Everything heavier (quantized modules, I/O, real models, methods, kernels, plots, widgets) is
imported on first use, so ``import qlab`` works without transformers, triton, matplotlib or
ipywidgets installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from qlab import codebooks, formats, metrics, packing
from qlab.codebooks import quantize_fp4, quantize_nf4
from qlab.config import QuantConfig
from qlab.quantize import QuantizedTensor, QuantSpec, dequantize, fake_quantize, quantize

__version__ = "0.1.0"

# name -> module that defines it, imported lazily on first attribute access.
_LAZY = {
    "QuantLinear": "qlab.nn",
    "quantize_model": "qlab.nn",
    "dequantize_model": "qlab.nn",
    "save_quantized": "qlab.io",
    "load_quantized": "qlab.io",
}
_SUBMODULES = {
    "nn",
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
    "QuantConfig",
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
