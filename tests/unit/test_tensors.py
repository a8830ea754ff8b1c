"""Signatures and the tensor codec (agent_workers/tensors.py), without a worker: parsing, every dtype in both
encodings, the checks a request fails alone on, limits before decoding, and the spec's compatibility."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
import torch

from agent_workers import numbers
from agent_workers.errors import InputError, ModelError
from agent_workers.models import ModelSpec, make_spec, register_architecture
from agent_workers.tensors import Signature, TensorSpec, decode_inputs, decode_tensor, encode_tensor

ISSUE_SIGNATURE = {
    "inputs": [{"name": "pixels", "dtype": "uint8", "shape": [3, 64, 64]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}],
}


def spec(dtype: str, shape: list[int]) -> TensorSpec:
    return TensorSpec("x", dtype, tuple(shape))


def test_the_issue_signature_round_trips_its_json_form() -> None:
    assert Signature.from_json(ISSUE_SIGNATURE).to_json() == ISSUE_SIGNATURE


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"inputs": []}, "at least one input"),
        ({"inputs": [{"name": "x", "dtype": "float64", "shape": [1]}]}, "float64"),
        ({"inputs": [{"name": "x", "dtype": "uint8", "shape": [0]}]}, "shape"),
        ({"inputs": [{"name": "x y", "dtype": "uint8", "shape": [1]}]}, "identifier"),
        ({"inputs": [{"name": "x", "dtype": "uint8", "shape": [1]}] * 2}, "repeat"),
        ({"input": []}, "signature is"),
    ],
)
def test_a_bad_signature_is_refused_naming_the_fault(data: Any, says: str) -> None:
    with pytest.raises(ModelError, match=says):
        Signature.from_json(data)


@pytest.mark.parametrize(
    "array",
    [
        np.array([[True, False], [False, True]]),
        np.array([[0, 255], [7, 128]], dtype=np.uint8),
        np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        np.array([-(2**63), 2**63 - 1, 5], dtype=np.int64),
        np.array([1.5, -0.25, 65504], dtype=np.float16),
        np.array([[0.1, -3e38]], dtype=np.float32),
    ],
)
def test_every_dtype_decodes_from_b64_to_the_same_array(array: np.ndarray) -> None:
    encoded = encode_tensor(array)
    decoded = decode_tensor(spec(encoded["dtype"], list(array.shape)), encoded, max_elements=100)
    assert decoded.dtype == array.dtype and np.array_equal(decoded, array)
    if encoded["dtype"] != "float16":  # lists carry every dtype but the 16-bit floats
        listed = decode_tensor(spec(encoded["dtype"], list(array.shape)), array.tolist(), max_elements=100)
        assert listed.dtype == array.dtype and np.array_equal(listed, array)


def test_bfloat16_travels_as_its_raw_bits() -> None:
    bf = torch.tensor([1.5, -0.25, 3.0e38], dtype=torch.bfloat16)
    raw = bf.view(torch.uint16).numpy()
    encoded = {"dtype": "bfloat16", "shape": [3], "b64": base64.b64encode(raw.tobytes()).decode()}
    decoded = decode_tensor(spec("bfloat16", [3]), encoded, max_elements=10)
    assert torch.equal(torch.from_numpy(decoded.copy()).view(torch.bfloat16), bf)
    inf = {"dtype": "bfloat16", "shape": [1], "b64": base64.b64encode(np.uint16(0x7F80).tobytes()).decode()}
    with pytest.raises(InputError, match="NaN or infinity"):
        decode_tensor(spec("bfloat16", [1]), inf, max_elements=10)
    with pytest.raises(InputError, match="b64} only"):
        decode_tensor(spec("bfloat16", [1]), [1.0], max_elements=10)


def b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


@pytest.mark.parametrize(
    ("x_spec", "value", "says"),
    [
        (spec("int64", [3]), {"dtype": "int64", "shape": [3], "b64": "!" * 32}, "not valid base64"),
        (spec("int64", [3]), {"dtype": "int64", "shape": [3], "b64": b64(np.zeros(2, np.int64))}, "takes 24 bytes"),
        (spec("int64", [-1]), {"dtype": "int64", "shape": [4], "b64": b64(np.zeros(3, np.int64))}, "takes 32 bytes"),
        (spec("int64", [3]), {"dtype": "int32", "shape": [3], "b64": b64(np.zeros(3, np.int32))}, "takes dtype int64"),
        (spec("int64", [3]), numbers.loads("[9223372036854775808, 0, 0]"), "past int64"),
        (spec("int64", [3]), [0.5, 1, 2], "must be an integer"),
        (spec("uint8", [2]), [0, 256], "from 0 to 255"),
        (spec("bool", [2]), [0, 2], "from 0 to 1"),
        (spec("float32", [2]), [1.0, float("nan")], "NaN"),
        (spec("float32", [2]), {"dtype": "float32", "shape": [3], "b64": b64(np.zeros(3, np.float32))}, "shape"),
        (spec("float32", [2]), "abc", "nested list"),
        (spec("uint8", [3, 2]), [[1, 2], [3, 4], [5]], "numbers of shape"),
        (spec("uint8", [-1]), [], "empty"),
    ],
)
def test_a_bad_tensor_fails_with_an_input_error_that_names_it(x_spec: TensorSpec, value: Any, says: str) -> None:
    with pytest.raises(InputError, match=says):
        decode_tensor(x_spec, value, max_elements=1000)


def test_limits_apply_to_the_declared_shape_before_anything_is_decoded() -> None:
    # 10**9 elements declared, a few bytes sent: refused on the shape alone, never decoded or allocated.
    value = {"dtype": "uint8", "shape": [10**9], "b64": "AAAA"}
    with pytest.raises(InputError, match="limit is 1000"):
        decode_tensor(spec("uint8", [-1]), value, max_elements=1000)


def test_several_inputs_take_a_mapping_naming_each_once() -> None:
    signature = Signature.from_json(
        {"inputs": [{"name": "ids", "dtype": "int64", "shape": [-1]}, {"name": "mask", "dtype": "bool", "shape": [-1]}]}
    )
    rows = decode_inputs(signature, {"ids": [1, 2], "mask": [1, 0]}, max_elements=10)
    assert rows["ids"].dtype == np.int64 and rows["mask"].tolist() == [True, False]
    with pytest.raises(InputError, match="name exactly"):
        decode_inputs(signature, {"ids": [1, 2]}, max_elements=10)
    with pytest.raises(InputError, match="mapping"):
        decode_inputs(signature, [1, 2], max_elements=10)


def test_old_specs_read_as_one_float32_input_and_are_stored_unchanged() -> None:
    old = {"arch": "linear", "config": {"in_features": 3}, "input_shape": [3]}
    spec_ = ModelSpec.from_json(old)
    assert spec_.legacy and spec_.signature == Signature.legacy((3,))
    assert spec_.to_json() == old


def test_an_architecture_declares_its_signature_and_create_overrides_it() -> None:
    @register_architecture("test_tensors_declared", signature=ISSUE_SIGNATURE)
    def build() -> torch.nn.Module:
        return torch.nn.Flatten()

    declared = make_spec("test_tensors_declared")
    assert declared.signature.to_json() == ISSUE_SIGNATURE and declared.input_shape == (3, 64, 64)
    assert ModelSpec.from_json(declared.to_json()) == declared
    other = {"inputs": [{"name": "x", "dtype": "float16", "shape": [8]}], "outputs": []}
    assert make_spec("test_tensors_declared", signature=other).signature.to_json() == other


def test_the_client_encoding_is_compact() -> None:
    image = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    encoded = encode_tensor(image)
    assert len(encoded["b64"]) <= 1.34 * image.nbytes  # base64: 4/3 of the raw bytes
    assert encode_tensor(np.ones(2))["dtype"] == "float32"  # float64 has no signature dtype


class _Counting(torch.nn.Module):
    """Two inputs, two outputs (a tuple); counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return (ids * mask).sum(dim=1, keepdim=True).float(), mask.sum(dim=1, keepdim=True)


