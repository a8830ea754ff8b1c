"""Parameter blobs: safetensors bytes whose header carries model, version and incarnation, and their chunking.

A blob is never unpickled: anything that is not safetensors is refused with a :class:`ModelError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import warnings
from collections import OrderedDict
from functools import cache
from typing import TYPE_CHECKING, Any

from agent_workers.errors import ModelError

if TYPE_CHECKING:  # torch only when a blob is encoded or decoded, so the CLI starts fast
    import torch

#: Model parameters are stored as ``p.<name>``; optimizer state under other prefixes.
PARAM_PREFIX = "p."


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One consistent version: model parameters plus any optimizer state, as CPU tensors.

    Snapshots may be shared by the store's cache: treat ``tensors`` as read-only (clone before changing; they
    may view the downloaded bytes). ``complete`` is False for a parameters-only read (no optimizer state).
    """

    model: str
    version: int
    epoch: str
    tensors: dict[str, torch.Tensor]
    barrier: int = 0
    meta: dict[str, str] = dataclasses.field(default_factory=dict)
    complete: bool = True

    def parameters(self) -> dict[str, torch.Tensor]:
        """The module's state dict (names without the store's prefix)."""
        n = len(PARAM_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(PARAM_PREFIX)}


def snapshot_bytes(snap: Snapshot) -> int:
    """Bytes of the tensors ``snap`` holds."""
    return sum(t.numel() * t.element_size() for t in snap.tensors.values())


@cache
def _dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype names (the format's spec) and the torch dtypes they stand for."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool,
    }  # fmt: skip


def encode_blob(tensors: dict[str, torch.Tensor], *, model: str, version: int, epoch: str = "") -> bytearray:
    """Serialize tensors in the safetensors format; model, version and incarnation travel in the header.

    Written straight into one preallocated buffer (one copy of each tensor; ``safetensors.torch.save`` makes
    three), laid out as the format's reference writer lays it out: largest dtypes first, so every tensor is
    aligned. ``safetensors.torch.load`` reads the result (tested).
    """
    import torch

    names = {dtype: name for name, dtype in _dtypes().items()}
    items = sorted(
        ((name, t.detach().cpu().contiguous()) for name, t in tensors.items()),
        key=lambda item: (-item[1].element_size(), item[0]),
    )
    header: dict[str, object] = {"__metadata__": {"model": model, "version": str(version), "epoch": epoch}}
    offset = 0
    for name, t in items:
        if t.dtype not in names:
            raise ModelError(f"tensor {name!r} has dtype {t.dtype}, which a parameter blob cannot carry")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out = bytearray(8 + len(head) + offset)
    out[:8] = len(head).to_bytes(8, "little")
    out[8 : 8 + len(head)] = head
    position = 8 + len(head)
    for _name, t in items:
        size = t.numel() * t.element_size()
        if size:
            out[position : position + size] = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        position += size
    return out


def decode_blob(data: bytes | bytearray) -> dict[str, torch.Tensor]:
    """Parse a safetensors blob into tensors that VIEW ``data`` (no copy); anything else (a pickle, garbage) is
    refused. The header is checked as the format requires: known dtypes, sizes that match shapes, and data
    offsets that cover the buffer exactly, so no tensor reads outside it.

    Raises:
        ModelError: not a valid safetensors blob.
    """
    import torch

    header, start = _header(data)
    spans = []
    tensors: dict[str, torch.Tensor] = {}
    try:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = _dtypes()[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
            count = math.prod(shape)
            if min(shape, default=0) < 0 or end - begin != count * dtype.itemsize:
                raise ValueError(f"tensor {name!r}: data_offsets do not match its shape and dtype")
            spans.append((begin, end))
            if count == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                with warnings.catch_warnings():  # read-only bytes from Redis: the tensors are read-only by contract
                    warnings.simplefilter("ignore", UserWarning)
                    flat = torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin)
                tensors[name] = flat.reshape(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"parameter blob is not valid safetensors: {exc}") from exc
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise ModelError("parameter blob is not valid safetensors: data offsets overlap or leave gaps")
        covered = end
    if covered != len(data) - start:
        raise ModelError("parameter blob is not valid safetensors: the data is not fully covered by its header")
    return tensors


def _header(data: bytes | bytearray) -> tuple[dict[str, Any], int]:
    """The parsed JSON header of a blob and where its data starts."""
    try:
        if len(data) < 8:
            raise ValueError("shorter than a header")
        header_len = int.from_bytes(data[:8], "little")
        if header_len > len(data) - 8:
            raise ValueError("header longer than the blob")
        header = json.loads(bytes(data[8 : 8 + header_len]))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        return header, 8 + header_len
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"parameter blob is not valid safetensors (no readable header): {exc}") from exc


def blob_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a blob's header (model, version, epoch) without loading the tensors."""
    return dict(_header(data)[0].get("__metadata__") or {})


def blob_version(data: bytes) -> int:
    """Read the version recorded in a blob's header without loading the tensors."""
    return int(blob_metadata(data)["version"])


