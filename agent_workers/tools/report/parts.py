"""The report's four parts: linear regression and the digits MLP trained through the queue, commit coordination
between concurrent trainers, and parameter fetch latency."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np
import redis
import torch

from agent_workers.models import ModelSpec, make_spec, parameter_count
from agent_workers.store.blobs import chunk_keys
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.report.lab import (
    ACCURACY_GAP_GOAL,
    ACCURACY_GOAL,
    DIGITS_BATCH,
    DIGITS_HIDDEN,
    DIGITS_HP,
    LINEAR_HP,
    MSE_GOAL,
    Lab,
    Plan,
    layout,
    send_steps,
    step_stats,
    stop_all,
    train_through_queue,
)
from agent_workers.tools.stats import percentile

# -- 1. linear regression ---------------------------------------------------------------------------------------


def linear_regression(lab: Lab, plan: Plan) -> list[dict[str, Any]]:
    from agent_workers.tools.demo import N_FEATURES, N_TEST, seed_data

    x, y = seed_data()
    x_train, y_train, x_test, y_test = x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]
    floor = float(np.mean((x_test[:, 0] - y_test) ** 2))
    dataset = lab.datasets.upload(x_train, y_train.reshape(-1, 1))
    rows = []
    for path, n in [(p, n) for p in plan.linear_paths for n in plan.linear_trainers]:
        lab.progress(f"[1/4] linear regression, {path}, {n} trainer process(es): starting workers")
        workers = lab.workers(n, path=path)
        try:
            model = f"linear-{path}-{n}"
            lab.store.create(model, make_spec("linear", in_features=N_FEATURES, out_features=1), seed=0, replace=True)
            # In flight: two steps per trainer, or two groups' worth when grouped (so groups can form).
            results, seconds = send_steps(
                lab,
                model,
                dataset,
                len(x_train),
                epochs=plan.linear_epochs,
                batch_size=100,
                hparams=LINEAR_HP,
                window=2 * n * lab.group(path),
                label=f"linear {path} x{n}",
            )
        finally:
            stop_all(workers)
        params = lab.store.read(model).parameters()
        pred = x_test @ params["weight"].numpy().T + params["bias"].numpy()
        mse = float(np.mean((pred[:, 0] - y_test) ** 2))
        row = {
            "path": path,
            "trainers": n,
            "test_mse": round(mse, 5),
            "floor_mse": round(floor, 5),
            "ratio": round(mse / floor, 4),
            "meets_goal": mse / floor <= MSE_GOAL,
            "version": lab.store.head(model).version,
            **step_stats(results, seconds),
        }
        lab.progress(
            f"  -> test MSE {mse:.4f}, floor {floor:.4f}, ratio {mse / floor:.3f} "
            f"(goal <= {MSE_GOAL}); {row['steps_per_s']} steps/s, conflict rate {row['conflict_rate']}"
        )
        rows.append(row)
    return rows


# -- 2. digits --------------------------------------------------------------------------------------------------


def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits scaled to [0, 1]; a stratified 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_train, x_test, y_train.astype(np.int64), y_test.astype(np.int64)


def digits_spec() -> ModelSpec:
    return make_spec("mlp", in_features=64, hidden=DIGITS_HIDDEN, out_features=10)


def accuracy(module: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((module(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def torch_loop(spec: ModelSpec, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int = 0) -> torch.nn.Module:
    """The single-process reference: same initial weights, batch order and Adam settings as the queued run."""
    torch.manual_seed(seed)
    module = spec.build()
    opt = torch.optim.Adam(module.parameters(), lr=DIGITS_HP["lr"])
    rng = np.random.default_rng(0)  # Client.train's batch order (its seed 0)
    steps = math.ceil(len(x) / DIGITS_BATCH)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(steps):
            rows = order[i * DIGITS_BATCH : (i + 1) * DIGITS_BATCH]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(torch.from_numpy(x[rows])), torch.from_numpy(y[rows]))
            loss.backward()
            opt.step()
    return module


def digits(lab: Lab, plan: Plan) -> dict[str, Any]:
    x_train, x_test, y_train, y_test = digits_data()
    spec = digits_spec()
    n = plan.digits_trainers
    lab.progress(f"[2/4] digits MLP, single-process torch loop ({plan.digits_epochs} epochs)")
    reference = accuracy(torch_loop(spec, x_train, y_train, epochs=plan.digits_epochs), x_test, y_test)
    lab.progress(f"  -> torch loop accuracy {reference:.4f}")
    lab.progress(f"[2/4] digits MLP, {n} trainer processes through the queue: starting workers")
    workers = lab.workers(n)
    try:
        torch.manual_seed(0)
        lab.store.create("digits", spec, module=spec.build(), replace=True)
        results, seconds = train_through_queue(
            lab,
            "digits",
            x_train,
            y_train,
            epochs=plan.digits_epochs,
            batch_size=DIGITS_BATCH,
            hparams=DIGITS_HP,
            window=2 * n,
            label=f"digits x{n}",
        )
    finally:
        stop_all(workers)
    module = spec.build()
    module.load_state_dict(lab.store.read("digits").parameters())
    ours = accuracy(module, x_test, y_test)
    gap = reference - ours
    lab.progress(f"  -> queued accuracy {ours:.4f} (torch loop {reference:.4f}, gap {gap * 100:+.2f} points)")
    return {
        "trainers": n,
        "epochs": plan.digits_epochs,
        "hidden": DIGITS_HIDDEN,
        "hparams": DIGITS_HP,
        "batch_size": DIGITS_BATCH,
        "test_rows": len(y_test),
        "accuracy": round(ours, 4),
        "torch_accuracy": round(reference, 4),
        "gap_points": round(gap * 100, 2),
        "meets_goal": ours >= ACCURACY_GOAL and gap <= ACCURACY_GAP_GOAL,
        **step_stats(results, seconds),
    }


# -- 3. commit coordination ------------------------------------------------------------------------------------


def coordination(lab: Lab, plan: Plan) -> list[dict[str, Any]]:
    x_train, _, y_train, _ = digits_data()
    dataset = lab.datasets.upload(x_train, y_train)
    spec = digits_spec()
    rng = np.random.default_rng(1)
    batches = [rng.choice(len(x_train), DIGITS_BATCH, replace=False).tolist() for _ in range(plan.commit_steps)]
    rows = []
    for path, mode in plan.commit_runs:
        for n in plan.commit_trainers:
            processes, threads = layout(n)
            lab.progress(
                f"[3/4] {plan.commit_steps} steps, {n} trainers ({processes} process(es) x {threads} "
                f"thread(s)), {path}, {mode}: starting workers"
            )
            workers = lab.workers(n, mode=mode, path=path)
            try:
                model = f"coord-{path}-{mode}-{n}"
                torch.manual_seed(0)
                lab.store.create(model, spec, module=spec.build(), replace=True)
                started = time.perf_counter()
                handles = [
                    lab.client.send_train_step(model, dataset=dataset, rows=b, hparams=DIGITS_HP) for b in batches
                ]
                results = [lab.client.wait(h, 300) for h in handles]
                seconds = time.perf_counter() - started
            finally:
                stop_all(workers)
            row = {
                "path": path,
                "group": lab.group(path),
                "mode": mode,
                "trainers": n,
                "processes": processes,
                "threads": threads,
                **step_stats(results, seconds),
            }
            lab.progress(
                f"  -> {row['steps_per_s']} steps/s in {row['commits']} commits, conflict rate "
                f"{row['conflict_rate']}, latency p50 {row['latency_p50_ms']} ms, p99 {row['latency_p99_ms']} ms, "
                f"staleness {row['staleness']}"
            )
            rows.append(row)
    return rows


# -- 4. fetch latency ------------------------------------------------------------------------------------------


def fetch_latency(lab: Lab, plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for (label, width, hidden), reads in zip(plan.fetch_sizes, plan.fetch_reads, strict=True):
        spec = make_spec("mlp", in_features=width, hidden=[hidden], out_features=10)
        torch.manual_seed(0)
        module = spec.build()
        params = parameter_count(module)
        lab.progress(f"[4/4] fetch latency, {label} parameters ({params:,}): creating the model")
        model = f"fetch-{label.strip('~')}"
        lab.store.create(model, spec, module=module, replace=True)
        del module
        cold = RedisParamStore.from_settings(lab.settings, cache=False)
        warm = RedisParamStore.from_settings(lab.settings)
        head = cold.head(model)
        full = []
        for _ in range(reads):
            t = time.perf_counter()
            cold.read(model)
            full.append(time.perf_counter() - t)
        warm.read(model)
        checks = []
        for _ in range(200):
            t = time.perf_counter()
            warm.read(model)  # unchanged version: one HMGET, no download
            checks.append(time.perf_counter() - t)
        snap = cold.read(model)
        commits = []
        for _ in range(min(reads, 3)):
            current = cold.head(model)
            t = time.perf_counter()
            cold.commit(model, expected=current.version, tensors=snap.tensors, epoch=current.epoch)
            commits.append(time.perf_counter() - t)
        raw_get, raw_set = raw_transfer(lab, chunk_keys(head.blob, head.chunks), reads)
        blob_mb = sum(t.numel() * t.element_size() for t in snap.tensors.values()) / 2**20
        row = {
            "model": label,
            "parameters": params,
            "blob_mib": round(blob_mb, 1),
            "chunks": head.chunks,
            "read_p50_ms": round(statistics.median(full) * 1000, 2),
            "read_max_ms": round(max(full) * 1000, 2),
            "check_p50_ms": round(statistics.median(checks) * 1000, 3),
            "check_p99_ms": round(percentile(checks, 99) * 1000, 3),
            "commit_p50_ms": round(statistics.median(commits) * 1000, 2),
            "raw_get_p50_ms": round(raw_get * 1000, 2),
            "raw_set_p50_ms": round(raw_set * 1000, 2),
            "read_vs_raw_get": round(statistics.median(full) / raw_get, 2),
            "commit_vs_raw_set": round(statistics.median(commits) / raw_set, 2),
        }
        lab.progress(
            f"  -> full read p50 {row['read_p50_ms']} ms ({row['chunks']} chunk(s), {row['blob_mib']} MiB), "
            f"unchanged-version check p50 {row['check_p50_ms']} ms, commit p50 {row['commit_p50_ms']} ms; "
            f"{row['read_vs_raw_get']}x a raw MGET, {row['commit_vs_raw_set']}x raw SETs of the same bytes"
        )
        lab.store.delete(model)
        rows.append(row)
    return rows


def raw_transfer(lab: Lab, keys: list[str], reads: int) -> tuple[float, float]:
    """Median seconds of a plain redis-py client (default settings) reading ``keys`` with one MGET, and writing the
    same bytes to fresh keys in one pipeline: the floor a load and a commit are measured against."""
    client = redis.Redis.from_url(lab.settings.params_url)
    try:
        parts = client.mget(keys)
        gets, sets = [], []
        for i in range(reads):
            t = time.perf_counter()
            client.mget(keys)
            gets.append(time.perf_counter() - t)
            scratch = [f"{lab.settings.namespace}:raw:{i}:{n}" for n in range(len(parts))]
            t = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            for key, part in zip(scratch, parts, strict=True):
                pipe.set(key, part)
            pipe.execute()
            sets.append(time.perf_counter() - t)
            client.delete(*scratch)
        return statistics.median(gets), statistics.median(sets)
    finally:
        client.close()
