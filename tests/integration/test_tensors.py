"""Typed tensors against real workers on both brokers (contract 1.2, docs/tasks.md "Typed tensors"): the page's
examples of every dtype and encoding, a uint8 CNN fed numpy arrays by the Client, a two-input model with two named
outputs, and the signature through ``models create`` / ``models show``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from agent_workers.config import Settings
from agent_workers.contract import PREDICT
from agent_workers.errors import InputError
from agent_workers.models import make_spec
from agent_workers.tensors import decode_inputs
from tests.conftest import Pool, _cleanup, pool_env, serving_pool, unique
from tests.integration.test_cli import cli
from tests.integration.test_contract import check, contract
from tests.plugins_tensors import CNN_SIGNATURE, TWO_INPUT_SIGNATURE

pytestmark = pytest.mark.integration

PLUGINS = "tests.plugins_tensors"


@pytest.fixture(scope="module")
def typed_pool(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """One worker per broker that knows the typed test architectures (tests/plugins_tensors.py)."""
    yield from serving_pool(broker, tmp_path_factory, max_wait_ms=20, plugins=PLUGINS)


def arch_of(signature: dict[str, Any]) -> str:
    """The test architecture the page's example signatures are served by."""
    if signature == TWO_INPUT_SIGNATURE:
        return "two_input"
    return "tiny_cnn" if signature == CNN_SIGNATURE else "total"


def local(pool: Pool, model: str, inputs: Any) -> Any:
    """What torch computes here from the stored parameters: the ground truth of one request's outputs."""
    snap = pool.store.read(model)
    spec = pool.store.spec(model, snap.epoch)
    module = spec.build()
    module.load_state_dict(snap.parameters())
    decoded = decode_inputs(spec.signature, inputs, max_elements=10**6)
    rows = decoded if isinstance(decoded, dict) else {spec.signature.inputs[0].name: decoded}
    tensors = {}
    for entry in spec.signature.inputs:
        x = torch.from_numpy(np.array(rows[entry.name])[None])
        tensors[entry.name] = x.view(torch.bfloat16) if entry.dtype == "bfloat16" else x
    with torch.no_grad():
        y = module(**tensors)
    if isinstance(y, tuple):
        return {o.name: t[0].tolist() for o, t in zip(spec.signature.outputs, y, strict=True)}
    return y[0].tolist()


def close(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            close(got[k], want[k])
    else:
        np.testing.assert_allclose(
            np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), rtol=1e-5, atol=1e-6
        )


def test_documented_typed_examples_of_every_dtype_are_served(typed_pool: Pool) -> None:
    pool = typed_pool
    schemas, _ = contract()
    examples = schemas["urn:agent-workers:typed-examples"]["examples"]
    dtypes = {e["dtype"] for ex in examples for e in ex["signature"]["inputs"]}
    assert dtypes == {"bool", "uint8", "int32", "int64", "float16", "bfloat16", "float32"}
    sent = []
    for example in examples:
        first = example["requests"][0]
        model = first["args"][0] if first.get("args") else first["kwargs"]["model"]
        spec = make_spec(arch_of(example["signature"]), signature=example["signature"])
        pool.store.create(model, spec, seed=3, replace=True)
        for request in example["requests"]:
            handle = pool.client.app.send_task(
                PREDICT, args=request.get("args"), kwargs=request.get("kwargs"), queue=pool.settings.inference_queue
            )
            inputs = request["args"][1] if len(request.get("args", [])) > 1 else request["kwargs"]["inputs"]
            sent.append((model, inputs, handle))
    for model, inputs, handle in sent:
        result = pool.client.wait(handle, timeout=60)
        check(f"{PREDICT}:result", result)
        close(result["outputs"], local(pool, model, inputs))


def test_client_sends_numpy_images_compactly_and_outputs_match_torch(typed_pool: Pool) -> None:
    pool = typed_pool
    model = unique("cnn")
    pool.store.create(model, make_spec("tiny_cnn"), seed=7)  # the signature the architecture declares
    images = np.random.default_rng(0).integers(0, 256, size=(6, 3, 8, 8), dtype=np.uint8)
    results = pool.client.predict_bulk(model, images)
    for image, result in zip(images, results, strict=True):
        close(result["outputs"], local(pool, model, image.tolist()))


def test_two_inputs_of_variable_length_answer_named_outputs(typed_pool: Pool) -> None:
    pool = typed_pool
    model = unique("enc")
    pool.store.create(model, make_spec("two_input"), seed=1)
    requests = [
        {"ids": np.array([5, 6, 7], dtype=np.int64), "mask": np.array([True, True, False])},
        {"ids": [9, 8], "mask": [1, 1]},
        {"ids": np.array([1, 2, 3, 4, 5], dtype=np.int64), "mask": [True] * 5},
    ]
    results = pool.client.predict_bulk(model, requests)
    for inputs, result in zip(requests, results, strict=True):
        plain = {k: np.asarray(v).tolist() for k, v in inputs.items()}
        assert set(result["outputs"]) == {"pooled", "count"}
        assert result["outputs"]["count"] == [int(np.sum(plain["mask"]))]
        close(result["outputs"], local(pool, model, plain))


def test_a_request_of_the_wrong_dtype_fails_alone_with_an_input_error(typed_pool: Pool) -> None:
    pool = typed_pool
    model = unique("cnn")
    pool.store.create(model, make_spec("tiny_cnn"), seed=2)
    good = np.zeros((3, 8, 8), dtype=np.uint8)
    results = pool.client.predict_bulk(model, [good, good.astype(np.float32), good], return_exceptions=True)
    assert isinstance(results[1], InputError) and "takes dtype uint8" in str(results[1])
    assert all(isinstance(r, dict) for r in (results[0], results[2]))


def test_models_create_takes_a_signature_and_models_show_prints_it(redis_up: None) -> None:
    env = pool_env("redis", plugins=PLUGINS)  # the CLI alone: no worker, one broker is enough
    name = unique("sig")
    signature = {
        "inputs": [{"name": "pixels", "dtype": "uint8", "shape": [3, 8, 8]}],
        "outputs": [{"name": "total", "dtype": "float32", "shape": [1]}],
    }
    try:
        made = cli(
            "models", "create", name, "--arch", "total", "--config", "{}", "--signature", json.dumps(signature), env=env
        )
        assert made.returncode == 0, made.stderr
        assert json.loads(cli("models", "show", name, env=env).stdout)["signature"] == signature
        declared = unique("cnn")  # no --signature: the architecture's own
        assert cli("models", "create", declared, "--arch", "tiny_cnn", "--config", "{}", env=env).returncode == 0
        assert json.loads(cli("models", "show", declared, env=env).stdout)["signature"] == CNN_SIGNATURE
        bad = cli("models", "create", unique("bad"), "--arch", "total", "--signature", '{"inputs": []}', env=env)
        assert bad.returncode != 0 and "at least one input" in bad.stderr
    finally:
        _cleanup(Settings.from_env(env))
