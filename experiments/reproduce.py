"""The paper's claims at laptop scale: many short runs, one result file each, and a report rebuilt
from whatever result files exist (so an interrupted session loses at most the run in progress).

    python experiments/reproduce.py run [--seeds 0 1 2] [--only lm-selective ...]   # skips finished runs
    python experiments/reproduce.py heldout    # check searched budgets on held-out windows
    python experiments/reproduce.py report                                         # README table + plots

Runs (same data, steps and optimizer for all; byte-level KJV, context 512, 4 layers, d_model 128):
  lm-standard            standard attention, 4 heads of 32
  lm-selective           selective attention (the paper's F from head 0), same size
  lm-standard-2xheads    standard attention with 8 heads of 32 (2x attention width/parameters)
  lm-selective-memloss   selective + the paper's memory loss (tau 1, eps 0.1)
  va-standard / va-selective   the variable-assignment task (latest value of a reassigned variable;
                         2 layers, 4 variables, 8 assignments, loss on the answer only)
For each selective LM run a budget search on one set of validation windows finds the smallest
per-layer KV budgets (a budget b = at most b tokens stored and attended per step, the newest
included) whose loss is at most the same-seed standard model's full-cache loss on those windows: the
paper's "less memory at equal validation perplexity", with no tolerance unless --tolerance is given
(then printed beside every ratio). A second set of windows, never seen by the search, checks it: a
ratio counts as reproduced only where the pruned selective model is at or under the standard model
there too. Statistics are paired by seed (same initialisation and data order): the mean difference,
its paired t and two-sided p-value, and every seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selective_attention.budget_search import pruned_loss, search_budgets  # noqa: E402
from selective_attention.data import TextData  # noqa: E402
from selective_attention.stats import paired_t  # noqa: E402
from selective_attention.train import TrainConfig, mean_loss, model_from_checkpoint  # noqa: E402
from selective_attention.train import main as train  # noqa: E402

RESULTS = ROOT / "results" / "repro"
RUNS_DIR = ROOT / "runs" / "repro"

# flat: the model's options beside the training ones, as on the command line (TrainConfig.from_options)
LM = dict(data="kjv", context_len=512, n_layer=4, n_head=4, d_model=128, batch_size=4, max_steps=600,
          lr=3e-3, min_lr=3e-4, warmup_steps=60, eval_interval=100, eval_batches=16, ckpt_interval=100)  # fmt: skip
# 4 variables, 8 assignments ("b=3;a=1;b=7;...;b?7"); the loss is on the answer only
VA = dict(data="varassign", va_vars=4, va_assign=8, context_len=64, n_layer=2, n_head=4, d_model=128,
          batch_size=32, max_steps=1000, lr=3e-3, min_lr=3e-4, warmup_steps=60, eval_interval=250,
          eval_batches=16, ckpt_interval=250)  # fmt: skip
RUNS = {
    "lm-standard": {**LM},
    "lm-selective": {**LM, "selection": True},
    "lm-standard-2xheads": {**LM, "n_head": 8, "d_head": 32},
    "lm-selective-memloss": {**LM, "selection": True, "memory_eps": 0.1},
    "va-standard": {**VA},
    "va-selective": {**VA, "selection": True},
}
SEARCH_WINDOWS = 16  # per window set: the search sees set 0, set 1 is held out


def val_windows(cfg: TrainConfig, which: int = 0):
    """Validation windows of the run's corpus: set 0 drives the budget search, set 1 is held out to check it."""
    data = TextData.from_name(cfg.data, val_fraction=cfg.val_fraction)
    batches = data.eval_batches("val", SEARCH_WINDOWS, cfg.model.context_len, 2)
    for _ in range(which):
        next(batches)
    return next(batches)


def heldout(name: str, seed: int) -> None:
    """Check a selective run's searched budgets on held-out windows (the search saw only set 0)."""
    f = RESULTS / f"{name}-s{seed}.json"
    std = RESULTS / f"lm-standard-s{seed}.json"
    r = json.loads(f.read_text())
    if "heldout" in r or not std.exists() or "budgets_vs_standard" not in r:
        return
    cfg = TrainConfig.from_dict(r["config"])  # also the flat config of results written before it was nested
    x, y = val_windows(cfg, which=1)
    model, _ = model_from_checkpoint(cfg.out_dir)
    std_model, _ = model_from_checkpoint(TrainConfig.from_dict(json.loads(std.read_text())["config"]).out_dir)
    out = {"standard_full": mean_loss(std_model, x, y), "selective_full": mean_loss(model, x, y)}
    budgets = r["budgets_vs_standard"].get("budgets")
    if budgets:
        out["pruned"] = pruned_loss(model, x, y, budget=budgets)[0]
        out["holds"] = out["pruned"] <= out["standard_full"] + r["budgets_vs_standard"]["tolerance"]
    r["heldout"] = out
    f.write_text(json.dumps(r, indent=1))
    print(f"{name} seed {seed} held out: {out}", flush=True)


