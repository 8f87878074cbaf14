"""The main job: train a standard and a selective model of the same size, compare them, and show
how little context the selective one needs.

``selective-attention demo`` (about 10 minutes on 2 CPU cores; ``--quick`` about 1 minute):

1. trains a standard and a selective GPT (same size, same data, same steps) on a corpus (KJV);
2. searches per-layer KV budgets for the selective model on one set of validation windows: the
   smallest that keep its loss at the full-cache standard model's loss on those windows (the
   paper's "equal validation perplexity"; no tolerance unless ``tolerance`` is set, and then it is
   printed beside the ratio), then checks them on held-out windows the search never saw: the
   ratio holds only if the pruned selective model is at or under the standard model there too;
3. prints a table (validation loss, tokens/s, KV memory at the standard's loss on the search windows and whether it
   holds on the held-out ones) and writes a JSON report and
   PNG plots: loss curves, memory vs loss, and the penalty F of a real sentence.

A budget b counts every KV slot a layer stores and attends to at a step, the newest token included.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import field
from pathlib import Path

import torch

from .budget_search import KV_METHODS, pruned_loss, search_budgets, smallest_budget_at, uniform_budgets
from .checkpoint import model_from_checkpoint
from .machine import provenance
from .model import GPT, GPTConfig
from .ops import cpu_kernels
from .options import finite_number, path_text, positive_int
from .progress import progress as progress_bar
from .stats import rounded_down
from .train import Task, TrainConfig, check_out_dir, mean_loss
from .train import main as train_main

__all__ = ["DemoConfig", "run_demo", "plot_penalty"]


def _demo_model() -> GPTConfig:
    return GPTConfig(context_len=512, n_layer=4, n_head=4, d_model=128)


@dataclasses.dataclass
class DemoConfig:
    """The demo: two training runs made from ``train`` (:meth:`train_config`), then the budget search."""

    out: str = field(default="demo_out", metadata={"type": path_text, "help": "folder for the report and plots"})
    data: str = "kjv"  # kjv | pydoc | a text file
    tokenizer: str = "byte"  # byte | bpe (as train's --tokenizer: trained on the training split, <bos> first)
    bpe_vocab_size: int = field(
        default=4096, metadata={"type": positive_int, "help": "--tokenizer=bpe: tokens in the vocabulary"}
    )
    steps: int = field(default=1000, metadata={"type": positive_int, "help": "training steps per model"})
    batch_size: int = field(default=4, metadata={"type": positive_int, "help": "sequences per training step"})
    # the standard model (vocab_size is set from the data); the selective one is the same with selection=True
    model: GPTConfig = field(default_factory=_demo_model)
    search_batch: int = field(
        default=8,
        metadata={"type": positive_int, "help": "validation windows for the budget search (and as many held out)"},
    )
    tolerance: float = field(
        default=0.0,
        metadata={
            "type": finite_number(positive=False, hint="; 0 = the standard model's loss itself"),
            "help": "nats above the standard model's loss still called equal loss (0 = the paper's; printed)",
        },
    )
    seed: int = 0  # initialisation and data order of both runs
    progress: bool = True  # progress bars

    @classmethod
    def quick(cls, **kw) -> DemoConfig:
        """A ~1 minute version: a tiny model, few steps."""
        base = dict(steps=150, batch_size=8, search_batch=4, data="kjv",
                    model=GPTConfig(context_len=128, n_layer=2, n_head=4, d_model=64))  # fmt: skip
        base.update(kw)
        return cls(**base)

    def train_config(self, name: str, selection: bool) -> TrainConfig:
        """The training run ``name`` (its folder under ``out``): this model, selective or not."""
        return TrainConfig(
            data=self.data,
            tokenizer=self.tokenizer,
            bpe_vocab_size=self.bpe_vocab_size,
            out_dir=str(Path(self.out) / name),
            model=dataclasses.replace(self.model, selection=selection),
            batch_size=self.batch_size,
            max_steps=self.steps,
            warmup_steps=max(1, self.steps // 10),
            eval_interval=max(1, self.steps // 10),
            ckpt_interval=self.steps,
            eval_batches=8,
            seed=self.seed,
            resume=False,
            progress=self.progress,
        )


SENTENCE = "And God said, Let there be light: and there was light. And God saw the light, that it was good."


def run_demo(cfg: DemoConfig) -> dict:
    """Train, search, check, report (module docstring); returns the report. Runs the chunked backend's eager CPU
    passes unless ``SELECTIVE_ATTENTION_NUMBA`` is set: the README's numbers are theirs, and the compiled passes
    (extra ``[cpu]``) round a selective model's training apart."""
    with cpu_kernels.eager_passes(force=False):
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    if cfg.data == "varassign":
        raise ValueError(
            "the demo compares KV memory on text; --data=varassign has no text windows: use --data kjv, pydoc or a "
            "text file (experiments/varassign.py compares the two attentions on variable assignment)."
        )
    # the windows the search and its check read, counted before any training (BPE: a few seconds, trained again
    # by each run); the split holds only so many, and eval_batches would quietly use fewer
    n_val = Task(cfg.train_config("standard", False)).text.n_eval_windows("val", cfg.model.context_len)
    if n_val < 2 * cfg.search_batch:
        fix = f"use --search_batch <= {n_val // 2}" if n_val >= 2 else "use a shorter context or a longer text"
        raise ValueError(
            f"--search_batch {cfg.search_batch} needs {2 * cfg.search_batch} validation windows of "
            f"{cfg.model.context_len} tokens (as many held out as searched), but {cfg.data!r} holds {n_val}: {fix}."
        )
    check_out_dir(out, "--out")
    (out / "report.json").unlink(missing_ok=True)  # a run stopped partway leaves no report of an earlier one
    runs = {}
    for name, selection in (("standard", False), ("selective", True)):
        t0 = time.perf_counter()
        runs[name] = train_main(cfg.train_config(name, selection))
        runs[name]["train_seconds"] = time.perf_counter() - t0
        print(f"{name}: val loss {runs[name]['val_loss']:.4f}, {runs[name]['tokens_per_s']:,.0f} tokens/s", flush=True)

    sel_model, sel_meta = model_from_checkpoint(out / "selective")
    std_model, std_meta = model_from_checkpoint(out / "standard")
    tokenizer = sel_meta["tokenizer"]
    if std_meta["tokenizer"] != tokenizer:  # trained the same way on the same split: the same, or no comparison
        raise RuntimeError(f"the two runs have different tokenizers: {std_meta['tokenizer']!r}, {tokenizer!r}.")
    # the windows exactly as training made them (the checkpoint's tokenizer, <bos> first with BPE): set 0 drives
    # the budget search; set 1 is held out to check what it found
    data = Task(cfg.train_config("selective", True), tokenizer=tokenizer).text
    (xs, ys), (xh, yh) = data.eval_batches("val", cfg.search_batch, cfg.model.context_len, 2)
    std_search, std_held = mean_loss(std_model, xs, ys), mean_loss(std_model, xh, yh)
    sel_search, sel_held = mean_loss(sel_model, xs, ys), mean_loss(sel_model, xh, yh)
    # equal loss: the standard model's. If the selective model does not reach it even with its full
    # cache, no budget can: then search against its own full-cache loss and say so (no saving at equal loss).
    reached = sel_search <= std_search + cfg.tolerance
    # its own full cache: read as the pruned caches are (one token at a time; target=None), not by the full forward,
    # whose loss differs in the last bits: at a target of its own full cache, a verdict would follow that rounding
    target = std_search if reached else None
    search = search_budgets(sel_model, xs, ys, target=target, tolerance=cfg.tolerance, progress=cfg.progress)
    pruned_held, _ = pruned_loss(sel_model, xh, yh, budget=search.budgets)
    # the same budgets evicting the oldest token instead of the largest F: how much is the rule's, not the model's
    # (nothing to compare when no budget below the context was found)
    window = None
    if search.saves_memory:
        window = {
            "search": pruned_loss(sel_model, xs, ys, budget=search.budgets, policy="window")[0],
            "heldout": pruned_loss(sel_model, xh, yh, budget=search.budgets, policy="window")[0],
        }
    held_reference = std_held if reached else pruned_loss(sel_model, xh, yh)[0]  # (its full cache, as above)
    # the picture a reader wants: held-out loss vs KV tokens per layer, one curve per method
    models = {"standard": std_model, "selective": sel_model}
    budgets = uniform_budgets(cfg.model.context_len)
    curves = {}
    bar = progress_bar(len(KV_METHODS) * len(budgets), "memory vs loss (held out)", enabled=cfg.progress)
    for method, (kind, policy) in KV_METHODS.items():
        curves[method] = []
        for b in budgets:
            curves[method].append({"budget": b, "loss": pruned_loss(models[kind], xh, yh, budget=b, policy=policy)[0]})
            bar.update(1)
    bar.close()
    report = {
        "config": dataclasses.asdict(cfg),
        "standard": {k: v for k, v in runs["standard"].items() if k != "history"},
        "selective": {k: v for k, v in runs["selective"].items() if k != "history"},
        "history": {n: r["history"] for n, r in runs.items()},
        "budget_search": {
            "budgets": search.budgets,
            "context": search.context,
            "full_loss": search.full_loss,
            "pruned_loss": search.loss,
            "standard_full_loss": std_search,
            "equal_to": "standard" if reached else "selective (own full cache)",
            "reached_standard": reached,  # the selective model's full cache at or under the standard's loss
            "found": search.saves_memory,  # some budget below the context met the target
            "target_loss": search.target,
            "tolerance": search.tolerance,
            "memory_ratio": search.memory_ratio,
            "evaluations": search.evaluations,
        },
        "heldout": {
            "standard_full_loss": std_held,
            "selective_full_loss": sel_held,
            "pruned_loss": pruned_held,
            "holds": pruned_held <= held_reference + cfg.tolerance,
            "window_same_budgets": window,  # selective + window at the searched budgets (search and held out)
            "reference": "standard" if reached else "selective (own full cache)",
            "reference_loss": held_reference,  # what "holds" compares the pruned loss with
            "curves": curves,
        },
        "throughput_ratio": runs["selective"]["tokens_per_s"] / runs["standard"]["tokens_per_s"],
        "models": {"standard": dataclasses.asdict(std_model.config), "selective": dataclasses.asdict(sel_model.config)},
        "machine": provenance(),  # the tokens/s and their ratio are this machine's
    }
    tmp = out / "report.json.tmp"  # whole or not at all
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")
    print(table(report))
    try:
        plot_curves(report, out / "loss_curves.png")
        plot_memory(report, out / "memory_vs_loss.png")
        plot_penalty(sel_model, SENTENCE, out / "penalty_F.png", tokenizer=tokenizer)
        print(f"plots: {out}/loss_curves.png, memory_vs_loss.png, penalty_F.png")
    except ImportError:
        print("(matplotlib is not installed: no plots; pip install 'selective-attention[train]')")
    print(f"report: {out / 'report.json'}")
    return report


