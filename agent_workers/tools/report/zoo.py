"""The report's zoo part: the example CNN and transformer (examples/models/zoo.py) trained through the queue.

Per model: the same initial weights trained three ways on the same mini-batches (``epoch_batches``, seed 0) with the
same Adam settings: a single-process torch loop (the reference), and ``train_step`` messages sent by a bare Celery
producer (``send_task`` by name, at most 2 × trainers in flight) on rows of an uploaded typed dataset (uint8
pixels; ragged int64 token ids), drained by 1 and by 4 trainer processes (grouped path, optimistic commits).
Reported: held-out accuracy, its gap to the reference in points (goal: within 1; digits >= 96 % with 4 trainers),
steps/s and conflicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from agent_workers.models import ModelSpec, make_spec
from agent_workers.padding import call_module
from agent_workers.tools.report.lab import Lab, send_steps, step_stats, stop_all
from agent_workers.training import columns
from agent_workers.training.datasets import epoch_batches
from agent_workers.training.steps import batch_of

PLUGINS = "examples.models.zoo"
ZOO_BEGIN = "<!-- report:zoo:begin -->"
ZOO_END = "<!-- report:zoo:end -->"
GAP_GOAL_POINTS = 1.0
DIGITS_GOAL = 0.96


@dataclasses.dataclass(frozen=True)
class Task:
    """One example model, its data and its training run."""

    name: str
    arch: str
    config: dict[str, Any]
    hparams: dict[str, Any]
    epochs: int
    batch_size: int


TASKS = (
    Task("digits", "digits_cnn", {}, {"loss": "cross_entropy", "optimizer": "adam", "lr": 0.005}, 10, 32),
    Task("order", "order_transformer", {}, {"loss": "cross_entropy", "optimizer": "adam", "lr": 0.003}, 6, 32),
)
ORDER_TRAIN, ORDER_TEST = 3000, 1000


def data(task: Task) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """``(x_train, x_test, y_train, y_test)``: uint8 digits, or ragged token rows of the order task."""
    import examples.models.zoo as zoo

    if task.name == "digits":
        return zoo.digits_data()
    x_train, y_train = zoo.order_data(ORDER_TRAIN, seed=0)
    x_test, y_test = zoo.order_data(ORDER_TEST, seed=1)
    return x_train, x_test, y_train, y_test


def accuracy(spec: ModelSpec, module: torch.nn.Module, x: Any, y: np.ndarray) -> float:
    """Held-out accuracy, the test rows collated as training collates them (padding and mask included)."""
    batch, _ = batch_of(spec, x, y)
    module.eval()
    with torch.no_grad():
        return float((call_module(module, spec.signature, batch).argmax(1).numpy() == y).mean())


def single_process(spec: ModelSpec, initial: dict[str, torch.Tensor], task: Task, x: Any, y: np.ndarray) -> Any:
    """The reference: torch's Adam over the same batches, in the same order, from the same weights."""
    module = spec.build()
    module.load_state_dict(initial)
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=task.hparams["lr"])
    data = columns.typed_columns(x)
    for _, _, rows in epoch_batches(len(y), epochs=task.epochs, batch_size=task.batch_size, seed=0):
        batch, target = batch_of(spec, columns.take(data, rows), y[rows])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            call_module(module, spec.signature, batch), torch.from_numpy(target)
        ).backward()
        opt.step()
    return module


