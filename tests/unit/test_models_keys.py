"""Model registry and key names."""

from __future__ import annotations

import pytest
import torch

from agent_workers.errors import ModelError
from agent_workers.keys import Keys
from agent_workers.models import ModelSpec, architectures, make_spec, parameter_count, register_architecture


def test_builtin_architectures() -> None:
    assert {"linear", "mlp"} <= set(architectures())
    mlp = make_spec("mlp", in_features=64, hidden=[256, 256], out_features=10).build()
    assert parameter_count(mlp) == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def test_user_architecture_registers_and_round_trips() -> None:
    @register_architecture("tiny-test")
    def build(*, in_features: int) -> torch.nn.Module:
        return torch.nn.Linear(in_features, 2, bias=False)

    spec = make_spec("tiny-test", in_features=5)
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.input_shape == (5,)
    assert isinstance(again.build(), torch.nn.Linear)


def test_unknown_architecture_and_bad_config_are_model_errors() -> None:
    with pytest.raises(ModelError, match="unknown architecture 'nope'"):
        ModelSpec("nope", {}, (1,)).build()
    with pytest.raises(ModelError, match="rejected config"):
        make_spec("linear", in_features=3, colour="red")
    with pytest.raises(ModelError, match="needs in_features"):
        make_spec("linear")


def test_all_keys_of_a_model_share_one_hash_tag() -> None:
    k = Keys("aw")
    keys = [k.spec("m"), k.head("m"), k.blob("m", 3), k.staging("m", "x"), k.applied("m"), k.history("m")]
    assert all("{m}" in key and key.startswith("aw:model:") for key in keys)
    assert k.blob("m", 7) == "aw:model:{m}:blob:7"
