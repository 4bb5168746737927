"""GGUF export and packed import on a tiny Llama (2 layers, hidden 64) written by qlab's own exporter.

What is checked: the llama layout and metadata; gguf-py's dequantize of every exactly mapped tensor equals
qlab's weight bit for bit; re-quantization warns with the SQNR it costs; ``load_gguf`` keeps the codes and
a second export gives the same bytes; transformers loads the file and its logits match; bad files fail
with errors that name the problem.
"""

from __future__ import annotations

import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGUFWriter, dequantize  # noqa: E402

from qlab import QuantLinear, QuantSpec  # noqa: E402
from qlab.gguf import (  # noqa: E402
    QuantEmbedding,
    load_gguf,
    open_gguf,
    save_gguf,
    spec_for,
    unpermute_rotary,
)
from qlab.metrics import sqnr  # noqa: E402
from qlab.nn import use_path  # noqa: E402

HEADS, KV_HEADS = 4, 2
F16 = torch.float16
#: module -> spec: every one of them has an exact GGUF type (fp16 scales, groups that are multiples of 32)
EXACT_SPECS = {
    "q_proj": QuantSpec.per_group(4, 32, zero_domain="float", scale_dtype=F16),  # Q4_1
    "k_proj": QuantSpec.per_group(4, 32, symmetric=True, scale_dtype=F16),  # Q4_0
    "v_proj": QuantSpec.per_group(8, 32, symmetric=True, scale_dtype=F16),  # Q8_0
    "o_proj": QuantSpec.per_channel(8, symmetric=True, scale_dtype=F16),  # Q8_0, one d per row
    "gate_proj": QuantSpec.per_group(4, 64, zero_domain="float", scale_dtype=F16),  # Q4_1
    "up_proj": QuantSpec.per_group(4, 32, zero_domain="float", scale_dtype=F16),
    "down_proj": QuantSpec.per_group(4, 32, symmetric=True, scale_dtype=F16),
}
EXPECTED_TYPE = {"q_proj": "Q4_1", "k_proj": "Q4_0", "v_proj": "Q8_0", "o_proj": "Q8_0",
                 "gate_proj": "Q4_1", "up_proj": "Q4_1", "down_proj": "Q4_0"}  # fmt: skip
