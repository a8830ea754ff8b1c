"""The report's hard case: every step of a training run queued at once, then 1, 2 and 4 trainers drain it.

This is how a batch job's producer behaves (publish the epoch, collect later), and where group commits used to
cost quality: each group computed all its gradients at one snapshot. Per run: the seed's linear regression, 10
epochs of batches of 100 (800 ``train_step`` messages, sent by a bare Celery producer before any worker starts), on
the per-step path, the grouped path (optimistic) and the grouped path in lock mode, with SGD and with Adam. Quality
is the test MSE over the floor, against sequential single-process torch on the same mini-batches in the same order
from the same initial weights; speed is steps per second from the first to the last stored step (worker start-up
left out), with conflicts per step.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from agent_workers.models import make_spec
from agent_workers.tools.report.lab import Lab, Plan, cpu_seconds, redis_cpu_seconds, stop_all
from agent_workers.training.datasets import epoch_batches

#: The issue's hard case: Adam lr 0.01 and SGD lr 0.05 (the demo's), MSE, batches of 100.
QUEUED_HP = {
    "sgd": {"loss": "mse", "optimizer": "sgd", "lr": 0.05},
    "adam": {"loss": "mse", "optimizer": "adam", "lr": 0.01},
}
QUEUED_BATCH = 100
#: Batches per run when the sequential reference is interleaved (a default group).
QUEUED_INTERLEAVE = 8
#: Goal: the queued run's test MSE / floor within this of sequential single-process training's.
QUALITY_GAP_GOAL = 0.005
#: Goal: lost compare-and-sets per step with 4 trainers.
CONFLICT_GOAL = 0.1


def sequential_reference(
    initial: dict[str, torch.Tensor],
    x: np.ndarray,
    y: np.ndarray,
    hp: dict[str, Any],
    *,
    epochs: int,
    interleave: int | None = None,
) -> torch.nn.Module:
    """Single-process torch over the batches ``Client.train`` and the report send (``epoch_batches``, seed 0).

    With ``interleave`` (a seed), neighbouring runs of ``QUEUED_INTERLEAVE`` batches swap places at random, as two
    trainers' groups interleave: the same batches, another order. The spread of those runs is how much the order
    alone moves the result (the yardstick for the quality gap).
    """
    module = make_spec("linear", in_features=x.shape[1], out_features=1).build()
    module.load_state_dict(initial)
    params = module.parameters()
    opt = torch.optim.Adam(params, lr=hp["lr"]) if hp["optimizer"] == "adam" else torch.optim.SGD(params, lr=hp["lr"])
    batches = [rows for _, _, rows in epoch_batches(len(x), epochs=epochs, batch_size=QUEUED_BATCH, seed=0)]
    if interleave is not None:
        rng = np.random.default_rng(interleave)
        runs = [batches[i : i + QUEUED_INTERLEAVE] for i in range(0, len(batches), QUEUED_INTERLEAVE)]
        for i in range(0, len(runs) - 1, 2):
            if rng.random() < 0.5:
                runs[i], runs[i + 1] = runs[i + 1], runs[i]
        batches = [rows for run in runs for rows in run]
    for rows in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(module(torch.from_numpy(x[rows])), torch.from_numpy(y[rows]))
        loss.backward()
        opt.step()
    return module


def walk_ms_per_step(
    initial: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray, hp: dict[str, Any], *, epochs: int
) -> float:
    """CPU milliseconds per step of a group's walk alone (gradient, optimizer step, finiteness check, one module per
    walk as groups.py builds it), in this process with one torch thread: the part of a step that trainers of one
    model take in turn to train sequentially. CPU time, not wall time, so that a busy machine does not inflate it."""
    from agent_workers.store.blobs import PARAM_PREFIX, Snapshot
    from agent_workers.training.groups import BuiltOnce
    from agent_workers.training.optim import HyperParams, apply_update, check_finite, compute_gradient

    spec = BuiltOnce(make_spec("linear", in_features=x.shape[1], out_features=1))
    params = HyperParams.from_json(hp)
    snapshot = Snapshot("walk", 0, "", {PARAM_PREFIX + k: v for k, v in initial.items()})
    batches = [rows for _, _, rows in epoch_batches(len(x), epochs=epochs, batch_size=QUEUED_BATCH, seed=0)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.process_time()
        for rows in batches:
            grads, loss = compute_gradient(spec, snapshot, x[rows], y[rows], params)
            tensors = apply_update(snapshot, grads, params)
            check_finite(grads, tensors, params, loss=loss)
            snapshot = Snapshot("walk", 0, "", tensors)
        return 1000 * (time.process_time() - started) / len(batches)
    finally:
        torch.set_num_threads(threads)


def _mse(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(((x @ weight.T + bias)[:, 0] - y[:, 0]) ** 2))


def queued_at_once(lab: Lab, plan: Plan) -> list[dict[str, Any]]:
    """Every (optimizer, path, commit mode, trainers) run of the hard case; one row each."""
    from celery import Celery

    from agent_workers.contract import TRAIN_STEP
    from agent_workers.tools.demo import N_TEST, seed_data

    x, y = seed_data()
    y = y.reshape(-1, 1)
    x_train, y_train, x_test, y_test = x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]
    floor = float(np.mean((x_test[:, 0] - y_test[:, 0]) ** 2))
    dataset = lab.datasets.upload(x_train, y_train)
    spec = make_spec("linear", in_features=x.shape[1], out_features=1)
    producer = Celery("report-queued", broker=lab.settings.broker_url, backend=lab.settings.result_backend)
    rows_out: list[dict[str, Any]] = []
    try:
        for opt in plan.queued_optimizers:
            hp = QUEUED_HP[opt]
            lab.store.create("queued-ref", spec, seed=0, replace=True)
            ref = sequential_reference(
                lab.store.read("queued-ref").parameters(), x_train, y_train, hp, epochs=plan.queued_epochs
            )
            ref_ratio = _mse(ref.weight.detach().numpy(), ref.bias.detach().numpy(), x_test, y_test) / floor
            spread = []
            for seed in range(1, 5):
                other = sequential_reference(
                    lab.store.read("queued-ref").parameters(),
                    x_train,
                    y_train,
                    hp,
                    epochs=plan.queued_epochs,
                    interleave=seed,
                )
                spread.append(
                    _mse(other.weight.detach().numpy(), other.bias.detach().numpy(), x_test, y_test) / floor - ref_ratio
                )
            walk_ms = walk_ms_per_step(
                lab.store.read("queued-ref").parameters(), x_train, y_train, hp, epochs=plan.queued_epochs
            )
            lab.progress(
                f"[5/5] {opt}: sequential torch MSE/floor {ref_ratio:.4f}; the same batches interleaved in runs of "
                f"{QUEUED_INTERLEAVE}: {min(spread):+.4f} .. {max(spread):+.4f}; a step's walk alone {walk_ms:.3f} ms"
            )
            for path, mode in plan.queued_runs:
                for n in plan.queued_trainers:
                    label = f"[5/5] queued at once, {opt}, {path} {mode}, {n} trainer(s)"
                    model = f"queued-{opt}-{path}-{mode}-{n}"
                    lab.store.create(model, spec, seed=0, replace=True)
                    handles = [
                        producer.send_task(
                            TRAIN_STEP,
                            kwargs={"model": model, "dataset": dataset, "rows": rows.tolist(), "hparams": hp},
                            queue=lab.settings.training_queue,
                        )
                        for _, _, rows in epoch_batches(
                            len(x_train), epochs=plan.queued_epochs, batch_size=QUEUED_BATCH, seed=0
                        )
                    ]
                    lab.progress(f"{label}: {len(handles)} steps queued; starting workers")
                    workers = lab.workers(n, mode=mode, path=path)
                    try:
                        # CPU from every worker being ready to the last result: the steps' cost, start-up left out.
                        cpu_before, redis_before = cpu_seconds(workers), redis_cpu_seconds(lab.store.client)
                        results = [h.get(timeout=600) for h in handles]
                        cpu = cpu_seconds(workers) - cpu_before
                        redis_cpu = redis_cpu_seconds(lab.store.client) - redis_before
                    finally:
                        stop_all(workers)
                    done = sorted(h.date_done.timestamp() for h in handles)
                    seconds = done[-1] - done[0]
                    params = lab.store.read(model).parameters()
                    ratio = _mse(params["weight"].numpy(), params["bias"].numpy(), x_test, y_test) / floor
                    conflicts = sum(r["conflicts"] for r in results)
                    row = {
                        "optimizer": opt,
                        "path": path,
                        "mode": mode,
                        "trainers": n,
                        "steps": len(results),
                        "ratio": round(ratio, 4),
                        "sequential_ratio": round(ref_ratio, 4),
                        "gap": round(ratio - ref_ratio, 4),
                        "order_spread": [round(min(spread), 4), round(max(spread), 4)],
                        "meets_goal": ratio - ref_ratio <= QUALITY_GAP_GOAL,
                        "steps_per_s": round((len(results) - 1) / seconds, 1) if seconds > 0 else None,
                        "conflicts_per_step": round(conflicts / len(results), 3),
                        "recomputed": sum(r["recomputed"] for r in results),
                        "rebased": sum(1 for r in results if r["staleness"] > 0),
                        "commits": lab.store.head(model).version,
                        "worker_cpu_ms_per_step": round(1000 * cpu / len(results), 3),
                        "walk_ms_per_step": round(walk_ms, 3),
                        "redis_cpu_ms_per_step": round(1000 * redis_cpu / len(results), 3),
                    }
                    lab.progress(
                        f"  -> MSE/floor {ratio:.4f} (sequential {ref_ratio:.4f}, gap {ratio - ref_ratio:+.4f}); "
                        f"{row['steps_per_s']} steps/s, {row['conflicts_per_step']} conflicts/step, "
                        f"{row['commits']} commits, {row['rebased']} steps rebased; CPU per step: workers "
                        f"{row['worker_cpu_ms_per_step']} ms, Redis {row['redis_cpu_ms_per_step']} ms"
                    )
                    rows_out.append(row)
    finally:
        producer.close()
    return rows_out


def scaling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps/s of n trainers over one trainer's, per (optimizer, path, mode), from one report run."""
    out = []
    for r in rows:
        base = next(
            (
                b
                for b in rows
                if (b["optimizer"], b["path"], b["mode"], b["trainers"]) == (r["optimizer"], r["path"], r["mode"], 1)
            ),
            None,
        )
        if base and base["steps_per_s"] and r["steps_per_s"]:
            out.append(
                {
                    **{k: r[k] for k in ("optimizer", "path", "mode", "trainers")},
                    "speedup": round(r["steps_per_s"] / base["steps_per_s"], 2),
                }
            )
    return out


