"""Loss vs KV memory for every KV-compression method at equal memory, from one standard and one selective
checkpoint, on held-out validation windows.

    python experiments/kv_curves.py [--standard demo_out/standard] [--selective demo_out/selective]
                                    [--windows 128] [--searched auto] [--out results/kv_curves]
    python experiments/kv_curves.py --report       # the table and plot again from results/kv_curves.json

Methods (a budget b = at most b tokens stored and attended per layer at any step, the newest included;
the first token is never evicted, in every policy; :mod:`selective_attention.kv_cache`):

  standard + window       the standard model, sliding window + first token (StreamingLLM-style)
  standard + H2O          the standard model, heavy hitters + a recent window of b // 2 (H2O-style)
  selective + selective   the selective model, pruned by its penalty F (the paper)
  selective + window      the selective model, sliding window + first token

For uniform budgets 8, 16, ..., 256 and the full context, each method reads every held-out window one
token at a time through its pruned cache (``budget_search.pruned_loss``); with ``--searched`` (by default
the per-layer budgets the demo searched, from ``report.json`` next to the checkpoints) every method is
also evaluated at those per-layer budgets. The windows are validation windows made exactly as training
and the demo make them (``Task(...).text.windows``: the checkpoint's tokenizer, ``<bos>`` first with
BPE), the same for every method, spread evenly over the validation split, and exclude the demo's search
windows (set 0 of ``eval_batches("val", search_batch, T, 2)``), so the searched budgets are checked on
windows their search never saw. Writes ``<out>.json``, ``<out>.md`` (the table that
``benchmarks/readme_tables.py`` copies into experiments/README.md) and ``<out>.png``, and prints the CPU
time taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import cpu_model  # noqa: E402

from selective_attention import machine  # noqa: E402
from selective_attention.budget_search import KV_METHODS as METHODS  # noqa: E402
from selective_attention.budget_search import pruned_logits, smallest_budget_at  # noqa: E402
from selective_attention.stats import rounded_down  # noqa: E402
from selective_attention.train import Task, TrainConfig, model_from_checkpoint  # noqa: E402

BUDGETS = [8, 16, 32, 64, 128, 256]


def heldout_windows(text, context: int, n: int, search_batch: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``n`` validation windows ``(x, y)`` ``[n, T]`` spread evenly over the split, none of them one of the demo's
    search windows (compared by content), and their indices (window k starts at stream position kT)."""
    total = text.n_eval_windows("val", context)
    search_x, _ = next(text.eval_batches("val", search_batch, context, 2))
    x_all, y_all = text.windows("val", torch.arange(total) * context, context)
    seen = (x_all[:, None, :] == search_x[None]).all(-1).any(-1)  # [total]
    free = (~seen).nonzero().squeeze(-1)
    if n > free.numel():
        raise ValueError(f"only {free.numel()} validation windows of {context} tokens are not search windows.")
    picks = free[torch.arange(n) * free.numel() // n]
    return x_all[picks], y_all[picks], picks.tolist()


@torch.no_grad()
def loss(model, x, y, budget=None, policy="selective", batch: int = 128) -> float:
    """Mean next-token loss (nats/token) of ``y`` when ``x`` is read through a cache pruned by ``policy``;
    ``budget=None``: the full forward (the exact full cache)."""
    total, count = 0.0, 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        logits = model(xb) if budget is None else pruned_logits(model, xb, budget=budget, policy=policy)[0]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="sum").item()
        count += int((yb != -100).sum())
    return total / count


