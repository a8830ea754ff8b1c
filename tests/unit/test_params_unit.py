"""The store's pure parts: blob codec, chunking, name escaping, and the durability check on a fake client."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch

from agent_workers.config import Settings
from agent_workers.errors import ConfigError, ModelError, StoreUnavailableError
from agent_workers.keys import Keys
from agent_workers.redis_clients import glob_escape as _glob_escape
from agent_workers.store.blobs import blob_metadata, blob_version, chunk_keys, decode_blob, encode_blob, split_chunks
from agent_workers.store.params import RedisParamStore


def test_blob_round_trip_keeps_tensors_and_header() -> None:
    tensors = {"p.w": torch.arange(6.0).reshape(2, 3), "o.adam.step": torch.tensor([3.0], dtype=torch.float64)}
    blob = encode_blob(tensors, model="m", version=7, epoch="abc")
    back = decode_blob(blob)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert blob_metadata(blob) == {"model": "m", "version": "7", "epoch": "abc"}
    assert blob_version(blob) == 7


def test_a_pickle_is_not_a_blob() -> None:
    with pytest.raises(ModelError, match="not valid safetensors"):
        decode_blob(pickle.dumps({"w": [1.0]}))


@pytest.mark.parametrize(("size", "chunk", "expected"), [(0, 4, 1), (4, 4, 1), (5, 4, 2), (12, 4, 3), (13, 4, 4)])
def test_split_chunks_covers_the_blob_exactly(size: int, chunk: int, expected: int) -> None:
    data = bytes(range(size))
    parts = split_chunks(data, chunk)
    assert len(parts) == expected
    assert all(len(p) <= chunk for p in parts)
    assert b"".join(bytes(p) for p in parts) == data


def test_chunk_keys_keep_the_first_key_and_suffix_the_rest() -> None:
    assert chunk_keys("aw:model:{m}:blob:3", 3) == [
        "aw:model:{m}:blob:3",
        "aw:model:{m}:blob:3:1",
        "aw:model:{m}:blob:3:2",
    ]


def test_glob_escape_makes_a_prefix_literal() -> None:
    assert _glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"


class FakeRedis:
    """Just what the store's constructor and the durability path touch."""

    def __init__(self, version: str, aof: int, waitaof: list[int] | None = None) -> None:
        self.version, self.aof, self.waitaof = version, aof, waitaof or [1, 0]
        self.commands: list[tuple[Any, ...]] = []

    def register_script(self, script: str) -> object:
        return object()

    def info(self, section: str) -> dict[str, Any]:
        return {"redis_version": self.version} if section == "server" else {"aof_enabled": self.aof}

    def execute_command(self, *args: Any) -> list[int]:
        self.commands.append(args)
        return self.waitaof