def test_a_batch_of_variable_lengths_runs_once_padded_with_named_outputs() -> None:
    from agent_workers.config import Settings
    from agent_workers.worker.inference import InferenceEngine, LoadedModel

    signature = {
        "inputs": [{"name": "ids", "dtype": "int64", "shape": [-1]}, {"name": "mask", "dtype": "bool", "shape": [-1]}],
        "outputs": [
            {"name": "total", "dtype": "float32", "shape": [1]},
            {"name": "count", "dtype": "int64", "shape": [1]},
        ],
    }
    spec_ = ModelSpec(arch="x", config={}, input_shape=(-1,), signature=Signature.from_json(signature))
    module = _Counting()
    engine = InferenceEngine(store=None, settings=Settings.from_env({}))  # type: ignore[arg-type]
    loaded = LoadedModel("m", 1, "e", spec_, module, torch.device("cpu"))
    rows = [
        engine.validate(loaded, {"ids": ids, "mask": mask})
        for ids, mask in [([1, 2, 3], [1, 1, 0]), ([4, 5], [1, 1]), ([6, 7, 8], [1, 1, 1])]
    ]
    out = engine.run_batch(loaded, rows)
    assert out == [{"total": [3.0], "count": [2]}, {"total": [9.0], "count": [2]}, {"total": [21.0], "count": [3]}]
    assert module.calls == 1  # one batch padded to the longest (contract 1.3), no bisection
