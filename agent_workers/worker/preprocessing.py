"""Preprocessing off the event loop: raw inputs become tensors in a bounded thread pool before their request joins a
batch (agent_workers/hooks.py).

A predict request for a model whose architecture declares ``preprocess`` (decode a PNG, tokenize a sentence) is
handed to ``AGENT_WORKERS_PREPROCESS_THREADS`` threads when it arrives. Each resolves the model version the request
will be served by, runs the hook with that version's artifacts, and posts the request back to the event loop
(the hub's thread-safe ``call_soon``), where it is admitted to the buffer pinned to that version, so its tensors and
artifacts always match the parameters that score it. A hook that raises fails its own request; the rest of the
batch never sees it. Requests of models without hooks never pass through here (one dict lookup), so a model
without hooks keeps its latency while another model's requests are being decoded.

Why threads and not a CPU queue in front of the inference queue: the hooks that matter release the GIL (Pillow's
decoders, the Rust ``tokenizers``), the thread pool costs no extra broker round trip, message or worker, and a
bad input is answered by the worker that received it. A CPU-queue tier pays a second publish and consume per
request and would be worth it only for Python-heavy hooks that hold the GIL (docs/hooks.md has the measurement).

The pool is bounded twice: by its thread count, and by the prefetch window (a request in the pool is unacknowledged,
so no more than the window's messages can wait for it).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
from collections.abc import Callable
from typing import Any

from agent_workers.errors import AgentWorkersError, ModelError
from agent_workers.hooks import prepare
from agent_workers.worker.requests import Pending

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request's preprocessed example and the version it was made for (both None: the model has no hooks)."""

    version: int | None
    tensors: Any


#: the request was looked at: its model has no preprocess hook (or could not be resolved: the batch path answers it)
AS_SENT = Prepared(None, None)


class Preprocessing:
    """Runs preprocess hooks in a thread pool and hands prepared requests back to the event loop.

    Args:
        engine: the worker's :class:`~agent_workers.worker.inference.InferenceEngine` (versions, artifacts).
        threads: pool size; 0 runs the hooks on the calling thread (the event loop).
        hub: the consumer's kombu hub (None: inline, as a consumer without a hub cannot be woken).
        admit: event loop: a prepared request joins the buffer.
        fail: event loop: a request whose preprocessing failed gets its error as its result.
        settled: event loop: called after requests came back from the pool (a flush may be due).
    """

    def __init__(
        self,
        *,
        engine: Any,
        threads: int,
        hub: Any,
        admit: Callable[[Pending], None],
        fail: Callable[[Pending, Exception], None],
        settled: Callable[[], None],
    ) -> None:
        self.engine = engine
        self.in_flight = 0
        self._hub = hub
        self._admit = admit
        self._fail = fail
        self._settled = settled
        self._limit = engine.settings.max_input_elements
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="preprocess")
            if threads > 0 and hub is not None
            else None
        )
        self._back: queue.SimpleQueue[tuple[Pending, Exception | None]] = queue.SimpleQueue()

    def wants(self, request: Pending) -> bool:
        """Whether ``request`` must be preprocessed first: its model is loaded here and has a preprocess hook.

        A model not loaded yet goes straight to the batch, which preprocesses its first requests where it serves
        them (worker/decoding.py ``example_of``): a round trip through the pool for every model's first requests
        broke a drain's first batches into pieces, and an unknown name never has hooks.
        """
        if request.prepared is not None:
            return False
        model = request.args[0] if request.args else request.kwargs.get("model")
        return isinstance(model, str) and self.engine.hooked.get(model, False)

    def submit(self, request: Pending) -> None:
        """Event loop: preprocess ``request`` in the pool; it comes back through ``admit`` or ``fail``."""
        if self._pool is None:
            self._settle(request, self._prepare(request))
            return
        self.in_flight += 1
        self._pool.submit(self._run, request)

    def pump(self) -> None:
        """Event loop: admit or fail every request the pool finished, then say so once. Never raises."""
        handled = 0
        while True:
            try:
                request, error = self._back.get_nowait()
            except queue.Empty:
                break
            self.in_flight -= 1
            handled += 1
            try:
                self._settle(request, error)
            except Exception:  # noqa: BLE001 - a fault here must not stop the event loop
                log.exception("admitting preprocessed request %s failed", request.id)
        if handled:
            try:
                self._settled()
            except Exception:  # noqa: BLE001 - as above
                log.exception("flushing after preprocessing failed")

    def drain(self) -> None:
        """Event loop, blocking (warm shutdown): finish preprocessing and admit what was made."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.pump()

    def close(self) -> None:
        """Stop the pool (the consumer restarted: its unacknowledged messages are redelivered)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _settle(self, request: Pending, error: Exception | None) -> None:
        if error is None:
            self._admit(request)
        else:
            self._fail(request, error)

    def _run(self, request: Pending) -> None:
        self._back.put((request, self._prepare(request)))
        try:
            self._hub.call_soon(self.pump)
        except Exception:  # noqa: BLE001 - the next submit's pump or the drain picks it up
            log.warning("cannot wake the event loop", exc_info=True)

    def _prepare(self, request: Pending) -> Exception | None:
        """Preprocess ``request`` in place (sets ``request.prepared``); its error, or None. Never raises."""
        request.prepared = AS_SENT
        try:
            call = request.predict_call()
        except Exception:  # noqa: BLE001 - refused with its arguments' error when its batch is served
            return None
        try:
            loaded = self.engine.resolve(call.model, call.version, call.min_version)
        except Exception:  # noqa: BLE001 - unknown model, store outage: the batch path answers (and retries) it
            return None
        if loaded.hooks.preprocess is None:
            return None
        try:
            tensors = prepare(
                loaded.hooks, loaded.spec.signature, call.inputs, loaded.artifacts, max_elements=self._limit
            )
        except AgentWorkersError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - a fault in the hook machinery: this request alone
            return ModelError(f"preprocessing failed: {type(exc).__name__}: {exc}")
        request.prepared = Prepared(loaded.version, tensors)
        return None