def zoo_models(lab: Lab, trainers: tuple[int, ...] = (1, 4), *, quick: bool = False) -> list[dict[str, Any]]:
    """Every (model, trainers) run; one row each with the single-process reference beside it."""
    import examples.models.zoo  # noqa: F401 - registers the architectures in this process

    rows = []
    for task in TASKS:
        epochs = 2 if quick else task.epochs
        task = dataclasses.replace(task, epochs=epochs)
        x_train, x_test, y_train, y_test = data(task)
        spec = make_spec(task.arch, **task.config)
        torch.manual_seed(0)
        initial = spec.build().state_dict()
        lab.progress(f"[zoo] {task.name}: single-process torch loop ({task.epochs} epochs)")
        reference = accuracy(spec, single_process(spec, initial, task, x_train, y_train), x_test, y_test)
        lab.progress(f"  -> single-process accuracy {reference:.4f}")
        for n in trainers:
            lab.progress(f"[zoo] {task.name}: {n} trainer process(es) through the queue: starting workers")
            workers = lab.workers(n, path="grouped", plugins=(PLUGINS,))
            try:
                module = spec.build()
                module.load_state_dict(initial)
                lab.store.create(task.name, spec, module=module, replace=True)
                dataset = lab.datasets.upload(x_train, y_train, ttl=3600)
                results, seconds = send_steps(
                    lab,
                    task.name,
                    dataset,
                    len(y_train),
                    epochs=task.epochs,
                    batch_size=task.batch_size,
                    hparams=task.hparams,
                    window=2 * n,
                    label=f"{task.name} x{n}",
                )
            finally:
                stop_all(workers)
            module = spec.build()
            module.load_state_dict(lab.store.read(task.name).parameters())
            ours = accuracy(spec, module, x_test, y_test)
            gap = (reference - ours) * 100
            lab.progress(f"  -> queued accuracy {ours:.4f} (single process {reference:.4f}, gap {gap:+.2f} points)")
            goal = abs(gap) <= GAP_GOAL_POINTS and (task.name != "digits" or n < 4 or ours >= DIGITS_GOAL)
            rows.append(
                {
                    "model": task.name,
                    "arch": task.arch,
                    "signature": spec.signature.to_json(),
                    "trainers": n,
                    "epochs": task.epochs,
                    "batch_size": task.batch_size,
                    "hparams": task.hparams,
                    "train_rows": len(y_train),
                    "test_rows": len(y_test),
                    "accuracy": round(ours, 4),
                    "single_process_accuracy": round(reference, 4),
                    "gap_points": round(gap, 2),
                    "meets_goal": goal,
                    **step_stats(results, seconds),
                }
            )
    return rows


def render_zoo(report: dict[str, Any]) -> str:
    """The markdown of the zoo part, spliced between its own markers in docs/training.md."""
    from agent_workers.tools.report.output import markdown_table

    head = (
        f"Measured {report['finished']} ({report['environment']['cpus']} CPUs, shared with other work; broker "
        f"`{report['environment']['broker']}`): held-out accuracy of the queued runs against the single-process "
        f"reference on the same batches from the same weights (goal: gap within {GAP_GOAL_POINTS:g} point; digits "
        f">= {DIGITS_GOAL:.0%} with 4 trainers). Regenerate with `agent-workers report --part zoo`.\n\n"
    )
    table = markdown_table(
        ["model", "trainers", "epochs", "steps", "accuracy", "single process", "gap (points)", "goal", "steps/s",
         "conflicts/step"],
        [
            [r["model"], r["trainers"], r["epochs"], r["steps"], r["accuracy"], r["single_process_accuracy"],
             r["gap_points"], "met" if r["meets_goal"] else "missed", r["steps_per_s"],
             round(r["conflicts"] / max(r["steps"], 1), 3)]
            for r in report["zoo"]
        ],
    )  # fmt: skip
    return head + table + "\n"


def plot_zoo(rows: list[dict[str, Any]], path: Any) -> None:
    """Held-out accuracy per model: single process, then each number of trainers through the queue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    trainers = sorted({r["trainers"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (len(trainers) + 1)
    for m, model in enumerate(models):
        mine = {r["trainers"]: r for r in rows if r["model"] == model}
        bars = [("single process", next(iter(mine.values()))["single_process_accuracy"])]
        bars += [(f"{n} trainer{'s' * (n > 1)}", mine[n]["accuracy"]) for n in trainers if n in mine]
        for b, (label, value) in enumerate(bars):
            ax.bar(m + b * width, value * 100, width, color=f"C{b}", label=label if m == 0 else None)
            ax.text(m + b * width, value * 100 + 0.3, f"{value * 100:.1f}", ha="center", fontsize=8)
    ax.set_xticks([m + width * len(trainers) / 2 for m in range(len(models))], models)
    low = min(min(r["accuracy"], r["single_process_accuracy"]) for r in rows) * 100
    ax.set_ylim(max(0, low - 5), 100.5)
    ax.set_ylabel("held-out accuracy %")
    ax.set_title("example models trained through the queue vs one process")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
