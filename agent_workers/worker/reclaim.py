"""Fast reclaim on a Redis broker: a dead worker's unacknowledged messages go back to their queues within seconds,
without a short visibility timeout.

kombu restores an unacknowledged message only once it is older than the visibility timeout (one hour by default),
and lowering the timeout re-runs long tasks whose worker is alive. Instead, as dramatiq's Redis broker does (worker
heartbeats in a sorted set, a maintenance pass that requeues the messages of workers whose heartbeat is too old):

* every consumer has an id and a **heartbeat**: ``<ns>:reclaim:heartbeats`` scores the id with Redis's clock
  (``TIME``, so skewed hosts agree), refreshed every ``reclaim_after / 5`` seconds;
* the pop script (``lua/pop_and_record.lua``) adds each tag it records as unacknowledged to the consumer's **held
  set** ``<ns>:reclaim:held:<id>``, in the same atomic step; every ack, reject or restore removes it
  (``kombu_redis.QoS``, whose index removal ``ack_all`` uses too);
* every live consumer **sweeps** every ``reclaim_after / 5`` seconds: ``lua/reclaim.lua`` atomically claims the
  held tags of every worker whose heartbeat is older than ``reclaim_after`` (index score 0, held set and heartbeat
  deleted), then each is restored with kombu's own ``QoS.restore_by_tag`` (the same routing, priority and
  ``redelivered`` flag as kombu's sweep; its WATCH on the unacked hash makes two restorers push once). A sweeper
  that dies in between leaves score 0 behind, which kombu's visibility sweep restores at its next pass.

kombu's visibility sweep stays as the backstop (a consumer without a heartbeat, a held set lost with its Redis).

**Why a heartbeat process, not the event-loop timer nor a thread.** The batcher computes on the event loop: a
forward pass or a parameter load of many seconds would starve a timer, and a thread of the same process stops
whenever a forward pass holds the GIL (pure-Python model code, a C extension that keeps it): a live worker's batch
would be handed to another worker and computed twice. A child process (heartbeat.py) beats instead, for exactly as
long as this process lives; only a Sentinel broker, whose pool the child cannot rebuild, keeps the thread. The sweep
needs kombu's channel, so it stays on the loop: a busy loop only delays its own sweeps, never anyone's heartbeat. A
process whose loop is wedged but whose heartbeat lives keeps its messages until kombu's visibility timeout: the
backstop, as before.

**A clean stop deregisters.** On a warm shutdown the batcher first finishes what it holds (``BatcherStep`` stops
after this step starts, so before it stops); then :meth:`Reclaimer.stop` restores whatever this consumer still holds
(eta-held or prefetched messages), deletes its held set and removes its heartbeat: no other worker reclaims it or
warns. Only a worker that died without deregistering is logged as having "missed its heartbeats".
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from celery import bootsteps
from kombu.utils.encoding import bytes_to_str

from agent_workers import lua
from agent_workers.keys import Keys
from agent_workers.worker.heartbeat import HeartbeatProcess, connection_of
from agent_workers.worker.kombu_redis import UNACKED_INDEX_KEY

log = logging.getLogger(__name__)
#: Dead workers claimed per sweep (their messages: all of them).
SWEEP_WORKERS = 16


class Reclaimer:
    """One consumer's heartbeat (a child process) and sweep (the event-loop timer) on a Redis broker channel.

    Args:
        channel: the consuming :class:`agent_workers.worker.kombu_redis.Channel`.
        keys: key builder of the namespace (heartbeats and held sets live in the broker's database).
        worker_id: this consumer's id, unique per process and connection.
        reclaim_after: seconds without a heartbeat after which a worker is dead.
        timer: the consumer's event-loop timer, for the sweep.
    """

    def __init__(self, *, channel: Any, keys: Keys, worker_id: str, reclaim_after: float, timer: Any) -> None:
        self.channel = channel
        self.keys = keys
        self.worker_id = worker_id
        self.reclaim_after = float(reclaim_after)
        self.interval = max(0.2, self.reclaim_after / 5)
        self.timer = timer
        # A client on the channel's synchronous pool: not the consumer's own (asynchronous) connection.
        self._client = channel.Client(connection_pool=channel.pool)
        self._beat_script = self._client.register_script(lua.source("heartbeat"))
        self._sweep_script = self._client.register_script(lua.source("reclaim"))
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: HeartbeatProcess | None = None
        self._tref: Any = None

    def start(self) -> None:
        """Beat once, then record what this consumer pops, beat from a child process, and sweep on the timer."""
        self.beat()  # before the first pop records a holder: no held set without a heartbeat
        self.channel.reclaim_key = self.keys.held(self.worker_id)
        self._start_heartbeat()
        self._tref = self.timer.call_repeatedly(self.interval, self._tick)

    def _start_heartbeat(self) -> None:
        connection = connection_of(self.channel.pool)
        if connection is None:
            self._beat_from_thread("the heartbeat process cannot rebuild this broker's connection pool")
            return
        self._process = HeartbeatProcess(
            connection=connection, key=self.keys.heartbeats(), worker_id=self.worker_id, interval=self.interval
        )
        self._process.start()

    def _beat_from_thread(self, why: str) -> None:
        log.warning(
            "fast reclaim beats from a thread (%s): a forward pass holding the GIL for over %.0f s lets another "
            "worker reclaim this worker's batch",
            why,
            self.reclaim_after,
        )
        self._thread = threading.Thread(target=self._run, name="aw-heartbeat", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        code = None if self._process is None else self._process.exit_code()
        if code is not None:
            self.beat()
            self._process = None
            self._beat_from_thread(f"the heartbeat process exited with status {code}")
        self.sweep()

    def stop(self) -> int:
        """Stop beating and sweeping, then deregister (a clean stop): restore what this consumer still holds, remove
        its held set and heartbeat, so that no other worker reclaims it. Returns the messages restored.

        When Redis cannot be reached the heartbeat expires instead: the others reclaim what is left
        ``reclaim_after`` seconds later, as after a crash."""
        self._stopped.set()
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            return self._deregister()
        except Exception as exc:  # noqa: BLE001 - the broker is gone: the others reclaim us after reclaim_after
            log.warning(
                "clean stop: could not deregister consumer %s (%s); the others reclaim what it held in %.0f s",
                self.worker_id,
                exc,
                self.reclaim_after,
            )
            return 0

    def _deregister(self) -> int:
        held = self.keys.held(self.worker_id)
        tags = [bytes_to_str(t) for t in self._client.smembers(held)]
        for tag in tags:  # what the batcher did not finish: back to its queue now, not in reclaim_after seconds
            self.channel.qos.restore_by_tag(tag, client=self._client)
        self.channel.reclaim_key = None
        self._client.delete(held)
        self._client.zrem(self.keys.heartbeats(), self.worker_id)
        log.info("clean stop: consumer %s deregistered (restored %d held messages)", self.worker_id, len(tags))
        return len(tags)

    def beat(self) -> None:
        self._beat_script(keys=[self.keys.heartbeats()], args=[self.worker_id])

    def _run(self) -> None:
        failing = False
        while not self._stopped.wait(self.interval):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - keep beating; the others reclaim us only if this lasts
                if not failing:
                    log.warning("heartbeat failed; retrying every %.1f s", self.interval, exc_info=True)
                failing = True
            else:
                if failing:
                    log.info("heartbeat restored")
                failing = False

    def sweep(self) -> list[str]:
        """Restore the messages of every worker whose heartbeat is older than ``reclaim_after``; returns their tags."""
        try:
            workers, tags = self._sweep_script(
                keys=[self.keys.heartbeats(), UNACKED_INDEX_KEY],
                args=[self.reclaim_after, self.keys.held_prefix(), self.worker_id, SWEEP_WORKERS],
            )
            tags = [bytes_to_str(t) for t in tags]
            for tag in tags:
                self.channel.qos.restore_by_tag(tag, client=self._client)
        except Exception:  # noqa: BLE001 - a sweep must never disturb the consumer; claimed tags have score 0
            log.warning("reclaim sweep failed; kombu's visibility sweep restores what it claimed", exc_info=True)
            return []
        for worker in workers:
            log.warning(
                "worker %s missed its heartbeats for %.0f s (it crashed or was killed: a clean stop deregisters): "
                "reclaimed",
                bytes_to_str(worker),
                self.reclaim_after,
            )
        if tags:
            log.warning("reclaimed %d unacknowledged messages of dead workers", len(tags))
        return tags


class ReclaimStep(bootsteps.StartStopStep):
    """Consumer bootstep: fast reclaim for a Redis broker (see the module docstring); on every (re)connect."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.reclaimer: Reclaimer | None = None

    def start(self, c: Any) -> None:
        settings = getattr(c.app, "settings", None)
        if settings is None or not settings.broker_is_redis:
            return
        channel = c.task_consumer.channel
        visibility = f"a killed worker's messages return after the visibility timeout ({settings.visibility_timeout} s)"
        if not settings.reclaim_after:
            log.info("fast reclaim is off (AGENT_WORKERS_RECLAIM_AFTER=0): %s", visibility)
            return
        can = getattr(channel, "_can_bulk_pop", None)
        if can is None or not can():
            log.warning(
                "fast reclaim is off: the broker is not Redis >= 7.0 without a global key prefix, or the transport is "
                "not agent_workers.worker.kombu_redis; %s",
                visibility,
            )
            return
        worker_id = f"{c.hostname}/{uuid.uuid4().hex[:8]}"
        self.reclaimer = Reclaimer(
            channel=channel,
            keys=Keys(settings.namespace),
            worker_id=worker_id,
            reclaim_after=settings.reclaim_after,
            timer=c.timer,
        )
        self.reclaimer.start()
        log.info("fast reclaim: consumer %s, reclaimed %d s after its last beat", worker_id, settings.reclaim_after)

    def stop(self, c: Any) -> None:
        if self.reclaimer is not None:
            self.reclaimer.stop()
            self.reclaimer = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)
