"""The method registry is the one source of method facts: config, CLI, driver and explorer read it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlab import cli, explorer
from qlab.config import QuantConfig
from qlab.driver import quantize_layer
from qlab.nn import LAYER_TYPES
from qlab.registry import METHODS, Method, affine_spec, calibrated_methods, data_free_methods, get_method


def test_every_entry_is_consistent():
    for name, m in METHODS.items():
        assert m.name == name
        assert m.bits and all(1 <= b <= 8 for b in m.bits)
        assert (m.model_pass is not None) == m.calibrated and (m.build is not None) != m.calibrated
        spec = m.spec(m.bits[-1], 64, None)
        assert spec.bits == m.bits[-1] or m.layer in ("fp8", "w8a8", "int8")
    assert set(data_free_methods()) | set(calibrated_methods()) == set(METHODS)
    assert set(calibrated_methods()) == {"gptq", "awq", "smoothquant"}


def test_an_entry_needs_exactly_one_way_to_quantize():
    with pytest.raises(ValueError, match="exactly one of build"):
        Method("x", "nothing", (4,), False, True, "weight", affine_spec)
    with pytest.raises(ValueError, match="calibrated methods are exactly those"):
        Method(
            "x", "data but no pass", (4,), True, True, "weight", affine_spec, quantize_weight=lambda w, s: w
        )


@pytest.mark.parametrize("name", data_free_methods())
def test_every_data_free_method_builds_its_layer(name):
    m = METHODS[name]
    bits = 8 if 8 in m.bits and len(m.bits) == 1 else 4
    lin = nn.Linear(64, 32)
    layer = quantize_layer(lin, QuantConfig(name, bits, 32))
    expected = "Int8Linear" if m.layer == "int8" else "QuantLinear"
    assert type(layer).__name__ == expected and type(layer) in LAYER_TYPES.values()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (layer(x) - lin(x)).norm() / lin(x).norm()
    assert err < 0.2


def test_config_and_cli_read_the_registry():
    assert QuantConfig.__dataclass_fields__["method"].default in METHODS
    assert tuple(cli.METHODS) == tuple(METHODS)
    for name, m in METHODS.items():
        bad = 3 if 3 not in m.bits else 9
        with pytest.raises(ValueError, match=f"method '{name}' takes"):
            QuantConfig(name, bad)
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("spqr")
    with pytest.raises(ValueError, match="needs asymmetric codes"):
        QuantConfig("hqq", 4, 64, symmetric=True)


def test_explorer_offers_the_registry_weight_methods():
    free = {n.upper() for n, m in METHODS.items() if not m.calibrated and m.quantize_weight is not None}
    assert set(explorer.available_methods()) == free == {"RTN", "NF4", "FP4", "HQQ"}
    assert set(explorer.data_methods()) == {"GPTQ", "AWQ"}
