"""Training takes typed inputs (contract 1.3): token ids of different lengths padded with a mask, uint8 pixels as
one binary tensor, several named inputs, integer labels; ragged datasets stored as values + offsets in safetensors;
legacy float32 rows exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import examples.models.zoo as zoo
from agent_workers.errors import InputError
from agent_workers.models import make_spec
from agent_workers.padding import MASK, call_module, masks_of, pad_rows
from agent_workers.tensors import encode_tensor
from agent_workers.training import columns, inputs
from agent_workers.training.columns import Ragged
from agent_workers.training.groups import Step, group_step
from agent_workers.training.steps import HyperParams, StepResult, as_batch, batch_of, train_step
from tests.plugins_tensors import TWO_INPUT_SIGNATURE
from tests.unit.test_training import MemoryStore

ORDER = make_spec("order_transformer", width=16, heads=2, layers=1)
DIGITS = make_spec("digits_cnn", channels=4)
TWO = make_spec("two_input", signature=TWO_INPUT_SIGNATURE, vocab=50, width=4)
CE = HyperParams(loss="cross_entropy", optimizer="adam", lr=0.01)


def test_pad_rows_pads_every_variable_dim_with_zeros_and_the_mask_marks_real_tokens() -> None:
    rows = [np.array([5, 6, 7]), np.array([8])]
    assert pad_rows(rows).tolist() == [[5, 6, 7], [8, 0, 0]]
    masks = masks_of(np.array([3, 1]), 3)
    assert masks["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]] and masks["lengths"].tolist() == [3, 1]
    two_d = pad_rows([np.ones((2, 3)), np.ones((1, 4))], np.dtype(np.float32))
    assert two_d.shape == (2, 2, 4) and two_d[1].sum() == 4 and two_d[0].sum() == 6


def test_token_rows_of_different_lengths_become_one_padded_int64_batch_with_its_mask() -> None:
    batch, y = batch_of(ORDER, [[1, 5, 2], [3, 2, 4, 1, 6], [2, 1]], [1, 0, 0])
    assert batch["ids"].dtype == np.int64 and batch["ids"].tolist() == [
        [1, 5, 2, 0, 0],
        [3, 2, 4, 1, 6],
        [2, 1, 0, 0, 0],
    ]
    assert batch[MASK].dtype == np.int64 and batch[MASK].sum(axis=1).tolist() == [3, 5, 2]
    assert batch["lengths"].tolist() == [3, 5, 2]
    assert y.dtype == np.int64 and y.tolist() == [1, 0, 0]


def test_the_mask_reaches_the_model_so_padding_does_not_change_any_rows_loss() -> None:
    """The loss of a padded batch equals the mean of each row's loss computed alone (unpadded): fails if the mask is
    not handed to forward (the model then attends to the padding)."""
    torch.manual_seed(0)
    module = ORDER.build().eval()
    rows, labels = zoo.order_data(6, seed=3)
    batch, y = batch_of(ORDER, [r.tolist() for r in rows], labels.tolist())
    with torch.no_grad():
        padded = torch.nn.functional.cross_entropy(call_module(module, ORDER.signature, batch), torch.from_numpy(y))
        alone = [
            torch.nn.functional.cross_entropy(module(torch.from_numpy(r[None])), torch.tensor([int(t)]))
            for r, t in zip(rows, labels, strict=True)
        ]
    assert len({len(r) for r in rows}) > 1
    assert float(padded) == pytest.approx(float(torch.stack(alone).mean()), rel=1e-5)


def test_uint8_pixels_travel_as_one_binary_tensor_of_the_batch() -> None:
    pixels = np.arange(3 * 64, dtype=np.uint8).reshape(3, 1, 8, 8)
    batch, y = batch_of(DIGITS, encode_tensor(pixels), encode_tensor(np.array([4, 0, 9])))
    assert batch["pixels"].dtype == np.uint8 and np.array_equal(batch["pixels"], pixels)
    assert MASK not in batch and y.tolist() == [4, 0, 9]
    rows, _ = batch_of(DIGITS, [encode_tensor(p) for p in pixels], [4, 0, 9])  # or one tensor per row
    assert np.array_equal(rows["pixels"], pixels)


def test_several_named_inputs_are_decoded_per_name() -> None:
    spec = make_spec("two_input", signature=TWO_INPUT_SIGNATURE, vocab=50, width=4)
    batch, _ = batch_of(spec, {"ids": [[1, 2, 3], [4]], "mask": [[True, True, False], [True]]}, [0.5, 1.5])
    assert batch["ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["mask"].tolist() == [[True, True, False], [True, False, False]]  # bool pads with False
    assert batch[MASK].tolist() == [[1, 1, 1], [1, 0, 0]]  # the lengths of ids, the first variable input
    with pytest.raises(InputError, match=r"naming exactly \['ids', 'mask'\]"):
        batch_of(spec, {"ids": [[1]]}, [0.0])


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        ([[1, 2], [3, -1.5]], [0, 1], r"x row 1: input 'ids' takes int64"),
        ([[1, 2], [2**63]], [0, 1], r"x row 1: .*elements must be from"),
        ([[1, 2], []], [0, 1], "x row 1: input 'ids' is empty"),
        ([[1, 2], [3]], [0], "one target"),
        ([[1, 2], [3]], [0.5, float("nan")], "NaN"),
        ({"dtype": "int32", "shape": [1, 2], "b64": "AQAAAAIAAAA="}, [0], "takes dtype int64"),
        ("tokens", [0], "non-empty list of rows"),
    ],
)
def test_a_bad_typed_batch_is_refused_naming_the_row_or_input(x: object, y: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        batch_of(ORDER, x, y, max_elements=1000)


def test_the_element_limit_counts_the_padded_batch() -> None:
    with pytest.raises(InputError, match="padded"):
        batch_of(ORDER, [[1] * 30, [2]] * 2, [0, 1] * 2, max_elements=100)


def test_legacy_float32_rows_take_the_exact_path_of_before() -> None:
    spec = make_spec("linear", in_features=2, out_features=1)
    x, y = [[0.5, -1.0], [1.0, 0.0]], [[1.5], [0.2]]
    got, expected = batch_of(spec, x, y), as_batch(x, y)
    assert isinstance(got[0], np.ndarray) and got[0].dtype == np.float32
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    b64, _ = batch_of(spec, encode_tensor(np.array(x, dtype=np.float32)), y)  # also as one binary tensor
    assert np.array_equal(b64, expected[0])


def test_typed_train_steps_and_a_group_commit_lower_the_loss_of_the_order_task() -> None:
    store = MemoryStore(ORDER)
    rows, labels = zoo.order_data(64, seed=1)
    x = [r.tolist() for r in rows]
    first = train_step(store, "m", x, labels.tolist(), CE, update_id="s0")
    for i in range(1, 21):
        last = train_step(store, "m", x, labels.tolist(), CE, update_id=f"s{i}")
    assert last.loss < 0.8 * first.loss
    steps = [Step(f"u{i}", *batch_of(ORDER, x[i * 16 : (i + 1) * 16], labels[i * 16 : (i + 1) * 16])) for i in range(4)]
    answers = group_step(store, "m", steps, CE)
    assert [a.version for a in answers if isinstance(a, StepResult)] == [22] * 4  # one commit for the group


def test_ragged_and_typed_columns_round_trip_through_safetensors_bytes() -> None:
    rows, _ = zoo.order_data(5, seed=2)
    ragged = columns.typed_columns(rows)
    assert isinstance(ragged, Ragged) and len(ragged) == 5
    back = columns.from_bytes(columns.to_bytes(ragged))
    assert [r.tolist() for r in back.take(np.arange(5))] == [r.tolist() for r in rows]
    named = columns.typed_columns({"pixels": np.zeros((5, 1, 8, 8), np.uint8), "ids": rows})
    back = columns.from_bytes(columns.to_bytes(named))
    assert back["pixels"].dtype == np.uint8 and back["pixels"].shape == (5, 1, 8, 8)
    assert isinstance(back["ids"], Ragged) and back["ids"].values.dtype == np.int64
    assert columns.typed_columns(np.ones((4, 3))) is None  # float rows × features: the legacy form


def test_dataset_columns_are_checked_against_the_signature_before_training() -> None:
    inputs.check_columns(DIGITS, np.zeros((4, 1, 8, 8), np.uint8))
    with pytest.raises(InputError, match="takes uint8"):
        inputs.check_columns(DIGITS, np.full((4, 1, 8, 8), 0.5, np.float32))
    with pytest.raises(InputError, match=r"must have shape \[1, 8, 8\]"):
        inputs.check_columns(DIGITS, np.zeros((4, 64), np.uint8))
    with pytest.raises(InputError, match="cannot differ in length"):
        inputs.check_columns(DIGITS, columns.typed_columns([np.zeros(3, np.uint8), np.zeros(2, np.uint8)]))
    inputs.check_columns(ORDER, columns.typed_columns([np.arange(1, 4), np.arange(1, 3)]))


def test_the_client_sends_typed_numpy_x_as_binary_tensors_and_float_rows_as_before() -> None:
    from agent_workers.client.messages import training_x

    assert training_x(np.ones((2, 3))) == [[1.0] * 3] * 2  # float rows × features: plain lists, as before 1.3
    pixels = np.zeros((2, 1, 8, 8), np.uint8)
    assert training_x(pixels) == encode_tensor(pixels)  # one binary tensor of the batch
    rows = [np.arange(3), np.arange(5)]
    assert training_x(rows) == [encode_tensor(r) for r in rows]
    assert training_x({"ids": rows})["ids"][1]["shape"] == [5]
    batch, _ = batch_of(ORDER, training_x(rows), [0, 1])  # and the worker decodes what it sends
    assert batch["ids"].tolist() == [[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]


def test_an_input_the_signature_names_attention_mask_is_the_producers_own() -> None:
    signature = {
        "inputs": [
            {"name": "ids", "dtype": "int64", "shape": [-1]},
            {"name": "attention_mask", "dtype": "int64", "shape": [-1]},
        ],
        "outputs": [{"name": "pooled", "dtype": "float32", "shape": [4]}],
    }
    spec = make_spec("two_input", signature=signature, vocab=50, width=4)
    batch, _ = batch_of(spec, {"ids": [[1, 2], [3]], "attention_mask": [[1, 0], [1]]}, [0.0, 1.0])
    assert batch[MASK].tolist() == [[1, 0], [1, 0]] and batch["lengths"].tolist() == [2, 1]


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(["dtype", "shape", "b64", "ids"]), inner)
    ),
    max_leaves=30,
)
_TENSORS = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["int64", "uint8", "int32", "bool", "float32", "bfloat16", "x"]),
        "shape": st.lists(st.integers(min_value=-2, max_value=9), max_size=4),
        "b64": st.sampled_from(["", "AAAA", "AAECAw==", "!!!!", "AAAAAAAAAAA=", "AQAAAAAAAAACAAAAAAAAAA=="]),
    }
)


@settings(max_examples=300, deadline=None)
@given(
    spec=st.sampled_from(["order", "digits", "two"]),
    x=_JSON | _TENSORS | st.lists(_JSON | _TENSORS, min_size=1, max_size=4) | st.fixed_dictionaries({"ids": _JSON}),
    y=_JSON | _TENSORS,
)
def test_any_hostile_x_or_y_is_an_input_error_and_nothing_else(spec: str, x: object, y: object) -> None:
    """Whatever a producer sends as x and y, decoding either succeeds or raises InputError (the worker answers that
    request alone with it): never a TypeError, IndexError or numpy error that would read as a worker fault."""
    model = {"order": ORDER, "digits": DIGITS, "two": TWO}[spec]
    try:
        batch, ya = batch_of(model, x, y, max_elements=10_000)
    except InputError:
        return
    assert len(ya) == len(next(iter(batch.values())))


@settings(max_examples=300, deadline=None)
@given(
    spec=st.sampled_from(["order", "digits", "two"]),
    x=st.lists(_JSON, min_size=1, max_size=5) | st.dictionaries(st.sampled_from(["ids", "mask", "pixels"]), _JSON),
)
def test_any_hostile_upload_is_refused_with_an_input_error_or_checked_before_training(spec: str, x: object) -> None:
    """An upload's x becomes typed columns, the legacy form (None) or an InputError; typed columns are then either
    refused by the model's check or collate into a batch."""
    model = {"order": ORDER, "digits": DIGITS, "two": TWO}[spec]
    try:
        data = columns.typed_columns(x)
        if data is None:
            return
        inputs.check_columns(model, data)
        inputs.collate(model, columns.take(data, np.arange(columns.n_rows(data))))
    except InputError:
        return


