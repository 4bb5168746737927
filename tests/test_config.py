"""QuantConfig: specs, skip patterns, overrides, serialization, validation."""

from __future__ import annotations

import pytest

from qlab.config import QuantConfig


def test_defaults_and_specs():
    c = QuantConfig()
    assert c.spec().describe() == "int4 asym g128"
    assert QuantConfig(bits=8, group_size=None).spec().describe() == "int8 sym per-channel"
    assert QuantConfig(method="nf4", group_size=64).spec().describe() == "nf4 b64"


def test_skip_and_overrides():
    c = QuantConfig(overrides={"*.mlp.*": {"bits": 8, "group_size": None}})
    assert c.is_skipped("lm_head") and c.is_skipped("model.embed_tokens")
    assert not c.is_skipped("model.layers.0.self_attn.q_proj")
    assert c.for_module("model.layers.0.mlp.down_proj").spec().describe() == "int8 sym per-channel"
    assert c.for_module("model.layers.0.self_attn.q_proj").spec().describe() == "int4 asym g128"


def test_round_trip_dict():
    c = QuantConfig(method="hqq", bits=3, group_size=64, skip=("lm_head",), method_kwargs={"iters": 5})
    assert QuantConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "magic"}, "method"),
        ({"method": "nf4", "bits": 3}, "bits"),
        ({"method": "w8a8", "bits": 4}, "bits"),
        ({"bits": 9}, "bits"),
        ({"group_size": 0}, "group_size"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown"):
        QuantConfig.from_dict({"colour": "red"})
