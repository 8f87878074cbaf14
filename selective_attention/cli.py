"""The ``selective-attention`` command (also ``python -m selective_attention``).

Every subcommand's options are the fields of a dataclass (:mod:`selective_attention.options` turns them into
argparse options and ``--help``): ``train`` takes :class:`~selective_attention.train.TrainConfig` (its
``model``, a ``GPTConfig``, flattened: ``--n_layer`` beside ``--lr``), ``demo``
:class:`~selective_attention.demo.DemoConfig`, and ``eval``, ``generate``, ``bench``, ``seed-example`` the
option classes below.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .attention import SelectiveAttention
from .machine import cpu_model
from .options import (
    OptionParser,
    UsageError,
    add_options,
    build,
    finite_number,
    help_formatter,
    int_at_least,
    non_negative_int,
    normalise_argv,
    option_strings,
    path_text,
    positive_int,
    refuse_unknown,
    seed_int,
    values_of,
)

__all__ = ["main", "demo", "seed_example"]


# --- the subcommands' options ------------------------------------------------------------------------
_threshold = finite_number(positive=False, hint="; omit --threshold to evict by --budget only")  # as check_policy
_temperature = finite_number(positive=False, hint="; 0 = greedy")
_top_k = int_at_least(1, hint="; omit --top_k to sample from every token")
BUDGET_HELP = "KV budget: one int, or one per layer: 32,16,16,8 (none in the list, or omitted: the whole context)"
POLICY_CHOICES = ("selective", "window", "h2o")  # kv_cache.POLICIES (the CLI loads lazily; a test keeps them equal)


def _one_of(choices: Sequence[str]):
    """An argparse ``type``: one of ``choices``; argparse reports another naming the option and the choices."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}; got {text!r}")
        return text

    parse.metavar = "{" + ",".join(choices) + "}"
    return parse


# the eviction options of `eval` and `generate`
POLICY_OPTION = {
    "type": _one_of(POLICY_CHOICES),
    "help": "which token a full layer evicts (never the first): selective = the largest penalty F (the paper), "
    "window = the oldest (StreamingLLM-style), h2o = the least attention received, outside a recent window "
    "(H2O-style)",
}
RECENT_OPTION = {"type": positive_int, "help": "--policy=h2o: the recent window, newest included (omit: budget/2)"}


@dataclass
class EvalOptions:
    ckpt: str = field(metadata={"type": path_text, "help": "a run folder or a .safetensors checkpoint"})
    data: str | None = None  # the corpus to evaluate on (omit: the one the model was trained on)
    budget: str | None = field(default=None, metadata={"help": BUDGET_HELP})
    threshold: float | None = field(
        default=None,
        metadata={"type": _threshold, "help": "evict tokens whose penalty exceeds this (--policy=selective only)"},
    )
    policy: str = field(default="selective", metadata=POLICY_OPTION)
    recent: int | None = field(default=None, metadata=RECENT_OPTION)
    context_len: int | None = field(
        default=None, metadata={"type": positive_int, "help": "tokens per window (omit: the model's)"}
    )
    batch_size: int = field(default=8, metadata={"type": positive_int, "help": "windows (or examples) per batch"})
    batches: int = field(default=4, metadata={"type": positive_int, "help": "batches to evaluate"})
    json: bool = False  # print one JSON object


@dataclass
class GenerateOptions:
    ckpt: str = field(metadata={"type": path_text, "help": "a run folder or a .safetensors checkpoint"})
    prompt: str = "In the beginning"  # the text to continue
    max_new_tokens: int | None = field(
        default=None,
        metadata={"type": non_negative_int, "help": "tokens to generate (omit: 200, or as many as fit the context)"},
    )
    temperature: float = field(default=0.8, metadata={"type": _temperature, "help": "sampling temperature; 0 = greedy"})
    top_k: int | None = field(
        default=None, metadata={"type": _top_k, "help": "sample from the k likeliest tokens (omit: from all)"}
    )
    budget: str | None = field(default=None, metadata={"help": BUDGET_HELP})
    threshold: float | None = field(
        default=None,
        metadata={"type": _threshold, "help": "evict tokens whose penalty exceeds this (--policy=selective only)"},
    )
    policy: str = field(default="selective", metadata=POLICY_OPTION)
    recent: int | None = field(default=None, metadata=RECENT_OPTION)
    seed: int = field(default=0, metadata={"type": seed_int, "help": "sampling seed"})
    compile: bool = False  # compile the decoding step (a few seconds; pays off with --budget)


