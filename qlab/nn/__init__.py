"""Quantized modules: :class:`QuantLinear` (packed weight-only, FP8 and W8A8 layers) and
:class:`Int8Linear` (LLM.int8 / SmoothQuant), with the forward dispatch in :mod:`qlab.nn.dispatch`.

Modules only: turning a model's layers into these is the driver's job (:func:`qlab.quantize_model`).
"""

from qlab.nn.dispatch import (
    CPU_DEQUANT_MIN_ROWS,
    CPU_INT8DOT_MAX_ROWS,
    CPU_TILED_MIN_ROWS,
    CPU_W8A8_DOT_MAX_ROWS,
    FAST_PATH_RTOL,
    PATH_TABLE,
    PATHS,
    PREPARE_ROWS,
    prepare,
    select_path,
    use_path,
)
from qlab.nn.embedding import QuantEmbedding
from qlab.nn.int8 import DEFAULT_THRESHOLD, Int8Linear, outlier_features
from qlab.nn.linear import FP8_MAX, MODES, QuantLinear, is_conv1d, is_linear, linear_weight

#: The quantized module classes, by name (what files record as a layer's ``type``).
LAYER_TYPES: dict[str, type] = {cls.__name__: cls for cls in (QuantLinear, Int8Linear)}

__all__ = [
    "CPU_DEQUANT_MIN_ROWS",
    "CPU_INT8DOT_MAX_ROWS",
    "CPU_TILED_MIN_ROWS",
    "CPU_W8A8_DOT_MAX_ROWS",
    "DEFAULT_THRESHOLD",
    "FAST_PATH_RTOL",
    "FP8_MAX",
    "LAYER_TYPES",
    "MODES",
    "PATHS",
    "PATH_TABLE",
    "PREPARE_ROWS",
    "Int8Linear",
    "QuantEmbedding",
    "QuantLinear",
    "is_conv1d",
    "is_linear",
    "linear_weight",
    "outlier_features",
    "prepare",
    "select_path",
    "use_path",
]
