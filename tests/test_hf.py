"""qlab as a transformers backend (qlab.hf): round trips, on-the-fly loading, failures that must be loud.

A 2-layer Llama built from a config and saved to a temporary folder stands in for a real model;
one slow test loads SmolLM2 on the fly in a subprocess and compares its peak memory with fp32 loading.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.quantizers.auto import AutoQuantizationConfig  # noqa: E402

import qlab  # noqa: E402
from qlab.driver import quantized_layers  # noqa: E402
from qlab.hf import MARKER, QlabConfig, QlabHfQuantizer  # noqa: E402
from qlab.io import QuantizedFileError, load_quantized, save_quantized  # noqa: E402
from qlab.registry import data_free_methods  # noqa: E402

VOCAB = 96
#: (method, bits, group_size) for every method of the registry; rtn at 2, 3, 4 and 8 bits.
CASES = [
    ("rtn", 2, 32),
    ("rtn", 3, 32),
    ("rtn", 4, 32),
    ("rtn", 8, None),
    ("nf4", 4, 32),
    ("fp4", 4, 32),
    ("fp8", 8, None),
    ("w8a8", 8, None),
    ("hqq", 4, 32),
    ("llm_int8", 8, None),
    ("gptq", 4, 32),
    ("awq", 4, 32),
    ("smoothquant", 8, None),
    ("mxfp4", 4, 32),
    ("nvfp4", 4, 16),
]
DATA_FREE = [c for c in CASES if c[0] in data_free_methods()]


def tiny_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaConfig(**{**base, **kw})


def make_float_folder(path, seed: int = 0, **kw) -> str:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # weights large enough that 2-bit codes still change the logits
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> str:
    return make_float_folder(tmp_path_factory.mktemp("tiny") / "float")


def tokens(seed: int, shape=(1, 12)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g)


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def greedy(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)


#: Small searches keep the calibrated methods fast on a 64-wide model.
KWARGS = {"awq": {"grid": 4}, "hqq": {"iters": 5}}


def quantize(float_dir: str, method: str, bits: int, group_size: int | None):
    model = LlamaForCausalLM.from_pretrained(float_dir).eval()
    calib = tokens(7, (2, 16)) if method in ("gptq", "awq", "smoothquant") else None
    cfg = qlab.QuantConfig(method, bits, group_size, method_kwargs=KWARGS.get(method, {}))
    return qlab.quantize_model(model, cfg, calib, progress=False)


@pytest.fixture(scope="module")
def float_logits(float_dir) -> torch.Tensor:
    return logits(LlamaForCausalLM.from_pretrained(float_dir), tokens(1))


@pytest.mark.parametrize(("method", "bits", "group_size"), CASES, ids=[f"{m}{b}" for m, b, _ in CASES])
def test_save_pretrained_round_trip_is_bit_identical(
    float_dir, float_logits, tmp_path, method, bits, group_size
):
    model = quantize(float_dir, method, bits, group_size)
    x = tokens(1)
    before, text = logits(model, x), greedy(model, x)
    model.save_pretrained(tmp_path / "hf")
    save_quantized(model, tmp_path / "q.safetensors")

    saved = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "qlab" and saved["method"] == method and saved["bits"] == bits
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["qlab"])["format"] == "qlab-quantized"
        marker = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert bytes(marker.tolist()) == MARKER  # the float name holds the marker, never a float weight

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    via_io = load_quantized(tmp_path / "q.safetensors")
    layers = quantized_layers(loaded)
    assert len(layers) == 14  # 7 linears x 2 blocks; lm_head and embeddings stay float
    assert all(type(m) is type(quantized_layers(model)[n]) for n, m in layers.items())
    assert not any(type(m) is nn.Linear for n, m in loaded.named_modules() if n.startswith("model.layers"))
    assert torch.equal(logits(loaded, x), before)
    assert torch.equal(logits(via_io, x), before)
    assert torch.equal(greedy(loaded, x), text)
    assert not torch.equal(before, float_logits)  # the layers really are quantized


@pytest.mark.parametrize(
    ("method", "bits", "group_size"), DATA_FREE, ids=[f"{m}{b}" for m, b, _ in DATA_FREE]
)
def test_on_the_fly_matches_quantize_model(float_dir, method, bits, group_size):
    cfg = QlabConfig(method=method, bits=bits, group_size=group_size, method_kwargs=KWARGS.get(method, {}))
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg)
    reference = quantize(float_dir, method, bits, group_size)
    assert set(quantized_layers(model)) == set(quantized_layers(reference))
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    x = tokens(2)
    assert torch.equal(logits(model, x), logits(reference, x))


def test_on_the_fly_with_biases_and_save(tmp_path):
    """Biases arrive as their own tensors; they must end up in the quantized layers."""
    folder = make_float_folder(tmp_path / "float", seed=3, attention_bias=True, mlp_bias=True)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=QlabConfig("rtn", 4, 32))
    reference = quantize(folder, "rtn", 4, 32)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    x = tokens(4)
    assert torch.equal(logits(model, x), logits(reference, x))
    model.save_pretrained(tmp_path / "hf")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), x), logits(model, x))


def test_dequantize_gives_float_linears(float_dir):
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=QlabConfig("rtn", 4, 32))
    x = tokens(5)
    expected = qlab.dequantize_model(quantize(float_dir, "rtn", 4, 32))
    model = model.dequantize()
    assert not quantized_layers(model)
    assert getattr(model.config, "quantization_config", None) is None
    assert torch.equal(logits(model, x), logits(expected, x))


def test_qlab_config_is_json_and_validated():
    cfg = QlabConfig("hqq", 3, 64, skip=["lm_head"], method_kwargs={"iters": 5})
    d = json.loads(json.dumps(cfg.to_dict()))
    again = AutoQuantizationConfig.from_dict(d)
    assert isinstance(again, QlabConfig) and again.to_dict() == cfg.to_dict()
    assert again.to_quant_config() == qlab.QuantConfig(
        "hqq", 3, 64, skip=("lm_head",), method_kwargs={"iters": 5}
    )

    with pytest.raises(ValueError, match="method must be one of"):
        QlabConfig(method="int3")
    with pytest.raises(ValueError, match="bits: method 'nf4' takes bits=4"):
        QlabConfig(method="nf4", bits=3)
    with pytest.raises(ValueError, match="bits: method 'rtn'"):
        QlabConfig(method="rtn", bits=9)
    with pytest.raises(ValueError, match="method_kwargs must hold JSON values"):
        QlabConfig(method="hqq", method_kwargs={"iters": torch.tensor(3)})
    with pytest.raises(ValueError, match="method_kwargs"):
        QlabConfig(method="rtn", method_kwargs={"damp": 0.1})
    with pytest.raises(ValueError, match=r"overrides\['\*mlp\*'\]: unknown fields \['dtype'\]"):
        QlabConfig(overrides={"*mlp*": {"dtype": "float16"}})
    with pytest.raises(ValueError, match="bits"):
        QlabConfig(overrides={"*mlp*": {"bits": 11}})
    with pytest.raises(ValueError, match="unknown fields"):
        QlabConfig(bitz=4)
    with pytest.raises(ValueError, match="skip must be a list"):
        QlabConfig(skip="lm_head")
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        QlabConfig(format_version=99)


def test_calibrated_method_cannot_load_on_the_fly(float_dir):
    with pytest.raises(ValueError, match="needs calibration data"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=QlabConfig("gptq", 4, 32))


@pytest.fixture(scope="module")
def rtn_dir(float_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("rtn") / "hf"
    quantize(float_dir, "rtn", 4, 32).save_pretrained(out)
    return str(out)


def test_newer_format_version_is_refused(rtn_dir, tmp_path):
    import shutil

    # in config.json
    folder = tmp_path / "cfg"
    shutil.copytree(rtn_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 2 is newer than this qlab reads"):
        AutoModelForCausalLM.from_pretrained(folder)
    # in the safetensors header
    folder = tmp_path / "header"
    shutil.copytree(rtn_dir, folder)
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(meta["qlab"])
    doc["format_version"] = 2
    save_file(tensors, str(path), metadata={**meta, "qlab": json.dumps(doc)})
    with pytest.raises(QuantizedFileError, match="format_version 2 is newer"):
        AutoModelForCausalLM.from_pretrained(folder)


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_without_qlab_loading_fails_loudly(rtn_dir, tmp_path):
    """transformers alone does not know quant_method "qlab": it warns and tries float weights. The
    marker tensors make that a size-mismatch error, never a silently random model."""
    out = run_python(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({rtn_dir!r})
        except RuntimeError as err:
            print("RAISED", type(err).__name__, "ignore_mismatched_sizes" in str(err))
        else:
            print("LOADED SILENTLY")
        print("qlab imported:", "qlab" in sys.modules)
        import qlab  # transformers' quantizer table is loaded: qlab registers at once, the folder loads
        model = AutoModelForCausalLM.from_pretrained({rtn_dir!r})
        print("after import qlab:", type(model.model.layers[0].mlp.up_proj).__name__)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "RAISED RuntimeError True" in out.stdout and "qlab imported: False" in out.stdout
    assert "Unknown quantization type, got qlab" in out.stderr
    assert "q_proj.weight" in out.stderr and "MISMATCH" in out.stderr
    assert "after import qlab: QuantLinear" in out.stdout


def test_import_qlab_registers_lazily(tmp_path):
    out = run_python(
        """
        import sys, qlab
        print("transformers after import qlab:", "transformers" in sys.modules)
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING
        print(AUTO_QUANTIZER_MAPPING["qlab"].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING["qlab"].__name__)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [
        "transformers after import qlab: False",
        "QlabHfQuantizer QlabConfig",
    ]
    assert QlabHfQuantizer(QlabConfig()).is_serializable() and QlabHfQuantizer(QlabConfig()).is_trainable


