"""Hooks, built-in outputs and artifacts against real workers on both brokers (contract 1.3, docs/hooks.md): a PNG
through preprocess to top_k labels, a bad PNG failing alone in its batch, top_k / softmax / normalize / outputs equal
to a local computation, labels that follow the versions, a postprocess hook, and a model without hooks answered
while another model's request is still being preprocessed."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from agent_workers.config import Settings
from agent_workers.errors import InputError, StoreError
from agent_workers.models import make_spec
from agent_workers.worker.launch import settings_env
from tests.conftest import Pool, _cleanup, pool_env, serving_pool, unique
from tests.integration.test_cli import cli
from tests.plugins_hooks import decode_png, pad

pytestmark = pytest.mark.integration

PLUGINS = "tests.plugins_hooks"
LABELS = ["cat", "dog", "bird"]
VOCAB = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3, "the": 4, "cat": 5, "sat": 6, "on": 7, "mat": 8}


@pytest.fixture(scope="module")
def hooks_pool(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """One worker per broker that knows the hooked test architectures (tests/plugins_hooks.py)."""
    yield from serving_pool(broker, tmp_path_factory, max_wait_ms=50, plugins=PLUGINS, preprocess_threads=2)


def png(seed: int, size: tuple[int, int] = (16, 12)) -> bytes:
    """A small RGB PNG of seeded noise (the preprocess hook greys and resizes it)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def image_input(data: bytes) -> dict[str, Any]:
    return {"image": {"b64": base64.b64encode(data).decode()}}


def tokenizer_json() -> str:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str()


def module_of(pool: Pool, model: str, version: int | None = None) -> torch.nn.Module:
    snap = pool.store.read(model, version)
    module = pool.store.spec(model, snap.epoch).build()
    module.load_state_dict(snap.parameters())
    return module.eval()


def local_logits(pool: Pool, model: str, data: bytes, version: int | None = None) -> np.ndarray:
    """What torch computes here: the same preprocess, the stored parameters."""
    pixels = torch.from_numpy(decode_png(image_input(data), None)[None])  # type: ignore[arg-type]
    with torch.no_grad():
        return module_of(pool, model, version)(pixels)[0].numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(x).double(), dim=-1).numpy()


def test_a_png_is_preprocessed_and_answered_with_its_top_k_labels(hooks_pool: Pool) -> None:
    model = unique("png")
    hooks_pool.store.create(model, make_spec("png_classifier"), seed=3, artifacts={"labels": json.dumps(LABELS)})
    data = png(1)
    answer = hooks_pool.client.predict(model, image_input(data), options={"top_k": 2, "softmax": True})
    probs = softmax(local_logits(hooks_pool, model, data))
    best = np.argsort(-probs)[:2]
    assert [t["index"] for t in answer["top_k"]] == best.tolist()
    assert [t["label"] for t in answer["top_k"]] == [LABELS[i] for i in best]
    np.testing.assert_allclose([t["score"] for t in answer["top_k"]], probs[best], rtol=1e-5)
    assert "outputs" not in answer and answer["version"] == 0
    # without options: the logits, as a model without hooks answers
    np.testing.assert_allclose(
        hooks_pool.client.predict(model, image_input(data))["outputs"], local_logits(hooks_pool, model, data), rtol=1e-5
    )


def test_a_bad_png_fails_alone_and_its_batch_mates_are_answered(hooks_pool: Pool) -> None:
    model = unique("png")
    hooks_pool.store.create(model, make_spec("png_classifier"), seed=4, artifacts={"labels": json.dumps(LABELS)})
    images = [png(i) for i in range(6)]
    rows: list[Any] = [image_input(d) for d in images]
    rows[2] = image_input(b"\x89PNG\r\n\x1a\n this is not an image")
    rows[4] = {"image": "not base64 bytes"}
    results = hooks_pool.client.predict_bulk(model, rows, return_exceptions=True)
    assert isinstance(results[2], InputError) and "preprocessing refused this input" in str(results[2])
    assert isinstance(results[4], InputError) and '{"image": {"b64"' in str(results[4])
    for i in (0, 1, 3, 5):
        np.testing.assert_allclose(results[i]["outputs"], local_logits(hooks_pool, model, images[i]), rtol=1e-5)


