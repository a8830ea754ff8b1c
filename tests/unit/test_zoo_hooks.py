"""The example models' preprocess hooks (examples/models/zoo.py): a PNG of a training-set digit becomes exactly the
pixels the model was trained on, a sentence becomes exactly the ids of the row it spells, tensors still pass, and a
bad image or an unknown word is refused with a clear InputError."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

import examples.models.zoo as zoo
from agent_workers.errors import InputError, ModelError
from agent_workers.store.artifacts import Artifacts


def png_input(data: bytes) -> dict[str, dict[str, str]]:
    return {"image": {"b64": base64.b64encode(data).decode()}}


@pytest.fixture(scope="module")
def tokenizer_artifacts() -> Artifacts:
    return Artifacts({"tokenizer": zoo.order_tokenizer().to_str().encode()}, version=0)


def test_a_png_of_a_digit_decodes_to_the_training_pixels() -> None:
    _, x_test, _, _ = zoo.digits_data()
    for pixels in x_test[:40]:
        np.testing.assert_array_equal(zoo.digits_preprocess(png_input(zoo.digits_png(pixels)), Artifacts()), pixels)


def test_a_larger_rgb_image_is_greyscaled_and_resized_to_8x8() -> None:
    from PIL import Image

    _, x_test, _, _ = zoo.digits_data()
    big = Image.fromarray(x_test[3][0]).resize((64, 64), Image.Resampling.NEAREST).convert("RGB")
    out = io.BytesIO()
    big.save(out, format="PNG")
    got = zoo.digits_preprocess(png_input(out.getvalue()), Artifacts())
    assert got.shape == (1, 8, 8) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, x_test[3])  # 8×8 blocks of one value average back to that value


def test_digits_tensors_still_pass_through_checked() -> None:
    pixels = np.arange(64, dtype=np.uint8).reshape(1, 8, 8)
    np.testing.assert_array_equal(zoo.digits_preprocess(pixels.tolist(), Artifacts()), pixels)
    with pytest.raises(InputError):
        zoo.digits_preprocess([[1, 2, 3]], Artifacts())


def test_a_corrupt_png_is_refused() -> None:
    from PIL import UnidentifiedImageError

    with pytest.raises(UnidentifiedImageError):  # the worker reports it as this request's InputError
        zoo.digits_preprocess(png_input(b"\x89PNG not really"), Artifacts())
    with pytest.raises(InputError, match="base64"):
        zoo.digits_preprocess({"image": {"b64": "!!"}}, Artifacts())


def test_a_sentence_becomes_the_ids_of_its_row(tokenizer_artifacts: Artifacts) -> None:
    rows, _ = zoo.order_data(100, seed=3)
    for row in rows:
        np.testing.assert_array_equal(zoo.order_preprocess({"text": zoo.order_text(row)}, tokenizer_artifacts), row)
    got = zoo.order_preprocess({"text": "The a, cat sat on B."}, tokenizer_artifacts)
    assert got.tolist() == [3, zoo.TOKEN_A, 4, 5, 6, zoo.TOKEN_B]


def test_unknown_words_and_empty_text_are_refused(tokenizer_artifacts: Artifacts) -> None:
    with pytest.raises(InputError, match=r"unknown words \['pad', 'zebra'\]"):
        zoo.order_preprocess({"text": "the a zebra b [PAD]"}, tokenizer_artifacts)
    with pytest.raises(InputError, match="no words"):
        zoo.order_preprocess({"text": " ,. "}, tokenizer_artifacts)


def test_token_ids_still_pass_and_text_needs_the_tokenizer(tokenizer_artifacts: Artifacts) -> None:
    assert zoo.order_preprocess([3, 1, 2], tokenizer_artifacts).tolist() == [3, 1, 2]
    with pytest.raises(ModelError, match="tokenizer"):
        zoo.order_preprocess({"text": "a b"}, Artifacts())