@dataclass
class BenchOptions:
    lengths: list[int] = field(
        default_factory=lambda: [256, 1024], metadata={"type": positive_int, "help": "sequence lengths"}
    )
    repeats: int = field(default=3, metadata={"type": positive_int, "help": "timed runs per length (the median)"})


@dataclass
class SeedExampleOptions:
    seed: int = field(default=0, metadata={"type": seed_int, "help": "seed of the random Q, K, V"})


@dataclass
class DemoMode:
    quick: bool = False  # a ~1 minute version: a tiny model, few steps (its defaults replace the ones listed)


def _grid(weights: torch.Tensor, labels: Sequence[str]) -> str:
    """Render a ``(Lq, Lk)`` weight matrix as text: a row per query, a column per key, 'x' = removed."""
    w = weights.detach().float().cpu()
    width = max(len(s) for s in labels)
    lines = [" " * (width + 3) + " ".join(f"{s:>4}" for s in labels) + "   <- keys"]
    for i, row in enumerate(w):
        cells = ["   x" if val == 0.0 else f"{val:4.2f}" for val in row.tolist()]
        lines.append(f"{labels[i]:>{width}} | " + " ".join(cells))
    return "\n".join(lines)


def demo(seed: int = 0) -> None:
    """Run the seed README's usage example, then show which keys each query attends to."""
    torch.manual_seed(seed)
    d_model, n_heads, batch_size, seq_len = 512, 8, 32, 64
    Q = torch.randn(batch_size, seq_len, d_model)
    K = torch.randn(batch_size, seq_len, d_model)
    V = torch.randn(batch_size, seq_len, d_model)
    # The seed's mask, verbatim: -inf above the diagonal. Under our rule any infinite entry removes
    # the key, so this is a causal mask.
    selective_mask = (
        torch.triu(torch.ones((seq_len, seq_len), dtype=torch.bool) * float("-inf"), diagonal=1)
        .unsqueeze(0)
        .unsqueeze(1)
        .expand(batch_size, n_heads, seq_len, seq_len)
    )
    attn = SelectiveAttention(d_model, n_heads).eval()
    with torch.no_grad():
        out = attn(Q, K, V, selective_mask=selective_mask)
    print("== The seed's usage example ==")
    print(f"output shape {tuple(out.shape)}  (batch_size, seq_len, d_model)")

    # A small sentence, self-attention, causal plus a selective penalty F on one token.
    words = "the cat sat on the mat".split()
    L = len(words)
    x = torch.randn(1, L, d_model)
    small = SelectiveAttention(d_model, n_heads, dropout=0.0).eval()
    F_mask = torch.zeros(L, L).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("inf"))
    F_mask[3:, 1] = 4.0  # 'cat' penalised by 4 nats for every query from 'on' on
    with torch.no_grad():
        _, w_causal = small(x, x, x, is_causal=True, need_weights=True)
        _, w_sel = small(x, x, x, selective_mask=F_mask, need_weights=True)
    print("\n== Which keys each query attends to (head 0 weights; x = removed, weight exactly 0) ==")
    print("causal only:")
    print(_grid(w_causal[0, 0], words))
    print("\ncausal + F = 4 on 'cat' for queries 'on' onwards (its weight drops by e^-4):")
    print(_grid(w_sel[0, 0], words))
    ratio = (w_sel[0, :, 3:, 1] / w_causal[0, :, 3:, 1]).mean()
    print(f"\nmean weight ratio on 'cat' after F: {ratio.item():.4f} (before renormalisation e^-4 = 0.0183)")


def seed_example(seed: int = 0) -> None:
    """The seed README's usage example and a picture of which keys each query attends to."""
    demo(seed=seed)


