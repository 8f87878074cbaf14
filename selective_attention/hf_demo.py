"""The Hugging Face example, end to end on a laptop with nothing downloaded (``selective-attention hf-demo``).

1. Build a small Llama-style config with grouped-query attention (4 layers, 8 query heads sharing 2
   key/value heads), byte vocabulary.
2. Train it from scratch on the bundled King James Bible twice, from one initialisation and on the
   same batches: ``attn_implementation="selective"`` (the paper's F in every layer) and ``"sdpa"``
   (standard attention). The loop is ours, a dozen lines (AdamW, warm-up then cosine), not ``Trainer``:
   both runs then see identical batches by construction and the example needs nothing beyond
   ``transformers`` itself. ``Trainer`` works too (:class:`~selective_attention.hf.SelectiveTrainer`
   adds the memory loss; tested in tests/test_hf.py).
3. ``save_pretrained`` both, reload them with ``from_pretrained(..., attn_implementation=...)``, and
   compare their loss on held-out windows.
4. Read held-out windows through :class:`~selective_attention.hf.SelectiveCache` with a budget per
   layer (teacher-forced, one token at a time, exactly as ``generate`` decodes): loss and KV bytes
   at each budget, against the full cache. Then ``generate`` a continuation with a budget.

Writes ``OUT/report.json``, ``OUT/report.md`` and the two saved models under ``OUT/``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import time
from dataclasses import field
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import ByteTokenizer, TextData
from .machine import provenance
from .ops import cpu_kernels
from .options import positive_int
from .progress import progress
from .train import check_out_dir, lr_schedule

__all__ = ["HFDemoConfig", "run_hf_demo", "pruned_loss"]

PROMPT = "And God said, "


@dataclasses.dataclass
class HFDemoConfig:
    """The Hugging Face example's settings (``selective-attention hf-demo --help``)."""

    out: str = "hf_demo_out"  # folder for the saved models and the report
    data: str = "kjv"  # kjv | pydoc | a text file (byte tokens)
    steps: int = field(default=400, metadata={"type": positive_int, "help": "training steps per model"})
    batch_size: int = field(default=8, metadata={"type": positive_int, "help": "sequences per step"})
    context_len: int = field(default=256, metadata={"type": positive_int, "help": "tokens per training window"})
    hidden_size: int = field(default=128, metadata={"type": positive_int, "help": "model width"})
    n_layers: int = field(default=4, metadata={"type": positive_int, "help": "decoder layers"})
    n_heads: int = field(default=8, metadata={"type": positive_int, "help": "query heads"})
    n_kv_heads: int = field(default=2, metadata={"type": positive_int, "help": "key/value heads (GQA)"})
    lr: float = 3e-3  # peak learning rate
    memory_eps: float = 0.0  # the paper's memory loss weight for the selective model (0 = off)
    eval_windows: int = field(default=16, metadata={"type": positive_int, "help": "held-out windows for losses"})
    budgets: tuple[int, ...] = (16, 32, 64)  # per-layer KV budgets to evaluate (comma-separated)
    seed: int = 0  # initialisation and data order of both runs
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}.")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of n_heads={self.n_heads}.")
        if not self.budgets:
            raise ValueError(
                "budgets is empty: the demo evaluates the pruned cache at each budget and generates with the smallest; "
                "give at least one, e.g. --budgets=16,32,64."
            )
        if any(b < 2 for b in self.budgets):
            raise ValueError(f"budgets must be >= 2 (the first token and the newest), got {self.budgets}.")
        if any(b > self.context_len for b in self.budgets):  # more slots than a window holds: memory, never used
            raise ValueError(
                f"budgets must be <= context_len={self.context_len} (the evaluation windows' length), got "
                f"{self.budgets}."
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}.")

    @classmethod
    def quick(cls, **kw) -> HFDemoConfig:
        """A ~1 minute version (a smaller model, few steps)."""
        base = dict(steps=60, batch_size=8, context_len=128, hidden_size=64, n_layers=2, eval_windows=4, budgets=(16,))
        base.update(kw)
        return cls(**base)

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=256, hidden_size=self.hidden_size, intermediate_size=int(self.hidden_size * 8 / 3 / 8) * 8,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads, num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=max(2048, 2 * self.context_len), bos_token_id=None, eos_token_id=None,
            pad_token_id=None, tie_word_embeddings=True,
        )  # fmt: skip


