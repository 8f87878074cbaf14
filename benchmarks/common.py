"""Shared benchmark helpers: interleaved timing, median ratios, machine description, table output."""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from selective_attention.machine import cores, cpu_model, cpu_signature  # one definition, shared with the CLI's bench
from selective_attention.ops import cpu_kernels

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """The CPU's model name and family/model/stepping (virtual machines give different chips one name), cores, torch
    build, threads, and whether the chunked backend's compiled CPU passes ran (extra ``[cpu]``): the line every table
    carries."""
    return (
        f"{cpu_model()} (family/model/stepping {cpu_signature()}), {cores()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {cpu_passes()}"
    )


# the selective model again, with its eager CPU passes, where the compiled ones run: one more entry in a benchmark's
# interleaved rounds (train_throughput.py, hf_llama.py), and the label of its ratio
EAGER_PASSES = "selective, eager passes"


def with_eager_passes(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names`` and, where the chunked backend's compiled CPU passes run, :data:`EAGER_PASSES` after them."""
    return names + ((EAGER_PASSES,) if cpu_kernels.available() else ())


def eager_passes(on: bool = True):
    """With ``on``, the chunked backend runs its eager CPU passes inside (``cpu_kernels.eager_passes``), where the
    compiled ones would otherwise run: a benchmark's "eager passes" column times the same model that way, in the
    same rounds. Wrap a forward and its backward alike (each reads the switch)."""
    return cpu_kernels.eager_passes() if on else contextlib.nullcontext()


def cpu_passes() -> str:
    """Which elementwise passes the chunked backend runs on CPU: Numba's compiled ones or the eager ones."""
    version = cpu_kernels.version()
    return f"compiled CPU passes (numba {version})" if version else "eager CPU passes"


def device_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn()``: CUDA events around it where a GPU is visible (each
    call synchronised), a host clock otherwise. No warm-up: the caller's."""
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def cpu_results() -> Path:
    """``results/<cpu>/``, this CPU's folder: tables from different CPUs never overwrite each other.

    The folder is the model name in lower case without trademarks, "Processor", "CPU" or the clock:
    ``Intel(R) Xeon(R) Processor`` -> ``intel-xeon``, ``AMD EPYC 7763 64-Core Processor`` -> ``amd-epyc-7763-64-core``.
    Virtual machines give different chips one name ("Intel(R) Xeon(R) Processor" has been family 6 model 207 and
    model 167), so each folder records the family/model/stepping of the chip that first wrote to it (``cpu.json``), and
    another chip of the same name writes to ``<name>-<family>-<model>-<stepping>`` instead (a folder from before the
    record, without one, is taken by the first chip that writes to it).
    """
    name = re.sub(r"\((r|tm)\)|\bprocessor\b|\bcpu\b|@.*$", " ", cpu_model().lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown-cpu"
    folder, signature = RESULTS / slug, cpu_signature()
    recorded = _recorded_signature(folder)
    if recorded is not None and recorded != signature and "?" not in recorded + signature:
        folder = RESULTS / f"{slug}-{signature.replace('/', '-')}"
    folder.mkdir(parents=True, exist_ok=True)
    if _recorded_signature(folder) is None:
        (folder / "cpu.json").write_text(json.dumps({"model": cpu_model(), "signature": signature}, indent=2) + "\n")
    return folder


def _recorded_signature(folder: Path) -> str | None:
    """The family/model/stepping recorded in ``folder/cpu.json`` (None: no folder, no record, or unreadable)."""
    try:
        return str(json.loads((folder / "cpu.json").read_text())["signature"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def interleaved(
    fns: dict[str, Callable[[], None]], repeats: int = 7, warmup: int = 2, alternate: bool = False
) -> dict[str, list[float]]:
    """Time each fn ``repeats`` times, round-robin so drift in machine load hits all of them alike. With
    ``alternate``, every other round runs the fns after the first in reverse order, so that none of them always
    follows the same one (the first, a baseline, always leads)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[:1] + names[1:][::-1] if alternate and r % 2 else names:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over repeats of the per-round ratio (each round ran both back to back)."""
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


_WRITTEN: dict[str, str] = {}  # name -> the stem write() last used for it ("NAME" or "NAME.partial")


def side_path(name: str, suffix: str) -> Path:
    """Where a table's side file (``_raw.json``, ``.png``) goes: beside the table :func:`write` last wrote for ``name``,
    so a partial run's side files are partial too and never replace the committed ones."""
    return cpu_results() / f"{_WRITTEN.get(name, name)}{suffix}"


def write(name: str, rows: list[dict], columns: list[str], title: str, key: tuple[str, ...] | None = None) -> str:
    """Write ``results/<cpu>/NAME.json`` and ``.md`` (see ``cpu_results``); return the markdown table.

    A run that measured fewer rows than the table already there (a subset of the contexts or modes: the rows are
    told apart by their ``key`` columns, default the first) does not replace it: it writes ``NAME.partial.json`` and
    ``.md`` beside it and says so, so the committed table is never silently cut down to the rows of a quick check.
    """
    out = cpu_results()
    key = key or (columns[0],)
    target = name
    old = out / f"{name}.json"
    if old.exists():
        try:
            old_keys = {tuple(str(r.get(c)) for c in key) for r in json.loads(old.read_text())["rows"]}
        except (ValueError, KeyError, TypeError, AttributeError):
            old_keys = set()  # unreadable: replaced, as before
        missing = old_keys - {tuple(str(r[c]) for c in key) for r in rows}
        if missing:
            target = f"{name}.partial"
            shown = ", ".join(" / ".join(k) for k in sorted(missing)[:4]) + (" ..." if len(missing) > 4 else "")
            print(f"note: {old} has rows this run did not measure ({shown}): written to {target}.json / .md "
                  "instead; a run with the default options replaces the table", file=sys.stderr)  # fmt: skip
    _WRITTEN[name] = target
    payload = {"machine": machine(), "rows": rows}
    (out / f"{target}.json").write_text(json.dumps(payload, indent=2))
    lines = [f"**{title}** — {payload['machine']}", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in columns) + " |")
    md = "\n".join(lines) + "\n"
    (out / f"{target}.md").write_text(md)
    return md
