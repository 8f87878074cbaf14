"""What machine and code a number was measured with: the CPU's model, the torch build, the commit. Benchmark tables
and result files carry it, because CPUs differ (the same script has given 1.26x on one and 2.2x on another)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["cpu_model", "cpu_signature", "cores", "commit", "provenance"]


def _cpuinfo(*names: str) -> dict[str, str]:
    """The first value of each of ``names`` in /proc/cpuinfo (those it has; none off Linux)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in names and name not in found:
                    found[name] = value.strip()
    except OSError:
        pass
    return found


def cpu_model() -> str:
    """This CPU's model name as /proc/cpuinfo gives it (else what ``platform`` knows)."""
    return _cpuinfo("model name").get("model name") or platform.processor() or platform.machine()


def cpu_signature() -> str:
    """``family/model/stepping`` of this CPU (``?`` where /proc/cpuinfo has none): virtual machines that give one model
    name can be different chips, whose matrix-product kernels round differently."""
    ids = _cpuinfo("cpu family", "model", "stepping")
    return "/".join(ids.get(k, "?") for k in ("cpu family", "model", "stepping"))


def cores() -> int:
    """The cores this process may run on (its affinity mask: ``taskset -c 1`` gives 1), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def commit(path: str | Path | None = None) -> str | None:
    """The git commit of the checkout holding ``path`` (default: this package), with ``+changes`` when its tracked
    files differ from it, ``+status-unknown`` when git could not say; None outside a git checkout (an installed
    wheel) or without git."""
    where = str(Path(__file__).resolve().parent if path is None else path)
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        if path is None:  # a checkout that does not hold this package (an install inside another repository): none
            mine = subprocess.run(["git", "-C", where, "ls-files", "--error-unmatch", Path(__file__).name],
                                  capture_output=True, text=True, timeout=10)  # fmt: skip
            if mine.returncode != 0:
                return None
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if dirty.returncode != 0:  # not a clean tree as far as anyone knows
        return head.stdout.strip() + "+status-unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def provenance() -> dict:
    """``{"cpu", "cpu_signature", "cores", "torch", "threads", "numba", "commit"}``, for a result file (the signature:
    one VM name has been two chips; ``numba``: its version where the chunked backend's compiled CPU passes run, which
    round a selective model's training apart from the eager passes', else None)."""
    from .ops import cpu_kernels

    return {"cpu": cpu_model(), "cpu_signature": cpu_signature(), "cores": cores(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "numba": cpu_kernels.version(), "commit": commit()}  # fmt: skip