def train(model, data: TextData, cfg: HFDemoConfig, name: str) -> list[float]:
    """``cfg.steps`` AdamW steps on random training windows (the same ones for every model: the
    generator is seeded by ``cfg.seed``); returns the training losses."""
    import selective_attention.hf as sa_hf

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses = []
    bar = progress(cfg.steps, f"train {name}", enabled=cfg.progress)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_schedule(step, lr=cfg.lr, min_lr=0.0, warmup_steps=max(1, cfg.steps // 10),
                                      max_steps=cfg.steps)  # fmt: skip
        x, y = data.batch("train", cfg.batch_size, cfg.context_len, generator=gen)
        logits = model(x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        total = loss + sa_hf.memory_loss_term(model) if name == "selective" else loss
        if not torch.isfinite(total):
            raise FloatingPointError(f"{name}: the loss is {total.item()} at step {step}; try a lower --lr.")
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return losses


@torch.no_grad()
def full_loss(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean next-token loss of held-out windows ``x, y`` ``[N, T]`` in one forward (no cache)."""
    model.eval()
    logits = model(x, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()


@torch.no_grad()
def pruned_loss(
    model, x: torch.Tensor, y: torch.Tensor, budget: int | None, policy: str = "selective"
) -> tuple[float, int]:
    """Loss of ``x, y`` ``[N, T]`` read through ``SelectiveCache(budget, policy=policy)``: the first token is the
    prompt, then every token is decoded one at a time against the pruned cache, exactly as
    ``generate`` would (teacher-forced). Returns ``(loss, KV bytes of one window's cache at the end)``
    (every allocated key/value slot: with a budget b, b slots per layer; the per-slot bookkeeping, accumulated F
    and position, is not counted)."""
    from selective_attention.hf import SelectiveCache, cache_keyword

    model.eval()
    cache = SelectiveCache(budget=budget, policy=policy)
    kw = {cache_keyword(): cache, "use_cache": True}  # cache=, or past_key_values= in older transformers
    first = model(x[:, :1], **kw).logits
    rest = model(x[:, 1:], **kw).logits  # SelectiveCache decodes these one by one
    logits = torch.cat([first, rest], 1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    return loss, cache.kv_bytes() // x.shape[0]


def run_hf_demo(cfg: HFDemoConfig) -> dict:
    """Train, save, reload, compare and generate (module docstring); returns the report. Runs the chunked backend's
    eager CPU passes unless ``SELECTIVE_ATTENTION_NUMBA`` is set (the committed results are theirs; see the demo)."""
    with cpu_kernels.eager_passes(force=False):
        return _run_hf_demo(cfg)


def _run_hf_demo(cfg: HFDemoConfig) -> dict:
    try:
        import transformers
    except ImportError as e:
        raise SystemExit("hf-demo needs transformers: pip install 'selective-attention[hf]'") from e
    import selective_attention.hf as sa_hf

    sa_hf.register()
    if not cfg.progress:  # transformers' own bars too (saving and loading the models)
        transformers.utils.logging.disable_progress_bar()
    out = Path(cfg.out)
    check_out_dir(out, "--out")
    data = TextData.from_name(cfg.data)
    started = time.perf_counter()
    report: dict = {"config": {k: v for k, v in dataclasses.asdict(cfg).items()}, "runs": {}}
    # the tokens/s are this machine's; the losses follow its matrix products' rounding (one VM name, two chips)
    report["machine"] = {**provenance(), "transformers": transformers.__version__}
    report["date"] = datetime.date.today().isoformat()
    base = sa_hf.configure(cfg.llama_config(), memory_eps=cfg.memory_eps)
    for name, impl in [("standard", "sdpa"), ("selective", "selective")]:
        torch.manual_seed(cfg.seed)
        model = transformers.AutoModelForCausalLM.from_config(base, attn_implementation=impl)
        t0 = time.perf_counter()
        losses = train(model, data, cfg, name)
        seconds = time.perf_counter() - t0
        model.save_pretrained(out / name)
        report["runs"][name] = {
            "train_loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": seconds,
            "tokens_per_s": cfg.steps * cfg.batch_size * cfg.context_len / seconds,
            "params": sum(p.numel() for p in model.parameters()),
        }
    # reload from disk, as a user would, and evaluate on held-out windows
    x, y = next(data.eval_batches("val", cfg.eval_windows, cfg.context_len, max_batches=1))
    auto = transformers.AutoModelForCausalLM
    std = auto.from_pretrained(out / "standard", attn_implementation="sdpa")
    sel = auto.from_pretrained(out / "selective", attn_implementation="selective")
    report["val_loss"] = {"standard": full_loss(std, x, y), "selective": full_loss(sel, x, y)}
    full, _ = pruned_loss(sel, x, y, None)
    c = sel.config  # a full cache stores every token: T slots of k and v per layer (fp32)
    head_dim = c.hidden_size // c.num_attention_heads
    full_kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4 * x.shape[1]
    # the baselines at the same memory: the standard model (its weights under "selective" with no selecting layer:
    # F = 0, standard attention) through a sliding window and H2O-style heavy hitters
    base_cfg = sa_hf.configure(transformers.AutoConfig.from_pretrained(out / "standard"), layers=[])
    std_cached = auto.from_pretrained(out / "standard", config=base_cfg, attn_implementation="selective")
    std_full, _ = pruned_loss(std_cached, x, y, None)  # every token kept: no policy evicts
    # and the control for the eviction rule itself: the selective model through a sliding window (what F adds)
    rows = [{"budget": "full", "loss": full, "kv_bytes": full_kv, "selective_window": full, "window": std_full,
             "h2o": std_full}]  # fmt: skip
    for b in cfg.budgets:
        loss, kv = pruned_loss(sel, x, y, b)
        sel_window, _ = pruned_loss(sel, x, y, b, policy="window")
        window, _ = pruned_loss(std_cached, x, y, b, policy="window")
        h2o, _ = pruned_loss(std_cached, x, y, b, policy="h2o")
        rows.append({"budget": b, "loss": loss, "kv_bytes": kv, "selective_window": sel_window, "window": window,
                     "h2o": h2o})  # fmt: skip
    report["pruned"] = rows
    ids = ByteTokenizer().encode(PROMPT)[None]
    budget = min(cfg.budgets)
    cache = sa_hf.SelectiveCache(budget=budget)
    gen = sel.generate(ids, **{sa_hf.cache_keyword(): cache}, max_new_tokens=120, do_sample=False)
    report["generated"] = {
        "budget": budget,
        "text": ByteTokenizer().decode(gen[0]),
        "occupancy": cache.occupancy(),
        "kv_bytes": cache.kv_bytes(),
    }
    report["seconds"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=2))
    md = table(report)
    (out / "report.md").write_text(md)
    print(md)
    return report


def _short(commit: str | None) -> str:
    """A commit as :func:`~selective_attention.machine.commit` gives it, its hash cut to 10 characters."""
    if commit is None:
        return "unknown (not a git checkout)"
    sha, plus, state = commit.partition("+")
    return sha[:10] + plus + state


def table(report: dict) -> str:
    """The report as markdown."""
    cfg, runs, val = report["config"], report["runs"], report["val_loss"]
    m = report.get("machine")
    lines = []
    if m is not None:  # (reports written before it was recorded have none)
        took = report.get("seconds")
        lines += [
            f"`selective-attention hf-demo` on {m['cpu']} (family/model/stepping {m['cpu_signature']}; {m['cores']} "
            f"cores, torch {m['torch']}, transformers {m['transformers']}), commit {_short(m['commit'])}"
            + ("" if took is None else f", {int(took // 60)} min {int(took % 60)} s")
            + ("" if report.get("date") is None else f", {report['date']}")
            + ":",
            "",
        ]
    lines += [
        f"Llama-style, {cfg['n_layers']} layers, hidden {cfg['hidden_size']}, {cfg['n_heads']} query / "
        f"{cfg['n_kv_heads']} key-value heads, {runs['standard']['params']:,} parameters, {cfg['steps']} steps of "
        f"{cfg['batch_size']}x{cfg['context_len']} byte tokens ({cfg['data']}); saved, reloaded with "
        "`from_pretrained`, evaluated on held-out windows.",
        "",
        "| model | attn_implementation | held-out loss (nats/byte) | training tokens/s |",
        "|---|---|---|---|",
        f"| standard | sdpa | {val['standard']:.4f} | {runs['standard']['tokens_per_s']:,.0f} |",
        f"| selective | selective | {val['selective']:.4f} | {runs['selective']['tokens_per_s']:,.0f} |",
        "",
        "Held-out loss read through `SelectiveCache(budget=b)` (one token at a time, as `generate` does): the "
        "selective model evicting by F and, the control for that rule, through a sliding window "
        '(`policy="window"`); the baselines at the same memory, the standard model with a sliding window and H2O '
        f'(`policy="h2o"`); the standard model\'s full-cache loss is {val["standard"]:.4f}:',
        "",
        "| per-layer budget | selective (F) | selective + window | standard + window | standard + H2O "
        "| KV bytes per sequence | KV vs a full cache (every token) |",
        "|---|---|---|---|---|---|---|",
    ]
    full_kv = report["pruned"][0]["kv_bytes"]
    for r in report["pruned"]:
        base = " | ".join(f"{r[p]:.4f}" for p in ("selective_window", "window", "h2o"))
        lines.append(
            f"| {r['budget']} | {r['loss']:.4f} | {base} | {r['kv_bytes']:,} | {r['kv_bytes'] / full_kv:.3f}x |"
        )
    g = report["generated"]
    lines += ["", f"`generate` with `SelectiveCache(budget={g['budget']})` (greedy), occupancy {g['occupancy']}:", ""]
    lines += ["```", g["text"], "```", ""]
    return "\n".join(lines)
