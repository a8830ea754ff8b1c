"""After a soak: what became of every request (lost, failed, wrong, computed twice), how worker memory grew, the
summary lines and the files."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from agent_workers.contract import RESULT_KEY_PREFIX
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.soak.plot import plot


def growth(samples: list[tuple[float, float]], skip: float = 0.1) -> dict[str, float] | None:
    """Median RSS of the first and last fifth of ``(t, rss)`` samples, after skipping the first ``skip`` of them
    (start-up: model load, first batches)."""
    if len(samples) < 10:
        return None
    body = samples[int(len(samples) * skip) :]
    fifth = max(1, len(body) // 5)
    first = statistics.median(r for _, r in body[:fifth])
    last = statistics.median(r for _, r in body[-fifth:])
    return {
        "first_mb": first,
        "last_mb": last,
        "growth_mb": last - first,
        "growth_pct": 100.0 * (last - first) / first if first else 0.0,
    }


def account(
    results: Any, store: RedisParamStore, model: str, rows: np.ndarray, ids: Sequence[str], counts: Counter[str] | None
) -> dict[str, Any]:
    """Every request's stored result against torch run locally; with ``counts`` (results heard per task id), how
    many were computed more than once."""
    snap = store.read(model)
    params = snap.parameters()
    want = rows[: len(ids)] @ params["weight"].numpy().T + params["bias"].numpy()
    lost = failed = wrong = 0
    lost_rows: list[int] = []
    for lo in range(0, len(ids), 2000):
        chunk = ids[lo : lo + 2000]
        for k, raw in enumerate(results.mget([RESULT_KEY_PREFIX + i for i in chunk])):
            if raw is None:
                lost += 1
                lost_rows.append(lo + k)
                continue
            meta = json.loads(raw)
            if meta["status"] != "SUCCESS":
                failed += 1
            elif not np.allclose(meta["result"]["outputs"], want[lo + k], rtol=1e-4, atol=1e-5):
                wrong += 1
    report: dict[str, Any] = {
        "sent": len(ids),
        "completed": len(ids) - lost,
        "lost": lost,
        "failed": failed,
        "wrong": wrong,
        "lost_examples": [{"row": r, "id": ids[r]} for r in lost_rows[:20]],
    }
    if counts is not None:
        time.sleep(0.5)  # the last pub/sub messages are in flight; they only add to the duplicate count
        report["duplicated"] = sum(1 for i in ids if counts.get(i, 0) > 1)
        report["executions"] = sum(counts.get(i, 0) for i in ids)
    return report


def rss_report(rss_series: Sequence[list[tuple[float, float]]], killed: bool) -> dict[str, Any]:
    """Per worker slot: its role (slot 0 is the victim when there were kills), RSS growth of survivors, peak RSS."""
    out: dict[str, Any] = {}
    for slot, series in enumerate(rss_series):
        role = "victim" if slot == 0 and killed else "survivor"
        out[f"w{slot}"] = {
            "role": role,
            "growth": growth(series) if role == "survivor" else None,
            "max_mb": max((r for _, r in series), default=None),
        }
    return out


def summarize(report: dict[str, Any], *, kills: int, death_ms: Sequence[float], say: Callable[[str], None]) -> None:
    """The closing lines: the account, how long a killed worker took to go, and each worker's memory."""
    if report["mode"] != "soak":
        say(f"lost {report['lost']:,}  failed {report['failed']:,}  wrong {report['wrong']:,}")
        return
    say(
        f"sent {report['sent']:,}  completed {report['completed']:,}  lost {report['lost']:,}  "
        f"duplicated {report.get('duplicated', 0):,} (computed twice after a kill; same result)  "
        f"failed {report['failed']:,}  wrong {report['wrong']:,}  kills {kills}"
    )
    if death_ms:
        say(
            f"a SIGKILLed worker took {min(death_ms):.0f}-{max(death_ms):.0f} ms to be gone "
            "(its broker connection stays open until then)"
        )
    for name, info in report["rss"].items():
        g = info["growth"]
        if g is not None:
            say(
                f"{name} ({info['role']}, never killed): RSS {g['first_mb']:.0f} MiB -> "
                f"{g['last_mb']:.0f} MiB ({g['growth_mb']:+.1f} MiB, {g['growth_pct']:+.1f}%) between "
                "the first and the last fifth of the run"
            )
        else:
            say(f"{name} ({info['role']}): peak RSS {info['max_mb'] or 0:.0f} MiB")


def write(
    report: dict[str, Any], samples: Sequence[Any], out: Path, broker_url: str | None, say: Callable[[str], None]
) -> None:
    """soak.{json,png} under ``out`` for the soak's own Redis broker, soak-<scheme>.* for another (e.g. amqp)."""
    stem = "soak" if broker_url is None else f"soak-{urlparse(broker_url).scheme}"
    out.mkdir(parents=True, exist_ok=True)
    report["samples"] = [dataclasses.asdict(s) for s in samples]
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    png = plot(report, out / f"{stem}.png")
    say(f"wrote {out / f'{stem}.json'} and {png}")
