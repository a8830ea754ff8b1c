"""Parameter blobs: safetensors bytes whose header carries model, version and incarnation, and their chunking.

A blob is never unpickled: anything that is not safetensors is refused with a :class:`ModelError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from typing import TYPE_CHECKING

from agent_workers.errors import ModelError

if TYPE_CHECKING:  # safetensors.torch imports torch: only when a blob is encoded or decoded (CLI start-up)
    import torch

#: Model parameters are stored as ``p.<name>``; optimizer state under other prefixes.
PARAM_PREFIX = "p."


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One consistent version: model parameters plus any optimizer state, as CPU tensors.

    Snapshots may be shared by the store's cache: treat ``tensors`` as read-only (clone before changing).
    """

    model: str
    version: int
    epoch: str
    tensors: dict[str, torch.Tensor]
    barrier: int = 0
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    def parameters(self) -> dict[str, torch.Tensor]:
        """The module's state dict (names without the store's prefix)."""
        n = len(PARAM_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(PARAM_PREFIX)}


def encode_blob(tensors: dict[str, torch.Tensor], *, model: str, version: int, epoch: str = "") -> bytes:
    """Serialize tensors with safetensors; model, version and incarnation travel in the header."""
    from safetensors.torch import save as st_save

    return st_save(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        metadata={"model": model, "version": str(version), "epoch": epoch},
    )


def decode_blob(data: bytes) -> dict[str, torch.Tensor]:
    """Parse a safetensors blob; anything else (a pickle, garbage) is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        return st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise ModelError(f"parameter blob is not valid safetensors: {exc}") from exc


def blob_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a blob's header (model, version, epoch) without loading the tensors."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + header_len]))
        return dict(header.get("__metadata__") or {})
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"parameter blob has no readable safetensors header: {exc}") from exc


def blob_version(data: bytes) -> int:
    """Read the version recorded in a blob's header without loading the tensors."""
    return int(blob_metadata(data)["version"])


def split_chunks(data: bytes, chunk_bytes: int) -> list[memoryview]:
    """Cut ``data`` into views of at most ``chunk_bytes`` (at least one, even when empty); no copies."""
    view = memoryview(data)
    n = max(1, math.ceil(len(data) / chunk_bytes))
    return [view[i * chunk_bytes : (i + 1) * chunk_bytes] for i in range(n)]


def chunk_keys(first: str, n: int) -> list[str]:
    """Keys of an ``n``-chunk blob whose first chunk lives at ``first`` (the others at ``first:1`` ...)."""
    return [first] + [f"{first}:{i}" for i in range(1, n)]


class SnapshotCache:
    """The newest snapshot of each model in this process, so an unchanged version is never downloaded twice."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._snapshots: dict[str, Snapshot] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Snapshot | None:
        return self._snapshots.get(name)

    def remember(self, snap: Snapshot) -> None:
        """Keep ``snap`` unless a newer version of the same incarnation is already here."""
        if not self.enabled:
            return
        with self._lock:
            current = self._snapshots.get(snap.model)
            if current is None or current.epoch != snap.epoch or snap.version >= current.version:
                self._snapshots[snap.model] = snap

    def forget(self, name: str) -> None:
        with self._lock:
            self._snapshots.pop(name, None)
