"""Variable-length batches without a broker: padding, masks, output cuts (worker/padding.py) and length-aware
formation under a token budget (worker/forming.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent_workers.errors import ModelError
from agent_workers.tensors import Signature, TensorSpec
from agent_workers.worker import forming, padding

IDS = Signature.from_json(
    {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1]}],
        "outputs": [{"name": "per_token", "dtype": "float32", "shape": [-1, 2]}],
    }
)


class Masked(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids.float() * attention_mask


class Lengths(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return lengths


def test_rows_pad_to_the_longest_with_a_mask_of_their_own_lengths() -> None:
    rows = [np.array([5, 6], dtype=np.int64), np.array([7, 8, 9, 10], dtype=np.int64)]
    padded = padding.pad(IDS, rows, module=Masked())
    assert padded.batch.tolist() == [[5, 6, 0, 0], [7, 8, 9, 10]]  # type: ignore[union-attr]
    assert padded.extra["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert (padded.real_tokens, padded.padded_tokens) == (6, 8)


def test_lengths_reach_a_module_that_names_them_and_nothing_reaches_one_that_does_not() -> None:
    rows = [np.arange(3), np.arange(5)]
    assert padding.pad(IDS, rows, module=Lengths()).extra["lengths"].tolist() == [3, 5]
    assert padding.pad(IDS, rows, module=torch.nn.Identity()).extra == {}


def test_a_declared_pad_value_fills_the_padding() -> None:
    sig = Signature((TensorSpec("x", "float32", (-1, 2), pad=-1.0),))
    batch = padding.pad(sig, [np.ones((1, 2), np.float32), np.ones((2, 2), np.float32)]).batch
    assert batch[0].tolist() == [[1.0, 1.0], [-1.0, -1.0]]  # type: ignore[index]
    assert Signature.from_json(sig.to_json()) == sig


def test_a_pad_that_does_not_fit_the_dtype_is_refused() -> None:
    with pytest.raises(ModelError, match="pad must be a finite number"):
        TensorSpec.from_json({"name": "ids", "dtype": "int64", "shape": [-1], "pad": 0.5})


def test_variable_outputs_are_cut_back_to_each_requests_length() -> None:
    rows = [np.arange(2), np.arange(4)]
    padded = padding.pad(IDS, rows)
    out = [np.zeros((4, 2), np.float32), np.zeros((4, 2), np.float32)]
    assert [r.shape for r in padded.cut(IDS, out)] == [(2, 2), (4, 2)]  # type: ignore[union-attr]


def test_fixed_shape_models_slice_by_size_exactly_as_before() -> None:
    assert forming.plan(list(range(10)), max_batch_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_batches_respect_the_token_budget_and_group_similar_lengths() -> None:
    lengths = [500, 10, 12, 480, 11, 9, 300]
    batches = forming.plan(lengths, max_batch_size=64, length=int, max_tokens=1000)
    assert sorted(x for b in batches for x in b) == sorted(lengths)
    for b in batches:
        assert len(b) * max(b) <= 1000 or len(b) == 1
    assert [9, 10, 11, 12] in batches  # the short ones pay no padding from the long


def test_a_request_longer_than_the_budget_forms_a_batch_alone() -> None:
    batches = forming.plan([5, 4000, 6], max_batch_size=64, length=int, max_tokens=1000)
    assert [4000] in batches and sum(map(len, batches)) == 3


def test_the_batch_holding_the_most_urgent_request_computes_first() -> None:
    # index 0 is the most urgent (longest waiting): its batch goes first although it is the longest
    lengths = [400, 10, 10, 10, 10]
    batches = forming.plan(lengths, max_batch_size=2, length=int, max_tokens=10_000)
    assert batches[0] == [400]


def test_fifo_mode_slices_in_arrival_order_under_the_same_budget() -> None:
    lengths = [500, 10, 12, 480, 7]
    assert forming.plan(lengths, max_batch_size=64, length=int, max_tokens=1000, by_length=False) == [
        [500, 10],  # 2 × 500 = 1000 fits; a third would not
        [12, 480],
        [7],
    ]


def test_shares_split_compute_by_real_tokens() -> None:
    used = forming.shares([(2,), (6,)], elapsed=0.008)
    assert [u["compute_ms"] for u in used] == [2.0, 6.0]
    assert {u["padded_tokens"] for u in used} == {6} and {u["size"] for u in used} == {2}


def test_length_aware_cuts_pad_far_less_than_fifo_on_a_long_tailed_draw() -> None:
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(np.exp(rng.normal(np.log(40), 0.9, 128))), 8, 512).astype(int).tolist()

    def padding_share(batches: list[list[int]]) -> float:
        padded = sum(len(b) * max(b) for b in batches)
        return 1 - sum(map(sum, batches)) / padded

    by_length = forming.plan(lengths, max_batch_size=64, length=int, max_tokens=16384)
    fifo = forming.plan(lengths, max_batch_size=64, length=int, max_tokens=16384, by_length=False)
    assert padding_share(by_length) < 0.15 < 0.5 < padding_share(fifo)


def test_the_token_budget_and_the_switch_are_settings_with_documented_defaults() -> None:
    from pathlib import Path

    from agent_workers.config import Settings

    assert (Settings().batch.max_batch_tokens, Settings().batch.length_batching) == (16384, True)
    batch = Settings.from_env({"AGENT_WORKERS_MAX_BATCH_TOKENS": "512", "AGENT_WORKERS_LENGTH_BATCHING": "0"}).batch
    assert (batch.max_batch_tokens, batch.length_batching) == (512, False)
    operations = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    assert "| `AGENT_WORKERS_MAX_BATCH_TOKENS` | `16384` |" in operations
    assert "| `AGENT_WORKERS_LENGTH_BATCHING` | `true` |" in operations


class _Recording(torch.nn.Module):
    """Sums each row's ids (padding is 0) and records the shape of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(input_ids.shape))
        return (input_ids * attention_mask).sum(dim=1, keepdim=True).float()


def test_predict_many_batches_variable_lengths_by_length_and_answers_in_input_order() -> None:
    from agent_workers.config import Settings
    from agent_workers.models import ModelSpec
    from agent_workers.worker.inference import InferenceEngine, LoadedModel

    signature = Signature.from_json(
        {
            "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1]}],
            "outputs": [{"name": "total", "dtype": "float32", "shape": [1]}],
        }
    )
    module = _Recording()
    loaded = LoadedModel("m", 1, "e", ModelSpec("custom", {}, (-1,), signature), module, torch.device("cpu"))
    engine = InferenceEngine(store=None, settings=Settings.from_env({}))  # type: ignore[arg-type]
    engine.current = lambda name: loaded  # type: ignore[method-assign]
    lengths = [5, 300, 6, 290, 7, 310]
    inputs = [list(range(1, n + 1)) for n in lengths]
    out = engine.predict_many("m", inputs)
    assert out["outputs"] == [[n * (n + 1) / 2] for n in lengths]  # each its own sum, in the order sent
    # the short three form one batch padded to 7 and the long three another: not one batch padded to 310
    assert sorted(module.shapes) == [(3, 7), (3, 310)]
