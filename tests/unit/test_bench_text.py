"""The text benchmark's pure parts (agent_workers/tools/bench/text.py): the length draw, the producer's messages in
both encodings, and the plot of a report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from agent_workers.tensors import Signature, decode_inputs
from agent_workers.tools.bench import text

SIGNATURE = Signature.from_json({"inputs": [{"name": "input_ids", "dtype": "int64", "shape": [-1]}]})


def test_lengths_are_long_tailed_within_8_to_512() -> None:
    lengths = text.draw_lengths(5000)
    assert lengths.min() >= 8 and lengths.max() <= 512
    assert 30 <= np.median(lengths) <= 50 and np.percentile(lengths, 99) > 4 * np.median(lengths)


def test_both_encodings_carry_the_same_token_ids_as_a_bare_celery_message() -> None:
    row = text.draw_rows(1)[0]
    for encoding in ("json", "b64"):
        message = text.Producer("memory://", "redis://127.0.0.1:6379/1", encoding).message("t-1", row)
        args, kwargs, _embed = json.loads(message.body)
        assert message.headers["task"] == "agent_workers.predict" and args == []
        assert kwargs["model"] == text.MODEL
        decoded = decode_inputs(SIGNATURE, kwargs["inputs"], max_elements=10_000)
        assert decoded.tolist() == row.tolist()  # type: ignore[union-attr]


def test_the_plot_is_written(tmp_path: Path) -> None:
    drain = {"mode": "drain", "encoding": "json", "rate": 100.0, "padding_share": 0.05}
    runs = [
        {**drain, "formation": "length"},
        {**drain, "formation": "fifo", "rate": 40.0, "padding_share": 0.7},
        {"mode": "open", "formation": "length", "p99_ms": 20.0},
        {"mode": "open", "formation": "fifo", "p99_ms": 60.0},
    ]
    report = {
        "n": 10,
        "max_batch_size": 64,
        "max_batch_tokens": 16384,
        "lengths": {"median": 40.0},
        "raw_forward_rate": {"length": 200.0, "fifo": 50.0},
        "brokers": {"redis": {"runs": runs}},
    }
    text.plot(report, tmp_path / "text.png")
    assert (tmp_path / "text.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_request_with_a_deadline_carries_it_as_deadline_ms() -> None:
    row = text.draw_rows(1)[0]
    message = text.Producer("memory://", "redis://127.0.0.1:6379/1", "json").message("t-1", row, 1_900_000_000_000)
    _args, kwargs, _embed = json.loads(message.body)
    assert kwargs["deadline_ms"] == 1_900_000_000_000
    _args, kwargs, _embed = json.loads(text.Producer("memory://", "redis://", "json").message("t-2", row).body)
    assert "deadline_ms" not in kwargs


def test_deadline_summary_counts_late_and_refused_requests_as_missed() -> None:
    answers = [("a", 0.050, True), ("b", 0.150, True), ("c", 0.010, False), ("d", 0.090, True)]
    summary = text.deadline_summary(answers, 100.0)
    assert (summary["n"], summary["late"], summary["refused"], summary["missed"]) == (4, 1, 1, 2)
    assert summary["p99_over_deadline"] == summary["p99_ms"] / 100.0 and summary["p99_ms"] > 140.0
