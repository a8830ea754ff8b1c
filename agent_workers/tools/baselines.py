"""The benchmark's baselines, registered in a worker started with
``AGENT_WORKERS_PLUGINS=agent_workers.tools.baselines``.

* ``agent_workers.bench.predict_naive``: the plain per-request Celery task, one forward pass per message, executed by
  Celery's ordinary strategy and pool (what one writes without a batcher);
* ``agent_workers.bench.noop``: a Celery task that does nothing, the latency floor of one request (C=1);
* ``agent_workers.bench.predict_celery_batches``: the same model served by celery-batches 0.11 (``Batches`` task,
  ``flush_every`` = max batch size, ``flush_interval`` = max wait), each request's result stored with
  ``backend.mark_as_done`` as its docs say ("Returning results"). Registered only when ``celery_batches`` imports.

Both use the worker's own :class:`~agent_workers.worker.inference.InferenceEngine`, so the model, the parameter
cache, the validation and the forward pass are exactly those of ``agent_workers.predict``; only the Celery plumbing
differs.

They are registered on the *current* app: a worker imports its plugins in a bootstep (``StartupChecks``), after
Celery made the worker's app current and finalized it (``setup_worker_optimizations``), so the tasks land on that
app whatever module defined it. Imported anywhere else, this module refuses.
"""

from __future__ import annotations

from typing import Any

from celery import current_app

from agent_workers.worker.app import WorkerApp
from agent_workers.worker.inference import LoadedModel

app = current_app._get_current_object()
if not isinstance(app, WorkerApp):
    raise ImportError(
        f"{__name__} is a worker plugin (AGENT_WORKERS_PLUGINS={__name__}); the current Celery app "
        f"is {app.main!r}, not an agent-workers worker's"
    )

NAIVE = "agent_workers.bench.predict_naive"
NOOP = "agent_workers.bench.noop"
CELERY_BATCHES = "agent_workers.bench.predict_celery_batches"


@app.task(name=NAIVE)
def predict_naive(model: str, inputs: Any, version: int | None = None) -> dict[str, Any]:
    """Score one example with one forward pass (the per-request baseline)."""
    engine = app.engine
    loaded = engine.current(model) if version is None else engine.pinned(model, version)
    result = engine.run_batch(loaded, [engine.validate(loaded, inputs)])[0]
    if isinstance(result, Exception):
        raise result
    return {"model": model, "version": loaded.version, "outputs": result}


@app.task(name=NOOP)
def noop(model: str | None = None, inputs: Any = None, version: int | None = None) -> None:
    """Do nothing: the floor a plain Celery task sets for one request's latency on a broker (C=1)."""
    return None


try:  # celery-batches 0.11 pins celery<5.7; the bench installs it with --no-deps only when asked
    from celery_batches import Batches
except ImportError:  # pragma: no cover - depends on the environment
    Batches = None

if Batches is not None:

    @app.task(
        name=CELERY_BATCHES,
        base=Batches,
        flush_every=app.settings.batch.max_batch_size,
        flush_interval=app.settings.batch.max_wait_ms / 1000.0,
    )
    def predict_celery_batches(requests: list[Any]) -> None:
        """Score a celery-batches buffer: one forward pass per model, one ``mark_as_done`` per request."""
        engine = app.engine
        backend = app.backend
        by_model: dict[str, list[Any]] = {}
        for request in requests:
            model = request.kwargs.get("model", request.args[0] if request.args else None)
            by_model.setdefault(model, []).append(request)
        for model, members in by_model.items():
            loaded: LoadedModel = engine.current(model)
            arrays, valid = [], []
            for request in members:
                inputs = request.kwargs.get("inputs", request.args[1] if len(request.args) > 1 else None)
                try:
                    arrays.append(engine.validate(loaded, inputs))
                    valid.append(request)
                except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                    backend.mark_as_failure(request.id, exc, request=request)
            if not arrays:
                continue
            for request, value in zip(valid, engine.run_batch(loaded, arrays), strict=True):
                if isinstance(value, Exception):
                    backend.mark_as_failure(request.id, value, request=request)
                else:
                    backend.mark_as_done(
                        request.id, {"model": model, "version": loaded.version, "outputs": value}, request=request
                    )
