"""Worker and consumer bootsteps: start-up checks, dead-letter queues, the batcher's warm shutdown, queue depth,
and the ready file."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from celery import bootsteps, signals

from agent_workers import metrics
from agent_workers.contract import dead_letter_queue
from agent_workers.errors import ConfigError
from agent_workers.models import load_plugins
from agent_workers.worker import allocator
from agent_workers.worker.batcher import check_prefetch
from agent_workers.worker.intake import live_intakes
from agent_workers.worker.kombu_redis import queue_depth
from agent_workers.worker.launch import UNIQUE, unique_node_name

log = logging.getLogger(__name__)


class StartupChecks(bootsteps.Step):
    """Worker bootstep: start-up checks, torch threads, plugin imports and the metrics endpoint.

    A bootstep rather than a ``worker_init`` handler because Celery logs and swallows exceptions raised by signal
    handlers, and a worker that cannot work must not start.
    """

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        app = worker.app
        if getattr(app, "settings", None) is None:  # not our WorkerApp
            return
        try:
            self._check(app)
            # Here, not only in the batcher's strategy (consumer start), where Celery prints a long traceback.
            check_prefetch(app, (worker.prefetch_multiplier or 0) * (worker.concurrency or 1))
        except ConfigError as exc:
            # Celery would print a long traceback around the one line that names the fix.
            print(f"agent-workers: ConfigError: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    @staticmethod
    def _check(app: Any) -> None:
        check_app(app)
        warn_unknown_queues(app)
        if app.settings.wait_aof:
            app.store.check_durability()  # refuse now, not in the first commit, a Redis that cannot fsync-wait
        if app.settings.torch_threads:
            import torch

            torch.set_num_threads(app.settings.torch_threads)
        if app.settings.malloc_tuning:
            allocator.tune()
        load_plugins(app.settings.plugins)
        if app.settings.metrics_port:
            try:
                metrics.serve(app.settings.metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"AGENT_WORKERS_METRICS_PORT={app.settings.metrics_port} cannot be served ({exc.strerror}); "
                    "another process holds it: pick a free port, or 0 for no metrics endpoint"
                ) from None


class DeadLetterQueues(bootsteps.StartStopStep):
    """Consumer bootstep (quorum queues): declare ``<queue>.dead`` for every queue we consume, on each (re)connect.

    Declared here rather than in ``task_queues`` so that no worker ever consumes a dead-letter queue.
    """

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        channel = c.connection.channel()
        try:
            for queue in c.app.amqp.queues.consume_from.values():
                if (queue.queue_arguments or {}).get("x-queue-type") == "quorum":
                    dead_letter_queue(queue.name)(channel).declare()
        finally:
            channel.close()


@signals.celeryd_init.connect
def _on_celeryd_init(sender: Any = None, instance: Any = None, **_: Any) -> None:
    # A node name with the {unique} mark gets its unique part here, at start: one printed command line can start
    # any number of workers (RabbitMQ refuses a second consumer of one node name's pidbox queue).
    hostname = getattr(instance, "hostname", None)
    if isinstance(hostname, str) and UNIQUE in hostname:
        instance.hostname = unique_node_name(hostname)


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if getattr(app, "settings", None) is not None and app.settings.ready_file:
        path = Path(app.settings.ready_file)
        tmp = path.with_name(path.name + ".tmp")  # per file: processes with ready.0, ready.1 never share it
        tmp.write_text(str(getattr(sender, "hostname", "")))
        tmp.replace(path)


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if getattr(app, "settings", None) is not None and app.settings.ready_file:
        Path(app.settings.ready_file).unlink(missing_ok=True)


class _Strategies(dict):  # type: ignore[type-arg]
    """Celery's strategy table, where an unhashable task name is simply unknown."""

    def __getitem__(self, key: Any) -> Any:
        try:
            return super().__getitem__(key)
        except TypeError:
            raise KeyError(repr(key)[:100]) from None