def split_state(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(parameters, optimizer state)``: the tensors under :data:`PARAM_PREFIX`, and the others."""
    params = {k: v for k, v in tensors.items() if k.startswith(PARAM_PREFIX)}
    return params, {k: v for k, v in tensors.items() if not k.startswith(PARAM_PREFIX)}


@dataclasses.dataclass(frozen=True)
class EncodedVersion:
    """One version as it is stored: the parameters' blob and the optimizer state's (if any), cut into chunks; the
    first ``param_chunks`` chunks hold the parameters."""

    blob: bytearray
    state_blob: bytearray | None
    chunks: list[memoryview]
    param_chunks: int

    @classmethod
    def of(
        cls, tensors: dict[str, torch.Tensor], *, model: str, version: int, epoch: str, chunk_bytes: int
    ) -> EncodedVersion:
        params, opt_state = split_state(tensors)
        blob = encode_blob(params, model=model, version=version, epoch=epoch)
        chunks = split_chunks(blob, chunk_bytes)
        param_chunks = len(chunks)
        state_blob = encode_blob(opt_state, model=model, version=version, epoch=epoch) if opt_state else None
        if state_blob is not None:
            chunks += split_chunks(state_blob, chunk_bytes)
        return cls(blob, state_blob, chunks, param_chunks)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and optimizer state as views of the encoded bytes (what a commit caches: later in-place
        changes by the caller cannot leak in)."""
        return {**decode_blob(self.blob), **(decode_blob(self.state_blob) if self.state_blob is not None else {})}


def split_chunks(data: bytes, chunk_bytes: int) -> list[memoryview]:
    """Cut ``data`` into views of at most ``chunk_bytes`` (at least one, even when empty); no copies."""
    view = memoryview(data)
    n = max(1, math.ceil(len(data) / chunk_bytes))
    return [view[i * chunk_bytes : (i + 1) * chunk_bytes] for i in range(n)]


def chunk_keys(first: str, n: int) -> list[str]:
    """Keys of an ``n``-chunk blob whose first chunk lives at ``first`` (the others at ``first:1`` ...)."""
    return [first] + [f"{first}:{i}" for i in range(1, n)]


class SnapshotCache:
    """The newest snapshot of each model in this process, so an unchanged version is never downloaded twice.

    With ``max_bytes`` (``AGENT_WORKERS_MODEL_CACHE_BYTES``) the least recently used models are dropped once the
    snapshots together exceed it (the newest one always stays).
    """

    def __init__(self, *, enabled: bool = True, max_bytes: int = 0) -> None:
        self.enabled = enabled
        self.max_bytes = max_bytes
        self._snapshots: OrderedDict[str, Snapshot] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of tensors held."""
        return sum(snapshot_bytes(s) for s in list(self._snapshots.values()))

    def get(self, name: str, *, complete: bool = False) -> Snapshot | None:
        """The cached snapshot of ``name``; with ``complete``, only one that holds the optimizer state too."""
        snap = self._snapshots.get(name)
        if snap is not None and self.max_bytes:
            with self._lock:
                if name in self._snapshots:
                    self._snapshots.move_to_end(name)
        return None if snap is None or (complete and not snap.complete) else snap

    def remember(self, snap: Snapshot) -> None:
        """Keep ``snap`` unless a newer version of the same incarnation is already here."""
        if not self.enabled:
            return
        with self._lock:
            current = self._snapshots.get(snap.model)
            if (
                current is None
                or current.epoch != snap.epoch
                or snap.version > current.version
                or (snap.version == current.version and (snap.complete or not current.complete))
            ):
                self._snapshots[snap.model] = snap
                self._snapshots.move_to_end(snap.model)
            if self.max_bytes:
                total = sum(snapshot_bytes(s) for s in self._snapshots.values())
                while total > self.max_bytes and len(self._snapshots) > 1:
                    _, dropped = self._snapshots.popitem(last=False)
                    total -= snapshot_bytes(dropped)

    def forget(self, name: str) -> None:
        with self._lock:
            self._snapshots.pop(name, None)


def joined(parts: list[bytes]) -> bytes:
    """One blob from its chunks (no copy for a single chunk)."""
    return parts[0] if len(parts) == 1 else b"".join(parts)


def blob_owner(meta: dict[str, Any]) -> str:
    """Whose blob a header says it is, for an error message."""
    return f"model {meta.get('model')!r} version {meta.get('version')} (incarnation {meta.get('epoch') or '?'})"


def snapshot_of(
    parts: list[bytes], param_chunks: int, *, name: str, version: int, epoch: str, barrier: int, complete: bool
) -> Snapshot | str:
    """The snapshot a version's chunks hold (parameters in the first ``param_chunks``, optimizer state in any after
    them; ``complete``: the state was read, or there is none), or, when the header names another model, version or
    incarnation, whose blob it is (:func:`blob_owner`)."""
    data = joined(parts[:param_chunks])
    meta = blob_metadata(data)
    if meta.get("model") != name or meta.get("version") != str(version) or meta.get("epoch", "") not in ("", epoch):
        return blob_owner(meta)
    tensors = decode_blob(data)
    if len(parts) > param_chunks:
        tensors.update(decode_blob(joined(parts[param_chunks:])))
    return Snapshot(name, version, epoch, tensors, barrier, meta, complete=complete)
