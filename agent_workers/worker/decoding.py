"""Decoding ahead: the next batch's inputs are checked and decoded in a thread of their own while the compute thread
runs the current batch's forward pass.

Without it the compute thread decodes a batch (nested lists to arrays, base64 to bytes, range and NaN checks) and
only then runs its forward pass, so the model idles through every decode. With the pipeline busy, a flushed batch
waits for the compute thread anyway: :class:`Decoder` uses that wait. It decodes each request against the model
version loaded now (no Redis read: the engine's cached one) and leaves the result on the request; the compute thread
waits for the batch's decode to end (usually long over), then uses each result only if the version it serves has
that very spec (a new version of a new spec is decoded again, as before). A request whose decode failed keeps its
``InputError`` and fails alone, as it would have in the compute thread.

It also makes each input's key for grouping identical inputs (hashing an image's bytes is ~10 µs), and reads
each model's head (``engine.current``: one ``HMGET``, a load when the version changed) for
the batch, which the compute thread then serves with instead of reading it again between two forward passes. The
read comes after the batch was flushed, so after its last request arrived: a request sent after a commit returned
is still served by that version or a newer one, as with the read in the compute thread.

The forward pass releases the GIL, so on CPU the decode runs beside it on the other core; on a GPU it runs beside
the kernels. A batch computed at once (nothing in flight, or inline on the loop) is decoded where it computes: there
is nothing to overlap and a hand-over would only add a wait.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

from agent_workers import hooks
from agent_workers.errors import AgentWorkersError, InputError, ModelError
from agent_workers.worker.cache import key_of

log = logging.getLogger(__name__)


class Decoded:
    """One request's decoded inputs (or the ``InputError`` they raised), valid for the spec they were decoded for,
    and the key the batch groups identical inputs by (worker/cache.py's ``key_of``)."""

    __slots__ = ("error", "key", "spec", "value")

    def __init__(self, spec: Any, value: Any = None, error: InputError | None = None, key: Any = None) -> None:
        self.spec, self.value, self.error, self.key = spec, value, error, key


class Decoder:
    """Decodes batches in one thread of its own, ahead of their forward passes.

    Args:
        engine: the worker's :class:`~agent_workers.worker.inference.InferenceEngine` (its cached versions and
            ``validate``).
        keyed: whether the batch groups identical inputs by digest (a result cache is on) or by their bytes.
    """

    def __init__(self, engine: Any, *, keyed: bool = False) -> None:
        self.engine = engine
        self.keyed = keyed
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, batch: list[Any]) -> concurrent.futures.Future[dict[str, Any]]:
        """Start decoding ``batch`` (event loop); each request gets ``req.decoded`` once the future is done, whose
        result is the batch's heads: model name -> the newest version, read for this batch (see the module)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        return self._pool.submit(self._decode, batch)

    def _decode(self, batch: list[Any]) -> dict[str, Any]:
        heads: dict[str, Any] = {}
        for req in batch:
            try:
                call = req.predict_call()
                loaded = self._head(heads, call.model) if call.version is None else None
                if loaded is None or loaded.hooks.preprocess is not None:
                    continue  # no head (the compute thread reads it and reports why), a pinned version, raw inputs
                try:
                    value = self.engine.validate(loaded, call.inputs)
                    req.decoded = Decoded(loaded.spec, value, key=key_of(value, keyed=self.keyed))
                except InputError as exc:
                    req.decoded = Decoded(loaded.spec, error=exc)
            except Exception:  # noqa: BLE001 - the compute thread decodes it again and reports what it finds
                log.debug("decoding %s ahead failed", getattr(req, "id", "?"), exc_info=True)
        return {name: loaded for name, loaded in heads.items() if loaded is not None}

    def _head(self, heads: dict[str, Any], model: str) -> Any:
        """``model``'s newest version for this batch, read once; None when it cannot be read (store down, unknown
        model, a load that failed): the compute thread reads it again and answers with the error."""
        if model not in heads:
            try:
                heads[model] = self.engine.current(model)
            except Exception:  # noqa: BLE001 - reported by the compute thread's own read
                heads[model] = None
        return heads[model]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def example_of(engine: Any, loaded: Any, req: Any, inputs: Any) -> Any:
    """The decoded example ``req`` is served with by ``loaded``: what its model's preprocess hook made of it
    (worker/preprocessing.py; made here when the request reached the batch before this worker knew its model has
    hooks: the model's first requests), else its decode ahead when made for this version's spec, else decoded now.

    Raises:
        InputError: the inputs do not fit the model's signature, or its preprocess hook refused them.
        ModelError: the preprocess hook made what the signature does not take (this request alone fails).
    """
    made = None if req.prepared is None else req.prepared.tensors
    if made is not None:
        return made
    if loaded.hooks.preprocess is not None:
        limit = engine.settings.max_input_elements
        try:
            return hooks.prepare(loaded.hooks, loaded.spec.signature, inputs, loaded.artifacts, max_elements=limit)
        except AgentWorkersError:
            raise
        except Exception as exc:  # noqa: BLE001 - a fault in the hook machinery: this request alone
            raise ModelError(f"preprocessing failed: {type(exc).__name__}: {exc}") from None
    ahead = decoded_for(req, loaded.spec)
    if ahead is None:
        return engine.validate(loaded, inputs)
    if ahead.error is not None:
        raise ahead.error
    return ahead.value


def decoded_for(req: Any, spec: Any) -> Decoded | None:
    """``req``'s decode ahead if it was made for ``spec`` (the spec of the version about to serve it), else None."""
    decoded = getattr(req, "decoded", None)
    return decoded if decoded is not None and decoded.spec is spec else None
