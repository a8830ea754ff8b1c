"""Group commit: up to k queued train steps of one model, walked in order, one compare-and-set.

A group reads version ``v`` once and walks its steps IN ORDER locally: step i's gradient is computed at the
parameters (and optimizer state) that steps 0..i-1 left, exactly as k sequential steps of one process would, so one
trainer trains as sequential single-process training does while paying one read and one commit per group (and, in
the worker, one result write and one bulk ack). The group then commits ONCE: one compare-and-set that records all k
update ids with the new version (commit.lua). Every step of a group committed where it was computed has staleness 0.

On a conflict the group is **rebased** when that keeps the τ rule: its gradients are re-applied, in order, through
the optimizer onto the new head, as long as they are at most τ steps stale there (``moved × k``: ``moved`` versions
of about k steps each got ahead of the version they were computed at); otherwise, or when a rollback's barrier
passed them, the walk is recomputed at the new head, so every committed group is a sequential walk from the head it
commits on. With the defaults (k = 8, τ = 4) a group recomputes: re-applied Adam gradients a group stale cost far
more quality than the walk costs time (docs/training.md). A small k or a large τ (SGD with a small rate) rebases.
The epoch fence is the first snapshot's incarnation.

Exactly-once per update id: ids applied before are answered as duplicates before anything is computed; a repeated
id within the group applies once (its twins are duplicates of it); and when the commit script finds an id applied
meanwhile (a redelivery raced us), it refuses the whole group naming those ids, which are dropped before the rest
is re-applied and committed again.

Faults stay with their step: a malformed batch or a non-finite loss, gradient or update fails that step alone and the
walk goes on from the parameters before it; a fault of the whole group (unknown or recreated model, store
unavailable, conflicts past ``max_attempts``, the deadline) is every remaining step's answer.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any

import numpy as np

from agent_workers import metrics
from agent_workers.errors import ModelError, VersionConflictError
from agent_workers.padding import Batch
from agent_workers.store.blobs import Snapshot
from agent_workers.store.params import CommitOutcome, RedisParamStore
from agent_workers.training import steps as training
from agent_workers.training.optim import HyperParams
from agent_workers.training.steps import StepResult


@dataclasses.dataclass(frozen=True)
class Step:
    """One queued train step: its update id ('' = no exactly-once) and its validated mini-batch."""

    update_id: str
    x: Batch
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
    turns: bool = False,
    turn_wait: float | None = None,
) -> list[Answer]:
    """Apply ``steps`` to ``model`` in one commit; one answer per step, in order.

    Args:
        max_staleness: τ, the most steps a re-applied gradient may lag the parameters it is applied to.
        max_attempts: commits to try before the group gives up.
        deadline: ``time.monotonic()`` after which no commit is attempted.
        turns: in optimistic mode, take the model's short best-effort turn around the walk and commit, so that
            trainers of one model walk one after the other instead of colliding (``AGENT_WORKERS_TRAIN_TURNS``).
        turn_wait: the longest wait for the turn (seconds; None: its whole lease), after which the group goes ahead.

    Returns:
        For each step, its :class:`StepResult` (``version``: the group's committed version, or for a duplicate the
        one its first delivery produced; ``staleness``: that step's own) or the exception that is its answer.
    """
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
            with store.exclusive(model, turn=turns, turn_wait=turn_wait):
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


def _walk(
    spec: Any,
    snapshot: Snapshot,
    steps: list[Step],
    live: list[int],
    hp: HyperParams,
    answers: dict[int, Answer],
    grads: dict[int, Any],
    losses: dict[int, float],
    *,
    compute: bool,
) -> tuple[dict[str, Any], list[int]]:
    """Apply the live steps one after the other from ``snapshot``, as k sequential steps would.

    With ``compute``, step i's gradient is computed at the parameters after the steps before it (stored in
    ``grads``/``losses``); without, the stored gradients are re-applied in order (a rebase onto a newer head). A step
    whose batch, gradient or update fails answers alone and the walk goes on from the parameters before it.

    Returns:
        The tensors after the last applied step, and the applied steps in order.
    """
    tensors, applied = snapshot.tensors, []
    for i in live:
        here = dataclasses.replace(snapshot, tensors=tensors)
        step = steps[i]
        try:
            if compute:
                training.check_rows(spec, step.x)
                grads[i], losses[i] = training.compute_gradient(spec, here, step.x, step.y, hp)
            new = training.apply_update(here, grads[i], hp)
            training.check_finite(grads[i], new, hp, loss=losses[i])
        except Exception as exc:  # noqa: BLE001 - this step's data alone
            answers[i] = exc
            continue
        tensors = new
        applied.append(i)
    return tensors, applied


class BuiltOnce:
    """A model spec whose ``build()`` returns the same module for a whole walk.

    ``compute_gradient`` loads each step's parameters (the full state dict, buffers included) into the module it is
    given, so building it once per group instead of once per step changes no result; it saves the construction and
    the random initialisation torch runs in every constructor, a fifth to a quarter of a small model's walk (0.19
    of 0.88 s profiled over 800 steps of the seed's linear model).
    """

    def __init__(self, spec: Any) -> None:
        self._spec = spec
        self._module: Any = None

    def build(self) -> Any:
        """The walk's one module, built on first use."""
        if self._module is None:
            self._module = self._spec.build()
        return self._module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spec, name)  # input_shape, name, ...: the spec's own


