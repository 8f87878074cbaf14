"""Variable assignment (``a=3;c=1;a=7;b=2;a?7``): where is it learnable on a laptop CPU, and does selective
attention learn it where standard attention of the same size does not?

    python experiments/varassign.py run --config NAME [--seeds 0 1 2] [--commit]   # skips finished runs
    python experiments/varassign.py report       # results/varassign.md (tables) and results/varassign.png

Every named configuration in CONFIGS is trained with standard and with selective attention (``selection=True``,
nothing else changed), paired by seed: the same seed gives the same initialisation and data order. Each run writes
``results/varassign/{config}-{attention}-s{seed}.json`` (so an interrupted set resumes where it stopped; ``--commit``
commits each file as it finishes). After training, the run's checkpoint answers TEST_EXAMPLES held-out examples of
the final setting (the same examples for every run; another stream than training and the in-training evaluation):
the answer accuracy, also by how often the queried variable was assigned (1 = nothing to forget) and by the number
of assignments per example. The exploration configurations are kept as they were tried: the report's first table
lists every one; FINAL is the one compared over seeds.

Runs are sized for 2 shared CPU cores: one process at a time, ``torch.set_num_threads(1)`` (run it with ``nice``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from common import cpu_model  # noqa: E402

from selective_attention import machine  # noqa: E402
from selective_attention.data import VariableAssignment, curriculum_assign  # noqa: E402
from selective_attention.stats import mean_std, paired_t  # noqa: E402
from selective_attention.train import TrainConfig, config_changes, model_from_checkpoint, stale_results_error  # noqa: E402
from selective_attention.train import main as train  # noqa: E402

RESULTS = ROOT / "results" / "varassign"
RUNS_DIR = ROOT / "runs" / "varassign"
TEST_EXAMPLES = 4096  # held-out examples each run's final model answers (the same for every run)
TEST_SEED = 999_999  # their generator's seed: not a training (seed) or in-training evaluation (12345) stream
ATTENTIONS = {"standard": False, "selective": True}

# flat options, as on the command line (TrainConfig.from_options); "note" is for the report only
BASE = dict(data="varassign", va_vars=4, va_assign=8, context_len=35, n_layer=2, n_head=4, d_model=64,
            batch_size=32, max_steps=3000, lr=3e-3, min_lr=3e-4, warmup_steps=100, eval_interval=250,
            eval_batches=16, ckpt_interval=500)  # fmt: skip
CONFIGS: dict[str, dict] = {
    "c1": {**BASE, "va_assign_start": 2, "va_ramp_steps": 1500, "note": ""},  # fmt: skip
    "c2": {**BASE, "batch_size": 128, "va_assign_start": 2, "va_ramp_steps": 2000, "note": "4x batch"},
    "p2": {**BASE, "va_assign": 2, "batch_size": 64, "max_steps": 2000, "note": "probe: 2 assignments only"},
    "p2-d128": {
        **BASE,
        "va_assign": 2,
        "batch_size": 64,
        "max_steps": 2000,
        "d_model": 128,
        "note": "probe: 2 assignments only",
    },
    "p2-v8": {
        **BASE,
        "va_vars": 8,
        "va_assign": 2,
        "batch_size": 64,
        "max_steps": 2000,
        "note": "probe: 2 assignments only",
    },
    "p2-lr": {
        **BASE,
        "va_assign": 2,
        "batch_size": 64,
        "max_steps": 2000,
        "lr": 1e-2,
        "min_lr": 1e-3,
        "warmup_steps": 200,
        "note": "probe: 2 assignments only",
    },
    "p2-L4": {
        **BASE,
        "va_assign": 2,
        "batch_size": 64,
        "max_steps": 2000,
        "n_layer": 4,
        "note": "probe: 2 assignments only",
    },
    "p2-wd0": {
        **BASE,
        "va_assign": 2,
        "batch_size": 64,
        "max_steps": 3000,
        "weight_decay": 0.0,
        "note": "probe: 2 assignments only; no weight decay",
    },
    "c4": {
        **BASE,
        "batch_size": 64,
        "weight_decay": 0.0,
        "max_steps": 8000,
        "va_assign_start": 2,
        "va_ramp_steps": 6000,
        "note": "no weight decay",
    },
    "c5": {
        **BASE,
        "batch_size": 64,
        "weight_decay": 0.0,
        "max_steps": 7000,
        "va_assign_start": 2,
        "va_hold_steps": 3000,
        "va_ramp_steps": 3000,
        "note": "no weight decay; 3000 steps at 2 first",
    },
    "c3": {
        **BASE,
        "n_layer": 3,
        "max_steps": 5000,
        "va_assign_start": 2,
        "va_ramp_steps": 3000,
        "note": "3 layers, longer",
    },  # fmt: skip
}
FINAL = "c5"
# runs stopped by hand before their end (no result file): listed in the exploration table all the same
STOPPED = {
    "c2-selective-s0": "stopped at step 2000 of 3000: in-training accuracy 0.38 at 8 assignments, flat since step 250",
}


def run_name(config: str, attention: str, seed: int) -> str:
    return f"{config}-{attention}-s{seed}"


def options(config: str, attention: str, seed: int) -> dict:
    opts = {k: v for k, v in CONFIGS[config].items() if k != "note"}
    return {**opts, "selection": ATTENTIONS[attention], "seed": seed, "progress": False,
            "out_dir": str(RUNS_DIR / run_name(config, attention, seed))}  # fmt: skip


@torch.no_grad()
def test(model, cfg: TrainConfig) -> dict:
    """Answer accuracy of ``model`` on TEST_EXAMPLES held-out examples of the final setting, overall, by how many
    times the queried variable was assigned (``1``, ``2``, ``3``, ``4+``), and at fewer assignments per example."""
    task = VariableAssignment(n_vars=cfg.va_vars, n_assign=cfg.va_assign)

    def answers(n_assign: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(TEST_SEED + n_assign)
        right, counts = [], []
        for i in range(0, n, 512):
            x, y, answer = task.batch(min(512, n - i), gen, n_assign)
            pred = model(x).argmax(-1)[answer]  # [B]
            right.append(pred == y[answer])
            names = x[:, 0 : 4 * n_assign : 4]  # [B, n_assign]: the assigned variables
            counts.append((names == x[:, -3:-2]).sum(1))  # x ends with the query, '?' and the answer
        return torch.cat(right), torch.cat(counts)

    right, counts = answers(cfg.va_assign, TEST_EXAMPLES)
    by_count = {}
    for c in (1, 2, 3, 4):
        sel = counts == c if c < 4 else counts >= 4
        if sel.any():
            by_count["4+" if c == 4 else str(c)] = {"n": int(sel.sum()), "accuracy": right[sel].float().mean().item()}
    by_assign = {}
    for n_assign in sorted({1, 2, 4, cfg.va_assign // 2, cfg.va_assign} - {0}):
        r, _ = answers(n_assign, 1024)
        by_assign[str(n_assign)] = r.float().mean().item()
    return {"accuracy": right.float().mean().item(), "n": len(right), "by_count": by_count, "by_assign": by_assign}


def latest_value_baseline(n_vars: int, n_assign: int, n: int = TEST_EXAMPLES) -> float:
    """Accuracy of answering the value of the last assignment, whatever its variable, on the test examples: what a
    model that copies the latest value without matching the name gets."""
    task = VariableAssignment(n_vars=n_vars, n_assign=n_assign)
    gen = torch.Generator().manual_seed(TEST_SEED + n_assign)
    right = 0
    for i in range(0, n, 512):
        x, y, answer = task.batch(min(512, n - i), gen, n_assign)
        right += int((x[:, 4 * n_assign - 2] == y[answer]).sum())  # the last assignment's value
    return right / n


def commit(path: Path, message: str) -> None:
    rel = str(path.relative_to(ROOT))
    for attempt in range(5):  # another agent may hold the index lock for a moment
        add = subprocess.run(["git", "add", rel], cwd=ROOT, capture_output=True, text=True)
        done = (
            add.returncode == 0
            and subprocess.run(
                ["git", "commit", "-q", "-m", message, "--", rel], cwd=ROOT, capture_output=True, text=True
            ).returncode
            == 0
        )
        if done:
            return
        time.sleep(2 + 3 * attempt)
    print(f"warning: could not commit {rel}; commit it by hand", file=sys.stderr)


def stale(result: dict) -> str | None:
    """What differs between a result file's training config and the one this script runs for its name (None:
    nothing; a config no longer in CONFIGS says so): a file made before an edit of CONFIGS is not its result."""
    if result["config"] not in CONFIGS:
        return f"config {result['config']!r} is no longer in CONFIGS"
    cfg = TrainConfig.from_options(options(result["config"], result["attention"], result["seed"]))
    changes = config_changes(cfg, result["train_config"], ignore=("out_dir", "progress", "compile"))
    return ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in changes.items()) or None


def run_one(config: str, attention: str, seed: int, do_commit: bool = False) -> dict:
    out = RESULTS / f"{run_name(config, attention, seed)}.json"
    if out.exists():
        done = json.loads(out.read_text())
        if why := stale(done):
            raise SystemExit(
                f"{out} was made with another config ({why}): it is not this run's result. Move it away to run it "
                "again with this script's config, or restore the config it was made with."
            )
        return done
    torch.set_num_threads(1)
    cfg = TrainConfig.from_options(options(config, attention, seed))
    t0 = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - t0
    model, _ = model_from_checkpoint(cfg.out_dir)
    result = {"config": config, "attention": attention, "seed": seed, "note": CONFIGS[config].get("note", ""),
              "options": options(config, attention, seed), "train_config": dataclasses.asdict(cfg),
              "train_seconds": seconds, "cpu": cpu_model(), "torch": torch.__version__, "commit": machine.commit(),
              **{k: summary[k] for k in ("val_loss", "val_accuracy", "params", "history")},
              "test": test(model, cfg)}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    t = result["test"]
    by_count = {k: round(v["accuracy"], 3) for k, v in t["by_count"].items()}
    print(f"{out.stem}: test accuracy {t['accuracy']:.4f} (by count {by_count}), val loss {result['val_loss']:.4f}, "
          f"{seconds:.0f} s", flush=True)  # fmt: skip
    if do_commit:
        commit(out, f"results/varassign: {out.stem} (test accuracy {t['accuracy']:.4f})")
    return result


# --- report ------------------------------------------------------------------------------------------
def load() -> dict[str, dict[str, dict[int, dict]]]:
    """``{config: {attention: {seed: result}}}`` of every result file."""
    rows: dict = {}
    old = {}
    for f in sorted(RESULTS.glob("*.json")):
        r = json.loads(f.read_text())
        if why := stale(r):  # a report would pair it with the others as one experiment
            old[f.stem] = why
        rows.setdefault(r["config"], {}).setdefault(r["attention"], {})[r["seed"]] = r
    if old:
        raise SystemExit(stale_results_error(old, RESULTS))
    return rows


def describe(opts: dict) -> str:
    """The options that set the experiment, briefly."""
    hold = f" after {opts['va_hold_steps']}" if opts.get("va_hold_steps") else ""
    cur = f", {opts['va_assign_start']}→{opts['va_assign']} over {opts['va_ramp_steps']}{hold}" if opts.get(
        "va_assign_start") else ""  # fmt: skip
    return (f"{opts['va_vars']} vars, {opts['va_assign']} assign{cur}; {opts['n_layer']}L d{opts['d_model']} "
            f"h{opts['n_head']}; batch {opts['batch_size']}, lr {opts['lr']:g}, "
            f"wd {opts.get('weight_decay', 0.1):g}")  # fmt: skip


def paired_by_seed(seeds: list[int], a: dict[int, dict], b: dict[int, dict], value) -> str:
    """``value(a[s]) - value(b[s])`` paired by seed: the t-test over the seeds where both are finite, then each
    seed's difference (a diverged run's seed named and left out, not averaged in)."""
    d = {s: (value(a[s]), value(b[s])) for s in seeds}
    ok = [s for s in seeds if all(math.isfinite(x) for x in d[s])]
    per = ", ".join(f"{d[s][0] - d[s][1]:+.4f}" if s in ok else f"seed {s} not finite (left out)" for s in seeds)
    test = str(paired_t([d[s][0] for s in ok], [d[s][1] for s in ok])) if ok else "no finite pair"
    return f"{test} (per seed: {per})"


def _curriculum_stages(opts: dict) -> tuple[int, int] | None:
    """Where a config's curriculum (``va_assign_start`` > 0) first gives more assignments than at its start, and where
    it first gives the final count (data.curriculum_assign: the start's count lasts the hold and one stage of the
    ramp, so these are not the hold's and the ramp's ends); None without a curriculum."""
    start, final = opts.get("va_assign_start", 0), opts["va_assign"]
    if not start:
        return None
    hold, ramp = opts.get("va_hold_steps", 0), opts["va_ramp_steps"]
    at = [curriculum_assign(s, final, start, ramp, hold) for s in range(hold + ramp + 1)]
    return next(s for s, n in enumerate(at) if n > start), at.index(final)


def report() -> str:
    rows = load()
    acc = lambda r: r["test"]["accuracy"]  # noqa: E731
    lines = ["Exploration: every configuration tried, in order (answer accuracy on 4,096 held-out examples of the "
             "config's final number of assignments, per seed; seconds of training per run, on 2 CPU cores shared "
             "with other jobs, 1 thread, `nice -n 19`). Answering the latest value whatever its variable scores "
             f"{latest_value_baseline(4, 8):.3f} at 4 vars / 8 assignments and {latest_value_baseline(4, 2):.3f} at "
             "4 vars / 2 assignments on these examples; a uniform guess 0.1.", "",
             "| config | setting | steps | seeds | s/run | standard | selective |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    order = [c for c in CONFIGS if c in rows] + sorted(set(rows) - set(CONFIGS))
    for c in order:
        by = rows[c]
        any_r = next(iter(next(iter(by.values())).values()))
        opts = any_r["options"]
        seeds = sorted(set().union(*[set(v) for v in by.values()]))
        secs = [r["train_seconds"] for v in by.values() for r in v.values()]
        cells = []
        for a in ATTENTIONS:
            rs = [by.get(a, {}).get(s) for s in seeds]
            cells.append(", ".join(f"{acc(r):.3f}" if r else "-" for r in rs))
        note = CONFIGS[c].get("note", "") if c in CONFIGS else any_r["note"]
        note = f"; {note}" if note else ""
        lines.append(f"| {c}{' (final)' if c == FINAL else ''} | {describe(opts)}{note} | {opts['max_steps']} | "
                     f"{seeds} | {statistics.fmean(secs):.0f} | {cells[0]} | {cells[1]} |")  # fmt: skip
    for name, why in STOPPED.items():
        config, attention, seed = name.rsplit("-", 2)
        if attention == "selective" and rows.get(config, {}).get(attention, {}).get(int(seed[1:])) is None:
            lines.append(f"| {config} | {describe(CONFIGS[config])}; {CONFIGS[config]['note']} | "
                         f"{CONFIGS[config]['max_steps']} | [{seed[1:]}] | - | not run | {why} |")  # fmt: skip
    final = rows.get(FINAL, {})
    std, sel = final.get("standard", {}), final.get("selective", {})
    seeds = sorted(std.keys() & sel.keys())
    if seeds:
        lines += ["", f"Final comparison, config {FINAL} ({describe(std[seeds[0]]['options'])}, "
                  f"{std[seeds[0]]['options']['max_steps']} steps), paired by seed (same initialisation and data "
                  "order); accuracy on 4,096 held-out examples with 8 assignments, and by how often the queried "
                  "variable was assigned (1 = no earlier value to forget):", "",
                  "| seed | attention | answer accuracy | assigned 1× | 2× | 3× | 4+× | answer loss (val) | s |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for s in seeds:
            for a, r in (("standard", std[s]), ("selective", sel[s])):
                bc = r["test"]["by_count"]
                per = " | ".join(f"{bc[k]['accuracy']:.3f}" if k in bc else "-" for k in ("1", "2", "3", "4+"))
                lines.append(f"| {s} | {a} | {acc(r):.4f} | {per} | {r['val_loss']:.4f} | {r['train_seconds']:.0f} |")
        lines += ["", "| | standard | selective | selective − standard, paired by seed |", "|---|---|---|---|"]
        for name, value in (("answer accuracy", acc), ("answer loss (nats)", lambda r: r["val_loss"])):
            lines.append(
                f"| {name} | {mean_std([value(std[s]) for s in seeds])} | "
                f"{mean_std([value(sel[s]) for s in seeds])} | {paired_by_seed(seeds, sel, std, value)} |"
            )
        ba = sorted(std[seeds[0]]["test"]["by_assign"], key=int)
        lines += ["", "Mean accuracy (over the seeds) by assignments per example (1,024 held-out examples each):", "",
                  "| attention | " + " | ".join(ba) + " |", "|---|" + "---|" * len(ba)]  # fmt: skip
        for a, by in (("standard", std), ("selective", sel)):
            cells = [statistics.fmean(by[s]["test"]["by_assign"][k] for s in seeds) for k in ba]
            lines.append(f"| {a} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        cpus = sorted({r.get("cpu", "?") for r in [*std.values(), *sel.values()]})
        lines += ["", f"Trained on {', '.join(cpus)} (torch {std[seeds[0]].get('torch', '?')})."]
    md = "\n".join(lines) + "\n"
    (RESULTS.parent / "varassign.md").write_text(md)
    try:
        plot(rows)
    except ImportError:
        pass
    return md


def plot(rows) -> None:
    """Two panels per run of FINAL: the answer accuracy at the final count (in-training evaluation, 512 examples)
    and the training batch's answer loss (at the curriculum's count of that step), both against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = rows.get(FINAL, {})
    opts = CONFIGS[FINAL]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True)
    for i, a in enumerate(ATTENTIONS):
        for j, (seed, r) in enumerate(sorted(final.get(a, {}).items())):
            h = [e for e in r["history"] if "val_accuracy" in e]
            style = dict(color=f"C{i}", alpha=0.8, ls=("-", "--", ":", "-.")[j % 4], label=f"{a}, seed {seed}")
            ax.plot([e["step"] for e in h], [e["val_accuracy"] for e in h], **style)
            ax2.plot([e["step"] for e in h], [e["loss"] for e in h], **style)
    stages = _curriculum_stages(opts)  # the first step with more assignments than at the start, and with the final
    for a_ in (ax, ax2):
        for step in stages or ():
            a_.axvline(step, color="grey", lw=0.8, ls=":")
        a_.grid(alpha=0.3)
    if stages:
        ax2.text(0, 0.02, f" {opts['va_assign_start']} assignments", fontsize=7, color="grey")
        ax2.text(stages[0], 0.02, f" growing to {opts['va_assign']}", fontsize=7, color="grey")
        ax2.text(stages[1], 0.02, f" {opts['va_assign']}", fontsize=7, color="grey")
    ax.set(ylabel=f"answer accuracy at {opts['va_assign']} assignments", ylim=(0, 1.02),
           title="\n".join(textwrap.wrap(f"Variable assignment, config {FINAL}: {describe(opts)}", 90)))  # fmt: skip
    ax.title.set_fontsize(8)
    ax2.set(xlabel="step", ylabel="training answer loss (nats, one batch,\nat the step's number of assignments)",
            ylim=(0, 2.5))  # fmt: skip
    ax2.yaxis.label.set_fontsize(8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS.parent / "varassign.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "report"])
    ap.add_argument("--config", nargs="+", default=[FINAL], choices=list(CONFIGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--attention", nargs="+", default=list(ATTENTIONS), choices=list(ATTENTIONS))
    ap.add_argument("--commit", action="store_true", help="git commit each result file as it is written")
    args = ap.parse_args()
    if args.command == "run":
        for config in args.config:
            for seed in args.seeds:
                for attention in args.attention:
                    run_one(config, attention, seed, args.commit)
    print(report())


if __name__ == "__main__":
    main()