GGUF_PART = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def _tiny(tokenizer, tied: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, rms_norm_eps=1e-5,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that a lost or misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _quantize(model, specs=EXACT_SPECS):
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, spec in specs.items():
                if hasattr(parent, name):
                    setattr(parent, name, QuantLinear.from_linear(getattr(parent, name), spec))
    return model


@pytest.fixture(scope="module")
def quantized(tokenizer):
    return _quantize(_tiny(tokenizer))


@pytest.fixture(scope="module")
def exported(quantized, tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer maps exactly: no re-quantization warning
        save_gguf(quantized, path, tokenizer_from=tokenizer)
    return path


def _tensors(path: Path) -> dict:
    return {t.name: t for t in open_gguf(path).tensors}


def _weight(t) -> np.ndarray:
    return dequantize(np.asarray(t.data), t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
def test_export_writes_the_llama_layout_and_metadata(exported, quantized):
    reader = open_gguf(exported)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.feed_forward_length"] == 128 and meta["llama.context_length"] == 128
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (HEADS, KV_HEADS)
    assert meta["llama.rope.freq_base"] == 10000.0 and meta["llama.rope.dimension_count"] == 16
    assert abs(meta["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-11
    assert meta["general.file_type"] in (2, 3)  # mostly Q4_0 / Q4_1
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    tensors = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"] == "Q8_0" and tensors["output_norm.weight"] == "F32"
    for i in range(2):
        assert tensors[f"blk.{i}.attn_norm.weight"] == tensors[f"blk.{i}.ffn_norm.weight"] == "F32"
        for module, part in GGUF_PART.items():
            assert tensors[f"blk.{i}.{part}.weight"] == EXPECTED_TYPE[module], (i, module)
    assert len(tensors) == 2 + 2 * 9


def test_exported_weights_dequantize_to_qlabs_bit_for_bit(exported, quantized):
    """gguf-py's reading of every exactly mapped tensor equals qlab's dequantized weight, q/k after the
    converter's unpermute (so the rotary permutation is the exact inverse), norms exactly."""
    tensors = _tensors(exported)
    for i, block in enumerate(quantized.model.layers):
        for module, part in GGUF_PART.items():
            layer = (
                block.self_attn if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else block.mlp
            )
            w = _weight(tensors[f"blk.{i}.{part}.weight"])
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(part)
            if heads:
                w = unpermute_rotary(w, heads)
            assert np.array_equal(w, getattr(layer, module).dequantize(torch.float32).numpy()), (i, module)
        norm = block.input_layernorm.weight.detach().numpy()
        assert np.array_equal(_weight_1d(tensors[f"blk.{i}.attn_norm.weight"]), norm)
    assert np.array_equal(
        _weight_1d(tensors["output_norm.weight"]), quantized.model.norm.weight.detach().numpy()
    )


def _weight_1d(t) -> np.ndarray:
    return np.asarray(t.data).astype(np.float32).reshape(-1)


@pytest.mark.parametrize(
    "spec, how, low, high",
    [
        # fp32 scales and groups of 64 (qlab's RTN defaults) are no GGUF block, but the codes are:
        # kept, with d and m rounded to fp16, they cost only that rounding
        (QuantSpec.per_group(4, 64), "cast", 55, 80),
        # NF4's levels are not on any 16-step grid: gguf-py re-quantizes, at a real cost
        (QuantSpec.per_group(4, 64, symmetric=False, codebook="nf4"), "re-quantized", 15, 45),
    ],
)
def test_layers_without_an_exact_type_warn_with_the_sqnr_they_cost(tokenizer, tmp_path, spec, how, low, high):
    model = _quantize(_tiny(tokenizer), {"q_proj": spec})
    with pytest.warns(UserWarning) as caught:
        save_gguf(model, tmp_path / "r.gguf", tokenizer_from=tokenizer)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all(re.search(rf"{how}.* to Q4_1, SQNR", m) for m in messages), messages
    db = [float(re.search(r"SQNR (-?[\d.]+) dB", m).group(1)) for m in messages]
    assert all(low < x < high for x in db), db
    tensors = _tensors(tmp_path / "r.gguf")
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_1"
    assert tensors["blk.0.attn_k.weight"].tensor_type.name == "F16"  # float linears: float_type
    back = torch.from_numpy(unpermute_rotary(_weight(tensors["blk.0.attn_q.weight"]), HEADS))
    ours = model.model.layers[0].self_attn.q_proj.dequantize(torch.float32)
    assert abs(sqnr(ours, back) - db[0]) < 0.05  # the warning's figure is the file's


def test_requantize_to_forces_a_type(quantized, tokenizer, tmp_path):
    with pytest.warns(UserWarning, match="re-quantized to Q8_0"):
        save_gguf(quantized, tmp_path / "q8.gguf", tokenizer_from=tokenizer, requantize_to="Q8_0")
    types = {t.tensor_type.name for n, t in _tensors(tmp_path / "q8.gguf").items() if n.startswith("blk")}
    assert types == {"Q8_0", "F32"}


def test_save_gguf_rejects_bad_arguments(quantized, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="requantize_to"):
        save_gguf(quantized, tmp_path / "x.gguf", tokenizer_from=tokenizer, requantize_to="Q9_9")
    with pytest.raises(ValueError, match="model: expected a transformers LlamaForCausalLM"):
        save_gguf(torch.nn.Linear(2, 2), tmp_path / "x.gguf", tokenizer_from=tokenizer)
    with pytest.raises(ValueError, match="tokenizer_from"):
        save_gguf(quantized, tmp_path / "x.gguf", tokenizer_from=object())


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imported(exported):
    return load_gguf(exported)


def test_import_keeps_the_files_codes(imported, quantized):
    for i, (mine, theirs) in enumerate(zip(imported.model.layers, quantized.model.layers, strict=True)):
        for module in EXACT_SPECS:
            parent = "self_attn" if module in ATTENTION else "mlp"
            a = getattr(getattr(mine, parent), module)
            b = getattr(getattr(theirs, parent), module)
            assert isinstance(a, QuantLinear) and a.spec == spec_for(EXPECTED_TYPE[module]), (i, module)
            assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32)), (i, module)
    emb = imported.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and imported.lm_head is emb.linear  # tied, packed once
    ids = torch.tensor([[0, 5, 17, 5]])
    assert torch.equal(emb(ids), emb.linear.dequantize(torch.float32)[ids])


def test_import_then_export_gives_the_same_bytes(imported, exported, tokenizer, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_gguf(imported, tmp_path / "again.gguf", tokenizer_from=exported)
    a, b = _tensors(exported), _tensors(tmp_path / "again.gguf")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


def test_transformers_loads_the_export_and_its_logits_match(
    quantized, tokenizer, imported, exported, tmp_path
):
    """A real client: transformers' own GGUF loader. With the embedding written in F32, its logits equal
    qlab's model's to float rounding; with the default Q8_0 embedding they equal the packed import's."""
    pytest.importorskip("accelerate")
    save_gguf(quantized, tmp_path / "f32emb.gguf", tokenizer_from=tokenizer, embedding_type="F32")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    for path, model in ((tmp_path / "f32emb.gguf", quantized), (exported, imported)):
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        with torch.no_grad(), use_path("reference"):
            ours, theirs = model(ids).logits, hf(ids).logits
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max(), path.name
    gguf_tok = transformers.AutoTokenizer.from_pretrained(str(exported.parent), gguf_file=exported.name)
    assert gguf_tok(TEXT).input_ids == tokenizer(TEXT).input_ids


def test_untied_head_is_written_and_read_as_output(tokenizer, tmp_path):
    model = _quantize(_tiny(tokenizer, tied=False, seed=1))
    model.lm_head = QuantLinear.from_linear(model.lm_head, spec_for("Q8_0"))
    save_gguf(model, tmp_path / "untied.gguf", tokenizer_from=tokenizer)
    assert _tensors(tmp_path / "untied.gguf")["output.weight"].tensor_type.name == "Q8_0"
    back = load_gguf(tmp_path / "untied.gguf")
    assert not back.config.tie_word_embeddings and back.lm_head is not back.model.embed_tokens.linear
    assert torch.equal(back.lm_head.dequantize(), model.lm_head.dequantize())


def test_other_types_are_requantized_on_import_with_a_warning(tokenizer, tmp_path):
    model = _tiny(tokenizer)
    save_gguf(model, tmp_path / "q5.gguf", tokenizer_from=tokenizer, float_type="Q5_1")
    with pytest.warns(UserWarning, match=r"GGUF type Q5_1 has no exact qlab layout.*SQNR \d+\.\d dB"):
        back = load_gguf(tmp_path / "q5.gguf", requantize=QuantSpec.per_group(4, 32, scale_dtype=F16))
    layer = back.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.spec == QuantSpec.per_group(4, 32, scale_dtype=F16)
    save_gguf(model, tmp_path / "f16.gguf", tokenizer_from=tokenizer)  # float linears stay float
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = load_gguf(tmp_path / "f16.gguf")
    assert type(back.model.layers[0].mlp.up_proj) is torch.nn.Linear


# ------------------------------------------------------------------------------------------------
# Bad files
# ------------------------------------------------------------------------------------------------
def _patch_tensor_info(src: Path, dst: Path, name: str, field: str, value: int) -> None:
    """Copy ``src`` with one field of tensor ``name``'s header entry changed: ``"type"`` or ``"ne0"``."""
    data = bytearray(src.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, at)
    if field == "ne0":
        struct.pack_into("<Q", data, at + 4, value)
    else:
        struct.pack_into("<I", data, at + 4 + 8 * n_dims, value)
    dst.write_bytes(bytes(data))


def test_bad_files_get_clear_errors(exported, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(exported.read_bytes()[: exported.stat().st_size * 2 // 3])
    with pytest.raises(ValueError, match="path: .*truncated"):
        load_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(exported.read_bytes()[:100])
    with pytest.raises(ValueError, match="path: .*truncated or not a GGUF file"):
        load_gguf(head)
    unknown = tmp_path / "unknown.gguf"
    _patch_tensor_info(exported, unknown, "blk.0.attn_v.weight", "type", 99)
    with pytest.raises(ValueError, match="path: .*unknown GGML type"):
        load_gguf(unknown)
    rows = tmp_path / "rows.gguf"
    _patch_tensor_info(exported, rows, "blk.0.attn_v.weight", "ne0", 48)  # 48 values: 1.5 Q8_0 blocks
    with pytest.raises(ValueError, match="path: .*block size"):
        load_gguf(rows)
    with pytest.raises(FileNotFoundError, match="path: no GGUF file"):
        load_gguf(tmp_path / "missing.gguf")


def test_other_architectures_are_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="path: .*'gpt2' model; load_gguf reads the 'llama'"):
        load_gguf(path)


def test_cli_export_reports_a_missing_file(tmp_path, capsys):
    from qlab.cli import main

    assert main(["export", str(tmp_path / "missing.safetensors"), "--format", "gguf", "-o", "x.gguf"]) == 1
    assert "qlab export: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "x.safetensors", "--format", "onnx", "-o", "x.gguf"])


def test_cli_export_float_types(tmp_path, capsys):
    from gguf import GGUFReader

    from qlab.cli import main

    out = tmp_path / "f32.gguf"
    args = ["export", "smollm2-135m", "--float-type", "F32", "--embedding-type", "F32", "-o", str(out)]
    assert main(args) == 0
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "F32" and types["token_embd.weight"] == "F32"
    assert main(["export", "smollm2-135m", "--float-type", "F99", "-o", str(tmp_path / "x.gguf")]) == 1
    assert "float_type: expected one of" in capsys.readouterr().err
