"""The inference engine: validated inputs, a per-(model, version) parameter cache, and batched forward passes.

The engine knows nothing of Celery: the batcher hands it lists of requests and gets back one outcome per request.
A batch that makes the model raise is bisected so only the culprit requests fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from agent_workers.config import Settings
from agent_workers.errors import InputError, ModelError
from agent_workers.hooks import NO_HOOKS, Hooks, hooks_of
from agent_workers.models import ModelSpec
from agent_workers.outputs import encoded_output, plain_output
from agent_workers.store.artifacts import Artifacts
from agent_workers.store.params import RedisParamStore
from agent_workers.tensors import decode_inputs
from agent_workers.worker import forming, padding

#: One decoded example (an array, or name -> array for a model of several inputs), or a stacked batch of them.
Tensors = np.ndarray | dict[str, np.ndarray]

log = logging.getLogger(__name__)

PINNED_CACHE_SIZE = 4


@dataclasses.dataclass
class LoadedModel:
    """One version of a model, on its device, warmed and ready to serve."""

    name: str
    version: int
    epoch: str
    spec: ModelSpec
    module: torch.nn.Module
    device: torch.device
    nbytes: int = 0
    #: the version's artifacts (labels, tokenizer, ...) and the architecture's hooks (agent_workers/hooks.py)
    artifacts: Artifacts = dataclasses.field(default_factory=Artifacts)
    hooks: Hooks = NO_HOOKS


def resolve_device(name: str) -> torch.device:
    """Turn the ``device`` setting into a torch device; CUDA is touched only here, lazily, in the computing process."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("AGENT_WORKERS_DEVICE=%s but CUDA is not available; falling back to the CPU", name)
        return torch.device("cpu")
    return device


def validate_input(spec: ModelSpec, inputs: Any, *, max_elements: int) -> np.ndarray:
    """Check one example against the model's input shape and return it as float32.

    Raises:
        InputError: naming what is wrong (type, shape, size, NaN/inf).
    """
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, (list, tuple)):
        raise InputError(
            f"inputs must be a list of numbers of shape {list(spec.input_shape)}, got {type(inputs).__name__}"
        )
    if len(inputs) != spec.input_shape[0]:
        raise InputError(f"inputs must have shape {list(spec.input_shape)}, got length {len(inputs)}")
    try:
        with np.errstate(over="ignore"):  # past float32's range becomes inf, refused below
            array = np.asarray(inputs, dtype=np.float32)
    except (ValueError, TypeError, OverflowError) as exc:  # OverflowError: an int past the float range
        raise InputError(f"inputs must be numbers of shape {list(spec.input_shape)}: {exc}") from None
    if array.size > max_elements:
        raise InputError(f"inputs have {array.size} numbers; the limit is {max_elements}")
    if array.shape != spec.input_shape:
        raise InputError(f"inputs must have shape {list(spec.input_shape)}, got {list(array.shape)}")
    if not np.isfinite(array).all():
        if _has_null(inputs):  # numpy turns null (None) into NaN: name what was actually sent
            raise InputError("inputs contain null; every element must be a number")
        raise InputError("inputs contain NaN or infinity (or a number past float32's range, 3.4e38)")
    return array


def _has_null(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, (list, tuple)) and any(_has_null(v) for v in value)


