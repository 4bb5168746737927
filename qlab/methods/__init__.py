"""Quantization methods beyond round-to-nearest: one module per algorithm.

* :mod:`~qlab.methods.hqq`: half-quadratic zero-point (and scale) optimization, no data;
* :mod:`~qlab.methods.gptq`: Hessian-guided error feedback from calibration inputs;
* :mod:`~qlab.methods.awq`: activation-aware per-channel scaling, then group-wise quantization;
* :mod:`~qlab.methods.smoothquant` and :mod:`~qlab.methods.llm_int8`: W8A8 with activation outliers.

Each weight-level function returns the same :class:`~qlab.quantize.QuantizedTensor` as RTN;
:func:`quantize_model_with` applies a method to every linear layer of a model, and
:func:`compare_methods` builds the comparison table on a real model.
"""

from qlab.methods.apply import MODEL_METHODS, QuantizationResult, quantize_model_with
from qlab.methods.awq import AWQResult, awq_quantize, awq_search, clip_quantize
from qlab.methods.compare import compare_methods, format_table
from qlab.methods.gptq import gptq_quantize
from qlab.methods.hqq import hqq_quantize
from qlab.methods.llm_int8 import Int8Linear
from qlab.methods.smoothquant import smooth_scales

__all__ = [
    "MODEL_METHODS",
    "AWQResult",
    "Int8Linear",
    "QuantizationResult",
    "awq_quantize",
    "awq_search",
    "clip_quantize",
    "compare_methods",
    "format_table",
    "gptq_quantize",
    "hqq_quantize",
    "quantize_model_with",
    "smooth_scales",
]
