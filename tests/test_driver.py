"""The model driver: quantize_model / dequantize_model / memory_footprint on small models."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from qlab.config import QuantConfig
from qlab.driver import dequantize_model, quant_linears, quantize_model
from qlab.footprint import memory_footprint
from qlab.nn import QuantLinear, use_path

K, N = 256, 64


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


# ------------------------------------------------------------------------------------------------
# Whole models
# ------------------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, K)
        self.fc1 = nn.Linear(K, K)
        self.fc2 = nn.Linear(K, K)
        self.fc2b = nn.Linear(K, K)
        self.fc2b.weight, self.fc2b.bias = self.fc2.weight, self.fc2.bias  # one linear, two names
        self.lm_head = nn.Linear(K, 50, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = self.fc2(torch.relu(self.fc1(h))) + self.fc2b(h)
        return self.lm_head(h)


def test_quantize_model_skip_overrides_and_ties():
    torch.manual_seed(0)
    model = Toy()
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        ref = model(ids)
    cfg = QuantConfig("rtn", 4, 64, skip=(), overrides={"fc1": {"bits": 8, "group_size": None}})
    with pytest.warns(UserWarning, match="lm_head shares its weight with embed.weight"):
        quantize_model(model, cfg, progress=False)
    q = quant_linears(model)
    assert set(q) == {"fc1", "fc2", "fc2b"}
    assert isinstance(model.lm_head, nn.Linear)  # tied to the float embedding: left alone
    assert model.fc2 is model.fc2b  # shared weight -> one quantized layer
    assert q["fc1"].spec.bits == 8 and q["fc2"].spec.bits == 4
    with torch.no_grad():
        y = model(ids)
    assert rel_err(y, ref) < 0.1
    assert model.qlab_config is cfg


def test_linears_sharing_a_weight_but_not_a_bias_stay_two_layers():
    torch.manual_seed(0)
    a, b = nn.Linear(K, N), nn.Linear(K, N)
    b.weight = a.weight
    model = nn.ModuleDict({"a": a, "b": b})
    x = torch.randn(3, K)
    with torch.no_grad():
        ref = {n: m(x) for n, m in model.items()}
    quantize_model(model, QuantConfig("rtn", 8, None), progress=False)
    assert model["a"] is not model["b"]
    with torch.no_grad():
        for n, m in model.items():
            assert rel_err(m(x), ref[n]) < 0.01


def test_quantize_model_default_skips_lm_head_and_dequantize_model_inverts():
    torch.manual_seed(0)
    model = Toy(tie=False)
    ids = torch.randint(0, 50, (2, 5))
    quantize_model(model, QuantConfig("nf4", 4, 64), progress=False)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.fc1, QuantLinear)
    with torch.no_grad(), use_path("reference"):
        yq = model(ids)
    fp = memory_footprint(model)
    assert fp.total_now < fp.total_float
    row = next(r for r in fp.rows if r.kind == "QuantLinear")
    assert row.count == 2  # fc2 and fc2b are one module
    assert row.bytes_float == 2 * (K * K * 4 + K * 4)
    dequantize_model(model)
    assert not quant_linears(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), yq, rtol=1e-5, atol=1e-5)


def test_quantize_model_conv1d_and_errors():
    transformers = pytest.importorskip("transformers")
    model = nn.Sequential(
        transformers.pytorch_utils.Conv1D(K, K), nn.ReLU(), transformers.pytorch_utils.Conv1D(N, K)
    )
    quantize_model(model, QuantConfig("rtn", 4, 128), progress=False)
    assert all(isinstance(model[i], QuantLinear) for i in (0, 2))
    with pytest.raises(TypeError, match="config"):
        quantize_model(model, {"method": "rtn"})
    with pytest.raises(TypeError, match="model"):
        quantize_model("not a model", QuantConfig())


def test_quantize_model_runs_registry_methods():
    torch.manual_seed(0)
    model = Toy(tie=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_model(model, QuantConfig("hqq", 4, 64), progress=False)
    assert isinstance(model.fc1, QuantLinear)
    assert math.isfinite(model(torch.randint(0, 50, (1, 3))).sum().item())


def test_group_size_that_does_not_divide_falls_back_with_a_warning():
    model = nn.Sequential(nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 8))  # 192 = 1.5 * 128
    with pytest.warns(UserWarning, match=r"group_size=64 \(in_features=192\)"):
        quantize_model(model, QuantConfig("rtn", 4, 128), progress=False)
    assert model[0].spec.group_size == 64  # 192 = 3 * 64
    assert model[2].spec.group_size == 64  # a group larger than the row: one group per row