def test_builtin_outputs_equal_a_local_computation(hooks_pool: Pool) -> None:
    """top_k, softmax, normalize and outputs on a model without hooks (tensors in) and on a hooked one (text in)."""
    mlp = unique("mlp")
    hooks_pool.store.create(mlp, make_spec("mlp", in_features=5, hidden=[8], out_features=4), seed=5)
    x = np.random.default_rng(0).standard_normal(5).astype(np.float32)
    with torch.no_grad():
        logits = module_of(hooks_pool, mlp)(torch.from_numpy(x[None]))[0].numpy()
    client = hooks_pool.client
    np.testing.assert_allclose(client.predict(mlp, x, options={"softmax": True})["outputs"], softmax(logits), rtol=1e-5)
    top = client.predict(mlp, x, options={"top_k": 3})["top_k"]
    assert [t["index"] for t in top] == np.argsort(-logits)[:3].tolist() and top[0]["label"] is None
    np.testing.assert_allclose([t["score"] for t in top], np.sort(logits)[::-1][:3], rtol=1e-5)
    unit = logits / np.linalg.norm(logits)
    np.testing.assert_allclose(client.predict(mlp, x, options={"normalize": True})["outputs"], unit, rtol=1e-5)

    text = unique("text")
    hooks_pool.store.create(text, make_spec("text_embedder"), seed=6, artifacts={"tokenizer": tokenizer_json()})
    sentences = ["the cat sat on the mat", "hello world", "the unknown cat"]
    ids = [np.array([VOCAB.get(w, 1) for w in s.split()]) for s in sentences]
    with torch.no_grad():
        embedding, length = module_of(hooks_pool, text)(torch.from_numpy(pad(ids)))
    handles = [
        client.send_predict(text, {"text": s}, options={"outputs": ["embedding"], "normalize": True}) for s in sentences
    ]
    for i, handle in enumerate(handles):
        answer = client.wait(handle)
        assert set(answer["outputs"]) == {"embedding"}  # selected: no "length"
        want = embedding[i].numpy() / np.linalg.norm(embedding[i].numpy())
        np.testing.assert_allclose(answer["outputs"]["embedding"], want, rtol=1e-5, atol=1e-7)
    both = client.predict(text, {"text": "hello world"})["outputs"]
    assert both["length"] == [2] and set(both) == {"embedding", "length"}
    with pytest.raises(InputError, match="top_k ranks one output"):
        client.predict(text, {"text": "hello"}, options={"top_k": 2})
    with pytest.raises(InputError, match="options.outputs names"):
        client.predict(text, {"text": "hello"}, options={"outputs": ["nope"]})
    with pytest.raises(InputError, match="options.top_k must be an integer"):
        client.predict(mlp, x, options={"top_k": 0})


def test_artifacts_follow_the_versions_they_were_set_for(hooks_pool: Pool) -> None:
    model = unique("png")
    store = hooks_pool.store
    store.create(model, make_spec("png_classifier"), seed=7, artifacts={"labels": json.dumps(LABELS)})
    first = hooks_pool.client.predict(model, image_input(png(9)), options={"top_k": 3})
    renamed = ["chat", "chien", "oiseau"]
    assert hooks_pool.client.put_artifacts(model, {"labels": json.dumps(renamed)}) == 1
    with pytest.raises(StoreError, match="not yet committed"):
        hooks_pool.client.put_artifacts(model, {"labels": json.dumps(renamed)}, version=0)
    snap = store.read(model)
    assert store.commit(model, expected=0, tensors=snap.tensors, epoch=snap.epoch).version == 1
    newest = hooks_pool.client.predict(model, image_input(png(9)), options={"top_k": 3})
    pinned = hooks_pool.client.predict(model, image_input(png(9)), version=0, options={"top_k": 3})
    assert newest["version"] == 1 and pinned["version"] == 0
    assert [t["label"] for t in first["top_k"]] == [t["label"] for t in pinned["top_k"]]
    assert [t["label"] for t in newest["top_k"]] == [renamed[t["index"]] for t in first["top_k"]]