RSS_SCRIPT = """
import json, sys, torch
import qlab
from transformers import AutoModelForCausalLM
from qlab.cache import require
torch.set_num_threads(2)
def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
# VmHWM, not ru_maxrss: ru_maxrss survives execve, so a child of a large pytest process would report
# its parent's size as its own peak.
def rss_mb():
    return status_mb("VmRSS")
base = rss_mb()
kw = {{}} if {method!r} is None else {{"quantization_config": qlab.hf.QlabConfig({method!r}, 4, 64)}}
model = AutoModelForCausalLM.from_pretrained(str(require("smollm2-135m")), **kw)
peak = status_mb("VmHWM")
# safetensors maps the file: a float load leaves weights unread until used. Touch every tensor.
touched = sum(float(t.float().sum()) for t in model.state_dict().values())
resident = status_mb("VmHWM")
layers = qlab.driver.quantized_layers(model)
qbytes = sum(m.nbytes for m in layers.values())
fbytes = sum(m.float_nbytes() for m in layers.values())
total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
anon = [int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("RssAnon:")][0]
out = {{"base": base, "peak": peak, "resident": resident, "anon": anon, "layers": len(layers)}}
print(json.dumps({{**out, "qbytes": qbytes, "fbytes": fbytes, "model_bytes": total}}))
"""


