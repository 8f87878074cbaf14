"""The paper's claims at laptop scale: many short runs, one result file each, a report rebuilt from
whatever result files exist (an interrupted set loses at most the run in progress).

    python experiments/reproduce.py plan                      # the runs, in order, and which are done
    python experiments/reproduce.py run [--contexts 512] [--seeds 0 1] [--only standard selective]
    python experiments/reproduce.py report                    # tables + plots from the result files

**Runs.** KJV with a 4,096-token BPE trained on the training split (a real ``<bos>`` starts every
window: the token the paper never masks), 4 layers, d_model 128, heads of 32, 1,000 AdamW steps of
2,048 tokens (batch = 2048 / context), the same data order and initialisation for every variant of a
seed. Variants: ``standard`` (4 heads), ``selective`` (the paper's F from head 0), ``selective-memloss``
(+ the memory loss, eps 0.1, tau 1), and at context 512 ``standard-h2`` / ``standard-h8`` (2 and 8
heads of 32: the "selective ~ standard with 2x heads" question). Contexts 512 (seeds 0-4), 1024 and
2048 (seeds 0-2).

**Why these sizes.** The plan was sized for about a working day of 2-core CPU time, from a standard run
of ~2.5 min and a selective one of ~5.5 min at context 512 on an Intel Xeon. Measured since at 512: on a
quiet CPU ~4 min of training and ~1 min of evaluation for a standard run, ~6 + 3 min for a selective one
(the curves decode every budget token by token); with the CPU shared, 6-9 + 4-5 min. 1024 and 2048 cost
more per token (attention grows with the context): about a working day on a quiet 2-core CPU, nearer two
when it is shared. 1,000 steps of 2,048 tokens (2 M tokens: about 2 passes over the
~1.05 M-token BPE training split) is where the byte-level reproduction's losses had mostly settled; the
BPE models' validation loss is still falling there, so these are short runs: a model this small shows
the method's memory behaviour, not its quality at scale.

**KV memory** (every stored slot counted; a budget b = at most b tokens stored and attended per layer at
any step, the newest included). Two window sets from the validation split: set 0 ("search") chooses
budgets, set 1 ("held out") checks them. For each method -- (a) standard + sliding window with the first
token (StreamingLLM-style), (b) standard + heavy hitters (H2O-style), (c) selective + the paper's rule,
(d) selective + sliding window -- the smallest uniform budget (of 2^k below the context) from which on every
larger budget's loss on set 0 is at most the same-seed full-cache *standard* model's loss there (a lucky dip
under a budget that misses does not count), then checked on set 1 by the same rule; for (c) also
the per-layer budget search. A reduction counts only if it holds on set 1. The loss-vs-budget curves
on set 1 are the plot a reader wants.

**Statistics** are paired by seed: the mean difference, its std, the paired t and two-sided p, every
seed listed (selective_attention.stats.paired_t).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selective_attention.budget_search import KV_METHODS as METHODS  # noqa: E402
from selective_attention.budget_search import (  # noqa: E402
    pruned_loss,
    search_budgets,
    smallest_budget_at,
    uniform_budgets,
)
from selective_attention.machine import provenance  # noqa: E402
from selective_attention.stats import mean_std, paired_t, rounded_down  # noqa: E402
from selective_attention.train import (  # noqa: E402
    Task,
    TrainConfig,
    config_changes,
    mean_loss,
    model_from_checkpoint,
    stale_results_error,
)
from selective_attention.train import main as train  # noqa: E402

RESULTS = ROOT / "results" / "reproduction"
RUNS_DIR = ROOT / "runs" / "reproduction"
TOKENS_PER_STEP = 2048
# flat: the model's options beside the training ones, as on the command line (TrainConfig.from_options)
BASE = dict(data="kjv", tokenizer="bpe", bpe_vocab_size=4096, n_layer=4, n_head=4, d_head=32, d_model=128,
            max_steps=1000, lr=3e-3, min_lr=3e-4, warmup_steps=100, eval_interval=200, eval_batches=8,
            ckpt_interval=200)  # fmt: skip
VARIANTS = {
    "standard": {},
    "selective": {"selection": True},
    "selective-memloss": {"selection": True, "memory_eps": 0.1},
    "standard-h2": {"n_head": 2},
    "standard-h8": {"n_head": 8},
}
PLAN = {  # context: (seeds, variants); runs go context by context, seed by seed, standard first
    512: (range(5), list(VARIANTS)),
    1024: (range(3), ["standard", "selective", "selective-memloss"]),
    2048: (range(3), ["standard", "selective", "selective-memloss"]),
}
WINDOWS = 16  # per window set: set 0 chooses budgets, set 1 is held out
CLOSE = 1e-3  # nats/token: a held-out verdict decided by less is marked as within noise


def run_name(context: int, variant: str, seed: int) -> str:
    return f"c{context}-{variant}-s{seed}"


def config(context: int, variant: str, seed: int) -> TrainConfig:
    opts = {**BASE, **VARIANTS[variant], "context_len": context, "batch_size": TOKENS_PER_STEP // context,
            "seed": seed, "out_dir": str(RUNS_DIR / run_name(context, variant, seed)), "progress": False}  # fmt: skip
    return TrainConfig.from_options(opts)


def window_sets(cfg: TrainConfig, tokenizer):
    """The two fixed window sets of the validation split (set 0: search, set 1: held out), disjoint: 2 x WINDOWS
    windows spread evenly over the split, set 0 its first half and set 1 its second, so a verdict that holds on
    set 1 also holds on text further on (a shift in the text, besides the new windows)."""
    batches = Task(cfg, tokenizer=tokenizer).text.eval_batches("val", WINDOWS, cfg.model.context_len, 2)
    return next(batches), next(batches)


def kv_methods(result: dict, model, sets, standard: dict | None) -> dict:
    """Loss vs uniform budget on both window sets for this model's methods; the smallest budget that
    reaches the same-seed standard model's full-cache loss on set 0, checked on set 1."""
    variant = result["variant"]
    kind = "standard" if variant == "standard" else "selective" if variant.startswith("selective") else None
    out = {}
    for method, (model_kind, policy) in METHODS.items():
        if model_kind != kind:
            continue
        curve = []
        for b in uniform_budgets(result["context"]):
            losses = [pruned_loss(model, x, y, budget=b, policy=policy)[0] for x, y in sets]
            curve.append({"budget": b, "search": losses[0], "heldout": losses[1]})
        entry = {"curve": curve}
        if standard is not None:
            entry["at_standard_loss"] = at_standard_loss(curve, result["context"], standard, result["full"])
        out[method] = entry
    return out


