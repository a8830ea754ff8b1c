"""Every Redis key name is built here and nowhere else.

All keys of one model share the hash tag ``{name}`` so a Redis Cluster keeps them in one slot and the commit script
may touch them together::

    aw:models                          set of model names
    aw:model:{linear}:spec             JSON architecture spec
    aw:model:{linear}:head             hash: version, blob (key of the current blob's first chunk), chunks, epoch
                                       (incarnation), barrier (newest rollback), chunks:<v> for multi-chunk versions
    aw:model:{linear}:blob:7           safetensors bytes of version 7 (immutable); a blob over the chunk size
    aw:model:{linear}:blob:7:1 ...     continues in blob:7:1, blob:7:2, ...
    aw:model:{linear}:staging:<uuid>   an uploaded chunk waiting for its commit (expires)
    aw:model:{linear}:applied          sorted set: update id scored by the version it produced (exactly-once)
    aw:model:{linear}:history          list of JSON commit records, newest first
    aw:model:{linear}:lock             the commit lock (lock mode only)
    aw:model:{linear}:artifacts:4      hash: artifact name -> bytes, the set that holds from version 4 on
    aw:model:{linear}:artifact-versions  sorted set of the versions that carry a set of artifacts
    aw:deliveries:<task id>            how often a redelivered predict request was tried alone (poison detection)
    aw:data:{<id>}:x / :y              a dataset uploaded for training
    aw:sent:<task id>                  (broker Redis) a chunk of a client's bulk publish was queued (short-lived)
    aw:reclaim:heartbeats              (broker Redis) sorted set: worker id -> its last heartbeat, Redis time
    aw:reclaim:held:<worker id>        (broker Redis) set of the delivery tags that worker holds unacknowledged
"""

from __future__ import annotations

import dataclasses

#: The longest model or dataset name (a key part; also what a terminal line can show).
MAX_NAME_LENGTH = 200
#: Characters no model or dataset name may hold: the hash-tag braces (a ``{`` or ``}`` would split one name's keys
#: across Redis Cluster slots), the key separator, glob metacharacters (SCAN patterns) and whitespace.
_BAD_NAME_CHARS = frozenset("{}:*?[]\\")


def name_problem(name: object, kind: str = "name") -> str | None:
    """What makes ``name`` unusable as a model or dataset name, or None: one rule for both.

    A name is a non-empty string of at most ``MAX_NAME_LENGTH`` printable characters, no whitespace (so no control
    character reaches an operator's terminal) and none of ``{ } : * ? [ ] \\``.
    """
    if not isinstance(name, str) or not name:
        return f"{kind} must be a non-empty string"
    if len(name) > MAX_NAME_LENGTH:
        return f"{kind} {name[:40]!r}... is {len(name)} characters long; at most {MAX_NAME_LENGTH}"
    if not name.isprintable() or any(c.isspace() or c in _BAD_NAME_CHARS for c in name):
        return (
            f"{kind} {ascii(name)} must be printable, without spaces or control characters, and free of the "
            "characters { } : * ? [ ] \\"
        )
    return None


@dataclasses.dataclass(frozen=True)
class Keys:
    """Key builder for one namespace."""

    namespace: str

    def models(self) -> str:
        return f"{self.namespace}:models"

    def _model(self, name: str) -> str:
        return f"{self.namespace}:model:{{{name}}}"

    def spec(self, name: str) -> str:
        return f"{self._model(name)}:spec"

    def head(self, name: str) -> str:
        return f"{self._model(name)}:head"

    def blob(self, name: str, version: int) -> str:
        return f"{self._model(name)}:blob:{version}"

    def blob_prefix(self, name: str) -> str:
        return f"{self._model(name)}:blob:"

    def staging(self, name: str, token: str) -> str:
        return f"{self._model(name)}:staging:{token}"

    def applied(self, name: str) -> str:
        return f"{self._model(name)}:applied"

    def history(self, name: str) -> str:
        return f"{self._model(name)}:history"

    def lock(self, name: str) -> str:
        return f"{self._model(name)}:lock"

    def artifacts(self, name: str, version: int) -> str:
        """The artifacts (labels, tokenizer, ...) that hold from ``version`` on (agent_workers/store/artifacts.py)."""
        return f"{self._model(name)}:artifacts:{version}"

    def artifact_versions(self, name: str) -> str:
        return f"{self._model(name)}:artifact-versions"

    def deliveries(self, task_id: str) -> str:
        """How often a redelivered request was handed to a worker (poison-message detection)."""
        return f"{self.namespace}:deliveries:{task_id}"

    def dataset(self, dataset_id: str, part: str) -> str:
        return f"{self.namespace}:data:{{{dataset_id}}}:{part}"

    def sent(self, task_id: str) -> str:
        """Broker Redis: set with the chunk of a bulk publish whose first message is ``task_id``."""
        return f"{self.namespace}:sent:{task_id}"

    def heartbeats(self) -> str:
        """Broker Redis: every live consumer's last heartbeat (fast reclaim, agent_workers/worker/reclaim.py)."""
        return f"{self.namespace}:reclaim:heartbeats"

    def held(self, worker: str) -> str:
        """Broker Redis: the delivery tags ``worker`` holds unacknowledged."""
        return f"{self.held_prefix()}{worker}"

    def held_prefix(self) -> str:
        return f"{self.namespace}:reclaim:held:"