def ceiling(rows: list[dict[str, Any]], *, cpus: int) -> list[dict[str, Any]]:
    """The model of where several trainers of one model top out, per optimizer, from the one-trainer grouped run.

    Trainers that train sequentially take turns for the walk (``walk`` ms per step) and overlap the rest of their
    per-step CPU (``worker`` ms, one trainer's whole cost): Amdahl's law bounds n trainers at ``worker / walk`` × one
    trainer however many cores they get. On this machine the cores bound them too: ``cpus`` cores over the worker's
    and Redis's CPU per step (the producer queued everything before the workers started, so it costs nothing here).
    """
    out = []
    for r in rows:
        if (r["path"], r["mode"], r["trainers"]) != ("grouped", "optimistic", 1) or not r.get("walk_ms_per_step"):
            continue
        walk, worker, redis_ms = r["walk_ms_per_step"], r["worker_cpu_ms_per_step"], r["redis_cpu_ms_per_step"]
        out.append(
            {
                "optimizer": r["optimizer"],
                "walk_ms": walk,
                "worker_ms": worker,
                "redis_ms": redis_ms,
                "one_trainer_steps_per_s": r["steps_per_s"],
                "turns_bound_x": round(worker / walk, 2) if walk else None,
                "cores_bound_steps_per_s": round(1000 * cpus / (worker + redis_ms), 1) if worker + redis_ms else None,
            }
        )
    return out


