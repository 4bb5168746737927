"""Every registry method through the one driver on small models: data-driven ones beat RTN."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from qlab.compare import compare_methods, fitting_group, format_table, group_overrides
from qlab.config import QuantConfig
from qlab.driver import quant_linears, quantize_model, quantized_bits_per_weight
from qlab.nn import Int8Linear, QuantLinear


def quantize_with(method: str, model: nn.Module, cfg: QuantConfig, calib=None, **kw) -> nn.Module:
    return quantize_model(model, replace(cfg, method=method), calib, progress=False, **kw)


class Toy(nn.Module):
    """LayerNorm -> two linears reading the same input -> product -> linear: the shape of an MLP block."""

    def __init__(self, d: int = 64, h: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.gate = nn.Linear(d, h)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(y)) * self.up(y))


def toy_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = Toy()
    with torch.no_grad():
        model.norm.weight.mul_(torch.rand(64) * 4)  # uneven channel scales, as in trained models
        model.norm.weight[[5, 40]] *= 10
    g = torch.Generator().manual_seed(seed + 1)
    calib = torch.randn(16, 8, 64, generator=g)
    test = torch.randn(16, 8, 64, generator=g)
    return model, calib, test


def err(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x) - ref(x)).pow(2).mean().item()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_data_driven_methods_beat_rtn_on_a_toy_block(method: str) -> None:
    model, calib, test = toy_and_data()
    cfg = QuantConfig(bits=3, group_size=32)
    rtn = copy.deepcopy(model)
    quantize_with("rtn", rtn, cfg)
    ours = copy.deepcopy(model)
    quantize_with(method, ours, cfg, calib)
    assert set(quant_linears(ours)) == {"gate", "up", "down"}
    assert err(ours, model, calib) < 0.8 * err(rtn, model, calib)
    assert err(ours, model, test) < err(rtn, model, test)
    assert quantized_bits_per_weight(ours) == pytest.approx(3 + 2 * 32 / 32, rel=0.01)  # fp32 scale + zero


def test_awq_folds_into_norm_and_previous_linear() -> None:
    model, calib, _ = toy_and_data()
    before = model.norm.weight.detach().clone()
    quantize_with("awq", model, QuantConfig(bits=4, group_size=32), calib)
    # gate/up fold into the norm, down into up's rows: no layer keeps an input scale
    assert all(m.input_scale is None for m in quant_linears(model).values())
    assert not torch.equal(model.norm.weight, before)


def test_hqq_needs_no_data_and_beats_rtn_on_weight_lp_error() -> None:
    model, _, _ = toy_and_data()
    cfg = QuantConfig(bits=2, group_size=32)
    hqq = quantize_with("hqq", copy.deepcopy(model), cfg)
    for name, layer in quant_linears(hqq).items():
        w = model.get_submodule(name).weight.detach()
        rtn = QuantLinear.from_linear(model.get_submodule(name), cfg).dequantize().float()
        assert (w - layer.dequantize()).abs().pow(0.7).mean() < (w - rtn).abs().pow(0.7).mean()


def test_w8a8_methods_with_an_outlier_channel() -> None:
    model, calib, test = toy_and_data()
    calib[..., 7] *= 50
    test[..., 7] *= 50
    cfg = QuantConfig(bits=8, group_size=None)
    for method in ("smoothquant", "llm_int8"):
        q = copy.deepcopy(model)
        quantize_with(method, q, cfg, calib if method == "smoothquant" else None)
        assert isinstance(q.gate, Int8Linear)
        assert err(q, model, test) < 1e-2 * test.pow(2).mean().item()


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_decoder_is_processed_block_by_block(method: str) -> None:
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 97, (8, 32), generator=g)
    cfg = QuantConfig(bits=3, group_size=32)
    rtn = copy.deepcopy(model)
    quantize_with("rtn", rtn, cfg)
    q = copy.deepcopy(model)
    quantize_with(method, q, cfg, calib)
    assert len(quant_linears(q)) == 2 * 7 and "lm_head" not in quant_linears(q)

    def logits_err(m: nn.Module, x: torch.Tensor) -> float:
        with torch.no_grad():
            return (m(x).logits - model(x).logits).pow(2).mean().item()

    assert logits_err(q, calib) < logits_err(rtn, calib)


def test_bad_inputs_raise_clear_errors() -> None:
    model, calib, _ = toy_and_data()
    cfg = QuantConfig(bits=4, group_size=32)
    for method in ("gptq", "awq", "smoothquant"):
        bits_cfg = cfg if method != "smoothquant" else QuantConfig(bits=8, group_size=None)
        with pytest.raises(ValueError, match="needs calibration data"):
            quantize_with(method, copy.deepcopy(model), bits_cfg, None)
        with pytest.raises(ValueError, match="at least 2 calibration samples"):
            quantize_with(method, copy.deepcopy(model), bits_cfg, calib[:1])
    with pytest.raises(ValueError, match="calibration: method 'hqq' uses no data"):
        quantize_with("hqq", copy.deepcopy(model), cfg, calib)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_with("magic", model, cfg, calib)
    with pytest.raises(ValueError, match="not understood by 'gptq'"):
        QuantConfig("gptq", bits=4, group_size=32, method_kwargs={"dmap": 0.1})
    with pytest.raises(ValueError, match="takes bits=8"):
        quantize_with("llm_int8", model, cfg)
    with pytest.raises(TypeError, match="calibration: expected a torch.Tensor"):
        quantize_with("gptq", model, cfg, [[1, 2]])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):  # wrong feature width: the model itself refuses the batch
        quantize_with("gptq", copy.deepcopy(model), cfg, torch.randn(4, 8, 63))


@pytest.mark.parametrize("method", ["gptq", "awq", "hqq", "llm_int8", "smoothquant", "fp8"])
def test_every_method_gets_conv1d_and_shared_weights(method: str) -> None:
    """The driver's model handling (GPT-2 Conv1D, linears sharing a weight) holds for every method."""
    transformers = pytest.importorskip("transformers")

    class Gpt2ish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.c_fc = transformers.pytorch_utils.Conv1D(128, 64)  # weight [in, out]
            self.a = nn.Linear(128, 64)
            self.b = nn.Linear(128, 64)
            self.b.weight, self.b.bias = self.a.weight, self.a.bias  # one linear under two names

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.c_fc(self.norm(x)))
            return self.a(h) + self.b(h)

    torch.manual_seed(0)
    model = Gpt2ish()
    torch.nn.init.normal_(model.c_fc.weight, std=0.05)
    x = torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    bits = 8 if method in ("llm_int8", "smoothquant", "fp8") else 4
    calibrated = method in ("gptq", "awq", "smoothquant")
    quantize_with(method, model, QuantConfig(bits=bits, group_size=32), x if calibrated else None)
    kind = Int8Linear if method in ("llm_int8", "smoothquant") else QuantLinear
    assert isinstance(model.c_fc, kind) and isinstance(model.a, kind)
    assert model.a is model.b
    with torch.no_grad():
        y = model(x)
    # 4 bits g32 on this small random layer costs ~25%; a Conv1D weight read untransposed would give ~140%
    assert ((y - ref).norm() / ref.norm()).item() < (0.05 if bits == 8 else 0.5)