def _budget_arg(text: str | None) -> int | list[int | None] | None:
    """``--budget``: ``"32"`` -> 32, ``"32,16,16,8"`` -> one budget per layer (``none`` in the list: that layer keeps
    the whole context), ``None``/``""`` -> no budget."""
    if text is None or text.strip() == "":
        return None
    usage = (
        "--budget expects one int or a comma-separated list, one per layer, of ints or none (that layer unpruned), "
        "e.g. 32 or 32,16,16,8 or none,16,16,8"
    )
    try:
        parts = [None if p.strip().lower() == "none" else int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"{usage}; got {text!r}.") from None
    if all(b is None for b in parts):  # nothing pruned anywhere: no budget
        return None
    small = [b for b in parts if b is not None and b < 2]
    if small:
        # a budget b stores at most b tokens per layer, the newest included, and the first is never evicted
        raise ValueError(
            f"--budget must be >= 2 in every layer (the first token plus the newest one); got {text!r}. "
            f"Omit --budget to keep the whole context."
        )
    return parts[0] if len(parts) == 1 else parts


def _check_budget(budget: int | list[int] | None, model) -> None:
    """One budget for every layer or one per layer, each at most the model's context_len: a layer never
    attends to more tokens than that (reading longer windows or generating past it needs budgets within
    it), and a budget allocates its slots up front (10^8 would be gigabytes of nothing)."""
    n_layer, ctx = model.config.n_layer, model.config.context_len
    if isinstance(budget, list) and len(budget) != n_layer:
        raise ValueError(
            f"--budget has {len(budget)} values but the model has {n_layer} layers; "
            f"give one int for all layers or {n_layer} comma-separated ints."
        )
    big = [b for b in (budget if isinstance(budget, list) else [budget]) if b is not None and b > ctx]
    if big:
        raise ValueError(
            f"--budget {big[0]} exceeds the model's context_len={ctx}: a layer never needs more slots than "
            f"that (and a budget allocates its slots up front); use --budget <= {ctx}, or omit --budget to keep "
            f"the whole context."
        )


def _selects(model) -> bool:
    """Whether any layer computes F (without one, F = 0 everywhere)."""
    return any(b.attn.selects for b in model.blocks)


_EXP_MAX = math.log(sys.float_info.max)  # ~709.78: math.exp overflows beyond


