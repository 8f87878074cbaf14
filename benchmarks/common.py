"""Shared benchmark helpers: interleaved timing, median ratios, machine description, table output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def interleaved(fns: dict[str, Callable[[], None]], repeats: int = 7, warmup: int = 2) -> dict[str, list[float]]:
    """Time each fn ``repeats`` times, round-robin so drift in machine load hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over repeats of the per-round ratio (each round ran both back to back)."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def write(name: str, rows: list[dict], columns: list[str], title: str) -> str:
    """Write ``results/NAME.json`` and ``results/NAME.md``; return the markdown table."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"machine": machine(), "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    lines = [f"**{title}** — {payload['machine']}", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in columns) + " |")
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(md)
    return md
