"""The ``image`` workload's pure parts (agent_workers/tools/bench/image.py): what each encoding puts on the wire, the
CNN it is served by, and the figure; the drains themselves run in ``agent-workers bench --workload image``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from agent_workers.models import make_spec
from agent_workers.tensors import decode_inputs, encode_tensor
from agent_workers.tools.bench import image


def test_each_encoding_carries_the_same_pixels_at_its_own_size() -> None:
    pixels = image.images(1)[0]
    sizes = {encoding: image.message_bytes(encoding, pixels) for encoding in image.ENCODINGS}
    ratios = {encoding: body / image.PIXEL_BYTES for encoding, (body, _) in sizes.items()}
    assert ratios["msgpack"] < 1.02 < ratios["b64"] < 1.4 < 4 < ratios["json"] < ratios["json-float"]
    for encoding, (body, envelope) in sizes.items():
        assert 4 * body / 3 < envelope < 4 * body / 3 + 1200, encoding  # Redis carries the body base64'd
    spec = make_spec(image.ARCHITECTURE)
    for wire in (image.ENCODINGS["json"][1](pixels), encode_tensor(pixels), encode_tensor(pixels, raw=True)):
        np.testing.assert_array_equal(decode_inputs(spec.signature, wire, max_elements=10**6), pixels)


def test_the_cnn_takes_uint8_and_its_float_twin_takes_the_same_shape() -> None:
    module = make_spec(image.ARCHITECTURE).build().eval()
    with torch.inference_mode():
        assert module(torch.from_numpy(image.images(2))).shape == (2, 10)
    twin = make_spec(image.ARCHITECTURE, signature=image.FLOAT_SIGNATURE)
    assert twin.signature.inputs[0].dtype == "float32" and list(twin.signature.inputs[0].shape) == list(image.SHAPE)
    assert image.forward_ms_per_image(8, threads=1, seconds=0.05) > 0


def test_the_wide_cnn_is_the_issues_scale_and_takes_the_same_images() -> None:
    sizes = {}
    for architecture in image.MODELS:
        module = make_spec(architecture).build().eval()
        sizes[architecture] = sum(p.numel() for p in module.parameters())
        with torch.inference_mode():
            assert module(torch.from_numpy(image.images(2))).shape == (2, 10)
    assert image.MODELS[0] == "bench_cnn_wide" and sizes["bench_cnn_wide"] > 10 * sizes["bench_cnn"]


def test_the_figure_is_drawn_from_a_report(tmp_path: Path) -> None:
    runs = [
        {"broker": b, "architecture": a, "encoding": e, "message_ratio": m, "cpu_ratio": c, "rate": r}
        for a in image.MODELS
        for b in ("redis", "rabbitmq")
        for e, m, c, r in (("json-float", 20.0, 30.0, 100.0), ("json", 4.6, 6.0, 200.0), ("b64", 1.35, 1.5, 700.0))
        + (("msgpack", 1.01, 1.2, 900.0),)
    ]
    models = {a: {"forward_ms_per_image": f} for a, f in zip(image.MODELS, (0.4, 0.07), strict=True)}
    report = {"runs": runs, "goals": image.GOALS, "max_batch_size": 64, "forward_ms_per_image": 0.4, "models": models}
    image.plot(report, tmp_path / "image.png")
    assert (tmp_path / "image.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