class InferenceEngine:
    """Loads model versions from the store, caches them, and runs batches.

    Args:
        store: where parameters live.
        settings: device, AMP, compile and size limits.
    """

    def __init__(self, *, store: RedisParamStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._device: torch.device | None = None
        self._current: OrderedDict[str, LoadedModel] = OrderedDict()
        self._pinned: OrderedDict[tuple[str, str, int], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # the batcher and a pool thread (predict_many) may load at once
        #: model name -> whether its architecture preprocesses raw inputs (learnt when a version loads)
        self.hooked: dict[str, bool] = {}

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = resolve_device(self.settings.device)
            log.info("inference device: %s", self._device)
        return self._device

    def cached(self, name: str) -> LoadedModel | None:
        """The newest version of ``name`` loaded here, without asking the store whether it is still the newest."""
        return self._current.get(name)

    def loaded(self) -> list[LoadedModel]:
        """Models currently serving, for the inspect command and metrics."""
        return list(self._current.values())

    def current(self, name: str) -> LoadedModel:
        """The newest committed version of ``name``; one cheap head read, a load only when the version changed.

        A new version is loaded and warmed before it serves; if loading fails the old version keeps serving.
        """
        head = self.store.head(name)
        cached = self._current.get(name)
        if cached is not None and cached.version == head.version and cached.epoch == head.epoch:
            if self.settings.model_cache_bytes:
                self._touch(name)
            return cached
        with self._lock:
            cached = self._current.get(name)
            if cached is not None and cached.version == head.version and cached.epoch == head.epoch:
                return cached
            try:
                fresh = self._load(name, None)
            except ModelError:
                if cached is not None and cached.epoch == head.epoch:
                    log.exception("loading %s v%d failed; v%d keeps serving", name, head.version, cached.version)
                    return cached
                raise
            self._current[name] = fresh
            self._current.move_to_end(name)
            self._evict(fresh)
            return fresh

    def pinned(self, name: str, version: int) -> LoadedModel:
        """A specific version of ``name`` (kept in a small LRU)."""
        head = self.store.head(name)
        cached = self._current.get(name)
        if cached is not None and cached.version == version and cached.epoch == head.epoch:
            return cached
        key = (name, head.epoch, version)
        with self._lock:
            hit = self._pinned.get(key)
            if hit is not None:
                self._pinned.move_to_end(key)
                return hit
            loaded = self._load(name, version)
            self._pinned[key] = loaded
            while len(self._pinned) > PINNED_CACHE_SIZE:
                self._pinned.popitem(last=False)
            self._evict(loaded)
            return loaded

    @property
    def nbytes(self) -> int:
        """Bytes of parameters of every model this engine holds loaded."""
        return sum(m.nbytes for m in list(self._current.values()) + list(self._pinned.values()))

    def _touch(self, name: str) -> None:
        with self._lock:
            if name in self._current:
                self._current.move_to_end(name)

    def _evict(self, keep: LoadedModel) -> None:
        """Drop least recently used models (pinned versions first) until ``AGENT_WORKERS_MODEL_CACHE_BYTES`` holds;
        ``keep``, just loaded, always stays. Called with the lock held."""
        cap = self.settings.model_cache_bytes
        if not cap:
            return
        total = self.nbytes
        for cache in (self._pinned, self._current):
            for key in list(cache):
                if total <= cap:
                    return
                if cache[key] is not keep:
                    total -= cache.pop(key).nbytes
                    log.info("model cache over %d bytes: dropped %s", cap, key)

    def _load(self, name: str, version: int | None) -> LoadedModel:
        snapshot = self.store.read(name, version, state=False)  # parameters only: no optimizer state
        spec = self.store.spec(name, snapshot.epoch)
        module = spec.build()
        try:
            module.load_state_dict(snapshot.parameters())
        except RuntimeError as exc:
            raise ModelError(f"stored parameters of {name!r} v{snapshot.version} do not fit its spec: {exc}") from exc
        module = module.to(self.device).eval()
        if self.settings.compile:
            module = torch.compile(module)  # type: ignore[assignment]
        nbytes = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
        loaded = LoadedModel(
            name=name,
            version=snapshot.version,
            epoch=snapshot.epoch,
            spec=spec,
            module=module,
            device=self.device,
            nbytes=nbytes,
            artifacts=self.store.artifacts.get(name, snapshot.version),
            hooks=hooks_of(spec.arch),
        )
        self.hooked[name] = loaded.hooks.preprocess is not None
        self._run(loaded, [spec.signature.zeros()])  # warm before serving
        log.info("loaded %s v%d on %s", name, snapshot.version, self.device)
        return loaded

    def validate(self, loaded: LoadedModel, inputs: Any) -> Tensors:
        """One request's inputs, checked alone against the model's signature and decoded (agent_workers/tensors.py;
        a float32 list to an ``input_shape`` model goes through :func:`validate_input`, as before signatures)."""
        limit = self.settings.max_input_elements
        if loaded.spec.legacy and not isinstance(inputs, Mapping):
            return validate_input(loaded.spec, inputs, max_elements=limit)
        return decode_inputs(loaded.spec.signature, inputs, max_elements=limit)

    def forward(self, loaded: LoadedModel, batch: Tensors, extra: Mapping[str, np.ndarray] | None = None) -> Tensors:
        """One forward pass over a stacked batch (:func:`stack`): ``module(x)`` for one input, ``module(**inputs)``
        for several, each in its signature's dtype, plus ``extra`` keyword tensors (a padded batch's
        ``attention_mask`` / ``lengths``: worker/padding.py). Returns the output on the host (floats as float32), or
        name -> output for a model that returns several (a dict or a tuple, named by the signature's outputs)."""
        signature = loaded.spec.signature
        tensors = {}
        for spec in signature.inputs:
            x = torch.from_numpy(batch[spec.name] if isinstance(batch, dict) else batch)
            if spec.dtype == "bfloat16":
                x = x.view(torch.bfloat16)  # numpy holds bfloat16 as its raw uint16 bits
            tensors[spec.name] = x
        kwargs = {k: torch.from_numpy(v) for k, v in (extra or {}).items()}
        if loaded.device.type == "cuda":
            tensors = {k: x.pin_memory().to(loaded.device, non_blocking=True) for k, x in tensors.items()}
            kwargs = {k: x.to(loaded.device, non_blocking=True) for k, x in kwargs.items()}
        with torch.inference_mode(), self._autocast(loaded.device):
            y = loaded.module(*tensors.values(), **kwargs) if len(tensors) == 1 else loaded.module(**tensors, **kwargs)
        return _host_outputs(loaded, y)

    def _run(self, loaded: LoadedModel, arrays: list[Tensors]) -> tuple[Tensors, padding.Padded | None]:
        """Stack ``arrays`` (padded, with the mask, for a variable-length signature; or the architecture's
        ``collate`` hook, which takes examples of any shapes together) and forward them."""
        if loaded.hooks.collate is not None:
            return self.forward(loaded, loaded.hooks.collate(arrays)), None
        signature = loaded.spec.signature
        if padding.length_input(signature) is None:
            return self.forward(loaded, stack(arrays)), None
        padded = padding.pad(signature, arrays, module=loaded.module)
        return self.forward(loaded, padded.batch, padded.extra), padded

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if device.type != "cuda" or self.settings.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.settings.amp == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def run_batch(self, loaded: LoadedModel, arrays: list[Tensors]) -> list[Any]:
        """Forward ``arrays`` together; one output (lists of numbers) or one error per input, in order."""
        return [r if isinstance(r, Exception) else plain_output(r) for r in self.run_batch_arrays(loaded, arrays)]

    def run_batch_arrays(self, loaded: LoadedModel, arrays: list[Tensors]) -> list[Tensors | Exception]:
        """Forward ``arrays`` together; if the model raises, bisect so only the culprits fail.

        Examples whose variable dimensions differ are padded to the longest, and variable outputs cut back to each
        example's own sizes (worker/padding.py). Returns one row per input: an array (floats as float32), or name ->
        array for several outputs; the batcher serializes them without a Python-list detour.
        """
        try:
            out, padded = self._run(loaded, arrays)
        except Exception as exc:  # noqa: BLE001 - any model failure is isolated below
            if len(arrays) == 1:
                return [ModelError(f"model {loaded.name!r} v{loaded.version} failed on this input: {exc}")]
            mid = len(arrays) // 2
            return self.run_batch_arrays(loaded, arrays[:mid]) + self.run_batch_arrays(loaded, arrays[mid:])
        rows = _split(out)
        if len(rows) != len(arrays):
            error = ModelError(f"model {loaded.name!r} returned {len(rows)} outputs for {len(arrays)} inputs")
            return [error] * len(arrays)
        return rows if padded is None else padded.cut(loaded.spec.signature, rows)

    def current_at_least(self, name: str, min_version: int, wait: float) -> LoadedModel:
        """The newest version of ``name``, once it is ``min_version`` or newer (read-your-writes).

        Reads the head again every 20 ms for up to ``wait`` seconds (blocking: for pool threads, never the batcher).

        Raises:
            ModelError: the store did not reach ``min_version`` in time.
        """
        give_up = time.monotonic() + wait
        while True:
            loaded = self.current(name)
            if loaded.version >= min_version:
                return loaded
            if time.monotonic() >= give_up:
                raise ModelError(
                    f"model {name!r} is at version {loaded.version}; min_version {min_version} was not reached "
                    f"within {wait:g} s (AGENT_WORKERS_MIN_VERSION_WAIT_MS)"
                )
            time.sleep(0.02)  # noqa: sleep-ok - a bounded poll of the store's head, in a pool thread

    def resolve(self, name: str, version: int | None = None, min_version: int | None = None) -> LoadedModel:
        """The version a call asks for: ``version`` pinned, else the newest once at least ``min_version`` (waiting
        up to ``AGENT_WORKERS_MIN_VERSION_WAIT_MS``: blocking, for pool threads), else the newest."""
        if version is not None:
            return self.pinned(name, version)
        if min_version is not None:
            return self.current_at_least(name, min_version, self.settings.min_version_wait_ms / 1000.0)
        return self.current(name)

    def predict_many(
        self,
        name: str,
        inputs: Any,
        version: int | None = None,
        min_version: int | None = None,
        output_encoding: str = "json",
    ) -> dict[str, Any]:
        """Score many examples of one model in GPU-sized batches; outputs in input order, each as
        :func:`encoded_output` writes it for ``output_encoding``.

        Raises:
            InputError: ``inputs`` is not a list, holds more than ``max_input_elements`` numbers in all, or one
                example is bad (its index is named).
        """
        if not isinstance(inputs, list):
            raise InputError(f"inputs must be a list of examples, got {type(inputs).__name__}")
        if version is not None:
            if min_version is not None and version < min_version:
                raise InputError(f"version {version} is pinned below min_version {min_version}; drop one of them")
            loaded = self.pinned(name, version)
        elif min_version is not None:
            loaded = self.current_at_least(name, min_version, self.settings.min_version_wait_ms / 1000.0)
        else:
            loaded = self.current(name)
        limit = self.settings.max_input_elements
        width = sum(math.prod(abs(d) for d in t.shape) for t in loaded.spec.signature.inputs)
        if len(inputs) * width > limit:
            # Checked before any example is parsed: the whole message, not one example, is what must fit.
            raise InputError(
                f"{len(inputs)} examples of {width} numbers exceed AGENT_WORKERS_MAX_INPUT_ELEMENTS={limit} for one "
                f"predict_many; send at most {max(1, limit // width)} examples per message"
            )
        arrays = []
        for i, item in enumerate(inputs):
            try:
                arrays.append(self.validate(loaded, item))
            except InputError as exc:
                raise InputError(f"example {i}: {exc}") from None
        outputs: list[Any] = [None] * len(arrays)
        produced = 0
        for batch in self._plan_many(loaded, arrays):
            for i, row in zip(batch, self.run_batch_arrays(loaded, [arrays[i] for i in batch]), strict=True):
                if isinstance(row, Exception):
                    raise row
                produced += sum(v.size for v in row.values()) if isinstance(row, dict) else row.size
                if produced > limit:
                    raise InputError(
                        f"the outputs of this predict_many exceed AGENT_WORKERS_MAX_INPUT_ELEMENTS={limit} numbers; "
                        "send fewer examples per message"
                    )
                outputs[i] = plain_output(row) if output_encoding == "json" else encoded_output(row, output_encoding)
        return {"model": name, "version": loaded.version, "outputs": outputs}

    def _plan_many(self, loaded: LoadedModel, arrays: list[Tensors]) -> list[list[int]]:
        """A predict_many's examples cut into batches (indices): by ``max_batch_size``, or for a variable-length
        signature sorted by length under ``max_batch_tokens`` as the batcher forms them (worker/forming.py), so a
        long example does not pad its whole chunk."""
        batch = self.settings.batch
        spec = padding.length_input(loaded.spec.signature)
        length = (
            None if spec is None or loaded.hooks.collate is not None else (lambda i: padding.tokens(spec, arrays[i]))
        )
        return forming.plan(
            range(len(arrays)),
            max_batch_size=batch.max_batch_size,
            length=length,
            max_tokens=batch.max_batch_tokens,
            by_length=batch.length_batching,
        )


def stack(rows: list[Tensors]) -> Tensors:
    """Decoded examples of equal shapes as one batch (per input name for a model of several inputs)."""
    if isinstance(rows[0], dict):
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]}  # type: ignore[index]
    return np.stack(rows)  # type: ignore[arg-type]