def table(report: dict) -> str:
    s, t, b, h = report["selective"], report["standard"], report["budget_search"], report["heldout"]
    ctx = b["context"]
    tol = f" + {b['tolerance']:g} nats" if b["tolerance"] else ""
    reached = b.get("reached_standard", b["equal_to"] == "standard")
    found = b.get("found", b["memory_ratio"] > 1)
    if not reached:  # the full cache is already above the standard's loss: no budget can be at it
        kv = f"none: even its full cache is above the standard's loss{tol}"
    elif not found:
        kv = f"{ctx} (no budget below the context stays at the standard's loss{tol})"
    else:
        kv = (
            f"{sum(b['budgets']) / len(b['budgets']):.1f} (budgets {b['budgets']}): "
            f"{rounded_down(b['memory_ratio'], 1)}x less at standard's loss{tol} on the search windows; held out: "
            f"{'holds' if h['holds'] else 'does NOT hold'}"
        )
    reference = h.get("reference", b["equal_to"])
    # (the standard's loss out of reach, the search targeted the selective model's own full-cache loss: say so)
    own = h.get("reference_loss")  # its full cache read one token at a time (reports before it: none)
    at = (
        f"{reference}'s loss{tol}"
        if reached
        else f"the selective model's own full-cache loss{tol}"
        + ("" if own is None else f", {own:.4f} read one token at a time")
        + ", the standard's being out of reach"
    )
    verdict = (
        f"the {rounded_down(b['memory_ratio'], 1)}x ({at}) {'holds' if h['holds'] else 'does NOT hold'} there"
        if found
        else "nothing to check"
    )
    rows = [
        f"| model | val loss ({_unit(report)}) | tokens/s "
        "| KV slots per layer at standard's loss: budget search, then held-out check |",
        "|---|---|---|---|",
        f"| standard | {t['val_loss']:.4f} | {t['tokens_per_s']:,.0f} | {ctx} (full context) |",
        f"| selective | {s['val_loss']:.4f} | {s['tokens_per_s']:,.0f} | {kv} |",
    ]
    return (
        "\n".join(rows)
        + (
            f"\n\nbudget search on {ctx}-token validation windows: standard {b['standard_full_loss']:.4f}, "
            f"selective full cache {b['full_loss']:.4f}, pruned {b['pruned_loss']:.4f} (target: "
            f"{b['equal_to']}{tol} = {b['target_loss'] + b['tolerance']:.4f})"
            f"\nheld-out windows (not seen by the search): standard {h['standard_full_loss']:.4f}, selective full "
            f"cache {h['selective_full_loss']:.4f}, pruned {h['pruned_loss']:.4f}: {verdict}"
            + _window_line(h, b, found)
            + f"\nselective/standard training throughput {report['throughput_ratio']:.2f}"
        )
        + _curve_lines(h, ctx)
    )