def run_one(name: str, seed: int, tolerance: float = 0.0) -> dict:
    out = RESULTS / f"{name}-s{seed}.json"
    if out.exists():
        return json.loads(out.read_text())
    cfg = TrainConfig.from_options({**RUNS[name], "seed": seed, "out_dir": str(RUNS_DIR / f"{name}-s{seed}"),
                                    "progress": False})  # fmt: skip
    t0 = time.perf_counter()
    summary = train(cfg)
    result = {"name": name, "seed": seed, "config": dataclasses.asdict(cfg), "train_seconds": time.perf_counter() - t0,
              **{k: summary[k] for k in ("val_loss", "val_accuracy", "tokens_per_s", "params", "history")}}  # fmt: skip
    if name.startswith("lm-"):
        model, _ = model_from_checkpoint(cfg.out_dir)
        x, y = val_windows(cfg)
        result["search_loss"] = mean_loss(model, x, y)
        if cfg.model.selection:
            std_file = RESULTS / f"lm-standard-s{seed}.json"
            if std_file.exists():
                target = json.loads(std_file.read_text())["search_loss"]
                if result["search_loss"] <= target + tolerance:
                    eq = search_budgets(model, x, y, target=target, tolerance=tolerance)
                    result["budgets_vs_standard"] = {
                        "budgets": eq.budgets,
                        "loss": eq.loss,
                        "target": target,
                        "tolerance": tolerance,
                        "memory_ratio": eq.memory_ratio,
                    }
                else:
                    result["budgets_vs_standard"] = {
                        "target": target,
                        "tolerance": tolerance,
                        "memory_ratio": None,
                        "note": "selective full-cache loss is above the standard's: no budget reaches it",
                    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"{name} seed {seed}: val {result['val_loss']:.4f} ({result['train_seconds']:.0f}s)", flush=True)
    return result


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, 0
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def fmt(m, s, n, digits=4):
    return "-" if m is None else f"{m:.{digits}f} ± {s:.{digits}f} (n={n})"


def report() -> str:
    rows = {}
    for f in sorted(RESULTS.glob("*.json")):
        r = json.loads(f.read_text())
        rows.setdefault(r["name"], []).append(r)
    lines = [
        "| run | val loss (nats/byte) | answer accuracy |",
        "|---|---|---|",
    ]
    for name in RUNS:
        rs = rows.get(name, [])
        if rs:
            loss = mean_std([r["val_loss"] for r in rs])
            acc = mean_std([r.get("val_accuracy") for r in rs])
            lines.append(f"| {name} | {fmt(*loss)} | {fmt(*acc, digits=3)} |")
    lines += ["", "Paired by seed (same initialisation and data order), difference to the same-size baseline:", "",
              "| run − baseline | seeds | validation loss difference (nats/byte) |", "|---|---|---|"]  # fmt: skip
    for name, base in (("lm-selective", "lm-standard"), ("lm-selective-memloss", "lm-standard"),
                       ("lm-standard-2xheads", "lm-standard"), ("va-selective", "va-standard")):  # fmt: skip
        a = {r["seed"]: r["val_loss"] for r in rows.get(name, [])}
        b = {r["seed"]: r["val_loss"] for r in rows.get(base, [])}
        seeds = sorted(a.keys() & b.keys())
        if len(seeds) >= 2:
            pt = paired_t([a[s] for s in seeds], [b[s] for s in seeds])
            per = ", ".join(f"{a[s] - b[s]:+.4f}" for s in seeds)
            lines.append(f"| {name} − {base} | {seeds} | {pt} (per seed: {per}) |")
    lines += ["", "KV memory at the same-seed standard model's loss (budgets searched on one set of validation "
              "windows; every stored slot counted, the newest token included), checked on held-out windows:", "",
              "| run | seed | budgets (slots per layer) | KV reduction | tolerance | held out: standard / selective "
              "full / pruned | holds |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in ("lm-selective", "lm-selective-memloss"):
        for r in sorted(rows.get(name, []), key=lambda r: r["seed"]):
            eq, h = r.get("budgets_vs_standard", {}), r.get("heldout", {})
            if not eq:
                continue
            ratio = f"{eq['memory_ratio']:.1f}x" if eq.get("memory_ratio") else "- (" + eq.get("note", "") + ")"
            held = (f"{h['standard_full']:.4f} / {h['selective_full']:.4f} / {h['pruned']:.4f}" if "pruned" in h
                    else "-")  # fmt: skip
            lines.append(f"| {name} | {r['seed']} | {eq.get('budgets', '-')} | {ratio} | {eq['tolerance']:g} | "
                         f"{held} | {'yes' if h.get('holds') else 'no'} |")  # fmt: skip
    md = "\n".join(lines) + "\n"
    (RESULTS.parent / "repro.md").write_text(md)
    try:
        plot(rows)
        ckpt = RUNS_DIR / "lm-selective-s0"
        if (ckpt / "ckpt.safetensors").exists():
            from selective_attention.demo import SENTENCE, plot_penalty

            model, _ = model_from_checkpoint(ckpt)
            plot_penalty(model, SENTENCE, RESULTS.parent / "penalty_F.png")
    except ImportError:
        pass
    return md


def plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(n for n in RUNS if n.startswith("lm-")):
        for j, r in enumerate(rows.get(name, [])):
            h = r["history"]
            ax.plot([e["step"] for e in h], [e["val_loss"] for e in h], color=f"C{i}", alpha=0.7,
                    label=name if j == 0 else None)  # fmt: skip
    n_seeds = max((len(rows.get(n, [])) for n in RUNS), default=0)
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)", title=f"KJV, context 512, {n_seeds} seeds each")
    ax.set_ylim(top=2.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS.parent / "repro_loss.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "heldout", "report"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", default=list(RUNS))
    ap.add_argument("--tolerance", type=float, default=0.0, help="nats above the standard's loss still 'equal'")
    args = ap.parse_args()
    if args.command == "run":
        for seed in args.seeds:
            for name in args.only:  # standard before selective: the vs-standard search needs it
                run_one(name, seed, args.tolerance)
    if args.command in ("run", "heldout"):
        for f in sorted(RESULTS.glob("lm-selective*.json")):
            r = json.loads(f.read_text())
            heldout(r["name"], r["seed"])
    print(report())


if __name__ == "__main__":
    main()