def cmd_eval(args: EvalOptions) -> dict:
    from .budget_search import pruned_logits, pruned_slots
    from .checkpoint import malformed_text_record, model_from_checkpoint
    from .decoding import budgets_fit
    from .kv_cache import check_policy, check_threshold_applies, h2o_recent
    from .train import Task, TrainConfig, evaluate

    budget = _budget_arg(args.budget)
    check_policy(args.policy, args.threshold, args.recent, budget=budget)  # before loading anything
    model, meta = model_from_checkpoint(args.ckpt)
    _check_budget(budget, model)
    check_threshold_applies(args.threshold, _selects(model), cli=True)
    ctx = model.config.context_len
    prunes = budget is not None or args.threshold is not None
    if args.context_len is not None and args.context_len > ctx and not budgets_fit(budget, ctx):
        raise ValueError(
            f"--context_len {args.context_len} exceeds the model's context_len={ctx}; use --context_len <= {ctx}, "
            f"or pass --budget <= {ctx} (for every layer; a --threshold alone does not bound what a layer attends "
            f"to) to read longer windows through a pruned cache."
        )
    # The data exactly as training built it (same corpus, split, varassign streams), read through train.py.
    try:
        tc = TrainConfig.from_dict(meta["train_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint {args.ckpt} holds a training config this code refuses ({e}): it was edited or written by "
            f"other code; restore it from a copy, or retrain."
        ) from None
    tc = dataclasses.replace(tc, batch_size=args.batch_size, eval_batches=args.batches)
    if args.data is not None and args.data != tc.data:
        if args.data == "varassign" and tc.tokenizer == "bpe":
            raise ValueError(
                f"--data=varassign: this checkpoint reads {meta['tokenizer'].vocab_size}-token BPE, and varassign is a "
                "task of its own characters; evaluate it on a text (--data=kjv, pydoc or a file)."
            )
        # training options of the checkpoint's data that do not apply to the other data: dropped, not refused
        curriculum = dict(va_assign_start=0, va_ramp_steps=0, va_hold_steps=0) if args.data != "varassign" else {}
        tc = dataclasses.replace(tc, data=args.data, **curriculum)
    if args.data is None and malformed_text_record(meta):
        raise ValueError(
            f"checkpoint {args.ckpt}'s record of its training text ({meta['extra']['data']!r}) is not as training "
            f"writes it (its source, path and sha256): it was edited or written by other code. Pass the text to "
            f"evaluate on with --data, or restore the checkpoint from a copy."
        )
    stored = meta["extra"].get("data")  # the training text's record (checkpoints before it: none)
    if args.data is None and stored is not None and stored["path"] is not None:
        if not Path(stored["path"]).is_file():
            raise ValueError(
                f"checkpoint {args.ckpt} was trained on the file {stored['path']}, which is not there any more (moved "
                f"or deleted): pass --data=<its new path> (eval reports whether its sha256 is the training text's, "
                f"{stored['sha256'][:12]}...: training_text), or --data=<another text> to evaluate on that one "
                "knowingly."
            )
        tc = dataclasses.replace(tc, data=stored["path"])  # the file trained on, wherever eval runs from
    # varassign fixes the length of its examples; a text is cut into windows of --context_len
    T = ctx if tc.data == "varassign" else args.context_len or ctx
    tc = dataclasses.replace(tc, model=dataclasses.replace(tc.model, context_len=T))
    task = Task(tc, tokenizer=meta["tokenizer"])  # the checkpoint's tokenizer (byte level for older ones)
    T = task.val_task.seq_len if task.varassign else T
    if args.data is None and stored is not None and task.data is not None and task.data["sha256"] != stored["sha256"]:
        raise ValueError(
            f"this checkpoint was trained on {stored['path'] or stored['source']} (sha256 {stored['sha256'][:12]}...), "
            f"and {tc.data!r} now reads another text (sha256 {task.data['sha256'][:12]}...): its validation split is "
            f"not the one held out in training. Pass --data=<the training file>, or --data={tc.data} to evaluate on "
            f"this text knowingly."
        )
    if task.varassign and args.context_len not in (None, T):
        raise ValueError(
            f"--context_len does not apply to varassign: every example is {T} tokens "
            f"(va_assign={tc.va_assign}); omit --context_len."
        )
    occupancy = []

    def pruned(x: torch.Tensor) -> torch.Tensor:  # the most tokens a layer held at any step of any batch
        logits, occ = pruned_logits(model, x, budget=budget, threshold=args.threshold, policy=args.policy,
                                    recent=args.recent)  # fmt: skip
        occupancy[:] = [max(a, b) for a, b in zip(occupancy, occ)] if occupancy else occ
        return logits

    scores = evaluate(model, task, torch.device("cpu"), logits_fn=pruned if prunes else None)
    occupancy = occupancy or None
    loss = scores["val_loss"]
    if not math.isfinite(loss):  # (JSON has no NaN: a strict reader refuses the line)
        raise ValueError(
            f"checkpoint {args.ckpt} (step {meta['step']}) gives a validation loss of {loss}: its forward overflows "
            "(a diverged run's model). Evaluate an earlier checkpoint, or retrain with a lower --lr."
        )
    out = {"checkpoint": str(args.ckpt), "step": meta["step"], "data": tc.data, "val_loss": loss}
    # whether this is the text trained on (its held-out split), where the checkpoint's record of it is well formed
    if stored is not None and task.data is not None and not malformed_text_record(meta):
        out["training_text"] = task.data["sha256"] == stored["sha256"]
        if not out["training_text"]:
            out["note_data"] = (
                f"not the text this checkpoint was trained on ({stored['path'] or stored['source']}, sha256 "
                f"{stored['sha256'][:12]}...): its validation split is not the one held out in training"
            )
    if "val_accuracy" in scores:
        out["val_accuracy"] = scores["val_accuracy"]
    # exp(loss) beyond float's range (a loss above ~709 nats): none, and why
    out["perplexity"] = math.exp(loss) if loss < _EXP_MAX else None
    if out["perplexity"] is None:
        out["note_perplexity"] = f"exp(val_loss) = exp({loss:.4g}) exceeds a float's range"
    windows, targets, n_bytes = _scored(task)
    if tc.data != "varassign":  # bits per byte of text: the loss per token over the bytes per target token
        out["bits_per_byte"] = loss * targets / n_bytes / math.log(2)
    out["tokenizer"] = task.tokenizer.kind
    out.update({"windows": windows, "targets": targets})  # what the loss is over
    if windows < args.batch_size * args.batches:  # a short split holds fewer windows than asked for
        asked = args.batch_size * args.batches
        out["note_windows"] = f"the split holds {windows} windows, fewer than --batch_size x --batches = {asked}"
    out.update({"context_len": T, "budget": budget, "threshold": args.threshold})
    if prunes:
        out["policy"] = args.policy
        if args.policy == "selective" and not _selects(model):
            out["note"] = "no selective layer: F = 0, so the oldest token goes (as with policy window)"
        if args.policy == "h2o":
            # the window each layer used (its budget // 2 unless --recent; None: a layer without a budget)
            per_layer = budget if isinstance(budget, list) else [budget] * model.config.n_layer
            out["recent"] = [h2o_recent(b, args.recent) for b in per_layer]
    if occupancy is not None:  # the peak: every slot a step stored and attended
        out["kv_tokens_per_layer"] = occupancy
        # what the decoder's static buffers allocated: a threshold alone saves no memory with them
        out["kv_slots_per_layer"] = pruned_slots(model, T, budget=budget, threshold=args.threshold,
                                                 policy=args.policy, recent=args.recent)  # fmt: skip
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>22}: {v:.4f}" if isinstance(v, float) else f"{k:>22}: {v}")
    return out