@pytest.mark.slow
def test_smollm2_on_the_fly_peak_memory(fetched, tmp_path):
    """Peak resident memory of loading SmolLM2 with nf4 on the fly against plain fp32 loading, each in
    a fresh process (VmHWM; the RSS after imports is subtracted)."""
    runs = {}
    for method in (None, "nf4"):
        out = run_python(RSS_SCRIPT.format(method=method), tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[method] = json.loads(out.stdout.strip().splitlines()[-1])
    f32, q = runs[None], runs["nf4"]
    f32_load, f32_used = f32["peak"] - f32["base"], f32["resident"] - f32["base"]
    q_load = q["peak"] - q["base"]
    float_mb, quant_mb = f32["model_bytes"] / 2**20, q["model_bytes"] / 2**20
    print(
        f"\nSmolLM2 peak RSS over imports: fp32 from_pretrained +{f32_load:.0f} MB (mmap, weights unread), "
        f"+{f32_used:.0f} MB once every weight is read (state dict {float_mb:.0f} MB); nf4 on the fly "
        f"+{q_load:.0f} MB (state dict {quant_mb:.0f} MB, {q['layers']} layers; anonymous memory after "
        f"loading {q['anon']:.0f} MB vs fp32 {f32['anon']:.0f} MB, the rest is the mapped file)"
    )
    assert q["layers"] == 210
    assert q_load < float_mb + quant_mb  # never the whole float model plus its quantized copy


def test_bert_encoder_through_automodel(tmp_path):
    """An encoder (MiniLM's architecture, tiny) through AutoModel: on the fly, then save and reload."""
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64,
    )  # fmt: skip
    BertModel(cfg).eval().save_pretrained(tmp_path / "float")
    model = AutoModel.from_pretrained(tmp_path / "float", quantization_config=QlabConfig("rtn", 4, 32))
    assert len(quantized_layers(model)) == 2 * 6 + 1  # q, k, v, attn out, intermediate, out; the pooler
    x = tokens(6)
    with torch.no_grad():
        before = model(x).last_hidden_state
    model.save_pretrained(tmp_path / "hf")
    loaded = AutoModel.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, before)


def test_qlab_io_file_and_hf_folder_convert_both_ways(float_dir, tmp_path):
    from qlab.hf import export_pretrained, import_pretrained

    model = quantize(float_dir, "gptq", 4, 32)
    x = tokens(8)
    before = logits(model, x)
    save_quantized(model, tmp_path / "a.safetensors")
    export_pretrained(tmp_path / "a.safetensors", tmp_path / "hf")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), x), before)
    import_pretrained(tmp_path / "hf", tmp_path / "b.safetensors")
    assert torch.equal(logits(load_quantized(tmp_path / "b.safetensors"), x), before)
    with (
        safe_open(str(tmp_path / "a.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "hf/model.safetensors"), "pt") as h,
    ):
        extra = set(json.loads(a.metadata()["qlab"])["extra_buffers"])  # qlab.io also keeps rotary tables
        shared = set(a.keys()) - extra
        assert {k for k in h.keys() if not k.endswith(".weight") or k in shared} == shared
        assert all(torch.equal(a.get_tensor(k), h.get_tensor(k)) for k in shared)  # the same bytes