def optimizer_steps(snapshot: Snapshot, hp: HyperParams) -> int:
    """How many optimizer steps the parameters of ``snapshot`` have taken (its ``o.<optimizer>.step``; 0 before
    the first), so the staleness of a gradient is counted in steps exactly, whatever size other trainers' groups
    were."""
    counter = snapshot.tensors.get(f"o.{hp.optimizer}.step")
    return 0 if counter is None else int(counter[0])


def stale_hparams(hp: HyperParams, staleness: int) -> HyperParams:
    """The hyperparameters a gradient ``staleness`` steps old is re-applied with: the learning rate divided by its
    staleness (Zhang et al., IJCAI'16, "staleness-aware async-SGD"), so a late gradient moves the parameters less
    the less it knows about them; a fresh one (0) keeps ``hp``."""
    return hp if staleness <= 1 else dataclasses.replace(hp, lr=hp.lr / staleness)


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
    """Walk the live steps in order from the head and commit them once, answering each; on a conflict rebase the
    group onto the new head within τ (or recompute it); raises what fails the whole group."""
    snapshot = store.read(model)
    epoch = snapshot.epoch  # the incarnation the gradients belong to: every commit is fenced by it
    spec = BuiltOnce(store.spec(model, epoch))
    grads: dict[int, Any] = {}
    losses: dict[int, float] = {}
    walk_started = time.perf_counter()
    tensors, applied = _walk(spec, snapshot, steps, live, hp, answers, grads, losses, compute=True)
    walk_s = time.perf_counter() - walk_started
    grad_version, grad_steps = snapshot.version, optimizer_steps(snapshot, hp)
    stale = conflicts = recomputed = attempt = 0
    while applied:
        attempt += 1
        ids = [steps[i].update_id for i in applied if steps[i].update_id]
        training.check_deadline(deadline, f"a group of {len(applied)} train steps on {model!r}")
        result = store.commit(
            model,
            expected=snapshot.version,
            tensors=tensors,
            update_id=ids[0] if ids else "",
            more_ids=ids[1:],
            epoch=epoch,
            info={"loss": float(np.mean([losses[i] for i in applied])), "staleness": stale, "steps": len(applied)},
        )
        metrics.COMMITS.labels(model, result.outcome.value).inc()
        if result.outcome is CommitOutcome.COMMITTED:
            ms = _ms_since(started)
            for i in applied:
                metrics.STALENESS.labels(model).observe(stale)
                answers[i] = StepResult(
                    model, result.version, losses[i], attempt, stale, False, conflicts, recomputed, ms
                )
            metrics.PARAM_VERSION.labels(model).set(result.version)
            return
        if result.outcome is CommitOutcome.DUPLICATE:
            # A redelivery of some of our steps committed meanwhile: drop them (answered as duplicates) and commit
            # the rest, re-applied without them; if the head moved too, that commit conflicts and the rules below apply.
            gone = [i for i in applied if steps[i].update_id in result.applied] or applied
            for i in gone:
                version = result.applied.get(steps[i].update_id, result.version)
                answers[i] = StepResult(
                    model, version, losses[i], attempt, 0, True, conflicts, recomputed, _ms_since(started)
                )
        else:
            conflicts += 1
            if attempt >= max_attempts:
                raise VersionConflictError(
                    f"a group of {len(applied)} train steps on {model!r} still conflicted after {max_attempts} "
                    "attempts; fewer concurrent trainers, AGENT_WORKERS_COMMIT_MODE=lock or a higher "
                    "AGENT_WORKERS_MAX_STALENESS help",
                    expected=snapshot.version,
                    actual=result.version,
                )
            time.sleep(_backoff(attempt, walk_s))
            snapshot = store.read(model)
            if snapshot.epoch != epoch:
                raise ModelError(f"model {model!r} was recreated while this update was computed; it no longer applies")
        live = [i for i in applied if i not in answers]
        # Rebase: every gradient of the group is ``stale`` steps behind the new head (the steps other trainers
        # committed since it was computed; the group's own earlier steps are re-applied with it, so that count is the
        # same for each). Within τ they are re-applied, in order, with the learning rate divided by that staleness;
        # beyond τ, or when a rollback's barrier passed them, the walk is recomputed at the new head. Measured
        # (docs/training.md): Adam re-applying gradients a whole group stale at the full rate oscillates around
        # the optimum (MSE/floor 2-4x with 2-4 trainers).
        stale = max(optimizer_steps(snapshot, hp) - grad_steps, snapshot.version - grad_version)
        compute = stale > max_staleness or grad_version < snapshot.barrier
        if compute:
            grad_version, grad_steps, stale = snapshot.version, optimizer_steps(snapshot, hp), 0
            recomputed += 1
            walk_started = time.perf_counter()
        tensors, applied = _walk(
            spec, snapshot, steps, live, stale_hparams(hp, stale), answers, grads, losses, compute=compute
        )
        if compute:
            walk_s = time.perf_counter() - walk_started


def _backoff(attempt: int, walk_s: float) -> float:
    """Seconds a group that lost its compare-and-set waits before it reads the head again: full jitter over at
    least one walk's time, so that the winner's next group is not met by the same collision, capped."""
    return random.uniform(0, min(training.BACKOFF_CAP, max(training.BACKOFF_BASE * 2**attempt, 2 * walk_s)))


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)
