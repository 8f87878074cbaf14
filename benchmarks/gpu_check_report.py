"""Helpers of ``benchmarks/gpu_check.sh``: the environment probe and the final report.

python benchmarks/gpu_check_report.py env
    prints the GPU, torch, CUDA, Triton and Python versions; exit status 0 with a CUDA GPU, 3 without
    one (torch imports but sees none), 4 where torch does not import.
python benchmarks/gpu_check_report.py report OUT_DIR --md PATH --stage NAME=STATUS ... [--seconds S]
    reads OUT_DIR/{env.txt, tests.xml or tests.log, bench.json} and writes the markdown summary to
    OUT_DIR/gpu_check.md and PATH. Standard library only, so the report is written even where torch
    is broken.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

GOAL_L, GOAL_RATIO = 8192, 1.3


def env() -> int:
    import platform

    print(f"python: {platform.python_version()} ({sys.executable})")
    try:
        import torch
    except Exception as e:  # a broken install: say so, the stages after this will fail too
        print(f"torch: does not import: {type(e).__name__}: {e}")
        return 4
    print(f"torch: {torch.__version__} (CUDA build {torch.version.cuda})")
    try:
        import triton

        print(f"triton: {triton.__version__}")
    except Exception as e:
        print(f"triton: does not import: {type(e).__name__}: {e}")
    try:  # the HF test's
        import transformers

        print(f"transformers: {transformers.__version__}")
    except Exception as e:  # noqa: BLE001 - recorded: the HF test then fails to import
        print(f"transformers: does not import: {type(e).__name__}: {e}")
    if not torch.cuda.is_available():
        print("gpu: none (torch.cuda.is_available() is False)")
        return 3
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {torch.cuda.get_device_name(0)}")
    print(f"gpu details: {torch.cuda.device_count()} device(s); device 0: sm {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")  # fmt: skip
    print(f"cudnn: {torch.backends.cudnn.version()}")
    return 0


def _tests(out: Path) -> tuple[str, list[str]]:
    """``("N passed, N failed, ...", [failed test ids])`` from the JUnit XML, else from the ``-v`` log."""
    xml, log = out / "tests.xml", out / "tests.log"
    if xml.exists():
        try:
            root = ET.parse(xml).getroot()
            counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
            failed = []
            for case in root.iter("testcase"):
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                kinds = {child.tag for child in case}
                if "failure" in kinds:
                    counts["failed"] += 1
                    failed.append(name)
                elif "error" in kinds:
                    counts["errors"] += 1
                    failed.append(name + " (error)")
                elif "skipped" in kinds:
                    counts["skipped"] += 1
                else:
                    counts["passed"] += 1
            return ", ".join(f"{v} {k}" for k, v in counts.items()) + " (JUnit XML)", failed
        except ET.ParseError:
            pass
    if log.exists():  # a run stopped before pytest wrote its XML: count the -v lines it printed
        text = log.read_text(errors="replace")
        # "tests/x.py::t PASSED [ 5%]" (one process) or "[gw3] [ 5%] PASSED tests/x.py::t" (xdist)
        result = "(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
        outcome = re.compile(rf"(\S+::\S+)\s+{result}|{result}\s+(\S+::\S+)")
        seen: dict[str, str] = {}
        for m in outcome.finditer(text):
            test, res = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            seen[test] = res
        if seen:
            counts: dict[str, int] = {}
            for result in seen.values():
                counts[result.lower()] = counts.get(result.lower(), 0) + 1
            failed = [t for t, r in seen.items() if r in ("FAILED", "ERROR")]
            return ", ".join(f"{v} {k}" for k, v in counts.items()) + " (from the log: the run did not finish)", failed
        return "no test result in tests.log", []
    return "not run", []


def _bench_table(out: Path) -> tuple[list[str], dict, str]:
    """Markdown lines of the flash vs triton table from bench.json (one row per D, L), its environment
    and its dtype."""
    path = out / "bench.json"
    if not path.exists():
        return ["No benchmark result (bench.json missing: see bench.log)."], {}, "bf16"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"bench.json unreadable: {e}"], {}, "bf16"
    by: dict[tuple, dict[str, dict]] = {}
    for r in data.get("rows", []):
        by.setdefault((r["D"], r["L"], r["B"], r["H"]), {})[r["method"]] = r
    lines = [
        "| D | L | B×H | flash fwd+bwd ms | triton fwd+bwd ms | triton / flash: fwd | bwd | fwd+bwd "
        "| flash peak MiB | triton peak MiB | peak ratio | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for (D, L, B, H), methods in by.items():
        f, t = methods.get("flash", {}), methods.get("triton", {})
        notes = "; ".join(f"{m}: {r['note']}" for m, r in methods.items() if r.get("note"))
        lines.append(
            f"| {D} | {L} | {B}×{H} | {f.get('fwd+bwd ms', '-')} | {t.get('fwd+bwd ms', '-')} | "
            f"{t.get('fwd / flash', '-')} | {t.get('bwd / flash', '-')} | **{t.get('fwd+bwd / flash', '-')}** | "
            f"{f.get('peak MiB', '-')} | {t.get('peak MiB', '-')} | {t.get('peak / flash', '-')} | {notes} |"
        )
        ratio = t.get("fwd+bwd / flash")
        tm, fm = t.get("fwd+bwd ms"), f.get("fwd+bwd ms")
        if L == GOAL_L and isinstance(ratio, (int, float)):
            # judged on the times, not the 2-decimal ratio (1.3049 rounds to 1.3); the ratio is of the two medians
            exact = tm / fm if isinstance(tm, (int, float)) and isinstance(fm, (int, float)) and fm > 0 else ratio
            met = "met" if exact <= GOAL_RATIO else "NOT met"
            verdicts.append(f"D = {D}: {exact:.3f}× ({met})")
    goal = f"Goal: Triton paper-mode fwd+bwd ≤ {GOAL_RATIO}× flash at L = {GOAL_L}: "
    lines += ["", goal + ("; ".join(verdicts) if verdicts else "no measurement at that length.")]
    if not data.get("complete", False):
        lines.append("(The benchmark did not finish: the rows above are what it measured before it stopped.)")
    return lines, data.get("environment", {}), data.get("args", {}).get("dtype", "bf16")


def gpu_folder(name: str) -> str:
    """The results folder of a GPU, as ``common.cpu_results`` names a CPU's: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def report(args) -> int:
    out = Path(args.out)
    env_text = (out / "env.txt").read_text(errors="replace") if (out / "env.txt").exists() else ""
    gpu = re.search(r"^gpu: (.+)$", env_text, re.M)
    table, bench_env, dtype = _bench_table(out)
    name = bench_env.get("gpu") or (gpu.group(1) if gpu else "unknown GPU")
    versions = ", ".join(f"{k} {bench_env[k]}" for k in ("torch", "cuda", "triton") if bench_env.get(k))
    versions = versions or "; ".join(m.group(0) for m in re.finditer(r"^(torch|triton): .+$", env_text, re.M))
    tests, failed = _tests(out)
    stages = dict(s.split("=", 1) for s in args.stage)
    if stages.get("tests", "").startswith("TIMED OUT"):
        tests += "; stopped at its time limit: the tests it had not reached are not counted"
    lines = [
        f"### Paper-mode Triton kernel vs SDPA flash on {name}",
        "",
        f"`bash benchmarks/gpu_check.sh`: {dtype}, B·L = 16384 tokens, H·D = 2048; fwd+bwd medians of CUDA-event "
        f"timings; peak = extra memory of one fwd+bwd (`torch.cuda.max_memory_allocated`, inputs excluded). "
        f"{versions}.",
        "",
        *table,
        "",
        "GPU tests (tests/test_triton_gpu.py, tests/test_triton.py compiled; the HF and resume tests on CUDA): "
        f"{tests}.",
    ]
    if failed:
        shown = ", ".join(f"`{t}`" for t in failed[:15])
        lines.append(f"Failed: {shown}" + (f" and {len(failed) - 15} more" if len(failed) > 15 else "") + ".")
    stage_text = ", ".join(f"{k} {v}" for k, v in stages.items())
    lines.append(f"Stages: {stage_text}" + (f"; {args.seconds:.0f} s in all." if args.seconds is not None else "."))
    md = "\n".join(lines) + "\n"
    for path in (out / "gpu_check.md", Path(args.md.replace("{gpu}", gpu_folder(name)))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(md)
    print(md)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    rep = sub.add_parser("report")
    rep.add_argument("out")
    rep.add_argument("--md", required=True, help="a second copy of the report; {gpu}: the GPU's folder name")
    rep.add_argument("--stage", action="append", default=[], help="NAME=STATUS, in order")
    rep.add_argument("--seconds", type=float, default=None)
    args = ap.parse_args()
    return env() if args.cmd == "env" else report(args)


if __name__ == "__main__":
    sys.exit(main())