def _show(path) -> str:
    """A path relative to the repository when it is inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def demo_report(ckpt: Path) -> dict | None:
    f = ckpt.parent / "report.json"
    return json.loads(f.read_text()) if f.exists() else None


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    models, metas = {}, {}
    for kind in ("standard", "selective"):
        models[kind], metas[kind] = model_from_checkpoint(getattr(args, kind))
        models[kind].eval()
    if metas["standard"]["tokenizer"] != metas["selective"]["tokenizer"]:
        raise ValueError("the two checkpoints have different tokenizers: no comparison on the same windows.")
    T = models["selective"].config.context_len
    if models["standard"].config.context_len != T:
        raise ValueError("the two checkpoints have different context lengths.")
    report = demo_report(Path(args.selective))
    search_batch = args.search_batch or (report["config"]["search_batch"] if report else 8)
    tc = TrainConfig.from_dict(metas["selective"]["train_config"])
    text = Task(tc, tokenizer=metas["selective"]["tokenizer"]).text
    x, y, picks = heldout_windows(text, T, args.windows, search_batch)
    searched = None
    if args.searched == "auto":
        searched = report["budget_search"]["budgets"] if report else None
    elif args.searched not in ("none", ""):
        searched = [int(b) for b in args.searched.split(",")]

    def say(msg: str) -> None:
        print(f"[{time.process_time() - cpu0:7.1f} s cpu] {msg}", flush=True)

    full = {kind: loss(models[kind], x, y) for kind in models}
    say(f"full cache: standard {full['standard']:.4f}, selective {full['selective']:.4f} ({len(picks)} windows)")
    curves = {}
    for method, (kind, policy) in METHODS.items():
        curves[method] = []
        for b in [b for b in args.budgets if b < T]:
            curves[method].append({"kv_tokens_per_layer": b, "loss": loss(models[kind], x, y, b, policy)})
            say(f"{method:>22} b={b:<4} {curves[method][-1]['loss']:.4f}")
        curves[method].append({"kv_tokens_per_layer": T, "loss": full[kind], "full": True})
    at_searched = {}
    if searched is not None:
        for method, (kind, policy) in METHODS.items():
            at_searched[method] = loss(models[kind], x, y, searched, policy)
            say(f"{method:>22} b={searched} {at_searched[method]:.4f}")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    result = {
        "standard_ckpt": _show(args.standard),
        "selective_ckpt": _show(args.selective),
        "context": T,
        "n_layer": models["selective"].config.n_layer,
        "tokenizer": metas["selective"]["tokenizer"].kind,
        "windows": {"n": len(picks), "indices": picks, "excluded_search_windows": search_batch},
        "targets": int((y != -100).sum()),
        "full_loss": full,
        "methods": {m: {"model": k, "policy": p} for m, (k, p) in METHODS.items()},
        "h2o_recent": "budget // 2",
        "curves": curves,
        "searched_budgets": searched,
        "at_searched_budgets": at_searched,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "threads": args.threads,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "commit": machine.commit(),
    }
    print(f"CPU time: {cpu:.0f} s ({wall:.0f} s wall, {args.threads} thread(s))")
    return result


def table(r: dict) -> str:
    """Rows: KV tokens per layer; columns: the methods; each cell the held-out loss and its difference to the
    full-cache standard model's."""
    ref, T = r["full_loss"]["standard"], r["context"]
    methods = list(r["curves"])
    unit = "nats/byte" if r["tokenizer"] == "byte" else "nats/token"
    rows = [
        "| KV tokens per layer | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    budgets = sorted({p["kv_tokens_per_layer"] for c in r["curves"].values() for p in c}, reverse=True)
    for b in budgets:
        cells = []
        for m in methods:
            p = next(p for p in r["curves"][m] if p["kv_tokens_per_layer"] == b)
            cells.append(f"{p['loss']:.4f}" if p.get("full") else f"{p['loss']:.4f} ({p['loss'] - ref:+.3f})")
        label = f"{b} (full)" if b == T else str(b)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if r["searched_budgets"]:
        sb = r["searched_budgets"]
        cells = [f"{r['at_searched_budgets'][m]:.4f} ({r['at_searched_budgets'][m] - ref:+.3f})" for m in methods]
        rows.append(f"| {', '.join(map(str, sb))} (searched) | " + " | ".join(cells) + " |")
    smallest, tried = [], min(budgets)
    for m in methods:
        full = next((p["loss"] for p in r["curves"][m] if p.get("full")), None)
        b = smallest_budget_at(
            [(p["kv_tokens_per_layer"], p["loss"]) for p in r["curves"][m] if not p.get("full")], ref, full
        )
        if b is None:
            smallest.append("none below the full cache")
        elif b == tried:  # the curve may reach it lower still
            smallest.append(f"<= {tried} (>= {rounded_down(T / tried)}x less; the smallest tried)")
        else:
            smallest.append(f"{b} ({rounded_down(T / b)}x less)")
    rows.append(
        "| smallest uniform budget at or under the standard's full-cache loss (read off these windows: descriptive) | "
        + " | ".join(smallest)
        + " |"
    )
    cpu = f" of an {r['cpu']}, torch {r['torch']}" if "cpu" in r else ""  # files before 2026-11-30: no CPU
    note = (
        f"\nHeld-out validation loss ({unit}; in brackets: minus the full-cache standard model's, {ref:.4f}) on "
        f"{r['windows']['n']} windows of {T} tokens ({r['targets']:,} targets), the same for every method, none "
        f"seen by the budget search (the searched row's check); the smallest-budget row is read off these same "
        f"windows, so it describes them and is not a held-out test of a budget chosen elsewhere. A budget b = at "
        f"most b tokens stored and attended per layer at any step, the newest and the first included; H2O keeps a "
        f"recent window of b // 2. One seed, one checkpoint pair "
        f"(`{r['standard_ckpt']}`, `{r['selective_ckpt']}`); {r['cpu_seconds']:.0f} s of CPU time "
        f"({r['threads']} thread{cpu}; `python experiments/kv_curves.py --windows {r['windows']['n']}`)."
    )
    return "\n".join(rows) + "\n" + note + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"standard + window": ("C7", "-", "o"), "standard + H2O": ("C1", "-", "s"),
              "selective + selective": ("C0", "-", "o"), "selective + window": ("C2", "--", "s")}  # fmt: skip
    for m, curve in r["curves"].items():
        color, ls, marker = styles.get(m, (None, "-", "o"))
        xs, ys = [p["kv_tokens_per_layer"] for p in curve], [p["loss"] for p in curve]
        ax.plot(xs, ys, color=color, ls=ls, marker=marker, label=m, ms=4, lw=1.2)
        if r["searched_budgets"]:
            mean_b = sum(r["searched_budgets"]) / len(r["searched_budgets"])
            ax.plot([mean_b], [r["at_searched_budgets"][m]], color=color, marker="*", ms=10, ls="none")
    if r["searched_budgets"]:
        label = f"searched per-layer budgets {r['searched_budgets']} (at the mean)"
        ax.plot([], [], "k*", ms=8, ls="none", label=label)
    ax.axhline(r["full_loss"]["standard"], color="C3", ls=":", lw=1.2, label="standard model, full cache")
    ax.set_xscale("log", base=2)
    ticks = sorted({p["kv_tokens_per_layer"] for c in r["curves"].values() for p in c})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set(xlabel="KV tokens per layer (the newest and the first included)",
           ylabel="held-out validation loss", title=f"Loss vs KV memory, context {r['context']}")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--standard", default=str(ROOT / "demo_out" / "standard"), help="standard checkpoint (run folder)")
    p.add_argument("--selective", default=str(ROOT / "demo_out" / "selective"), help="selective checkpoint")
    p.add_argument("--windows", type=int, default=128, help="held-out validation windows (default 128)")
    p.add_argument("--budgets", type=int, nargs="+", default=BUDGETS, help="uniform budgets below the context")
    p.add_argument("--searched", default="auto",
                   help="per-layer budgets too: 8,12,9,9, 'auto' (the demo's report.json), 'none'")  # fmt: skip
    p.add_argument("--search_batch", type=int, default=None,
                   help="the demo's search windows, excluded (default: its report's search_batch, else 8)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    p.add_argument("--out", default=str(ROOT / "results" / "kv_curves"), help="output path without extension")
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot from <out>.json")
    args = p.parse_args(argv)
    if args.windows < 1 or args.threads < 1 or min(args.budgets) < 2:
        p.error(f"--windows {args.windows}, --threads {args.threads} and every --budgets ({args.budgets}) must be "
                ">= 1, >= 1 and >= 2 (a budget holds the first token and the newest)")  # fmt: skip
    out = Path(args.out)
    r = json.loads(out.with_suffix(".json").read_text()) if args.report else run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.report:
        out.with_suffix(".json").write_text(json.dumps(r, indent=1))
    out.with_suffix(".md").write_text(table(r))
    try:
        plot(r, out.with_suffix(".png"))
    except ImportError:
        print("(matplotlib is not installed: no plot)")
    print(table(r))
    return r


if __name__ == "__main__":
    main()
