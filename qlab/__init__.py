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

With transformers installed, ``import qlab`` registers the ``"qlab"`` quantization backend
(:mod:`qlab.hf`) without importing transformers: a one-shot import hook imports ``qlab.hf`` right
after transformers first loads its quantizer table (``transformers.quantizers.auto``), which every
``from_pretrained`` does. If that table is loaded already, ``qlab.hf`` is imported at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

from qlab import codebooks, formats, metrics, packing
from qlab.codebooks import quantize_fp4, quantize_nf4
from qlab.quantize import QuantizedTensor, QuantSpec, dequantize, fake_quantize, quantize

__version__ = "0.1.0"

# name -> module that defines it, imported lazily on first attribute access.
_LAZY = {
    "QuantConfig": "qlab.config",
    "QlabConfig": "qlab.hf",
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
    "hf",
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


# --- the transformers backend, registered lazily --------------------------------------------------
_HF_TABLE = "transformers.quantizers.auto"


def _register_hf_backend() -> None:
    try:
        importlib.import_module("qlab.hf")
    except Exception as err:  # never break transformers' own import
        warnings.warn(f"qlab: could not register the transformers backend: {err!r}", stacklevel=2)


class _AfterLoad(importlib.abc.Loader):
    """Runs the real loader of ``transformers.quantizers.auto``, then registers qlab's backend."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _register_hf_backend()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename ... for tracebacks
        return getattr(self.inner, name)


class _HfHook(importlib.abc.MetaPathFinder):
    """One-shot finder: wraps the loader of transformers' quantizer table, then removes itself."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _HF_TABLE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _AfterLoad(spec.loader)
                return spec
        return None


def _install_hf_hook() -> None:
    if _HF_TABLE in sys.modules:
        _register_hf_backend()
        return
    try:
        found = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        found = False
    if found and not any(isinstance(f, _HfHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _HfHook())


_install_hf_hook()