def _scored(task) -> tuple[int, int, int]:
    """``(windows, targets, bytes)`` of ``task``'s evaluation batches: the rows, the target tokens, and the bytes
    of text those targets stand for (byte level: one each; ``<bos>`` is never a target)."""
    per_token = task.tokenizer.token_bytes()
    windows = n_tokens = n_bytes = 0
    for _, y, _ in task.eval_batches():
        t = y[y != -100]
        windows, n_tokens, n_bytes = windows + y.shape[0], n_tokens + t.numel(), n_bytes + int(per_token[t].sum())
    return windows, n_tokens, n_bytes


def cmd_generate(args: GenerateOptions) -> str:
    from .checkpoint import model_from_checkpoint
    from .decoding import Decoder, budgets_fit
    from .kv_cache import check_policy, check_threshold_applies

    budget = _budget_arg(args.budget)
    check_policy(args.policy, args.threshold, args.recent, budget=budget)  # before loading anything
    if args.prompt == "":
        raise ValueError("--prompt must not be empty: give at least one character to continue.")
    model, meta = model_from_checkpoint(args.ckpt)
    tok = meta["tokenizer"]  # the checkpoint's: bytes, or BPE with <bos> first (as every training window)
    try:
        args.prompt.encode("utf-8")  # (a BPE tokenizer raises a TypeError of its own on them)
        idx = tok.encode_prompt(args.prompt)[None]  # [1, T]
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise ValueError(
            f"--prompt holds characters that are not valid UTF-8 text ({e.reason} at position {e.start}); "
            "give the prompt as UTF-8 text."
        ) from None
    _check_budget(budget, model)
    check_threshold_applies(args.threshold, _selects(model), cli=True)
    ctx = model.config.context_len
    if args.max_new_tokens is None:  # 200, or what fits: past the context only a budget within it can go
        # the last token is sampled from the logits of a full context, not attended
        fits = 200 if budgets_fit(budget, ctx) else ctx - idx.shape[1] + 1
        if fits <= 0:
            raise ValueError(
                f"the prompt ({idx.shape[1]} tokens) is longer than the model's context_len={ctx}: shorten it, or "
                f"pass --budget <= {ctx} (every layer) to read and generate past the context through a pruned cache."
            )
        args = dataclasses.replace(args, max_new_tokens=min(200, fits))
    last = idx.shape[1] + args.max_new_tokens - 1  # the most tokens a step attends to without eviction
    if args.threshold is not None and not budgets_fit(budget, ctx) and last > ctx:
        # the library checks each step and would stop partway, the text generated so far lost: refuse up front
        raise ValueError(
            f"the prompt ({idx.shape[1]} tokens) + --max_new_tokens {args.max_new_tokens} - 1 (the last is sampled, "
            f"not attended) exceed context_len={ctx}, and a --threshold alone does not bound what a layer attends to; "
            f"add --budget <= {ctx}, or generate at most {ctx - idx.shape[1] + 1} tokens."
        )
    dec = Decoder(model, budget=budget, threshold=args.threshold, policy=args.policy, recent=args.recent,
                  compile=args.compile)  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    never = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []  # <bos> starts a text, never follows
    out = dec.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=gen,
                       suppress_tokens=never)  # fmt: skip
    text = tok.decode(out[0])  # the prompt and what follows, without <bos>
    print(text)
    if budget is not None or args.threshold is not None:  # --threshold 0 prunes too
        kv = f"KV bytes (all slots): {sum(dec.kv_bytes()):,}"
        print(f"\n[tokens attended per layer at the last step: {dec.occupancy()}, {kv}]", file=sys.stderr)
    return text


