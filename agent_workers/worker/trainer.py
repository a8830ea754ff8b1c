"""The batched queue path of ``agent_workers.train_step``: queued steps of one model become group commits.

The receiving half (check, decode, hold, buffer, one pipelined result write, bulk acks, retries, Flower events) is
:class:`~agent_workers.worker.intake.Intake`; this module serves a flush:

1. every request is bound to train_step's arguments (docs/tasks.md), its hyperparameters parsed, its mini-batch
   resolved (inline, or rows of an uploaded dataset) and checked against ``AGENT_WORKERS_MAX_INPUT_ELEMENTS``; a
   request that fails any of this fails alone;
2. requests are grouped by (model, hyperparameters) and each group, in chunks of ``AGENT_WORKERS_TRAIN_GROUP``,
   is applied by :func:`agent_workers.training.groups.group_step`: one head read, the steps walked in arrival
   order, one commit;
3. each request gets its own result (the StepResult JSON of the per-step path), state and events; a store outage
   retries the request (its update id makes the retry a no-op if the commit had landed).

Redelivered requests are served alone after the rest of the flush, with the batcher's poison count. Like the
predict batcher, the work runs in the worker's event loop: a training message is small and a group of small-model
steps takes milliseconds, and while it runs the worker consumes nothing else; in lock mode, where a group may wait
for another process's commit lock, groups always run in the compute thread instead. An optimistic group's turn
(``AGENT_WORKERS_TRAIN_TURNS``) is waited for on the event loop: usually another trainer's walk, at most a lease
(0.5 s, a dead holder's) on a dedicated trainer and :data:`MIXED_TURN_WAIT` on a worker that also serves predictions,
after which the group goes ahead without the turn (the compare-and-set still decides).
``fit`` is not batched (it runs many steps itself, in the pool).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import states

from agent_workers.config import BatchSettings
from agent_workers.errors import InputError, ModelError, StoreUnavailableError
from agent_workers.models import ModelSpec
from agent_workers.training.groups import Step, group_step
from agent_workers.training.optim import HyperParams
from agent_workers.training.sizing import GroupSizer
from agent_workers.training.steps import StepResult, batch_of
from agent_workers.worker import redelivery
from agent_workers.worker.intake import Intake, register
from agent_workers.worker.limits import limited_strategy
from agent_workers.worker.policy import BatchPolicy
from agent_workers.worker.requests import Pending
from agent_workers.worker.results import Outcome

log = logging.getLogger(__name__)

#: the longest an optimistic group waits for its turn on the event loop of a worker that also serves predictions
#: (seconds): about one other trainer's walk of a full group, so a dead holder delays predictions this long at most
MIXED_TURN_WAIT = 0.025

#: train_step's parameters in order (docs/tasks.md), for binding positional and keyword arguments alike.
TRAIN_STEP_PARAMS = ("model", "x", "y", "hparams", "dataset", "rows", "update_id")

#: A group whose every answer is one of these never resolved its model (unknown, unreadable, or store down).
_UNRESOLVED = (ModelError, StoreUnavailableError)

GroupKey = tuple[str, HyperParams]
Member = tuple[Pending, Step]


class _GroupPolicy(BatchPolicy):
    """Flushes once the buffer holds a whole group at the adaptive size (the largest model's next group), so a
    window of k steps is served at once however large the cap lets groups grow."""

    def __init__(self, settings: BatchSettings, sizer: GroupSizer) -> None:
        super().__init__(settings)
        self.sizer = sizer

    @property
    def max_batch_size(self) -> int:
        return self.sizer.largest()


class TrainIntake(Intake):
    """Buffers train_step requests in a worker's event loop and applies them as group commits of at most
    ``group`` steps per (model, hyperparameters)."""

    def __init__(self, *, task: Any, app: Any, consumer: Any, group: int, cap: int) -> None:
        # Lock mode: a group may wait for another process's commit lock, so it always runs in the compute thread
        # (depth 2); the event loop goes on receiving (predictions too) while it waits. An optimistic turn is waited
        # for on the loop (groups there form larger and commit less: 640 against 450 steps/s in make demo), at most
        # MIXED_TURN_WAIT on a worker that also serves predictions.
        depth = 2 if app.settings.commit_mode == "lock" else 0
        serves_inference = app.settings.inference_queue in (getattr(app.amqp.queues, "consume_from", None) or {})
        self.turn_wait = MIXED_TURN_WAIT if serves_inference else None
        self.sizer = GroupSizer(start=group, cap=cap)
        policy = _GroupPolicy(
            BatchSettings(max_batch_size=cap, max_wait_ms=app.settings.batch.max_wait_ms, pipeline_depth=depth),
            self.sizer,
        )
        super().__init__(task=task, app=app, consumer=consumer, policy=policy)

    def _serve_later(self, item: Any) -> list[Outcome]:
        key, member = item
        req = member[0]
        try:
            attempt = redelivery.count_attempt(self.app.store, req.id)
        except Exception as exc:  # noqa: BLE001 - a parameter-Redis blip: retry later
            return [self._retry_or_fail(req, StoreUnavailableError(f"parameter store unavailable: {exc}"))]
        if attempt >= redelivery.MAX_DELIVERIES:
            log.error("train step %s took its worker down %d times; failing it as poison", req.id, attempt)
            return [Outcome(req, states.FAILURE, redelivery.poison_error(attempt))]
        return self._serve_group(key, [member])

    def _serve(self, batch: list[Pending]) -> tuple[list[Outcome], list[tuple[GroupKey, Member]]]:
        outcomes: list[Outcome] = []
        groups: dict[GroupKey, list[Member]] = {}
        solo: list[tuple[GroupKey, Member]] = []
        specs: dict[str, ModelSpec] = {}
        now_utc = datetime.now(UTC)
        for req in batch:
            dropped = self._revoked_or_expired(req, now_utc)
            if dropped is not None:
                outcomes.append(dropped)
                continue
            try:
                model, hp, step = self._bind(req, specs)
            except StoreUnavailableError as exc:  # a dataset could not be read: transient
                outcomes.append(self._retry_or_fail(req, exc))
                continue
            except Exception as exc:  # noqa: BLE001 - InputError, or arguments no one expected: this request alone
                outcomes.append(Outcome(req, states.FAILURE, exc))
                continue
            if req.redelivered:
                solo.append(((model, hp), (req, step)))
            else:
                groups.setdefault((model, hp), []).append((req, step))
        self._store_started([r for members in groups.values() for r, _ in members])
        for key, members in groups.items():
            start = 0
            while start < len(members):
                # The size is chosen again for every group: the last commit's conflicts decide the next one's size.
                size = self.sizer.size(key[0])
                outcomes.extend(self._serve_group(key, members[start : start + size]))
                start += size
        return outcomes, solo

    def _bind(self, req: Pending, specs: dict[str, ModelSpec]) -> tuple[str, HyperParams, Step]:
        """train_step's arguments of ``req``: its model, hyperparameters and checked mini-batch."""
        if len(req.args) > len(TRAIN_STEP_PARAMS):
            raise InputError(f"train_step takes at most {len(TRAIN_STEP_PARAMS)} arguments, got {len(req.args)}")
        bound = dict(zip(TRAIN_STEP_PARAMS, req.args, strict=False))
        for name, value in req.kwargs.items():
            if name not in TRAIN_STEP_PARAMS or name in bound:
                raise InputError(f"train_step got an unexpected or repeated argument {str(name)[:60]!r}")
            bound[name] = value
        model, update_id = bound.get("model"), bound.get("update_id")
        if not isinstance(model, str):
            raise InputError(f"model must be a model name (a string), got {type(model).__name__}")
        if update_id is not None and not isinstance(update_id, str):
            raise InputError(f"update_id must be a string, got {type(update_id).__name__}")
        hp = HyperParams.from_json(bound.get("hparams"))
        x, y = bound.get("x"), bound.get("y")
        if bound.get("dataset") is not None:
            x, y = self.app.datasets.rows(
                bound["dataset"], bound.get("rows"), max_elements=self.app.settings.max_input_elements
            )
        elif x is None or y is None:
            raise InputError("train_step needs x and y, or dataset and rows")
        if model not in specs:  # one head read per model and flush: the signature decodes x and y
            specs[model] = self.app.store.spec(model)
        xa, ya = batch_of(specs[model], x, y, max_elements=self.app.settings.max_input_elements)
        return model, hp, Step(update_id or req.id, xa, ya)

    def _serve_group(self, key: GroupKey, members: list[Member]) -> list[Outcome]:
        model, hp = key
        for req, _ in members:  # Flower shows received / started / succeeded times per request
            self.reporter.event("task-started", req)
        settings = self.app.settings
        started = time.monotonic()
        answers = group_step(
            self.app.store,
            model,
            [step for _, step in members],
            hp,
            max_staleness=settings.max_staleness,
            deadline=started + settings.task_time_limit,
            turns=settings.train_turns,
            turn_wait=self.turn_wait,
        )
        elapsed = time.monotonic() - started
        committed = [a for a in answers if isinstance(a, StepResult) and not a.duplicate]
        self.sizer.observe(model, steps=len(committed), conflicts=max((a.conflicts for a in committed), default=0))
        if any(not isinstance(a, _UNRESOLVED) for a in answers):
            # Labelled by name only once the store resolved it: a stream of made-up names shares UNKNOWN_MODEL.
            self.labels.known(model)
        outcomes = []
        for (req, _), answer in zip(members, answers, strict=True):
            if isinstance(answer, StepResult):
                outcomes.append(Outcome(req, states.SUCCESS, answer.to_json(), elapsed))
            elif isinstance(answer, StoreUnavailableError):
                outcomes.append(self._retry_or_fail(req, answer))
            else:
                outcomes.append(Outcome(req, states.FAILURE, answer, elapsed))
        return outcomes


def train_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """The ``Task.Strategy`` of ``agent_workers.train_step``: group commits through a :class:`TrainIntake` when
    ``AGENT_WORKERS_TRAIN_GROUP`` > 1, else one pool task per step (the size-checked default strategy)."""
    group = getattr(getattr(app, "settings", None), "train_group", 1)
    if group <= 1:
        return limited_strategy(task, app, consumer, **kwargs)
    cap = max(group, app.settings.train_group_max)
    intake = TrainIntake(task=task, app=app, consumer=consumer, group=group, cap=cap)
    return register(app, task.name, intake).on_message
