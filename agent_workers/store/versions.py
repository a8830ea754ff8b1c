"""What a version of a model's parameters is, and what a commit did to it."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from agent_workers.errors import ModelError

#: The head's fields every read asks for, in the order :meth:`Head.parse` takes them.
HEAD_FIELDS = ("version", "blob", "epoch", "barrier", "chunks", "pchunks")


class CommitOutcome(enum.StrEnum):
    """What a commit did."""

    COMMITTED = "committed"
    CONFLICT = "conflict"
    DUPLICATE = "duplicate"


@dataclasses.dataclass(frozen=True)
class CommitResult:
    """The outcome of a commit and the version it concerns (new, current, or the one the update produced).

    ``applied``: for a refused group commit, every update id of the group that was applied before, with the version
    it produced (the caller drops them and commits the rest).
    """

    outcome: CommitOutcome
    version: int
    applied: dict[str, int] = dataclasses.field(default_factory=dict)


def first_head(blob: str, epoch: str, chunks: int) -> dict[str, Any]:
    """The head hash of a model just created: version 0 at ``blob`` (its first chunk's key) in ``chunks`` chunks."""
    head: dict[str, Any] = {
        "version": 0,
        "blob": blob,
        "epoch": epoch,
        "barrier": 0,
        "chunks": chunks,
        "pchunks": chunks,
    }
    if chunks > 1:
        head["chunks:0"] = chunks
    return head


@dataclasses.dataclass(frozen=True)
class Head:
    """Where a model's parameters are now.

    Attributes:
        version: the current version.
        blob: the key of its (first) blob chunk.
        epoch: the model's incarnation; ``create(replace=True)`` starts a new one.
        barrier: the newest rollback's version; gradients computed before it must not be applied after it.
        chunks: how many keys the current blob spans.
        param_chunks: how many of them hold the model's parameters; the rest hold the optimizer state, which
            an inference worker never downloads.
    """

    version: int
    blob: str
    epoch: str
    barrier: int = 0
    chunks: int = 1
    param_chunks: int = 1

    @classmethod
    def parse(cls, name: str, raw: list[bytes | None]) -> Head:
        """The head from an ``HMGET`` of :data:`HEAD_FIELDS` (fields after those are ignored).

        Raises:
            ModelError: no such model.
        """
        version, blob, epoch, barrier, chunks, param_chunks = raw[:6]
        if version is None or blob is None:
            raise ModelError(f"unknown model {name!r}; create it first (agent-workers models create)")
        return cls(
            version=int(version),
            blob=blob.decode(),
            epoch=(epoch or b"").decode(),
            barrier=int(barrier or 0),
            chunks=int(chunks or 1),
            param_chunks=int(param_chunks or chunks or 1),  # a blob written before the split holds both
        )
