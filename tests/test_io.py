"""save_quantized / load_quantized: byte-exact round trips and a clear error for every corrupt file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

from qlab.config import QuantConfig
from qlab.driver import quantize_model
from qlab.io import FORMAT_VERSION, QuantizedFileError, load_quantized, read_metadata, save_quantized
from qlab.nn import QuantLinear

K = 128


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, K)
        self.a = nn.Linear(K, K)
        self.b = nn.Linear(K, 2 * K, bias=False)
        self.norm = nn.LayerNorm(2 * K)
        self.head = nn.Linear(2 * K, 40)
        self.register_buffer("table", torch.arange(4.0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.b(torch.relu(self.a(self.embed(ids)))))) + self.table.sum()


CONFIGS = [
    QuantConfig("rtn", 4, 64, skip=("embed",)),
    QuantConfig("rtn", 2, 32, skip=("embed",), overrides={"head": {"bits": 8, "group_size": None}}),
    QuantConfig("rtn", 3, 64, skip=("embed",)),
    QuantConfig("nf4", 4, 64, skip=("embed",)),
    QuantConfig("fp8", 8, None, skip=("embed",)),
    QuantConfig("w8a8", 8, None, skip=("embed",)),
]


def quantized_net(cfg: QuantConfig) -> Net:
    torch.manual_seed(0)
    return quantize_model(Net(), cfg, progress=False)


@pytest.fixture
def saved(tmp_path):
    model = quantized_net(CONFIGS[0])
    path = save_quantized(model, tmp_path / "net.safetensors")
    return model, path


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.method}{c.bits}g{c.group_size}")
def test_round_trip_is_byte_exact(tmp_path, cfg):
    model = quantized_net(cfg)
    path = save_quantized(model, tmp_path / "m.safetensors")
    loaded = load_quantized(path, Net)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(
            sd[k].view(torch.uint8), sd2[k].view(torch.uint8)
        ), k
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded.qlab_config == cfg
    assert read_metadata(path)["method"] == cfg.method


def test_loading_allocates_no_float_weights_for_quantized_layers(saved):
    _, path = saved
    seen = []

    def factory() -> Net:
        net = Net()
        seen.append(net.a.weight.device.type)
        return net

    loaded = load_quantized(path, factory)
    assert seen == ["meta"]  # the float skeleton never had real storage
    assert isinstance(loaded.a, QuantLinear) and loaded.a.qweight.device.type == "cpu"
    assert torch.equal(loaded.table, torch.arange(4.0))  # non-persistent buffers travel too


def test_load_into_existing_model(saved):
    model, path = saved
    loaded = load_quantized(path, Net())
    assert torch.equal(loaded.a.qweight, model.a.qweight)


def test_tied_weights_stored_once_and_retied(tmp_path):
    torch.manual_seed(0)
    model = Net()
    model.head = nn.Linear(K, 40, bias=False)
    model.b = nn.Identity()
    model.norm = nn.LayerNorm(K)
    model.head.weight = model.embed.weight
    with pytest.warns(UserWarning, match="head shares its weight with embed.weight"):
        quantize_model(model, QuantConfig("rtn", 4, 64), progress=False)

    def factory() -> Net:
        net = Net()
        net.head = nn.Linear(K, 40, bias=False)
        net.b = nn.Identity()
        net.norm = nn.LayerNorm(K)
        net.head.weight = net.embed.weight
        return net

    path = save_quantized(model, tmp_path / "tied.safetensors")
    assert read_metadata(path)["aliases"] == {"head.weight": "embed.weight"}
    loaded = load_quantized(path, factory)
    assert loaded.head.weight is loaded.embed.weight


# ------------------------------------------------------------------------------------------------
# Every corrupt file gets a clear error naming the problem
# ------------------------------------------------------------------------------------------------
def _header(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n])


def _rewrite_header(path, header: dict) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    body = json.dumps(header).encode()
    body += b" " * ((-len(body)) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


def _edit_qlab_meta(path, edit) -> None:
    _, header = _header(path)
    meta = json.loads(header["__metadata__"]["qlab"])
    edit(meta)
    header["__metadata__"]["qlab"] = json.dumps(meta)
    _rewrite_header(path, header)


def test_truncated_file(saved):
    _, path = saved
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(QuantizedFileError, match="truncated"):
        load_quantized(path, Net)
    path.write_bytes(raw[:5])
    with pytest.raises(QuantizedFileError, match="truncated"):
        load_quantized(path, Net)


def test_tampered_header_bytes(saved):
    _, path = saved
    raw = bytearray(path.read_bytes())
    raw[9] = ord("#")  # break the header's JSON
    path.write_bytes(bytes(raw))
    with pytest.raises(QuantizedFileError, match="corrupted header"):
        load_quantized(path, Net)


def test_tampered_qlab_metadata(saved):
    _, path = saved
    _, header = _header(path)
    header["__metadata__"]["qlab"] = "{not json"
    _rewrite_header(path, header)
    with pytest.raises(QuantizedFileError, match="not valid JSON"):
        load_quantized(path, Net)


def test_tampered_spec(saved):
    _, path = saved
    _edit_qlab_meta(path, lambda m: m["layers"]["a"]["spec"].update(bits=11))
    with pytest.raises(
        QuantizedFileError, match=r"layer a: invalid layer description.*bits must be an integer"
    ):
        load_quantized(path, Net)


@pytest.mark.parametrize("tensor", ["a.scale", "a.zero"])
def test_non_finite_stored_scale_is_refused(saved, tmp_path, tensor):
    """A NaN planted in a stored scale or zero-point would make every output of the layer NaN."""
    from safetensors.torch import load_file, save_file

    _, path = saved
    tensors = load_file(str(path))
    meta = read_metadata(path)
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[3] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata={"qlab": json.dumps(meta)})
    with pytest.raises(QuantizedFileError, match=rf"{tensor} holds 1 NaN/Inf value"):
        load_quantized(bad, Net)


def test_missing_tensor(saved):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "a.scale"}
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(QuantizedFileError, match="'a.scale' is missing"):
        load_quantized(path, Net)


def test_shape_mismatch(saved):
    _, path = saved
    _edit_qlab_meta(path, lambda m: m["layers"]["a"]["spec"].update(group_size=32))
    with pytest.raises(
        QuantizedFileError, match=r"'a.scale' has shape \[128, 2\] float32, the model expects \[128, 4\]"
    ):
        load_quantized(path, Net)


def test_dtype_mismatch(saved):
    _, path = saved
    _edit_qlab_meta(path, lambda m: m["layers"]["a"]["spec"].update(scale_dtype="float16"))
    with pytest.raises(
        QuantizedFileError, match="'a.scale' has shape .* float32, the model expects .* float16"
    ):
        load_quantized(path, Net)


def test_future_format_version(saved):
    _, path = saved
    _edit_qlab_meta(path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(QuantizedFileError, match="newer than this qlab reads"):
        load_quantized(path, Net)


def test_layer_not_in_model(saved):
    _, path = saved
    _edit_qlab_meta(path, lambda m: m["layers"].update({"nope": m["layers"]["a"]}))
    with pytest.raises(QuantizedFileError, match="layer nope in the file does not exist"):
        load_quantized(path, Net)


def test_unexpected_tensor(saved, tmp_path):
    model, _ = saved
    model.extra = nn.Linear(2, 2)  # saved, but the factory's model has no such layer
    path = save_quantized(model, tmp_path / "extra.safetensors")
    with pytest.raises(QuantizedFileError, match="has no place in the model"):
        load_quantized(path, Net)


def test_not_a_qlab_file_and_bad_arguments(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(p))
    with pytest.raises(QuantizedFileError, match="no qlab metadata"):
        load_quantized(p, Net)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_quantized(tmp_path / "absent.safetensors", Net)
    with pytest.raises(TypeError, match="model must be"):
        save_quantized("model", tmp_path / "x.safetensors")
    model = quantized_net(CONFIGS[0])
    path = save_quantized(model, tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="model_or_factory"):
        load_quantized(path, 3)
    with pytest.raises(ValueError, match="model_or_factory is required"):
        load_quantized(path)


@pytest.mark.slow
def test_smollm2_round_trip_without_factory(tmp_path):
    from qlab import models

    models.fetch("smollm2-135m", progress=False)
    model, _ = models.load_smollm2()
    quantize_model(model, QuantConfig("rtn", 4, 128), progress=False)
    path = save_quantized(model, tmp_path / "smollm2.safetensors", model_name="smollm2-135m")
    loaded = load_quantized(path)  # rebuilt from the transformers class and config in the file
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert read_metadata(path)["model"]["name"] == "smollm2-135m"


def _tiny_llama(tied: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig("rtn", 8, None, quantize_embeddings=True),
        QuantConfig("rtn", 4, 32, quantize_embeddings=True, overrides={"lm_head": {"bits": 8}}),
    ],
    ids=["int8", "int4-head8"],
)
def test_a_packed_embedding_round_trips(tmp_path, tied, cfg):
    """quantize_embeddings=True: the packed table (and a head tied to it, stored once) comes back bit for
    bit, with the tie restored as one module."""
    from qlab.nn import QuantEmbedding

    model = quantize_model(_tiny_llama(tied), cfg, progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    path = save_quantized(model, tmp_path / "x.safetensors")
    meta = read_metadata(path)
    assert meta["embeddings"] == {"model.embed_tokens": {"padding_idx": None}}
    loaded = load_quantized(path)  # rebuilt from the transformers class in the file
    emb = loaded.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and isinstance(loaded.lm_head, QuantLinear)
    assert (loaded.lm_head is emb.linear) == tied
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    ids = torch.tensor([[1, 7, 33, 2, 49, 0, 12]])
    with torch.inference_mode():
        want, got = model(ids).logits, loaded(ids).logits
        # independent reference: the float table the codes stand for, looked up and multiplied by hand
        table = model.model.embed_tokens.linear.dequantize(torch.float32)
        assert torch.equal(emb.rows(ids)[0], table[ids[0]])
    assert torch.equal(got, want)
    if tied:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            assert not any(k.startswith("lm_head.") for k in f.keys())  # the tied head is stored once


def test_a_packed_embedding_with_a_bad_description_is_refused(tmp_path):
    model = quantize_model(
        _tiny_llama(True), QuantConfig("rtn", 8, None, quantize_embeddings=True), progress=False
    )
    path = save_quantized(model, tmp_path / "x.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        doc = json.loads(f.metadata()["qlab"])
    doc["embeddings"] = {"model.norm": {"padding_idx": None}}  # no table described under model.norm.linear
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"qlab": json.dumps(doc)})
    with pytest.raises(QuantizedFileError, match="'embeddings'"):
        load_quantized(bad)
    doc["embeddings"] = {"model.layers.0.mlp": {"padding_idx": None}}
    doc["layers"]["model.layers.0.mlp.linear"] = doc["layers"]["model.embed_tokens.linear"]
    save_file(tensors, str(bad), metadata={"qlab": json.dumps(doc)})
    with pytest.raises(QuantizedFileError, match="embedding model.layers.0.mlp: the model has a LlamaMLP"):
        load_quantized(bad)
