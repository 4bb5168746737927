"""Calibration plumbing: input checks, input capture, Hessians, block-by-block decoder traversal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlab.calibration import (
    HessianAccumulator,
    capture_inputs,
    check_calibration,
    decoder_layers,
    hessian,
    layer_inputs,
    run_layer,
)


def test_check_calibration_accepts_batches_and_names_the_problem() -> None:
    ids = torch.randint(0, 10, (4, 16))
    assert check_calibration(ids) is ids
    assert check_calibration(torch.randn(3, 8)) is not None
    with pytest.raises(ValueError, match="GPTQ needs calibration data"):
        check_calibration(None, method="GPTQ")
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        check_calibration([[1, 2]])
    with pytest.raises(ValueError, match="at least 2 dims"):
        check_calibration(torch.arange(5))
    with pytest.raises(ValueError, match="at least 8 calibration samples, got 4"):
        check_calibration(ids, min_samples=8)
    with pytest.raises(ValueError, match="NaN"):
        check_calibration(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="bool"):
        check_calibration(torch.ones(2, 3, dtype=torch.bool))


def test_hessian_is_two_xtx_over_n_and_accumulates() -> None:
    x = torch.randn(3, 50, 12, generator=torch.Generator().manual_seed(0))
    rows = x.reshape(-1, 12).double()
    torch.testing.assert_close(hessian(x), (2 * rows.T @ rows / rows.shape[0]).float())
    acc = HessianAccumulator(12)
    for chunk in x:
        acc.add(chunk)
    torch.testing.assert_close(acc.value(), hessian(x))
    with pytest.raises(ValueError, match="expected 12 features, got 5"):
        acc.add(torch.randn(4, 5))
    with pytest.raises(ValueError, match="never ran"):
        HessianAccumulator(3).value()


def test_capture_inputs_records_rows_and_shared_sources() -> None:
    torch.manual_seed(0)
    a, b, c = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(4, 2)
    x = torch.randn(5, 3, 8)
    with capture_inputs({"a": a, "b": b, "c": c}) as seen:
        y = a(x)
        b(x)
        c(y)
        c(y)
    assert seen["a"].cat().shape == (15, 8) and len(seen["c"].rows) == 2
    assert seen["a"].source == seen["b"].source != seen["c"].source
    torch.testing.assert_close(seen["c"].cat(), torch.cat([y.reshape(-1, 4)] * 2))
    assert not a._forward_pre_hooks  # hooks are removed on exit


def test_block_by_block_traversal_reproduces_the_model() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 10))
    prefix, layers = decoder_layers(model)  # type: ignore[misc]
    assert prefix == "model.layers" and len(layers) == 3
    inputs = layer_inputs(model, layers, ids)
    h = inputs.hidden
    for layer in layers:
        h = run_layer(layer, h, inputs)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(model.model.norm(h), expected, rtol=1e-5, atol=1e-5)
    assert decoder_layers(nn.Sequential(nn.Linear(2, 2))) is None
