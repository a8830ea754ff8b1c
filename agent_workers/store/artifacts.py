"""Artifacts: the files a model carries besides its weights (labels, a tokenizer, normalisation constants).

Artifacts are versioned with the parameters. A set of artifacts is written for one version and holds from that
version on, until a later version brings its own set: the artifacts of version ``v`` are the set of the newest
version ``w <= v`` that has one. A set is only ever written for a version no worker can have loaded yet (version 0
in the transaction that creates the model, or a version above the head, which the next commit makes current), so
the artifacts a worker cached for ``(model, version)`` never change under it::

    aw:model:{digits}:artifacts:0          hash: artifact name -> bytes (the set written with version 0)
    aw:model:{digits}:artifacts:4          ... with version 4 (versions 4, 5, ... read it until the next set)
    aw:model:{digits}:artifact-versions    sorted set of the versions that have a set

Artifacts are bytes, never unpickled. Well-known names: ``labels`` (a JSON list of strings, checked on upload;
``top_k`` names its classes with it), ``tokenizer`` (a Hugging Face ``tokenizer.json``, read by
:meth:`Artifacts.tokenizer`) and any JSON file (:meth:`Artifacts.json`), e.g. ``normalize`` constants.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

import redis

from agent_workers.errors import InputError, ModelError, StoreError
from agent_workers.keys import Keys
from agent_workers.redis_clients import unavailable

#: The largest artifact accepted (a tokenizer.json of a big vocabulary is a few MiB).
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
#: Artifact names are short identifiers-with-dots, e.g. ``labels``, ``tokenizer``, ``mean.std``.
MAX_ARTIFACT_NAME = 64
LABELS = "labels"
TOKENIZER = "tokenizer"


def check_artifacts(files: Mapping[str, bytes | str]) -> dict[str, bytes]:
    """Check an upload: names, sizes, and that ``labels`` is a JSON list of strings. Returns name -> bytes.

    Raises:
        InputError: naming the artifact and what is wrong.
    """
    checked: dict[str, bytes] = {}
    for name, data in files.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_ARTIFACT_NAME:
            raise InputError(f"an artifact name is 1 to {MAX_ARTIFACT_NAME} characters, got {name!r:.80}")
        if not name.replace(".", "_").replace("-", "_").isidentifier():
            raise InputError(f"artifact name {name!r} must be letters, digits, '_', '-' or '.'")
        raw = data.encode() if isinstance(data, str) else data
        if not isinstance(raw, bytes):
            raise InputError(f"artifact {name!r} must be bytes or text, got {type(data).__name__}")
        if len(raw) > MAX_ARTIFACT_BYTES:
            raise InputError(f"artifact {name!r} is {len(raw)} bytes; the limit is {MAX_ARTIFACT_BYTES}")
        if name == LABELS:
            labels = _json(name, raw, InputError)
            if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
                raise InputError('artifact "labels" must be a JSON list of strings, e.g. ["cat", "dog"]')
        checked[name] = raw
    return checked


class Artifacts:
    """One version's artifacts, as a worker holds them: bytes by name, parsed forms cached on first use.

    Shared by the preprocessing threads: parsing is idempotent, so a race parses twice and keeps one.
    """

    def __init__(self, files: Mapping[str, bytes] | None = None, *, version: int | None = None) -> None:
        self.files = dict(files or {})
        #: the version whose set these are (None: the model has none)
        self.version = version
        self._parsed: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return sorted(self.files)

    def bytes(self, name: str) -> bytes:
        """Raises: ModelError: the model carries no artifact ``name``."""
        try:
            return self.files[name]
        except KeyError:
            have = ", ".join(self.names()) or "none"
            raise ModelError(
                f"this model version carries no artifact {name!r} (it has: {have}); upload it with "
                f"`agent-workers models create ... --artifact {name}=FILE` or Client.put_artifacts"
            ) from None

    def json(self, name: str) -> Any:
        """Artifact ``name`` parsed as JSON (cached). Raises: ModelError: missing or not JSON."""
        return self._cached(("json", name), lambda: _json(name, self.bytes(name), ModelError))

    @property
    def labels(self) -> list[str] | None:
        """The ``labels`` artifact, or None when the model has none."""
        return self.json(LABELS) if LABELS in self.files else None

    def tokenizer(self, name: str = TOKENIZER) -> Any:
        """A ``tokenizers.Tokenizer`` built from artifact ``name`` (a tokenizer.json; cached, thread-safe to use).

        Raises:
            ModelError: missing, not a tokenizer, or the optional ``tokenizers`` package is not installed.
        """

        def build() -> Any:
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise ModelError("tokenizer artifacts need `pip install agent-workers[hooks]` (tokenizers)") from None
            try:
                return Tokenizer.from_str(self.bytes(name).decode())
            except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
                raise ModelError(f"artifact {name!r} is not a tokenizer.json: {exc}") from None

        return self._cached(("tokenizer", name), build)

    def _cached(self, key: tuple[str, str], build: Any) -> Any:
        hit = self._parsed.get(key)
        if hit is None:
            hit = build()
            with self._lock:
                hit = self._parsed.setdefault(key, hit)
        return hit


class RedisArtifactStore:
    """Artifacts of models in the parameter store's Redis, beside the blobs (one hash tag per model).

    Args:
        client: the parameter store's redis-py client.
        keys: the key builder of the deployment's namespace.
        keep_versions: the parameter store's retention: a set no kept version reads is deleted (:meth:`prune`).
    """

    def __init__(self, *, client: redis.Redis, keys: Keys, keep_versions: int = 10) -> None:
        self.client = client
        self.keys = keys
        self.keep_versions = keep_versions

    def stage(self, pipe: Any, name: str, version: int, files: Mapping[str, bytes]) -> None:
        """Add the writes of ``files`` as version ``version``'s set to ``pipe`` (a transaction of the caller's)."""
        if files:
            pipe.delete(self.keys.artifacts(name, version))
            pipe.hset(self.keys.artifacts(name, version), mapping=dict(files))
            pipe.zadd(self.keys.artifact_versions(name), {str(version): version})

    def put(self, name: str, files: Mapping[str, bytes | str], *, version: int | None = None) -> int:
        """Write a set of artifacts that holds from ``version`` on (default: the next version committed).

        Only a version above the head can take a set: a version already current may be cached by workers with
        the artifacts it had. Returns the version the set belongs to.

        Raises:
            InputError: a bad artifact (see :func:`check_artifacts`).
            ModelError: no such model.
            StoreError: ``version`` is not above the head (the head moved past it, or it was already served).
        """
        checked = check_artifacts(files)
        head_key = self.keys.head(name)
        with unavailable(), self.client.pipeline(transaction=True) as pipe:
            pipe.watch(head_key)  # a commit between the check and the write aborts it: nothing half-applies
            raw = pipe.hget(head_key, "version")
            if raw is None:
                raise ModelError(f"unknown model {name!r}; create it first (agent-workers models create)")
            head = int(raw)
            target = head + 1 if version is None else version
            if target <= head:
                raise StoreError(
                    f"model {name!r} is at version {head}: artifacts can only be set for a version not yet "
                    f"committed ({head + 1} or later), since workers may have cached version {target}'s"
                )
            pipe.multi()
            self.stage(pipe, name, target, checked)
            try:
                pipe.execute()
            except redis.WatchError:
                raise StoreError(f"model {name!r} committed a version meanwhile; put the artifacts again") from None
        self.prune(name, head)
        return target

    def prune(self, name: str, head: int) -> int:
        """Delete the sets that no kept version reads, with ``head`` the model's head version; returns how many.

        Versions ``head - keep_versions + 1`` and up stay readable; the oldest of them reads the newest set at or
        below it, so only sets older than that one go. A head only grows (a rollback commits a new version), so a
        set found unreadable stays so. Called after each :meth:`put` (which adds a set) and by ``gc``.
        """
        oldest_kept = head - self.keep_versions + 1
        index = self.keys.artifact_versions(name)
        with unavailable():
            owners = [int(v) for v in self.client.zrangebyscore(index, "-inf", oldest_kept)]
            doomed = owners[:-1]  # the newest of them still holds for oldest_kept (and on, until the next set)
            if doomed:
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.delete(*(self.keys.artifacts(name, v) for v in doomed))
                    pipe.zrem(index, *(str(v) for v in doomed))
                    pipe.execute()
        return len(doomed)

    def get(self, name: str, version: int) -> Artifacts:
        """The artifacts of ``version``: the set of the newest version at or below it (empty when none)."""
        with unavailable():
            found = self.client.zrevrangebyscore(self.keys.artifact_versions(name), version, "-inf", start=0, num=1)
            if not found:
                return Artifacts()
            owner = int(found[0])
            files = self.client.hgetall(self.keys.artifacts(name, owner))
        return Artifacts({k.decode(): v for k, v in files.items()}, version=owner)

    def listing(self, name: str, version: int) -> dict[str, Any]:
        """What ``models show`` prints: the version whose set holds and each artifact's size in bytes."""
        artifacts = self.get(name, version)
        return {"from_version": artifacts.version, "files": {k: len(v) for k, v in sorted(artifacts.files.items())}}


def _json(name: str, raw: bytes, error: type[Exception]) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"artifact {name!r} is not valid JSON: {exc}") from None