def at_standard_loss(curve: list[dict], context: int, standard: dict, full: dict | None = None) -> dict:
    """The budget chosen on set 0 (the smallest from which on every larger one, the model's full cache included, is
    at or under the same-seed standard model's full-cache loss there: :func:`smallest_budget_at`) and whether it
    holds on set 1 by the same rule: the chosen budget, every larger one and the full cache at or under the standard's
    loss there (a chosen budget that dips under on set 1 while a larger one misses does not hold). ``full``: the
    model's full-cache losses ``{"search": ..., "heldout": ...}``."""
    full = full or {}
    b = smallest_budget_at([(c["budget"], c["search"]) for c in curve], standard["full"]["search"], full.get("search"))
    chosen = next((c for c in curve if c["budget"] == b), None)
    held = smallest_budget_at([(c["budget"], c["heldout"]) for c in curve], standard["full"]["heldout"],
                              full.get("heldout"))  # fmt: skip
    # what decides the verdict on set 1: the worst of the chosen budget, the larger ones and the model's full cache
    # (a "yes" that hinges on a full cache just under the target is as close as a "no" just over it), except the
    # standard model's own full cache, which is the target itself: a margin of 0 there says nothing
    target = standard["full"]["heldout"]
    losses = [] if b is None else [c["heldout"] for c in curve if c["budget"] >= b]
    if losses and full.get("heldout") is not None and full is not standard.get("full"):
        losses.append(full["heldout"])
    return {
        "budget": b,
        "ratio": None if chosen is None else context / b,
        "holds": chosen is not None and held is not None and held <= b,
        "heldout_loss": None if chosen is None else chosen["heldout"],
        "heldout_margin": max(losses) - target if losses else None,
    }


NOT_THE_EXPERIMENT = ("out_dir", "progress", "compile")  # where and how a run ran, not what it trained


def stale(result: dict) -> str | None:
    """What differs between a result file's config and the one this script runs for its name (None: nothing): a
    file made before an edit of BASE or VARIANTS is not this experiment's result."""
    if "config" not in result:
        return "it records no config"
    if result["variant"] not in VARIANTS:
        return f"variant {result['variant']!r} is no longer in VARIANTS"
    changes = config_changes(config(result["context"], result["variant"], result["seed"]), result["config"],
                             ignore=NOT_THE_EXPERIMENT)  # fmt: skip
    return ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in changes.items()) or None