QUEUED_BEGIN = "<!-- report:queued:begin -->"
QUEUED_END = "<!-- report:queued:end -->"


def render_queued(report: dict[str, Any]) -> str:
    """The markdown of the hard case, spliced between its own markers in docs/training.md."""
    from agent_workers.tools.report.output import markdown_table

    rows = report["queued"]
    speed = {(s["optimizer"], s["path"], s["mode"], s["trainers"]): s["speedup"] for s in scaling(rows)}
    head = (
        f"Measured {report['finished']} ({report['environment']['cpus']} CPUs, broker "
        f"`{report['environment']['broker']}`, τ = {report['environment']['max_staleness']}): the seed's linear "
        f"regression, {report['plan']['queued_epochs']} epochs of batches of {QUEUED_BATCH}, every `train_step` queued "
        "by a bare Celery producer before the workers start; quality against sequential single-process torch on the "
        f"same batches in the same order (goal: gap <= +{QUALITY_GAP_GOAL}); *order alone*: how far sequential torch "
        f"moves when the same batches come interleaved in runs of {QUEUED_INTERLEAVE} (as trainers' groups do; four "
        "orders), the yardstick for a gap; steps/s from the first to the last stored step. Regenerate with "
        "`agent-workers report --part queued`.\n"
    )
    table = markdown_table(
        [
            "optimizer",
            "path",
            "mode",
            "trainers",
            "MSE / floor",
            "sequential",
            "gap",
            "order alone",
            "goal met",
            "steps/s",
            "x one trainer",
            "conflicts/step",
            "recomputed",
            "rebased",
            "commits",
            "CPU ms/step workers",
            "CPU ms/step Redis",
        ],
        [
            [
                r["optimizer"],
                r["path"],
                r["mode"],
                r["trainers"],
                f"{r['ratio']:.4f}",
                f"{r['sequential_ratio']:.4f}",
                f"{r['gap']:+.4f}",
                "{:+.4f}..{:+.4f}".format(*r["order_spread"]) if "order_spread" in r else "",
                "yes" if r["meets_goal"] else "NO",
                r["steps_per_s"],
                speed.get((r["optimizer"], r["path"], r["mode"], r["trainers"]), ""),
                r["conflicts_per_step"],
                r["recomputed"],
                r.get("rebased", ""),
                r["commits"],
                r.get("worker_cpu_ms_per_step", ""),
                r.get("redis_cpu_ms_per_step", ""),
            ]
            for r in rows
        ],
    )
    bounds = "".join(
        f"\n- **{c['optimizer']}**: a step's walk takes {c['walk_ms']} ms of the {c['worker_ms']} ms one trainer "
        f"spends per step, plus {c['redis_ms']} ms of Redis: trainers that take turns for the walk top out at "
        f"{c['worker_ms']} / {c['walk_ms']} = {c['turns_bound_x']}x one trainer on any number of cores, and "
        f"{report['environment']['cpus']} cores at {c['worker_ms']} + {c['redis_ms']} ms per step cap the machine at "
        f"{c['cores_bound_steps_per_s']} steps/s ({c['one_trainer_steps_per_s']} measured with one trainer)."
        for c in ceiling(rows, cpus=report["environment"]["cpus"])
    )
    model = (
        f"\n\n**The ceiling, from this run** (CPU per step counted from /proc and Redis's INFO):{bounds}\n"
        if bounds
        else ""
    )
    return head + "\n" + table + model