def _window_line(h: dict, b: dict, found: bool) -> str:
    """The searched budgets with the oldest token evicted instead of the largest F (the selective model's own
    sliding window): what the paper's rule adds at those budgets. Reports without it (older ones) print nothing."""
    w = h.get("window_same_budgets")
    if w is None or not found:
        return ""
    return (
        f"\nthe same budgets evicting the oldest token instead of the largest F (selective + window): search "
        f"{w['search']:.4f} (F: {b['pruned_loss']:.4f}), held out {w['heldout']:.4f} (F: {h['pruned_loss']:.4f})"
    )


def _curve_lines(h: dict, ctx: int) -> str:
    """For each method, the smallest uniform budget from which on the held-out loss is at or under the
    full-cache standard model's (read off the held-out curve: :func:`smallest_budget_at`)."""
    if not h.get("curves"):
        return ""
    parts = []
    for method, curve in h["curves"].items():
        full = h["standard_full_loss"] if KV_METHODS[method][0] == "standard" else h["selective_full_loss"]
        b = smallest_budget_at([(c["budget"], c["loss"]) for c in curve], h["standard_full_loss"], full)
        if b is None:
            parts.append(f"{method} none below {ctx}")
        elif b == min(c["budget"] for c in curve):  # the curve may reach it lower still
            parts.append(f"{method} <= {b} (>= {rounded_down(ctx / b)}x, the smallest tried)")
        else:
            parts.append(f"{method} {b} ({rounded_down(ctx / b)}x)")
    what = "smallest uniform budget at the standard's full-cache loss (read off these windows: descriptive)"
    return f"\nheld-out curves, {what}: " + "; ".join(parts)