def run_one(context: int, variant: str, seed: int) -> dict:
    name = run_name(context, variant, seed)
    out = RESULTS / f"{name}.json"
    if out.exists():
        done = json.loads(out.read_text())
        if why := stale(done):
            raise SystemExit(
                f"{out} was made with another config ({why}): it is not this run's result. Move it away to run "
                f"{name} again with this script's config, or restore the config it was made with."
            )
        return done
    std_file = RESULTS / f"{run_name(context, 'standard', seed)}.json"
    if variant.startswith("selective") and not std_file.exists():
        # its KV verdicts are measured against that run's loss: without it they would never be filled in
        raise SystemExit(
            f"{name} is measured against {run_name(context, 'standard', seed)}, which has no result yet: run it "
            f"first (python experiments/reproduce.py run --contexts {context} --seeds {seed} --only standard)."
        )
    cfg = config(context, variant, seed)
    t0 = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - t0
    result = {"name": name, "context": context, "variant": variant, "seed": seed, "config": dataclasses.asdict(cfg),
              "train_seconds": seconds, "machine": provenance()}  # fmt: skip
    # start_step > 0: resumed there, so train_seconds and tokens_per_s cover only the steps after it
    result.update({k: summary[k] for k in ("val_loss", "tokens_per_s", "params", "history", "start_step")})
    model, meta = model_from_checkpoint(cfg.out_dir)
    sets = window_sets(cfg, meta["tokenizer"])
    result["full"] = {"search": mean_loss(model, *sets[0]), "heldout": mean_loss(model, *sets[1])}
    standard = result if variant == "standard" else json.loads(std_file.read_text()) if std_file.exists() else None
    if standard is not result and standard is not None and (why := stale(standard)):  # verdicts are measured by it
        raise SystemExit(f"{std_file} was made with another config ({why}): run it again first (move it away).")
    t1 = time.perf_counter()
    result["kv"] = kv_methods(result, model, sets, standard)
    if cfg.model.selection and standard is not None:
        target = standard["full"]["search"]
        if result["full"]["search"] <= target:
            eq = search_budgets(model, *sets[0], target=target)
            held = pruned_loss(model, *sets[1], budget=eq.budgets)[0]
            # the uniform rows' rule on set 1: the budgets and the model's full cache at or under the standard's loss;
            # no ratio unless the search reached the target below the full context
            holds = held <= standard["full"]["heldout"] and result["full"]["heldout"] <= standard["full"]["heldout"]
            ratio = eq.memory_ratio if eq.reached and eq.saves_memory else None
            result["per_layer_search"] = {"budgets": eq.budgets, "ratio": ratio, "search": eq.loss, "heldout": held,
                                          "holds": holds}  # fmt: skip
        else:
            result["per_layer_search"] = {"note": "the full cache is above the standard's loss on the search set"}
    result["eval_seconds"] = time.perf_counter() - t1
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"{name}: val {result['val_loss']:.4f}, held out {result['full']['heldout']:.4f} "
          f"({seconds:.0f} s training, {result['eval_seconds']:.0f} s evaluation)", flush=True)  # fmt: skip
    return result


def planned(contexts=None, seeds=None, only=None):
    for context, (ctx_seeds, variants) in PLAN.items():
        if contexts and context not in contexts:
            continue
        for seed in ctx_seeds:
            if seeds is not None and seed not in seeds:
                continue
            for variant in variants:  # standard first: the others are measured against it
                if not only or variant in only:
                    yield context, variant, seed


# --- the report ------------------------------------------------------------------------------------
def load() -> dict:
    """Every result file by run name; a file made with another config than this script's is refused (a report would
    pair it with the others as one experiment)."""
    runs = {json.loads(f.read_text())["name"]: json.loads(f.read_text()) for f in sorted(RESULTS.glob("*.json"))}
    old = {name: why for name, r in runs.items() if (why := stale(r))}
    if old:
        raise SystemExit(stale_results_error(old, RESULTS))
    return runs


def heldout_by_seed(runs: dict, context: int, variant: str) -> dict[int, float]:
    chosen = (r for r in runs.values() if r["context"] == context and r["variant"] == variant)
    return {r["seed"]: r["full"]["heldout"] for r in chosen}


