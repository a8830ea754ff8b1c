"""Built-in outputs, artifact checks and the hook plumbing, without a worker (agent_workers/outputs.py, hooks.py,
store/artifacts.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
import torch

from agent_workers import hooks, outputs
from agent_workers.contract import bind_predict_call
from agent_workers.errors import InputError, ModelError
from agent_workers.store.artifacts import Artifacts, check_artifacts
from agent_workers.tensors import Signature

ONE = Signature.from_json({"inputs": [{"name": "x", "dtype": "float32", "shape": [3]}]})
TWO = Signature.from_json(
    {
        "inputs": [{"name": "x", "dtype": "float32", "shape": [3]}],
        "outputs": [{"name": "a", "dtype": "float32", "shape": [4]}, {"name": "b", "dtype": "int64", "shape": [1]}],
    }
)
IDS = Signature.from_json({"inputs": [{"name": "ids", "dtype": "int64", "shape": [-1]}]})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ([1], "options must be an object"),
        ({"top_k": 0}, "top_k must be an integer from 1"),
        ({"top_k": True}, "top_k must be an integer from 1"),
        ({"top_k": 2.0}, "top_k must be an integer from 1"),
        ({"softmax": 1}, "softmax must be true or false"),
        ({"normalize": "yes"}, "normalize must be true or false"),
        ({"outputs": []}, "non-empty list of output names"),
        ({"outputs": ["a", "a"]}, "names an output twice"),
    ],
)
def test_bad_options_fail_the_request_with_the_option_named(options: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        bind_predict_call(["m", [1.0]], {"options": options})


def test_softmax_normalize_and_top_k_equal_torch() -> None:
    logits = np.random.default_rng(0).standard_normal(6).astype(np.float32)
    t = torch.from_numpy(logits)
    got = outputs.apply(logits, ONE, None, outputs.parse_options({"softmax": True}))["outputs"]
    np.testing.assert_allclose(got, torch.softmax(t.double(), 0).numpy(), rtol=1e-12)
    got = outputs.apply(logits, ONE, None, outputs.parse_options({"normalize": True}))["outputs"]
    np.testing.assert_allclose(got, torch.nn.functional.normalize(t.double(), dim=0).numpy(), rtol=1e-12)
    labels = [f"c{i}" for i in range(6)]
    top = outputs.apply(logits, ONE, labels, outputs.parse_options({"top_k": 3}))["top_k"]
    values, indexes = torch.topk(t, 3)
    assert [x["index"] for x in top] == indexes.tolist()
    assert [x["label"] for x in top] == [labels[i] for i in indexes.tolist()]
    assert [x["score"] for x in top] == pytest.approx(values.tolist())


def test_top_k_breaks_ties_by_the_lower_index_and_a_zero_vector_normalizes_to_zero() -> None:
    top = outputs.top_k(np.array([1.0, 3.0, 3.0, 0.0], dtype=np.float32), 3, None)
    assert [x["index"] for x in top] == [1, 2, 0]
    zero = outputs.apply(np.zeros(3, np.float32), ONE, None, outputs.parse_options({"normalize": True}))
    assert zero["outputs"].tolist() == [0.0, 0.0, 0.0]


def test_outputs_selects_named_outputs_and_top_k_needs_exactly_one() -> None:
    row = {"a": np.arange(4, dtype=np.float32), "b": np.array([7])}
    picked = outputs.apply(row, TWO, None, outputs.parse_options({"outputs": ["b"]}))["outputs"]
    assert list(picked) == ["b"] and picked["b"].tolist() == [7]
    with pytest.raises(InputError, match="top_k ranks one output"):
        outputs.apply(row, TWO, None, outputs.parse_options({"top_k": 1}))
    top = outputs.apply(row, TWO, None, outputs.parse_options({"top_k": 1, "outputs": ["a"]}))["top_k"]
    assert top == [{"label": None, "index": 3, "score": 3.0}]
    with pytest.raises(InputError, match=r"outputs are \['a', 'b'\]"):
        outputs.apply(row, TWO, None, outputs.parse_options({"outputs": ["c"]}))
    softened = outputs.apply(row, TWO, None, outputs.parse_options({"softmax": True}))["outputs"]
    assert softened["b"].tolist() == [7]  # integer outputs are left as they are


def test_top_k_refuses_more_classes_than_the_output_has_and_labels_that_do_not_fit() -> None:
    with pytest.raises(InputError, match="top_k=5 but the output has 3 classes"):
        outputs.top_k(np.zeros(3, np.float32), 5, None)
    with pytest.raises(ModelError, match="names 2 classes; its output has 3"):
        outputs.top_k(np.zeros(3, np.float32), 1, ["a", "b"])


def test_options_that_are_not_built_in_need_a_postprocess_hook() -> None:
    with pytest.raises(InputError, match=r"\['margin'\] are not built in"):
        outputs.apply(np.zeros(3, np.float32), ONE, None, outputs.parse_options({"margin": True}))


def test_artifacts_are_checked_on_upload() -> None:
    assert check_artifacts({"labels": '["a", "b"]', "tokenizer": b"{}"}) == {
        "labels": b'["a", "b"]',
        "tokenizer": b"{}",
    }
    with pytest.raises(InputError, match="JSON list of strings"):
        check_artifacts({"labels": '["a", 1]'})
    with pytest.raises(InputError, match="not valid JSON"):
        check_artifacts({"labels": b"\x80 not json"})
    with pytest.raises(InputError, match="must be letters"):
        check_artifacts({"a/b": b""})
    with pytest.raises(ModelError, match=r"carries no artifact 'tokenizer' \(it has: labels\)"):
        Artifacts({"labels": b"[]"}).tokenizer()


def test_prepare_checks_what_a_hook_made_against_the_signature() -> None:
    made: list[Any] = []

    def preprocess(raw: Any, artifacts: Artifacts) -> Any:
        return made[0]

    h = hooks.Hooks(preprocess=preprocess)
    made[:] = [[1, 2, 3]]
    out = hooks.prepare(h, IDS, None, Artifacts(), max_elements=10)
    assert out.dtype == np.int64 and out.tolist() == [1, 2, 3]
    made[:] = [np.zeros((2, 2), np.int64)]
    with pytest.raises(ModelError, match=r"shape \[2, 2\]; the signature takes \[-1\]"):
        hooks.prepare(h, IDS, None, Artifacts(), max_elements=10)
    made[:] = [np.zeros(3, np.float32)]
    with pytest.raises(ModelError, match="as float32; the signature takes int64"):
        hooks.prepare(h, IDS, None, Artifacts(), max_elements=10)
    made[:] = [np.zeros(11, np.int64)]
    with pytest.raises(InputError, match="more than 10 numbers"):
        hooks.prepare(h, IDS, None, Artifacts(), max_elements=10)


def test_a_hook_that_raises_refuses_that_input_with_the_reason() -> None:
    def preprocess(raw: Any, artifacts: Artifacts) -> Any:
        data = np.frombuffer(hooks.raw_bytes(raw, "blob"), dtype=np.uint8).astype(np.int64)
        return data // (4 // int(raw["div"]))  # div 0: ZeroDivisionError, the hook's own failure

    h = hooks.Hooks(preprocess=preprocess)
    good = {"blob": {"b64": base64.b64encode(b"\x04\x08").decode()}, "div": 2}
    assert hooks.prepare(h, IDS, good, Artifacts(), max_elements=10).tolist() == [2, 4]
    with pytest.raises(InputError, match="ZeroDivisionError"):
        hooks.prepare(h, IDS, {**good, "div": 0}, Artifacts(), max_elements=10)
    with pytest.raises(InputError, match=r'inputs must be \{"blob": \{"b64"'):
        hooks.prepare(h, IDS, {"blob": "text"}, Artifacts(), max_elements=10)
    with pytest.raises(InputError, match="not valid base64"):
        hooks.prepare(h, IDS, {"blob": {"b64": "!!!!"}}, Artifacts(), max_elements=10)


def test_a_failing_postprocess_hook_fails_only_the_examples_it_fails_on() -> None:
    def postprocess(rows: list[Any], artifacts: Artifacts, options: list[Any]) -> list[Any]:
        if any(r[0] < 0 for r in rows):
            raise ValueError("negative")
        return [json.dumps(r.tolist()) for r in rows]

    h = hooks.Hooks(postprocess=postprocess)
    rows: list[Any] = [np.array([1.0]), np.array([-1.0]), ModelError("forward failed"), np.array([2.0])]
    got = hooks.answers(h, ONE, Artifacts(), rows, [None] * 4)
    assert got[0] == {"outputs": "[1.0]"} and got[3] == {"outputs": "[2.0]"}
    assert isinstance(got[1], ModelError) and "negative" in str(got[1])
    assert got[2] is rows[2]