class BatcherStep(bootsteps.StartStopStep):
    """Consumer bootstep: on warm shutdown (SIGTERM), finish the batches in flight and serve the half-filled batch
    before the channel closes.

    Without it the buffered messages would simply be redelivered (they are unacknowledged), which is safe but slow;
    with it they finish here. After a lost connection the flush still stores results, and the failed acks only
    mean the broker redelivers messages whose results already exist.
    """

    # After fast reclaim starts, so before it stops: a clean stop deregisters only once the batches are done.
    requires = ("celery.worker.consumer.tasks:Tasks", "agent_workers.worker.reclaim:ReclaimStep")

    def start(self, c: Any) -> None:
        # Celery looks a message's strategy up by its 'task' header; an unhashable one (a JSON object or list)
        # raises TypeError, which stops the whole worker (celery/worker/consumer/consumer.py create_task_handler).
        # A lookup that answers KeyError instead sends it down Celery's own unknown-task path: logged, dropped.
        if not isinstance(c.strategies, _Strategies):
            c.strategies = _Strategies(c.strategies)

    def stop(self, c: Any) -> None:
        for intake in live_intakes(c.app):
            intake.drain()  # the batches in flight, then the buffered requests, each stored and acknowledged

    def shutdown(self, c: Any) -> None:
        self.stop(c)


QUEUE_DEPTH_INTERVAL = 5.0


class QueueDepthStep(bootsteps.StartStopStep):
    """Consumer bootstep: every few seconds, the depth of each consumed queue into ``agent_workers_queue_depth``.

    Runs on the event loop's timer with the consumer's own channel (one ``LLEN`` per queue and priority on Redis,
    one passive declare on RabbitMQ), so it costs one round trip per queue every ``QUEUE_DEPTH_INTERVAL`` seconds.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._tref: Any = None

    def start(self, c: Any) -> None:
        if getattr(c.app, "settings", None) is None or not c.app.settings.metrics_port:
            return
        self._tref = c.timer.call_repeatedly(QUEUE_DEPTH_INTERVAL, self.update, (c,))

    def update(self, c: Any) -> None:
        try:
            channel = c.connection.default_channel
            for queue in c.task_consumer.queues:
                metrics.QUEUE_DEPTH.labels(queue.name).set(queue_depth(channel, queue.name))
        except Exception:  # noqa: BLE001 - a metric must never disturb the consumer
            log.debug("queue depth update failed", exc_info=True)

    def stop(self, c: Any) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None


class SignalWakeup(bootsteps.StartStopStep):
    """Consumer bootstep: a signal wakes the event loop at once, so a SIGTERM's warm shutdown starts at once.

    Celery's handler only sets a flag, which the loop reads between two polls; an idle worker's poll lasts until its
    next timer: up to Celery's 2 s event heartbeat on RabbitMQ (the Redis transport wakes more often), so a stopped
    worker lingered that long before it began its warm shutdown. Python writes a byte to the wakeup fd for every
    signal (``signal.set_wakeup_fd``); the loop watches the pipe it goes to and just empties it.
    """

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._fds: tuple[int, int] | None = None
        self._previous = -1

    def start(self, c: Any) -> None:
        if c.hub is None or self._fds is not None or threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._fds = (read, write)
        c.hub.add_reader(read, self._empty, read)

    @staticmethod
    def _empty(fd: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass

    def stop(self, c: Any) -> None:
        if self._fds is None:
            return
        read, write = self._fds
        self._fds = None
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._previous)
        if c.hub is not None:
            c.hub.remove_reader(read)
        os.close(read)
        os.close(write)

    def shutdown(self, c: Any) -> None:
        self.stop(c)


def warn_unknown_queues(app: Any) -> list[str]:
    """Log a warning for every consumed queue that is neither configured queue; returns them.

    ``celery -A tasks worker -Q inference`` with ``AGENT_WORKERS_INFERENCE_QUEUE=prod.inference`` consumes a queue no
    client sends to: the worker looks healthy while predictions wait for ever.
    """
    settings = app.settings
    configured = {settings.inference_queue, settings.training_queue}
    strays = sorted(set(app.amqp.queues.consume_from or {}) - configured)
    for queue in strays:
        log.warning(
            "this worker consumes queue %r, which is neither AGENT_WORKERS_INFERENCE_QUEUE=%r nor "
            "AGENT_WORKERS_TRAINING_QUEUE=%r: no client sends there. Use agent-workers worker -Q inference/training, "
            "which resolves the configured names",
            queue,
            settings.inference_queue,
            settings.training_queue,
        )
    return strays


def check_app(app: Any) -> None:
    """Refuse Celery settings that break our promises.

    Raises:
        ConfigError: naming the setting to fix.
    """
    unsafe = {"pickle", "application/x-python-serialize", "yaml"} & set(app.conf.accept_content or ())
    if unsafe:
        raise ConfigError(
            f"accept_content allows {sorted(unsafe)}; untrusted messages could run code. Accept only json (or msgpack)"
        )
    if not app.conf.task_acks_late:
        raise ConfigError("task_acks_late is off, so a crash loses work; leave it on")