def cmd_bench(args: BenchOptions) -> None:
    """A quick benchmark that needs only the package: paper mode vs standard attention, fwd+bwd."""
    import statistics
    import time

    import torch.nn.functional as F

    from .functional import selective_attention

    print(
        f"B1 H8 D64 fp32, forward+backward, median of {args.repeats} rounds (the ratio: median of the per-round "
        f"ratios, order alternating) - {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| L | standard (SDPA causal) | selective, paper mode | ratio |\n|---|---|---|---|")
    for L in args.lengths:
        q, k, v = (torch.randn(1, 8, L, 64, requires_grad=True) for _ in range(3))
        g = torch.randn(1, 8, L, 64)
        fns = {
            "std": lambda q=q, k=k, v=v, g=g: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g),
            "sel": lambda q=q, k=k, v=v, g=g: selective_attention(q, k, v, selection=True).backward(g),
        }
        times = {n: [] for n in fns}
        for f in fns.values():
            f()
        for r in range(args.repeats):
            for n in ("std", "sel") if r % 2 == 0 else ("sel", "std"):
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
        a, b = statistics.median(times["std"]), statistics.median(times["sel"])
        ratio = statistics.median(s / t for s, t in zip(times["sel"], times["std"]))
        print(f"| {L} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {ratio:.2f}x |", flush=True)


def _commands() -> dict:
    """``{name: (help, [(options class, base, add_options keywords)], run)}``, in --help order; ``run`` takes the
    options given on the command line, a dict per options class."""
    from .demo import DemoConfig
    from .hf_demo import HFDemoConfig
    from .train import TRAIN_OPTIONS, TrainConfig

    return {
        "demo": (
            "train standard vs selective, compare, show the memory saving (~10 min)",
            [(DemoMode, None, {}), (DemoConfig, DemoConfig(), {})],
            cmd_demo,
        ),
        "seed-example": (
            "run the seed README's example and show the keys each query sees",
            [(SeedExampleOptions, None, {})],
            lambda given: seed_example(build(SeedExampleOptions, given).seed),
        ),
        "train": (
            "train a model: every TrainConfig field is an option, the model's beside the others (--selection=true)",
            [(TrainConfig, TrainConfig(), TRAIN_OPTIONS)],
            lambda given: cmd_train(TrainConfig.from_options(given)),
        ),
        "eval": (
            "validation loss / perplexity of a checkpoint, optionally with a pruned cache",
            [(EvalOptions, None, {})],
            lambda given: cmd_eval(build(EvalOptions, given)),
        ),
        "generate": (
            "continue a prompt with a trained checkpoint",
            [(GenerateOptions, None, {})],
            lambda given: cmd_generate(build(GenerateOptions, given)),
        ),
        "hf-demo": (
            "Hugging Face: train a Llama-style GQA model with attn_implementation='selective' and 'sdpa', "
            "save, reload, compare, generate with SelectiveCache (needs the [hf] extra; ~2.5 min on 2 cores, "
            "--quick under one)",
            [(DemoMode, None, {}), (HFDemoConfig, HFDemoConfig(), {})],
            cmd_hf_demo,
        ),
        "bench": (
            "quick speed check: paper mode vs standard attention",
            [(BenchOptions, None, {})],
            lambda given: cmd_bench(build(BenchOptions, given)),
        ),
    }