def report() -> str:
    runs = load()
    lines = ["Held-out loss (nats/token, 4,096-token BPE; window set 1, 16 windows), mean ± std over seeds:", "",
             "| context | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]  # fmt: skip
    for context in PLAN:
        chosen = [r for r in runs.values() if r["context"] == context]
        cells = [mean_std([r["full"]["heldout"] for r in chosen if r["variant"] == v]) for v in VARIANTS]
        lines.append(f"| {context} | " + " | ".join(cells) + " |")
    lines += ["", "Paired by seed (the same data order; the same initialisation too, except in the head-count rows, "
              "whose other attention shapes draw other weights), held-out loss difference:", "",
              "| context | comparison | difference (nats/token) | per seed |", "|---|---|---|---|"]  # fmt: skip
    pairs = [("selective", "standard"), ("selective-memloss", "standard"), ("standard-h8", "standard"),
             ("standard-h2", "standard"), ("selective", "standard-h8")]  # fmt: skip
    for context in PLAN:
        for a, b in pairs:
            da, db = (heldout_by_seed(runs, context, v) for v in (a, b))
            both = sorted(da.keys() & db.keys())
            seeds = [s for s in both if math.isfinite(da[s]) and math.isfinite(db[s])]
            if len(seeds) >= 2:
                per = ", ".join(f"s{s} {da[s] - db[s]:+.4f}" if s in seeds else f"s{s} not finite (left out)"
                                for s in both)  # fmt: skip
                lines.append(f"| {context} | {a} − {b} | {paired_t([da[s] for s in seeds], [db[s] for s in seeds])} "
                             f"| {per} |")  # fmt: skip
    lines += ["", "KV reduction at the same-seed full-cache standard model's loss (the smallest uniform budget, or in "
              "the per-layer search rows the searched budgets, chosen on window set 0 and checked on the held-out "
              "set 1; every slot counted). Per seed: reduction (holds on set 1?); * marks a verdict decided by less "
              f"than {CLOSE} nats/token on set 1, which {WINDOWS} windows do not resolve:", "",
              "| context | model + eviction | " + " | ".join(f"seed {s}" for s in range(5)) + " |",
              "|---|---|" + "---|" * 5]  # fmt: skip
    for context in PLAN:
        for variant in ("standard", "selective", "selective-memloss"):
            kind = "standard" if variant == "standard" else "selective"
            for method in [m for m, (k, _) in METHODS.items() if k == kind] + ["per-layer search"]:
                cells = []
                for seed in range(5):
                    r = runs.get(run_name(context, variant, seed)) or {}
                    std = runs.get(run_name(context, "standard", seed))
                    if method == "per-layer search":
                        e = r.get("per_layer_search")
                        if e is not None and "holds" in e and std is not None:  # result files before that rule
                            e = {**e, "holds": e["holds"] and r["full"]["heldout"] <= std["full"]["heldout"]}
                    elif std is not None and method in r.get("kv", {}):  # from the stored curve: the current rule
                        e = at_standard_loss(r["kv"][method]["curve"], context, std, r["full"])
                    else:
                        e = None
                    if e is None:
                        cells.append("")
                    elif e.get("ratio") is None:
                        cells.append("none")
                    else:
                        held = e.get("heldout_loss", e.get("heldout"))
                        margin = e.get("heldout_margin")  # the deciding one (per-layer rows: their budgets' own)
                        margin = held - std["full"]["heldout"] if margin is None and std is not None else margin
                        close = margin is not None and abs(margin) < CLOSE
                        cells.append(
                            f"{rounded_down(e['ratio'], 1)}x ({'yes' if e['holds'] else 'no'}{'*' if close else ''})"
                        )
                if any(cells):
                    label = method.split(" + ")[-1] if " + " in method else method
                    lines.append(f"| {context} | {variant} + {label} | " + " | ".join(cells) + " |")
    lines += ["", "The held-out curves read directly (descriptive: the budget is read off set 1 itself, not chosen "
              "on set 0): the largest reduction whose uniform budget is at or under the same-seed standard model's "
              "full-cache loss on set 1, where every budget above it is too ('none': no budget below the context):",
              "",
              "| context | model + eviction | " + " | ".join(f"seed {s}" for s in range(5)) + " |",
              "|---|---|" + "---|" * 5]  # fmt: skip
    for context in PLAN:
        for variant in ("standard", "selective", "selective-memloss"):
            kind = "standard" if variant == "standard" else "selective"
            for method in [m for m, (k, _) in METHODS.items() if k == kind]:
                cells = []
                for seed in range(5):
                    r, std = (runs.get(run_name(context, v, seed)) for v in (variant, "standard"))
                    if r is None or std is None or method not in r.get("kv", {}):
                        cells.append("")
                        continue
                    curve = r["kv"][method]["curve"]
                    b = smallest_budget_at(
                        [(c["budget"], c["heldout"]) for c in curve], std["full"]["heldout"], r["full"]["heldout"]
                    )
                    tried = min(c["budget"] for c in curve)  # passing there, the curve may go lower still
                    cells.append("none" if b is None else f"{'≥ ' if b == tried else ''}{rounded_down(context / b)}x")
                if any(cells):
                    label = method.split(" + ")[-1]
                    lines.append(f"| {context} | {variant} + {label} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    (RESULTS.parent / "reproduction.md").write_text(md)
    try:
        plot(runs)
    except ImportError:
        pass
    return md


def plot(runs: dict) -> None:
    """Per context: held-out loss vs KV tokens per layer, one curve per method (mean over seeds), and
    the full-cache standard model's loss as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [c for c in PLAN if any(r["context"] == c for r in runs.values())]
    if not contexts:
        return
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        lines = [(m, k, k, "-") for m, (k, _) in METHODS.items()]
        lines += [(m, "selective", "selective-memloss", "--") for m, (k, _) in METHODS.items() if k == "selective"]
        for i, (method, kind, variant, ls) in enumerate(lines):
            curves = [r["kv"][method]["curve"] for r in runs.values()
                      if r["context"] == context and r["variant"] == variant and method in r.get("kv", {})]  # fmt: skip
            if curves:
                budgets = [c["budget"] for c in curves[0]]
                mean = [sum(cv[j]["heldout"] for cv in curves) / len(curves) for j in range(len(budgets))]  # NaN: a gap
                label = method if variant == kind else method.replace("selective", "memloss", 1)
                ax.plot(budgets, mean, "o" + ls, color=f"C{i}", ms=4, label=f"{label} ({len(curves)} seeds)")
        std = [r["full"]["heldout"] for r in runs.values() if r["context"] == context and r["variant"] == "standard"]
        if std:
            ax.axhline(sum(std) / len(std), color="k", ls="--", lw=1, label=f"standard, full cache ({len(std)} seeds)")
        ax.set(xscale="log", xlabel="KV tokens per layer (budget)", ylabel="held-out loss (nats/token)",
               title=f"context {context}")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS.parent / "reproduction_kv.png", dpi=120)
    plot_loss_curves(runs, contexts)


def plot_loss_curves(runs: dict, contexts: list[int]) -> None:
    """Per context: the training-time validation loss (eval_batches windows of the validation split, every
    eval_interval steps, from each run's history) vs step, one line per variant (mean over its seeds)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        for i, variant in enumerate(VARIANTS):
            hists = [[h for h in r["history"] if "val_loss" in h] for r in runs.values()
                     if r["context"] == context and r["variant"] == variant and r.get("history")]  # fmt: skip
            if not hists:
                continue
            steps = [h["step"] for h in hists[0]]
            mean = [sum(hs[j]["val_loss"] for hs in hists) / len(hists) for j in range(len(steps))]
            ax.plot(steps, mean, "o-", color=f"C{i}", ms=3, label=f"{variant} ({len(hists)} seeds)")
        ax.set(xlabel="step", ylabel="validation loss (nats/token)", title=f"context {context}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS.parent / "reproduction_loss.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["plan", "run", "report"])
    ap.add_argument("--contexts", type=int, nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS))
    args = ap.parse_args()
    todo = list(planned(args.contexts, args.seeds, args.only))
    outside = [c for c in args.contexts or [] if c not in PLAN]
    if outside:  # dropped silently while another context matched
        ap.error(f"--contexts {outside} are not in the plan (contexts {sorted(PLAN)}).")
    if args.command != "report" and not todo:  # a context or seed outside the plan: say so, not a silent no-op
        plan = "; ".join(f"context {c}: seeds {min(s)}-{max(s)} of {', '.join(v)}" for c, (s, v) in PLAN.items())
        ap.error(
            f"nothing planned matches --contexts {args.contexts} --seeds {args.seeds} --only {args.only}. The plan: "
            f"{plan}."
        )
    if args.command == "plan":
        for context, variant, seed in todo:
            f = RESULTS / f"{run_name(context, variant, seed)}.json"
            state = "todo" if not f.exists() else "STALE" if stale(json.loads(f.read_text())) else "done"
            print(f"{state}  {run_name(context, variant, seed)}")
        return
    if args.command == "run":
        for context, variant, seed in todo:
            run_one(context, variant, seed)
    print(report())


if __name__ == "__main__":
    main()