def plot_queued(rows: list[dict[str, Any]], path: Any) -> None:
    """Quality gap and steps/s against trainers, one line per (optimizer, path, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, third) = plt.subplots(1, 3, figsize=(15, 4.2))
    runs = sorted({(r["optimizer"], r["path"], r["mode"]) for r in rows})
    for run in runs:
        line = sorted((r for r in rows if (r["optimizer"], r["path"], r["mode"]) == run), key=lambda r: r["trainers"])
        label = " ".join(run)
        left.plot([r["trainers"] for r in line], [r["gap"] for r in line], "o-", label=label)
        right.plot([r["trainers"] for r in line], [r["steps_per_s"] for r in line], "o-", label=label)
        third.plot([r["trainers"] for r in line], [r["conflicts_per_step"] for r in line], "o-", label=label)
    left.axhline(QUALITY_GAP_GOAL, color="grey", linestyle="--", label=f"goal +{QUALITY_GAP_GOAL}")
    left.set(title="MSE/floor minus sequential torch's", xlabel="trainers", ylabel="gap")
    right.set(title="steps/s, all steps queued at once", xlabel="trainers", ylabel="steps/s")
    third.axhline(CONFLICT_GOAL, color="grey", linestyle="--", label=f"goal {CONFLICT_GOAL}")
    third.set(title="conflicts per step", xlabel="trainers", ylabel="lost compare-and-sets / step")
    for ax in (left, right, third):
        ax.set_xticks(sorted({r["trainers"] for r in rows}))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
