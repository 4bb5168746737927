"""qlab.gguf: the Llama GGUF conventions the converter relies on.

The converter itself runs on the real SmolLM2 GGUF file in ``qlab fetch`` (see tests/test_models.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from qlab import gguf


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): interleave each head's rotary halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_rotary_inverts_llama_cpp_permute():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
    for heads in (1, 3, 6):
        np.testing.assert_array_equal(gguf.unpermute_rotary(llama_cpp_permute(w, heads), heads), w)


def test_unpermute_rotary_row_order():
    """One head of 4 rows: GGUF rows (0, 1, 2, 3) hold Hugging Face rows (0, 2, 1, 3)."""
    got = gguf.unpermute_rotary(np.array([0, 2, 1, 3]), 1)
    np.testing.assert_array_equal(got, [0, 1, 2, 3])


@pytest.mark.parametrize(
    ("shape", "heads", "arg"),
    [((12, 2), 0, "n_heads"), ((12, 2), 2.0, "n_heads"), ((12, 2), True, "n_heads"), ((10, 2), 3, "w")],
)
def test_unpermute_rotary_rejects_bad_input(shape, heads, arg):
    with pytest.raises(ValueError, match=arg):
        gguf.unpermute_rotary(np.zeros(shape, dtype=np.float32), heads)
