"""Typed training through real workers on both brokers (contract 1.3): the example CNN on uint8 digits trained by
queued ``train_step`` messages on dataset rows, the example transformer trained by ``fit`` on a ragged dataset of
token ids, and inline typed steps from a bare Celery producer where a bad row fails alone. Cheap versions of the
report's zoo part (docs/training.md): few steps, accuracy well above chance on held-out data."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from celery import Celery

import examples.models.zoo as zoo
from agent_workers.contract import TRAIN_STEP
from agent_workers.models import make_spec
from agent_workers.padding import call_module
from agent_workers.tensors import encode_tensor
from agent_workers.training.steps import batch_of
from tests.conftest import Pool, unique

pytestmark = pytest.mark.integration

PLUGINS = "examples.models.zoo"
TIMEOUT = 120.0
ADAM = {"loss": "cross_entropy", "optimizer": "adam", "lr": 0.005}


@pytest.fixture
def trainer(broker: str, start_pool: Callable[..., Pool]) -> Pool:
    """One training worker that knows the example models."""
    return start_pool(broker, queues="training", plugins=PLUGINS)


def accuracy(pool: Pool, model: str, x: list[np.ndarray] | np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of the stored parameters, computed here with torch (the same collate as training)."""
    snapshot = pool.store.read(model)
    spec = pool.store.spec(model, snapshot.epoch)
    module = spec.build()
    module.load_state_dict(snapshot.parameters())
    module.eval()
    batch, _ = batch_of(spec, list(x) if isinstance(x, list) else x, y)
    with torch.no_grad():
        return float((call_module(module, spec.signature, batch).argmax(1).numpy() == y).mean())


def test_the_digits_cnn_learns_from_queued_steps_on_uint8_dataset_rows(trainer: Pool) -> None:
    x_train, x_test, y_train, y_test = zoo.digits_data()
    model = unique("digits")
    trainer.store.create(model, make_spec("digits_cnn", channels=8))
    dataset = trainer.client.upload_dataset(None, x_train, y_train, ttl=600)
    assert trainer.client._datasets.info(dataset).inputs == {"": {"dtype": "uint8", "shape": [1, 8, 8]}}
    before = accuracy(trainer, model, x_test, y_test)
    results = trainer.client.train(
        model, dataset, len(x_train), epochs=2, batch_size=64, hparams=ADAM, window=8, timeout=TIMEOUT
    )
    after = accuracy(trainer, model, x_test, y_test)
    print(f"digits CNN: held-out accuracy {before:.3f} -> {after:.3f} after {len(results)} queued steps")
    assert len(results) == 2 * 23 and not any(r["duplicate"] for r in results)
    assert after >= 0.8 > before + 0.4  # chance is 0.1


def test_the_order_transformer_learns_token_order_by_fit_on_a_ragged_dataset(trainer: Pool) -> None:
    rows, labels = zoo.order_data(1500, seed=0)
    test_rows, test_labels = zoo.order_data(400, seed=1)
    model = unique("order")
    trainer.store.create(model, make_spec("order_transformer"))
    dataset = trainer.client.upload_dataset(None, rows, labels, ttl=600)
    assert trainer.client._datasets.info(dataset).inputs == {"": {"dtype": "int64", "shape": [-1]}}
    result = trainer.client.fit(model, dataset, epochs=3, batch_size=32, hparams=ADAM, timeout=TIMEOUT)
    after = accuracy(trainer, model, test_rows, test_labels)
    print(f"order transformer: held-out accuracy {after:.3f} after fit of {result['steps']} steps")
    assert result["steps"] == 3 * 47
    assert after >= 0.75  # chance, and the best a bag of words can do, is 0.5


def test_inline_typed_steps_from_a_bare_producer_commit_and_a_bad_row_fails_alone(trainer: Pool) -> None:
    model = unique("order")
    trainer.store.create(model, make_spec("order_transformer", width=16, heads=2, layers=1))
    rows, labels = zoo.order_data(64, seed=2)
    producer = Celery("bare", broker=trainer.settings.broker_url, backend=trainer.settings.result_backend)
    good = [
        producer.send_task(
            TRAIN_STEP,
            kwargs={
                "model": model,
                "x": [r.tolist() for r in rows[i : i + 16]] if i % 32 else [encode_tensor(r) for r in rows[i : i + 16]],
                "y": labels[i : i + 16].tolist(),
                "hparams": ADAM,
            },
            queue=trainer.settings.training_queue,
        )
        for i in range(0, 64, 16)
    ]
    bad = producer.send_task(
        TRAIN_STEP,
        kwargs={"model": model, "x": [[1, 2, 3], [4, "five"]], "y": [0, 1], "hparams": ADAM},
        queue=trainer.settings.training_queue,
    )
    results = [r.get(timeout=TIMEOUT) for r in good]
    assert all(np.isfinite(r["loss"]) and not r["duplicate"] for r in results)
    assert trainer.store.head(model).version >= 1
    with pytest.raises(Exception, match=r"x row 1: input 'ids'") as info:
        bad.get(timeout=TIMEOUT)
    assert type(info.value).__name__ == "InputError"
