"""Remote control: ``celery -A tasks inspect models`` asks every worker which models it serves, and where.

    $ celery -A tasks inspect models
    ->  aw-1@gpu-0: OK
        {'device': 'cuda:0', 'models': [{'name': 'house', 'version': 12, 'epoch': '...', 'arch': 'linear',
                                         'device': 'cuda:0'}]}

From Python: ``inspect_models(app)`` returns the same replies as ``{worker name: reply}``.

Inspect commands run in the worker's main process, between messages of its event loop, so the handler only reads
what the inference engine already holds: it never loads a model or touches CUDA (Celery docs, "Writing your own
remote control commands"; ``celery.worker.control.inspect_command``). Importing this module registers the command
(``create_app`` does it), in workers and in the ``celery inspect`` command line alike.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.worker.control import inspect_command

COMMAND = "models"


def models_reply(app: Any) -> dict[str, Any]:
    """What one worker answers: its inference device and every model version it has loaded.

    Args:
        app: the worker's app (a ``WorkerApp``); an app without an engine answers with no models.
    """
    engine = vars(app).get("engine")  # the cached_property, only if this worker already built it
    if engine is None:
        settings = getattr(app, "settings", None)
        return {"device": getattr(settings, "device", None), "models": []}
    for _ in range(3):  # the batcher or a pool thread may load a model while we copy the list
        try:
            loaded = engine.loaded()
            break
        except RuntimeError:
            continue
    else:
        loaded = []
    device = engine._device  # resolved lazily on the first load; never resolve it here (it may touch CUDA)
    return {
        "device": str(device) if device is not None else engine.settings.device,
        # parameter memory: the engine's loaded models and the store's cached snapshots (MODEL_CACHE_BYTES caps each)
        "memory": {"engine_bytes": engine.nbytes, "store_bytes": engine.store.cache_bytes},
        "models": sorted(
            (
                {"name": m.name, "version": m.version, "epoch": m.epoch, "arch": m.spec.arch, "device": str(m.device)}
                for m in loaded
            ),
            key=lambda m: m["name"],
        ),
    }


@inspect_command()
def models(state: Any) -> dict[str, Any]:
    """Models loaded by this worker: name, parameter version, architecture and device of each."""
    return models_reply(state.app)


def inspect_models(app: Celery, *, timeout: float = 1.0, destination: list[str] | None = None) -> dict[str, Any]:
    """Ask workers for their models; ``{worker name: models_reply}``, empty when none answered in ``timeout``."""
    return app.control.inspect(timeout=timeout, destination=destination)._request(COMMAND) or {}
