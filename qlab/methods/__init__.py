"""Quantization methods beyond round-to-nearest: one module per algorithm.

* :mod:`~qlab.methods.hqq`: half-quadratic zero-point (and scale) optimization, no data;
* :mod:`~qlab.methods.gptq`: Hessian-guided error feedback from calibration inputs;
* :mod:`~qlab.methods.awq`: activation-aware per-channel scaling, then group-wise quantization;
* :mod:`~qlab.methods.smoothquant`: migrate activation outliers into the weights for W8A8;
* :mod:`~qlab.methods.passes`: the calibrated methods' block-by-block passes over a whole model.

Each weight-level function returns the same :class:`~qlab.tensor.QuantizedTensor` as RTN. Methods
build no layers and know no config: the model driver (:func:`qlab.quantize_model`) reads the method
registry (:mod:`qlab.registry`) and installs the layers.
"""

from qlab.methods.awq import AWQResult, awq_quantize, awq_search, clip_quantize
from qlab.methods.gptq import gptq_quantize
from qlab.methods.hqq import hqq_quantize, hqq_zero_update
from qlab.methods.passes import QuantizationResult, awq_pass, gptq_pass, smoothquant_pass
from qlab.methods.smoothquant import smooth_scales

__all__ = [
    "AWQResult",
    "QuantizationResult",
    "awq_pass",
    "awq_quantize",
    "awq_search",
    "clip_quantize",
    "gptq_pass",
    "gptq_quantize",
    "hqq_quantize",
    "hqq_zero_update",
    "smooth_scales",
    "smoothquant_pass",
]
