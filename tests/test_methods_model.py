"""quantize_model_with on small models: every method runs, data-driven ones beat RTN, bad input fails."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qlab.config import QuantConfig
from qlab.methods import Int8Linear, compare_methods, quantize_model_with
from qlab.methods.compare import fitting_group, format_table, group_overrides
from qlab.nn import QuantLinear


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
    quantize_model_with("rtn", rtn, cfg)
    ours = copy.deepcopy(model)
    res = quantize_model_with(method, ours, cfg, calib, progress=False)
    assert set(res.tensors) == {"gate", "up", "down"}
    assert all(isinstance(getattr(ours, n), QuantLinear) for n in ("gate", "up", "down"))
    assert err(ours, model, calib) < 0.8 * err(rtn, model, calib)
    assert err(ours, model, test) < err(rtn, model, test)
    assert res.bits_per_weight == pytest.approx(3 + 2 * 32 / 32, rel=0.01)  # fp32 scale + zero per 32


def test_awq_folds_into_norm_and_previous_linear() -> None:
    model, calib, _ = toy_and_data()
    before = model.norm.weight.detach().clone()
    res = quantize_model_with("awq", model, QuantConfig(bits=4, group_size=32), calib, progress=False)
    assert res.input_scales == {}  # gate/up fold into the norm, down into up's rows
    assert not torch.equal(model.norm.weight, before)


def test_hqq_needs_no_data_and_beats_rtn_on_weight_lp_error() -> None:
    model, _, _ = toy_and_data()
    cfg = QuantConfig(bits=2, group_size=32)
    res = quantize_model_with("hqq", copy.deepcopy(model), cfg)
    for name, qt in res.tensors.items():
        w = model.get_submodule(name).weight.detach()
        rtn = QuantLinear.from_linear(model.get_submodule(name), cfg).dequantize().float()
        assert (w - qt.dequantize()).abs().pow(0.7).mean() < (w - rtn).abs().pow(0.7).mean()


def test_w8a8_methods_with_an_outlier_channel() -> None:
    model, calib, test = toy_and_data()
    calib[..., 7] *= 50
    test[..., 7] *= 50
    cfg = QuantConfig(bits=8, group_size=None)
    for method in ("smoothquant", "llm_int8"):
        q = copy.deepcopy(model)
        quantize_model_with(method, q, cfg, calib if method == "smoothquant" else None, progress=False)
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
    quantize_model_with("rtn", rtn, cfg)
    q = copy.deepcopy(model)
    res = quantize_model_with(method, q, cfg, calib, progress=False)
    assert len(res.tensors) == 2 * 7 and "lm_head" not in res.tensors

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
            quantize_model_with(method, copy.deepcopy(model), bits_cfg, None)
        with pytest.raises(ValueError, match="at least 2 calibration samples"):
            quantize_model_with(method, copy.deepcopy(model), bits_cfg, calib[:1])
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_model_with("magic", model, cfg, calib)
    with pytest.raises(ValueError, match="not understood by 'gptq'"):
        quantize_model_with(
            "gptq", model, QuantConfig(bits=4, group_size=32, method_kwargs={"dmap": 0.1}), calib
        )
    with pytest.raises(ValueError, match="W8A8"):
        quantize_model_with("llm_int8", model, cfg)
    with pytest.raises(TypeError, match="calibration: expected a torch.Tensor"):
        quantize_model_with("gptq", model, cfg, [[1, 2]])  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):  # wrong feature width: the model itself refuses the batch
        quantize_model_with("gptq", copy.deepcopy(model), cfg, torch.randn(4, 8, 63), progress=False)


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