def test_a_postprocess_hook_answers_with_its_own_options(hooks_pool: Pool) -> None:
    model = unique("argmax")
    hooks_pool.store.create(model, make_spec("png_argmax"), seed=8, artifacts={"labels": json.dumps(LABELS)})
    logits = local_logits(hooks_pool, model, png(2))
    order = np.argsort(-logits)
    answer = hooks_pool.client.predict(model, image_input(png(2)), options={"margin": True})["outputs"]
    assert answer["label"] == LABELS[order[0]]
    assert answer["margin"] == pytest.approx(float(logits[order[0]] - logits[order[1]]), rel=1e-5)


def test_a_model_without_hooks_is_served_while_another_request_is_still_preprocessed(hooks_pool: Pool) -> None:
    """A preprocess hook that holds until the test releases it: the model without hooks answers meanwhile, so
    neither the event loop nor the compute thread waits for preprocessing."""
    held, plain = unique("held"), unique("plain")
    store = hooks_pool.store
    store.create(held, make_spec("held_text"), seed=1, artifacts={"tokenizer": tokenizer_json()})
    store.create(plain, make_spec("linear", in_features=3), seed=2)
    client = hooks_pool.client
    client.predict(held, {"text": "hello"})  # loads it: the hold below is the only wait
    key = f"hold:{hooks_pool.settings.namespace}:{uuid.uuid4().hex}"
    pending = client.send_predict(held, {"text": key})
    try:
        for _ in range(3):
            assert client.predict(plain, [1.0, 2.0, 3.0], timeout=10)["version"] == 0
        assert not pending.ready(), pending.result  # still held in its preprocess hook
    finally:
        store.client.lpush(key, 1)
    assert client.wait(pending, timeout=30)["outputs"]["length"] == [1]


def test_models_create_takes_artifacts_and_models_show_lists_them(redis_up: None, tmp_path: Any) -> None:
    env = pool_env("redis", plugins=PLUGINS)
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    model = unique("cli")
    try:
        out = cli(
            "models", "create", model, "--arch", "png_classifier", "--config", "{}",
            "--artifact", f"labels={tmp_path / 'labels.json'}", env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "with artifacts labels" in out.stdout
        shown = json.loads(cli("models", "show", model, env=env).stdout)
        assert shown["artifacts"] == {"from_version": 0, "files": {"labels": len(json.dumps(LABELS))}}
        bad = cli(
            "models", "create", unique("cli"), "--arch", "png_classifier", "--config", "{}",
            "--artifact", f"labels={tmp_path / 'bad.json'}", env=env,
        )  # fmt: skip
        assert bad.returncode == 1 and "must be a JSON list of strings" in bad.stderr
        later = cli("models", "artifacts", model, "--artifact", f"labels={tmp_path / 'labels.json'}", env=env)
        assert later.returncode == 0 and "hold from version 1" in later.stdout, later.stderr
        again = cli("models", "artifacts", model, "--artifact", "labels=x", "--version", "1", env=env)
        assert again.returncode != 0 and "cannot read x" in again.stderr
    finally:
        _cleanup(Settings.from_env(env))


def test_a_direct_call_of_predict_preprocesses_and_answers_its_options(hooks_pool: Pool) -> None:
    """The task body (eager and direct calls; a worker's batcher bypasses it) serves hooks and options alike."""
    model = unique("png")
    hooks_pool.store.create(model, make_spec("png_classifier"), seed=5, artifacts={"labels": json.dumps(LABELS)})
    data = png(3)
    code = (
        "import json, sys\n"
        "from tasks.inference import predict\n"
        "print(json.dumps(predict(*json.loads(sys.argv[1]), **json.loads(sys.argv[2]))))\n"
    )
    args = json.dumps([model, image_input(data)])
    out = subprocess.run(
        [sys.executable, "-c", code, args, json.dumps({"options": {"top_k": 2}})],
        env=settings_env(hooks_pool.env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    answer = json.loads(out.stdout.splitlines()[-1])
    logits = local_logits(hooks_pool, model, data)
    best = np.argsort(-logits)[:2]
    assert [t["label"] for t in answer["top_k"]] == [LABELS[i] for i in best]
    np.testing.assert_allclose([t["score"] for t in answer["top_k"]], logits[best], rtol=1e-5)