def cmd_demo(mode: dict, given: dict) -> None:
    """``demo``: DemoConfig's options over its defaults, or over the quick run's with --quick."""
    from .demo import DemoConfig, run_demo

    base = DemoConfig.quick() if build(DemoMode, mode).quick else DemoConfig()
    cfg = build(DemoConfig, given, base)
    if "bpe_vocab_size" in given and cfg.tokenizer != "bpe":  # as train refuses it (inert_fields)
        raise ValueError(f"--bpe_vocab_size={given['bpe_vocab_size']!r} would be ignored: it applies to "
                         "--tokenizer=bpe; drop it, or pass --tokenizer=bpe.")  # fmt: skip
    run_demo(cfg)


def cmd_hf_demo(mode: dict, given: dict) -> None:
    """``hf-demo``: HFDemoConfig's options over its defaults, or over the quick run's with --quick."""
    from .hf_demo import HFDemoConfig, run_hf_demo

    base = HFDemoConfig.quick() if build(DemoMode, mode).quick else HFDemoConfig()
    run_hf_demo(build(HFDemoConfig, given, base))


def cmd_train(cfg) -> None:
    from .train import main as train_main

    summary = train_main(cfg)
    # one write per line: under torchrun every rank prints its summary to the same pipe, and print's
    # separate writes of the text and the newline could interleave two ranks' lines
    sys.stdout.write(json.dumps({k: v for k, v in summary.items() if k != "history"}) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """This package's own warnings as one line each, ``warning: <message>``, like its errors (not Python's
    ``file:line: UserWarning: ...`` and the source line, which tell a command-line user nothing); others' warnings
    keep their place in the code."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = default


def main(argv: Sequence[str] | None = None) -> int:
    parser = OptionParser(
        prog="selective-attention", description="Selective attention for PyTorch.", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OptionParser)
    commands, subparsers = _commands(), {}
    for name, (text, option_classes, _) in commands.items():
        p = sub.add_parser(name, help=text, description=text, allow_abbrev=False, formatter_class=help_formatter)
        subparsers[name] = (p, [add_options(p, cls, base, **kw) for cls, base, kw in option_classes])
    known = option_strings(parser, *(p for p, _ in subparsers.values()))
    argv = normalise_argv(sys.argv[1:] if argv is None else argv, known)
    try:
        ns, unknown = parser.parse_known_args(argv)
        p, option_classes = subparsers[ns.command]
        early = [a for a in argv[: argv.index(ns.command)] if a in unknown]
        if early:
            raise UsageError(
                f"{early[0]} comes before the command; options go after it: selective-attention {ns.command} "
                f"{' '.join(early)} ...",
                parser,
            )
        refuse_unknown(p, unknown)
        values = [values_of(ns, names) for names in option_classes]
    except UsageError as e:  # the usage of the (sub)command and argparse's message, as argparse prints them
        (e.parser or parser).print_usage(sys.stderr)
        print(f"{(e.parser or parser).prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
        with _warnings_as_lines():
            commands[ns.command][2](*values)
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so that the exit's flush cannot fail again)
        return 141  # 128 + SIGPIPE
    except UnicodeEncodeError as e:  # (prompts are checked where they are read): printing in a narrow encoding
        print(
            f"error: the output holds characters that stdout's encoding ({sys.stdout.encoding}) cannot write "
            f"({e.reason}); set PYTHONIOENCODING=utf-8 (or a UTF-8 locale) and run again.",
            file=sys.stderr,
        )
        return 2
    except (ValueError, FileNotFoundError, ModuleNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback (train has said what its checkpoint holds)
        return 130  # 128 + SIGINT
    except RuntimeError as e:
        if type(e).__name__ != "CheckpointError":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