def _unit(report: dict) -> str:
    return "nats/byte" if report["config"].get("tokenizer", "byte") == "byte" else "nats/token"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(report: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, style in (("standard", "k-o"), ("selective", "C0-o")):
        h = report["history"][name]
        ax.plot([r["step"] for r in h], [r["val_loss"] for r in h], style, label=name, ms=3)
    ax.set(xlabel="step", ylabel=f"validation loss ({_unit(report)})", title="Same size, same data")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(report: dict, path: Path) -> None:
    """Held-out loss vs KV tokens per layer: one curve per method (uniform budgets), the full caches as
    lines, and the searched per-layer budgets as a point."""
    plt = _plt()
    b, h = report["budget_search"], report["heldout"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (method, curve) in enumerate(h.get("curves", {}).items()):
        ax.plot([c["budget"] for c in curve], [c["loss"] for c in curve], "o-", ms=3, color=f"C{i}", label=method)
    ax.axhline(h["standard_full_loss"], color="k", ls="--", lw=1, label="standard, full cache")
    ax.axhline(h["selective_full_loss"], color="0.4", ls=":", lw=1.2, label="selective, full cache")
    n = len(b["budgets"])
    ax.scatter([sum(b["budgets"]) / n], [h["pruned_loss"]], marker="*", s=90, color="k", zorder=3,
               label=f"selective, searched budgets {b['budgets']}")  # fmt: skip
    ax.set(xscale="log", xlabel="KV tokens per layer (budget; the newest token included)",
           ylabel=f"held-out loss ({_unit(report)})", title="Memory vs loss, held-out windows")  # fmt: skip
    ticks = sorted({c["budget"] for curve in h.get("curves", {}).values() for c in curve})
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def plot_penalty(model: GPT, text: str, path: Path, max_tokens: int = 96, tokenizer=None) -> None:
    """Heat map of each selective layer's F for ``text`` (in the model's tokens: ``tokenizer``, default bytes;
    with ``<bos>`` first for a BPE one, as in training), with which tokens are masked."""
    from .data import ByteTokenizer

    plt = _plt()
    tok = ByteTokenizer() if tokenizer is None else tokenizer
    idx = tok.encode_prompt(text)[:max_tokens][None]  # [1, T]
    T = idx.shape[1]
    pos = torch.arange(T)
    x = model.tok_emb(idx)
    maps = []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if attn.selects:
            from .selection import selection_penalty

            q, k, _, sel = attn.project(block.norm1(x), pos)
            qs, ks = attn.selection.voters(q, k, sel)
            maps.append((i, selection_penalty(qs, ks)[0].mean(0)))  # [T, T] (mean over per-head Fs)
        x = block(x, pos)[0]
    if not maps:
        raise ValueError("the model has no selective layer.")
    if tok.kind == "byte":
        labels = [chr(c) if 32 <= c < 127 else "?" for c in idx[0].tolist()]
    else:
        labels = [tok.token_label(c).replace("\n", "\\n") for c in idx[0].tolist()]
    n = len(maps)
    fig = plt.figure(figsize=(max(9.0, 4.2 * n), 4.2 + 0.9 * n))
    grid = fig.add_gridspec(1 + n, n, height_ratios=[4.0] + [0.55] * n)
    for col, (i, Fm) in enumerate(maps):
        ax = fig.add_subplot(grid[0, col])
        im = ax.imshow(Fm.clamp(max=Fm.quantile(0.995).item() or 1.0).numpy(), cmap="magma", interpolation="nearest")
        ax.set_title(f"layer {i}: F[query, key]", fontsize=9)
        step = max(1, T // 24)
        ax.set_xticks(range(0, T, step), [labels[j] for j in range(0, T, step)], fontsize=6)
        ax.set_yticks(range(0, T, step), [labels[j] for j in range(0, T, step)], fontsize=6)
        ax.set_xlabel("key (bright = masked)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    # which tokens the last query no longer sees: its row of F, one labelled cell per token
    for row, (i, Fm) in enumerate(maps):
        ax = fig.add_subplot(grid[1 + row, :])
        last = Fm[-1].clamp(max=5.0)[None].numpy()  # F of the final query; >= 5 nats ~ gone
        ax.imshow(last, cmap="magma", vmin=0, vmax=5, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(T), labels, fontsize=6)
        ax.set_yticks([0], [f"layer {i}"], fontsize=7)
        ax.tick_params(length=0)
    fig.text(0.5, 0.005, "strips: F of the final query for each token (bright = masked, capped at 5 nats)",
             ha="center", fontsize=7)  # fmt: skip
    fig.suptitle(f"Selection penalty F for: {text[:70]}...", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
