"""What the tools measure with and print with: percentiles, tables, and CPU and memory read from ``/proc``.

Shared by the benchmark, the soak and the training report; the pure parts are unit-tested in tests/unit/test_bench.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Clock ticks per second of ``/proc/<pid>/stat`` and ``/proc/stat``.
TICKS = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


# -- numbers ------------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default); NaN
    for no values.

    Raises:
        ValueError: ``q`` is outside [0, 100].
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of latencies given in seconds, returned in milliseconds."""
    if not seconds:
        return {"count": 0}
    ms = [s * 1000.0 for s in seconds]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "mean_ms": sum(ms) / len(ms),
    }


# -- tables -------------------------------------------------------------------------------------------------------


def format_cell(value: Any) -> str:
    """A table cell: integers with thousands separators, floats to about three significant digits, None as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def _numeric(rows: Sequence[Sequence[Any]], column: int) -> bool:
    """True when every value of ``column`` is a number or None (the column is right-aligned)."""
    return all(isinstance(row[column], (int, float)) or row[column] is None for row in rows)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, cell: Callable[[Any], str] = format_cell
) -> str:
    """A plain-text table: numeric columns right-aligned, each value through ``cell``."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [_numeric(rows, i) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)]).rstrip()


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, cell: Callable[[Any], str] = format_cell
) -> str:
    """The same table as :func:`format_table`, in GitHub markdown (numeric columns right-aligned)."""
    rule = ["---:" if _numeric(rows, i) else "---" for i in range(len(headers))]
    lines = [list(headers), rule, *([cell(v) for v in row] for row in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


# -- /proc --------------------------------------------------------------------------------------------------------


def parse_proc_stat(text: str, ticks_per_second: float) -> float:
    """CPU seconds (user + system, all threads) from the text of ``/proc/<pid>/stat``.

    The command name (field 2) may contain spaces and parentheses, so fields are counted after its last ``)``.
    """
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_second  # utime, stime: fields 14 and 15 of the line


def parse_cpu_busy(text: str, ticks_per_second: float) -> float:
    """Busy CPU seconds of the whole machine (all CPUs, everything but idle and iowait) from ``/proc/stat``."""
    fields = [int(v) for v in text.split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / ticks_per_second  # user..steal, less idle and iowait


def process_cpu_seconds(pid: int | None) -> float:
    """CPU seconds used so far by ``pid`` and its live descendants (prefork children), from /proc; 0 when gone."""
    total = 0.0
    todo = [] if pid is None else [pid]
    while todo:
        p = todo.pop()
        try:
            total += parse_proc_stat(Path(f"/proc/{p}/stat").read_text(), TICKS)
            for child in Path(f"/proc/{p}/task").glob("*/children"):
                todo.extend(int(c) for c in child.read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def machine_cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far (:func:`parse_cpu_busy`); None without ``/proc/stat``."""
    try:
        return parse_cpu_busy(Path("/proc/stat").read_text(), TICKS)
    except OSError:
        return None


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of ``pid`` in MiB (from /proc), None when it is gone."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


def redis_cpu_seconds(client: Any) -> float:
    """CPU seconds (user + system) the Redis server behind ``client`` used so far (``INFO cpu``)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
