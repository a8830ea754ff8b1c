"""Decoding ahead (agent_workers/worker/decoding.py) without a worker: a batch decoded in the decode thread against
the loaded version's spec, used only for that spec, faults kept for their own request."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from agent_workers.config import Settings
from agent_workers.errors import InputError, ModelError
from agent_workers.models import make_spec
from agent_workers.worker.cache import distinct, key_of
from agent_workers.worker.decoding import Decoded, Decoder, decoded_for
from agent_workers.worker.inference import InferenceEngine, LoadedModel
from agent_workers.worker.requests import Pending


class _Store:
    """Only heads are read (one per model per batch): model "m" is at version 1 of incarnation "e", which the
    engine has loaded, so nothing is loaded; any other model is unknown. Anything else read is a failure."""

    def __init__(self) -> None:
        self.heads: list[str] = []

    def head(self, name: str) -> Any:
        self.heads.append(name)
        if name != "m":
            raise ModelError(f"unknown model {name!r}")
        return SimpleNamespace(version=1, epoch="e")

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the decoder read the store ({name})")


def engine_with(name: str) -> tuple[InferenceEngine, LoadedModel]:
    engine = InferenceEngine(store=_Store(), settings=Settings())  # type: ignore[arg-type]
    spec = make_spec("linear", in_features=3)
    loaded = LoadedModel(name, 1, "e", spec, spec.build(), engine.device)
    engine._current[name] = loaded
    return engine, loaded


def request(args: list[Any], kwargs: dict[str, Any] | None = None) -> Pending:
    return Pending("id", "agent_workers.predict", None, args, kwargs or {}, {}, 0.0, None)


def test_a_batch_is_decoded_ahead_for_the_loaded_spec_and_faults_stay_with_their_request() -> None:
    engine, loaded = engine_with("m")
    good = request(["m", [1.0, 2.0, 3.0]])
    bad = request(["m", [1.0, "x", 3.0]])
    pinned = request(["m", [1.0, 2.0, 3.0], 1])  # a pinned version may not be the loaded one
    unknown = request(["other", [1.0, 2.0, 3.0]])  # no head: decoded (and failed) in the compute thread
    unbound = request([], {"model": "m"})  # no inputs: the compute thread binds it again and names the fault
    decoder = Decoder(engine)
    try:
        heads = decoder.submit([good, bad, pinned, unknown, unbound]).result(timeout=10)
    finally:
        decoder.close()
    # the batch's heads, read once per model; an unknown model has none (the compute thread reads it and fails it)
    assert heads == {"m": loaded}
    assert sorted(engine.store.heads) == ["m", "other"]
    ahead = decoded_for(good, loaded.spec)
    assert ahead is not None and ahead.error is None
    np.testing.assert_array_equal(ahead.value, np.array([1.0, 2.0, 3.0], dtype=np.float32))
    assert ahead.key == key_of(ahead.value, keyed=False)  # the batch groups identical inputs by it
    fault = decoded_for(bad, loaded.spec)
    assert fault is not None and isinstance(fault.error, InputError)
    assert all(r.decoded is None for r in (pinned, unknown, unbound))
    assert decoded_for(good, make_spec("linear", in_features=3)) is None  # another spec: decoded again


def test_distinct_groups_by_the_keys_made_ahead_and_makes_the_missing_ones() -> None:
    a, b, c = (np.array([x, 0.0], dtype=np.float32) for x in (1.0, 2.0, 1.0))
    reqs = [request(["m", [0.0]]) for _ in range(3)]
    # a key made ahead for that very array is taken as it is (here one that says a and b are the same input); c's
    # request was decoded ahead for another array, so its key is made now
    reqs[0].decoded, reqs[1].decoded = Decoded(None, a, key="same"), Decoded(None, b, key="same")
    reqs[2].decoded = Decoded(None, c.copy(), key="same")
    rows = distinct(list(zip(reqs, [a, b, c], strict=True)), keyed=False)
    assert [len(row.requests) for row in rows] == [2, 1]
    assert rows[0].requests == reqs[:2] and rows[0].key == "same"
    assert rows[1].key == key_of(c, keyed=False)
