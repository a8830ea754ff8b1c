"""Group commit: up to k queued train steps of one model, one snapshot, one compare-and-set.

A group reads version ``v`` once, computes every step's gradient against that snapshot, and applies them IN ORDER
through the optimizer, so Adam/SGD state advances k steps exactly as k sequential steps from ``v`` would; the i-th
applied gradient (0-based) has staleness i. The group then commits ONCE: one compare-and-set that records all k
update ids with the new version (commit.lua). Contention drops by about k, and a group costs one read, one commit
and (in the worker) one result write and one bulk ack.

The τ rule stays exact: a gradient computed at version ``v`` is never applied beyond ``v + τ``. Within a group
the staleness is ``moved + i`` (``moved``: how far the head got ahead of the group's snapshot through conflicts),
so the gradients are reused after a conflict only while ``moved + k - 1 <= τ``, else recomputed at the new head
(also when a rollback's barrier passed the snapshot). The epoch fence is the first snapshot's incarnation.

Exactly-once per update id: ids applied before are answered as duplicates before anything is computed; a repeated
id within the group applies once (its twins are duplicates of it); and when the commit script finds an id applied
meanwhile (a redelivery raced us), it refuses the whole group naming those ids, which are dropped before the
group commits again.

Faults stay with their step: a malformed batch or a non-finite loss, gradient or update fails that step alone and the
group goes on without it; a fault of the whole group (unknown or recreated model, store unavailable, conflicts
past ``max_attempts``, the deadline) is every remaining step's answer.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import numpy as np

from agent_workers import metrics
from agent_workers.errors import InputError, ModelError, VersionConflictError
from agent_workers.store.blobs import Snapshot
from agent_workers.store.params import CommitOutcome, RedisParamStore
from agent_workers.training import steps as training
from agent_workers.training.optim import HyperParams
from agent_workers.training.steps import StepResult


@dataclasses.dataclass(frozen=True)
class Step:
    """One queued train step: its update id ('' = no exactly-once) and its validated mini-batch."""

    update_id: str
    x: np.ndarray
    y: np.ndarray


Answer = StepResult | Exception


def group_step(
    store: RedisParamStore,
    model: str,
    steps: list[Step],
    hp: HyperParams,
    *,
    max_staleness: int = 4,
    max_attempts: int = training.DEFAULT_MAX_ATTEMPTS,
    deadline: float | None = None,
) -> list[Answer]:
    """Apply ``steps`` (at most ``max_staleness + 1``) to ``model`` in one commit; one answer per step, in order.

    Args:
        max_staleness: τ; the group may hold at most τ + 1 steps.
        max_attempts: commits to try before the group gives up.
        deadline: ``time.monotonic()`` after which no commit is attempted.

    Returns:
        For each step, its :class:`StepResult` (``version``: the group's committed version, or for a duplicate the
        one its first delivery produced; ``staleness``: that step's own) or the exception that is its answer.

    Raises:
        InputError: more steps than ``max_staleness + 1`` (the τ rule could not hold even without conflicts).
    """
    if len(steps) > max_staleness + 1:
        raise InputError(f"a group of {len(steps)} steps exceeds max_staleness + 1 = {max_staleness + 1}")
    started = time.perf_counter()
    answers: dict[int, Answer] = {}
    first: dict[str, int] = {}
    twins: dict[int, int] = {}
    for i, step in enumerate(steps):
        if step.update_id in first:
            twins[i] = first[step.update_id]
        elif step.update_id:
            first[step.update_id] = i
    live = [i for i in range(len(steps)) if i not in twins]
    try:
        ids = [steps[i].update_id for i in live if steps[i].update_id]
        done = {u: v for u, v in zip(ids, store.applied_many(model, ids), strict=True) if v is not None}
        if done:
            old = [i for i in live if steps[i].update_id in done]
            answers.update(_duplicates(store, model, steps, hp, {i: done[steps[i].update_id] for i in old}, started))
            live = [i for i in live if i not in answers]
        if live:
            with store.exclusive(model):
                _commit(store, model, steps, hp, live, answers, max_staleness, max_attempts, deadline, started)
    except Exception as exc:  # noqa: BLE001 - a fault of the whole group answers every step not yet answered
        for i in range(len(steps)):
            if i not in twins:
                answers.setdefault(i, exc)
    for i, j in twins.items():
        a = answers[j]
        answers[i] = dataclasses.replace(a, attempts=0, staleness=0, duplicate=True) if isinstance(a, StepResult) else a
    return [answers[i] for i in range(len(steps))]


def _duplicates(
    store: RedisParamStore, model: str, steps: list[Step], hp: HyperParams, done: dict[int, int], started: float
) -> dict[int, Answer]:
    """Answers for steps applied before: the version they produced and their loss at the current parameters."""
    snapshot = store.read(model)
    spec = store.spec(model, snapshot.epoch)
    answers: dict[int, Answer] = {}
    for i, version in done.items():
        try:
            loss = training.compute_loss(spec, snapshot, steps[i].x, steps[i].y, hp)
        except Exception as exc:  # noqa: BLE001 - this step's data alone
            answers[i] = exc
            continue
        metrics.COMMITS.labels(model, CommitOutcome.DUPLICATE.value).inc()
        answers[i] = StepResult(model, version, loss, 0, 0, True, latency_ms=_ms_since(started))
    return answers


def _gradients(
    spec: Any, snapshot: Snapshot, steps: list[Step], live: list[int], hp: HyperParams, answers: dict[int, Answer]
) -> tuple[dict[int, Any], dict[int, float]]:
    """Every live step's gradient and loss at ``snapshot``; a step whose batch fails answers alone."""
    grads: dict[int, Any] = {}
    losses: dict[int, float] = {}
    for i in live:
        step = steps[i]
        try:
            if step.x.shape[1:] != spec.input_shape:
                raise InputError(f"x rows must have shape {list(spec.input_shape)}, got {list(step.x.shape[1:])}")
            grads[i], losses[i] = training.compute_gradient(spec, snapshot, step.x, step.y, hp)
        except Exception as exc:  # noqa: BLE001 - this step's data alone
            answers[i] = exc
    return grads, losses


def _commit(
    store: RedisParamStore,
    model: str,
    steps: list[Step],
    hp: HyperParams,
    live: list[int],
    answers: dict[int, Answer],
    max_staleness: int,
    max_attempts: int,
    deadline: float | None,
    started: float,
) -> None:
    """Compute, apply in order and commit the live steps, answering each; raises what fails the whole group."""
    snapshot = store.read(model)
    epoch = snapshot.epoch  # the incarnation the gradients belong to: every commit is fenced by it
    spec = store.spec(model, epoch)
    grads, losses = _gradients(spec, snapshot, steps, live, hp, answers)
    grad_version = snapshot.version
    conflicts = recomputed = attempt = 0
    while True:
        live = [i for i in live if i not in answers]
        if not live:
            return
        attempt += 1
        moved = snapshot.version - grad_version
        tensors, applied = snapshot.tensors, []
        for i in live:
            new = training.apply_update(dataclasses.replace(snapshot, tensors=tensors), grads[i], hp)
            try:
                training.check_finite(grads[i], new, hp, loss=losses[i])
            except InputError as exc:
                answers[i] = exc  # this step alone; the group goes on from the parameters before it
                continue
            tensors = new
            applied.append(i)
        if not applied:
            return
        ids = [steps[i].update_id for i in applied if steps[i].update_id]
        training.check_deadline(deadline, f"a group of {len(applied)} train steps on {model!r}")
        result = store.commit(
            model,
            expected=snapshot.version,
            tensors=tensors,
            update_id=ids[0] if ids else "",
            more_ids=ids[1:],
            epoch=epoch,
            info={
                "loss": float(np.mean([losses[i] for i in applied])),
                "staleness": moved + len(applied) - 1,
                "steps": len(applied),
            },
        )
        metrics.COMMITS.labels(model, result.outcome.value).inc()
        if result.outcome is CommitOutcome.COMMITTED:
            ms = _ms_since(started)
            for pos, i in enumerate(applied):
                metrics.STALENESS.labels(model).observe(moved + pos)
                answers[i] = StepResult(
                    model, result.version, losses[i], attempt, moved + pos, False, conflicts, recomputed, ms
                )
            metrics.PARAM_VERSION.labels(model).set(result.version)
            return
        if result.outcome is CommitOutcome.DUPLICATE:
            # A redelivery of some of our steps committed meanwhile: drop them (answered as duplicates) and commit
            # the rest at once; if the head moved too, that commit conflicts and the rules below apply.
            gone = [i for i in applied if steps[i].update_id in result.applied] or applied
            for i in gone:
                version = result.applied.get(steps[i].update_id, result.version)
                answers[i] = StepResult(
                    model, version, losses[i], attempt, 0, True, conflicts, recomputed, _ms_since(started)
                )
            continue
        conflicts += 1
        if attempt >= max_attempts:
            raise VersionConflictError(
                f"a group of {len(applied)} train steps on {model!r} still conflicted after {max_attempts} attempts; "
                "fewer concurrent trainers, AGENT_WORKERS_COMMIT_MODE=lock or a higher AGENT_WORKERS_MAX_STALENESS "
                "help",
                expected=snapshot.version,
                actual=result.version,
            )
        # Full jitter, capped: trainers that collided do not collide again in lockstep.
        time.sleep(random.uniform(0, min(training.BACKOFF_CAP, training.BACKOFF_BASE * 2**attempt)))
        snapshot = store.read(model)
        if snapshot.epoch != epoch:
            raise ModelError(f"model {model!r} was recreated while this update was computed; it no longer applies")
        # The last step of the group would land at staleness moved + len - 1: keep it within τ, else recompute.
        if snapshot.version - grad_version + len(applied) - 1 > max_staleness or grad_version < snapshot.barrier:
            grads, losses = _gradients(spec, snapshot, steps, applied, hp, answers)
            grad_version = snapshot.version
            recomputed += 1


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
