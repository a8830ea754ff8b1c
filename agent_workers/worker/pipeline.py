"""The compute pipeline of an intake: forward passes in their own thread, everything else on the event loop.

A batch computed on the consumer's event loop stops the loop: no message is received, decoded or buffered, no
result stored and no ack sent while it runs. With a pipeline of depth 2 (``AGENT_WORKERS_PIPELINE_DEPTH``) the
loop hands batch *k* to the compute thread and goes on receiving and buffering batch *k + 1*, which it hands over as
soon as *k* is done; depth 1 computes on the loop itself. On auto (0, the default) the predict intake runs at depth 2
and computes a batch inline when it is predicted under 2 ms (the hand-over would cost what it saves).

When a job ends, its last outcomes say so: the loop hands the thread its next batch first and stores those outcomes
after, so the thread never idles through a result write.

A job is a generator that runs in the compute thread. Each value it yields is ``(outcomes, wait)``: the outcomes go
back to the event loop, which stores, publishes retries, acknowledges and reports them (kombu channels are not
thread-safe, so every ack stays on the loop). ``wait`` makes the compute thread wait until the loop has done so;
redelivered requests are served alone only once the rest of their flush was stored and acknowledged. One compute
thread serves the jobs in the order they were submitted and the loop finishes their outcomes in the order they were
yielded, so results and acks follow the order of the batches.

The compute thread wakes the loop with the hub's thread-safe ``call_soon``. A consumer without a hub (Celery's
blocking ``synloop``) has no way to be woken, so its pipeline runs every job inline, as depth 1 does.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

#: A job: yields ``(outcomes, wait)`` pairs from the compute thread.
Job = Iterator[tuple[list[Any], bool]]

DEFAULT_DEPTH = 2
#: The process's GIL switch interval once a compute thread runs (seconds; CPython's default is 5 ms). A forward
#: pass gives the GIL up for each torch op and must take it back between ops; while the event loop runs Python
#: (decoding, result writes) the compute thread waits up to a whole interval each time. Measured on 2 cores
#: (docs/benchmarks.md): a 5-op MLP forward beside a busy Python thread took 2.0x its time alone at 5 ms, 1.04x at
#: 0.1 ms, the busy thread losing 2 % of its work. Set only when the first job goes to the thread: a worker whose
#: batches all compute on the loop keeps the default (its mlp drain on RabbitMQ was 2 % slower at 0.1 ms).
GIL_SWITCH_INTERVAL = 100e-6
_DONE = object()


class Pipeline:
    """Runs jobs in one compute thread, at most ``depth`` at a time, and finishes their outcomes on the event loop.

    Args:
        depth: jobs in flight at once (submitted and not yet finished); 1 runs each job inline.
        hub: the consumer's kombu hub, woken with ``call_soon`` (None: inline).
        finish: called on the event loop with each yielded list of outcomes, in order.
        on_free: called on the event loop each time a job is done (a flush that found the pipeline full can go).
    """

    def __init__(
        self, *, depth: int, hub: Any, finish: Callable[[list[Any]], None], on_free: Callable[[], None], name: str
    ) -> None:
        self.depth = max(1, depth) if hub is not None else 1
        self.in_flight = 0
        self._hub = hub
        self._finish = finish
        self._on_free = on_free
        self._name = name
        self._work: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._back: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waiting: set[threading.Event] = set()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._freeing = False
        self._lock = threading.Lock()
        self._running = False  # the compute thread runs (until closed and out of jobs)

    def in_compute_thread(self) -> bool:
        """Whether the caller runs in this pipeline's compute thread (not on the event loop)."""
        return self._thread is not None and threading.current_thread() is self._thread

    @property
    def full(self) -> bool:
        """True when ``depth`` jobs are in flight: the next flush waits (the prefetch window bounds the buffer)."""
        return self.depth > 1 and self.in_flight >= self.depth

    def submit(self, job: Job, *, inline: bool = False) -> None:
        """Run ``job``: in the compute thread, or now on the calling (event-loop) thread when the depth is 1 or the
        caller asks for ``inline`` (a cheap batch) and nothing is in flight (so outcomes keep the batches' order)."""
        if self._closed:
            # A replaced intake's late flush (a held or waiting request admitted after the consumer restarted): the
            # old thread may still compute an earlier job, so the new one queues behind it rather than running
            # beside it; once the thread is gone, inline.
            with self._lock:
                if self._running:
                    self.in_flight += 1
                    self._work.put(job)
                    self._work.put(None)  # and stop again after it
                    return
        if self.depth <= 1 or self._closed or (inline and self.in_flight == 0 and not self._freeing):
            for outcomes, _wait in _guarded(job):
                self._finish(outcomes)
            return
        if self._thread is None:
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
            self._thread = threading.Thread(target=self._run, name=f"compute-{self._name}", daemon=True)
            self._running = True
            self._thread.start()
        self.in_flight += 1
        self._work.put(job)

    def pump(self) -> None:
        """Event loop: finish whatever the compute thread handed back. Never raises."""
        while True:
            try:
                item = self._back.get_nowait()
            except queue.Empty:
                return
            self._handle(item)

    def drain(self) -> None:
        """Event loop, blocking (warm shutdown): finish every job in flight, stored and acknowledged."""
        self.pump()
        while self.in_flight:
            self._handle(self._back.get())

    def close(self) -> None:
        """Stop the compute thread once the submitted jobs are done; it no longer waits for the loop.

        A closed pipeline belongs to a replaced intake (the consumer reconnected): its outcomes are still stored
        whenever the old loop callbacks run, and their messages, on a dead channel, are redelivered and skipped.
        """
        self._closed = True
        for event in list(self._waiting):
            event.set()
        if self._thread is not None:
            self._work.put(None)

    # -- compute thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                with self._lock:  # closed: end once nothing was queued behind the stop (see submit)
                    if self._work.empty():
                        self._running = False
                        return
                continue
            values = _guarded(job)
            current = next(values, None)
            while current is not None:
                outcomes, wait = current
                event = threading.Event() if wait and not self._closed else None
                if event is not None:
                    self._waiting.add(event)
                    self._post((outcomes, event, False))
                    event.wait()
                    self._waiting.discard(event)
                    current = next(values, None)
                    continue
                # Nothing waits on these outcomes, so the job may end here: say so with them, and the loop hands
                # this thread its next batch before it stores them (the thread never idles through the store).
                current = next(values, None)
                self._post((outcomes, None, current is None))
                if current is None:
                    break
            else:
                self._post(_DONE)

    def _post(self, item: Any) -> None:
        self._back.put(item)
        try:
            self._hub.call_soon(self.pump)
        except Exception:  # noqa: BLE001 - the next flush or drain pumps it instead
            log.warning("cannot wake the event loop", exc_info=True)

    # -- event loop ----------------------------------------------------------------------------------------------

    def _handle(self, item: Any) -> None:
        if item is _DONE:
            self._free()
            return
        outcomes, event, last = item
        if last:  # the job is done: the next batch goes to the thread first, then these outcomes are finished
            self._free()
        try:
            self._finish(outcomes)
        except Exception:  # noqa: BLE001 - _finish never raises; last resort, the messages stay unacked
            log.exception("finishing %d outcomes failed unexpectedly", len(outcomes))
        finally:
            if event is not None:
                event.set()

    def _free(self) -> None:
        self.in_flight -= 1
        self._freeing = True  # a flush now must not run a batch inline: its outcomes would pass the ones in hand
        try:
            self._on_free()
        except Exception:  # noqa: BLE001 - a flush fault must not stop the event loop
            log.exception("flushing after a finished batch failed")
        finally:
            self._freeing = False


def _guarded(job: Job) -> Iterator[tuple[list[Any], bool]]:
    """The values of ``job``; a bug that escapes it ends that job alone (its unanswered messages come back)."""
    try:
        yield from job
    except Exception:  # noqa: BLE001 - last resort: the compute thread must outlive any job
        log.exception("a batch job failed unexpectedly")
