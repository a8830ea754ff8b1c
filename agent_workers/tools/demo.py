"""The main job: the seed's linear regression trained and served through the queue by a real worker.

10,000 × 10 features, y = x[:, 0] + 0.1·N(0, 1) (fixed seed); 9,000 rows train the ``linear`` model with queued
``train_step`` jobs (MSE, SGD, mini-batches of 100, 10 epochs); the 1,000 held-out rows come back as queued
``predict`` requests, and the test MSE is printed beside the floor (the MSE of the true function) and the seed's
reported 0.0118.

The demo uses names of its own (model ``demo-linear``, a dataset named by a uuid, worker ``demo-<unique>``) and
removes what it made when it is done: the model, the dataset, the worker's log (kept, and named, when it failed). So
nothing it leaves collides with the README's next steps.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from agent_workers.client import Client
from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.supervisor import WorkerProcess, ensure_redis
from agent_workers.training.datasets import DatasetStore
from agent_workers.worker.launch import UNIQUE

SEED_REPORTED_MSE = 0.0118
N_ROWS, N_FEATURES, N_TEST = 10_000, 10, 1_000


@dataclasses.dataclass(frozen=True)
class DemoResult:
    test_mse: float
    floor_mse: float
    version: int
    train_seconds: float
    predict_seconds: float

    @property
    def ratio(self) -> float:
        return self.test_mse / self.floor_mse


def seed_data(seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The seed's data: x ~ N(0, 1)^10, y = x0 + 0.1·noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_ROWS, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] + 0.1 * rng.standard_normal(N_ROWS)).astype(np.float32)
    return x, y


def run(
    settings: Settings,
    *,
    model: str = "demo-linear",
    epochs: int = 10,
    batch_size: int = 100,
    hparams: dict[str, Any] | None = None,
    progress: bool = True,
    start_worker: bool = True,
) -> DemoResult:
    """Train and evaluate through the queue; returns the figures (also printed). Removes ``model`` and its dataset
    at the end."""
    hparams = hparams or {"loss": "mse", "optimizer": "sgd", "lr": 0.05}
    x, y = seed_data()
    x_train, y_train, x_test, y_test = x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]
    store = RedisParamStore.from_settings(settings)
    store.create(model, make_spec("linear", in_features=N_FEATURES, out_features=1), replace=True)
    client = Client(settings)
    worker = None
    if start_worker:
        worker = WorkerProcess(
            queues=[settings.inference_queue, settings.training_queue], name=f"demo-{UNIQUE}@%h", loglevel="WARNING"
        )
        print(f"starting a worker (log: {worker.log_path}) ...")
        worker.start()
        print(f"worker {worker.ready_path.read_text() or worker.hostname} ready")  # the node name, %h expanded
    datasets = DatasetStore.from_settings(settings)
    dataset = None
    finished = False
    try:
        dataset = datasets.upload(x_train, y_train.reshape(-1, 1))
        steps = epochs * -(-len(x_train) // batch_size)
        started = time.perf_counter()
        with tqdm(total=steps, desc="train (queued steps)", unit="step", disable=not progress, mininterval=1.0) as bar:

            def on_step(result: dict[str, Any]) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{result['loss']:.4f}", version=result["version"], refresh=False)

            client.train(
                model, dataset, len(x_train), epochs=epochs, batch_size=batch_size, hparams=hparams, on_step=on_step
            )
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        with tqdm(
            total=N_TEST, desc="predict (queued requests)", unit="req", disable=not progress, mininterval=1.0
        ) as bar:
            results = client.predict_bulk(model, x_test.tolist(), on_result=lambda _: bar.update(1))
        predict_seconds = time.perf_counter() - started
        finished = True
    finally:
        if dataset is not None:
            datasets.delete(dataset)
        store.delete(model)
        if worker is not None:
            worker.stop()
            if finished:
                worker.remove_files()
            else:
                print(f"the worker's log is kept: {worker.log_path}")
    predictions = np.array([r["outputs"][0] for r in results], dtype=np.float64)
    test_mse = float(np.mean((predictions - y_test) ** 2))
    floor = float(np.mean((x_test[:, 0] - y_test) ** 2))
    version = max(r["version"] for r in results)
    result = DemoResult(test_mse, floor, version, train_seconds, predict_seconds)
    print_result(result)
    print(f"  (removed what it made: model {model}, its dataset, the worker's log; task results expire on their own)")
    return result


def print_result(r: DemoResult) -> None:
    print()
    print(f"  test MSE (1,000 held-out rows, via queued predictions) {r.test_mse:.4f}")
    print(f"  floor: MSE of the true function y = x0                  {r.floor_mse:.4f}")
    print(f"  test MSE / floor                                        {r.ratio:.3f}  (goal <= 1.02)")
    print(f"  seed article's reported MSE                             {SEED_REPORTED_MSE:.4f}")
    print(f"  final parameter version                                 {r.version}")
    print(f"  training {r.train_seconds:.1f}s, predictions {r.predict_seconds:.1f}s")


def main(settings: Settings | None = None) -> DemoResult:
    settings = settings or Settings.from_env()
    local = ensure_redis(settings)
    if local is not None:
        print(f"no Redis answered; started redis-server on port {local.port} (stopped at the end)")
    try:
        return run(settings)
    finally:
        if local is not None:
            local.stop()