def _split(out: Tensors) -> list[Tensors]:
    if not isinstance(out, dict):
        return list(out)
    lengths = {len(v) for v in out.values()}
    if len(lengths) != 1:
        return []  # outputs of different batch sizes: reported as a count mismatch
    return [{k: v[i] for k, v in out.items()} for i in range(lengths.pop())]


def _host_outputs(loaded: LoadedModel, y: Any) -> Tensors:
    """A model's output(s) on the host: a tensor, or a dict / tuple named by the signature's outputs."""
    names = [t.name for t in loaded.spec.signature.outputs]
    if isinstance(y, torch.Tensor):
        return _host(y)
    if isinstance(y, Mapping):
        missing = [n for n in names if n not in y]
        if missing:
            raise ModelError(f"model {loaded.name!r} returned {sorted(y)}, lacking its signature's outputs {missing}")
        return {n: _host(y[n]) for n in (names or list(y))}
    if isinstance(y, (tuple, list)):
        if len(y) != len(names):
            raise ModelError(
                f"model {loaded.name!r} returned {len(y)} outputs; its signature names {len(names)}: {names}"
            )
        return {n: _host(t) for n, t in zip(names, y, strict=True)}
    raise ModelError(f"model {loaded.name!r} returned {type(y).__name__}, not a tensor, a dict or a tuple")


def _host(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.is_floating_point() else t).cpu().numpy()