def make(client: FakeRedis, **options: Any) -> RedisParamStore:
    return RedisParamStore(client=client, keys=Keys("t"), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("version", ["6.2.14", "7.0.15", "7.1.0"])
def test_wait_aof_needs_redis_7_2_and_says_which_version_it_found(version: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(FakeRedis(version, aof=1), wait_aof=True)
    assert "7.2" in str(info.value) and version in str(info.value) and "AGENT_WORKERS_WAIT_AOF" in str(info.value)


def test_wait_aof_needs_appendonly() -> None:
    with pytest.raises(ConfigError, match="appendonly"):
        make(FakeRedis("7.2.4", aof=0), wait_aof=True)


def test_wait_aof_is_accepted_on_7_2_with_aof_and_not_checked_when_off() -> None:
    make(FakeRedis("7.2.4", aof=1), wait_aof=True)
    make(FakeRedis("7.0.15", aof=0))


def test_an_unconfirmed_fsync_fails_the_commit_as_retryable() -> None:
    client = FakeRedis("8.0.0", aof=1, waitaof=[0, 0])
    store = make(client, wait_aof=True)
    with pytest.raises(StoreUnavailableError, match="AOF fsync"):
        store._wait_aof("m", 3)
    assert client.commands == [("WAITAOF", 1, 0, 5000)]


def test_unknown_commit_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="optimistic, lock"):
        make(FakeRedis("7.0.0", aof=0), mode="pessimistic")


def test_from_settings_carries_the_store_settings() -> None:
    settings = Settings.from_env(
        {
            "AGENT_WORKERS_COMMIT_MODE": "lock",
            "AGENT_WORKERS_CHUNK_BYTES": "4096",
            "AGENT_WORKERS_LOCK_TIMEOUT": "2.5",
            "AGENT_WORKERS_KEEP_VERSIONS": "3",
            "AGENT_WORKERS_NAMESPACE": "ns1",
        }
    )
    store = RedisParamStore.from_settings(settings)  # redis-py connects lazily: no server needed
    assert (store.mode, store.chunk_bytes, store.lock_timeout, store.keep_versions, store.keys.namespace) == (
        "lock",
        4096,
        2.5,
        3,
        "ns1",
    )


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"AGENT_WORKERS_COMMIT_MODE": "pessimistic"}, "AGENT_WORKERS_COMMIT_MODE"),
        ({"AGENT_WORKERS_CHUNK_BYTES": "10"}, "AGENT_WORKERS_CHUNK_BYTES=10 is too small"),
        ({"AGENT_WORKERS_CHUNK_BYTES": str(2**30)}, "512 MiB"),
        ({"AGENT_WORKERS_WAIT_AOF": "perhaps"}, "AGENT_WORKERS_WAIT_AOF"),
    ],
)
def test_store_settings_are_validated(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert fragment in str(info.value)


# -- the codec against the safetensors library ------------------------------------------------------------------------


MIXED = {
    "p.w": torch.arange(12.0).reshape(3, 4),
    "o.adam.step": torch.tensor([3.0], dtype=torch.float64),
    "p.mask": torch.tensor([True, False, True]),
    "p.h": torch.arange(5.0).to(torch.bfloat16),
    "p.empty": torch.empty(0, 3),
    "p.scalar": torch.tensor(2.5),
    "p.i": torch.arange(7, dtype=torch.int32),
}


def test_our_blobs_read_with_the_safetensors_library_and_back() -> None:
    from safetensors.torch import load, save

    theirs = load(bytes(encode_blob(MIXED, model="m", version=4, epoch="e")))
    assert theirs.keys() == MIXED.keys() and all(torch.equal(theirs[k], MIXED[k]) for k in MIXED)
    ours = decode_blob(save(MIXED))
    assert all(torch.equal(ours[k], MIXED[k]) and ours[k].dtype == MIXED[k].dtype for k in MIXED)


def test_decoding_copies_nothing() -> None:
    blob = encode_blob({"p.w": torch.ones(1000)}, model="m", version=0)
    tensor = decode_blob(blob)["p.w"]
    # A view of the buffer: a change to the bytes shows through (no copy was made).
    blob[-4:] = torch.tensor([5.0]).view(torch.uint8).numpy().tobytes()
    assert float(tensor[-1]) == 5.0


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.update({"p.w": {**h["p.w"], "data_offsets": [0, 8]}}),  # shorter than its shape
        lambda h: h.update({"p.w": {**h["p.w"], "dtype": "OBJ"}}),  # not a dtype
        lambda h: h.update({"p.w": {**h["p.w"], "shape": [-1, 2]}}),  # negative dimension
        lambda h: h.update({"p.x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}),  # overlapping
    ],
)
def test_a_header_that_lies_about_its_data_is_refused(mutate: Any) -> None:
    import json

    good = bytes(encode_blob({"p.w": torch.ones(2, 2)}, model="m", version=0))
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n])
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with pytest.raises(ModelError):
        decode_blob(len(text).to_bytes(8, "little") + text + good[8 + n :])


def test_a_truncated_or_foreign_blob_is_refused() -> None:
    good = bytes(encode_blob({"p.w": torch.ones(4)}, model="m", version=0))
    for bad in (good[:-4], good[:5], b"\x80\x04garbage", pickle.dumps({"p.w": [1.0]})):
        with pytest.raises(ModelError):
            decode_blob(bad)


def test_the_staging_ttl_grows_with_the_blob_so_a_slow_multi_gb_upload_keeps_its_first_chunks() -> None:
    from agent_workers.store.maintenance import STAGING_MIN_RATE, STAGING_TTL, staging_ttl

    assert staging_ttl(0) == staging_ttl(64 * 1024) == STAGING_TTL  # small models: unchanged
    five_gb = 5 * 1024**3
    assert staging_ttl(five_gb) >= five_gb / STAGING_MIN_RATE  # 5 GB at 1 MiB/s: 85 minutes, not 5