def test_a_npz_carries_ragged_and_named_inputs_and_bad_offsets_are_refused(tmp_path: Path) -> None:
    from agent_workers.cli.tables import read_xy

    rows, labels = zoo.order_data(4, seed=5)
    ragged = Ragged.from_rows(rows)
    np.savez(tmp_path / "r.npz", x_values=ragged.values, x_offsets=ragged.offsets, y=labels)
    x, y = read_xy(tmp_path / "r.npz")
    assert [r.tolist() for r in columns.typed_columns(x).take(np.arange(4))] == [r.tolist() for r in rows]
    np.savez(tmp_path / "n.npz", **{"x.ids.values": ragged.values, "x.ids.offsets": ragged.offsets, "y": labels})
    named = columns.typed_columns(read_xy(tmp_path / "n.npz")[0])
    assert set(named) == {"ids"} and len(named["ids"]) == 4
    for offsets in ([0, 2, 1, len(ragged.values)], [1, len(ragged.values)], [0, 0, len(ragged.values)]):
        with pytest.raises(InputError, match="offsets must"):
            columns.typed_columns(Ragged(ragged.values, np.asarray(offsets)))


def test_the_zoo_report_renders_its_table_and_figure_from_its_json(tmp_path: Path) -> None:
    import json

    from agent_workers.tools.report import splice
    from agent_workers.tools.report.zoo import ZOO_BEGIN, ZOO_END, plot_zoo, render_zoo

    report = json.loads((Path(__file__).parents[2] / "docs/benchmarks/training-zoo.json").read_text())
    text = render_zoo(report)
    for row in report["zoo"]:
        assert f"| {row['model']} | {row['trainers']} | {row['epochs']} | {row['steps']} |" in text
    assert splice("# T\n", text, begin=ZOO_BEGIN, end=ZOO_END).count(ZOO_BEGIN) == 1
    plot_zoo(report["zoo"], tmp_path / "zoo.png")
    assert (tmp_path / "zoo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_declared_pad_value_fills_a_training_batch_as_it_fills_an_inference_batch() -> None:
    from agent_workers.worker import padding as serving

    signature = {
        "inputs": [{"name": "ids", "dtype": "int64", "shape": [-1], "pad": 15}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [2]}],
    }
    spec = make_spec("order_transformer", signature=signature)
    batch, _ = batch_of(spec, [[1, 2, 3], [4]], [0, 1])
    served = serving.pad(spec.signature, [np.array([1, 2, 3]), np.array([4])], module=spec.build())
    assert batch["ids"].tolist() == served.batch.tolist() == [[1, 2, 3], [4, 15, 15]]
    assert batch[MASK].tolist() == served.extra[MASK].tolist() == [[1, 1, 1], [1, 0, 0]]