def test_group_fitting_for_odd_widths() -> None:
    assert fitting_group(576, 128) == 144 and fitting_group(1536, 128) == 128 and fitting_group(576, 64) == 64
    over = group_overrides(tiny_llama(), 48)
    assert over["model.layers.0.self_attn.q_proj"] == {"group_size": 64}
    assert over["model.layers.0.mlp.down_proj"] == {"group_size": 64}  # 128 = 2 x 64
    assert "lm_head" in over and len(over) == 2 * 7 + 1


@pytest.mark.slow  # scores perplexity on the evaluation plays (needs `qlab fetch`)
def test_compare_methods_rows_on_a_tiny_model() -> None:
    pytest.importorskip("transformers")

    class Tok:
        def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
            return {"input_ids": [ord(c) % 97 for c in text]}

    import qlab.models as models

    orig = models.calibration_batches
    try:
        models.calibration_batches = lambda tok, n_samples, seq_len, seed: torch.randint(  # type: ignore[assignment]
            0, 97, (n_samples, seq_len), generator=torch.Generator().manual_seed(seed)
        )
        rows = compare_methods(
            ("rtn", "hqq"), ((4, 32),), nf4=False, n_samples=4, seq_len=16, eval_seq_len=16, eval_windows=2,
            loader=lambda: (tiny_llama(), Tok()), progress=False,
        )  # fmt: skip
    finally:
        models.calibration_batches = orig
    assert [r["method"] for r in rows] == ["fp32", "rtn", "hqq"]
    assert rows[1]["bits_per_weight"] == pytest.approx(4 + 64 / 32)
    assert "| int4 g32 | hqq |" in format_table(rows)
