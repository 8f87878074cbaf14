"""The ``selective-attention`` command (also ``python -m selective_attention``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence

import torch

from .attention import SelectiveAttention

__all__ = ["main", "demo", "seed_example"]


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


def _budget_arg(text: str | None) -> int | list[int] | None:
    """``--budget``: ``"32"`` -> 32, ``"32,16,16,8"`` -> one budget per layer, ``None``/``""`` -> no budget."""
    if text is None or text.strip() == "":
        return None
    usage = "--budget expects one int or a comma-separated list of ints, one per layer, e.g. 32 or 32,16,16,8"
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"{usage}; got {text!r}.") from None
    small = [b for b in parts if b < 2]
    if small:
        # a budget b stores at most b tokens per layer, the newest included, and the first is never evicted
        raise ValueError(
            f"--budget must be >= 2 in every layer (the first token plus the newest one); got {text!r}. "
            f"Omit --budget to keep the whole context."
        )
    return parts[0] if len(parts) == 1 else parts


def _check_budget_layers(budget: int | list[int] | None, n_layer: int) -> None:
    if isinstance(budget, list) and len(budget) != n_layer:
        raise ValueError(
            f"--budget has {len(budget)} values but the model has {n_layer} layers; "
            f"give one int for all layers or {n_layer} comma-separated ints."
        )


def _int_at_least(low: int, hint: str = ""):
    """An argparse ``type``: an int >= ``low``; argparse reports a bad one naming the option."""

    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}{hint}") from None
        if val < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}{hint}")
        return val

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _finite_float(*, positive: bool, hint: str = ""):
    """An argparse ``type``: a finite float > 0 (``positive``) or >= 0; NaN and inf are refused."""
    bound = "> 0" if positive else ">= 0"

    def parse(text: str) -> float:
        try:
            val = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}{hint}") from None
        if not math.isfinite(val) or val < 0 or (positive and val == 0):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}{hint}")
        return val

    return parse


_threshold = _finite_float(positive=True, hint="; omit --threshold to evict by --budget only")
_temperature = _finite_float(positive=False, hint="; 0 = greedy")
_top_k = _int_at_least(1, hint="; omit --top_k to sample from every token")
_tolerance = _finite_float(positive=False, hint="; 0 = the standard model's loss itself")


def cmd_eval(args) -> dict:
    from .pruning import pruned_loss
    from .train import TrainConfig, _Task, evaluate, model_from_checkpoint

    budget = _budget_arg(args.budget)
    model, meta = model_from_checkpoint(args.ckpt)
    _check_budget_layers(budget, model.config.n_layer)
    ctx = model.config.context_len
    prunes = budget is not None or args.threshold is not None
    if args.context_len is not None and args.context_len > ctx and not prunes:
        raise ValueError(
            f"--context_len {args.context_len} exceeds the model's context_len={ctx}; use --context_len <= {ctx}, "
            f"or pass --budget to read longer windows through a pruned cache."
        )
    # The data exactly as training built it (same corpus, split, varassign streams), read through train.py.
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in meta["train_config"].items() if k in names})
    tc = dataclasses.replace(tc, batch_size=args.batch_size, eval_batches=args.batches)
    if args.data is not None:
        tc = dataclasses.replace(tc, data=args.data)
    # varassign fixes the length of its examples; a text is cut into windows of --context_len
    tc = dataclasses.replace(tc, context_len=ctx if tc.data == "varassign" else args.context_len or ctx)
    task = _Task(tc)
    T = task.val_task.seq_len if task.varassign else tc.context_len
    if task.varassign and args.context_len not in (None, T):
        raise ValueError(
            f"--context_len does not apply to varassign: every example is {T} tokens "
            f"(va_assign={tc.va_assign}); omit --context_len."
        )
    occupancy = None
    if not prunes:
        scores = evaluate(model, task, torch.device("cpu"))
    else:
        losses = []
        for x, y, _ in task.eval_batches():  # y is -100 where it is not a target (varassign: all but the answer)
            loss, occupancy = pruned_loss(model, x, y, budget=budget, threshold=args.threshold)
            losses.append(loss)
        scores = {"val_loss": sum(losses) / len(losses)}
    loss = scores["val_loss"]
    out = {"checkpoint": str(args.ckpt), "step": meta["step"], "data": tc.data, "val_loss": loss}
    if "val_accuracy" in scores:
        out["val_accuracy"] = scores["val_accuracy"]
    out["perplexity"] = math.exp(loss)
    if tc.data != "varassign":  # byte tokens of a text: the loss in bits is bits per byte
        out["bits_per_byte"] = loss / math.log(2)
    out.update({"context_len": T, "budget": budget, "threshold": args.threshold})
    if occupancy is not None:
        out["kv_tokens_per_layer"] = occupancy
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>22}: {v:.4f}" if isinstance(v, float) else f"{k:>22}: {v}")
    return out


def cmd_generate(args) -> str:
    from .cache import Decoder
    from .data import ByteTokenizer
    from .train import model_from_checkpoint

    budget = _budget_arg(args.budget)
    tok = ByteTokenizer()
    idx = tok.encode(args.prompt)[None]
    if idx.shape[1] == 0:
        raise ValueError("--prompt must not be empty: give at least one character to continue.")
    model, _ = model_from_checkpoint(args.ckpt)
    _check_budget_layers(budget, model.config.n_layer)
    dec = Decoder(model, budget=budget, threshold=args.threshold, compile=args.compile)
    gen = torch.Generator().manual_seed(args.seed)
    out = dec.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=gen)
    text = tok.decode(out[0])
    print(text)
    if args.budget or args.threshold:
        print(f"\n[kept tokens per layer: {dec.occupancy()}, KV bytes: {sum(dec.kv_bytes()):,}]", file=sys.stderr)
    return text


def cmd_bench(args) -> None:
    """A quick benchmark that needs only the package: paper mode vs standard attention, fwd+bwd."""
    import statistics
    import time

    import torch.nn.functional as F

    from .functional import selective_attention

    print(f"B1 H8 D64 fp32, forward+backward, median of {args.repeats} (torch {torch.__version__})")
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
        for _ in range(args.repeats):
            for n, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t0)
        a, b = statistics.median(times["std"]), statistics.median(times["sel"])
        print(f"| {L} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {b / a:.2f}x |", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selective-attention", description="Selective attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train standard vs selective, compare, show the memory saving (~10 min)")
    p.add_argument("--quick", action="store_true", help="a ~1 minute version (tiny model, few steps)")
    p.add_argument("--out", default="demo_out", help="folder for the report and plots")
    p.add_argument("--data", default="kjv", help="kjv | pydoc | a text file")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps per model")
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        default=0.0,
        help="nats above the standard model's loss still called equal loss (default 0, the paper's; printed)",
    )
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("seed-example", help="run the seed README's example and show the keys each query sees")
    p.add_argument("--seed", type=int, default=0)

    sub.add_parser(
        "train",
        help="train a model: --key=value overrides of TrainConfig, e.g. --data=kjv --selection=true",
        add_help=False,  # --help lists TrainConfig's options instead
    )

    p = sub.add_parser("eval", help="validation loss / perplexity of a checkpoint, optionally with a pruned cache")
    p.add_argument("--ckpt", required=True, help="a run folder or a .safetensors checkpoint")
    p.add_argument("--data", default=None, help="default: the corpus the model was trained on")
    p.add_argument("--budget", default=None, help="KV budget: one int, or one per layer: 32,16,16,8")
    p.add_argument("--threshold", type=_threshold, default=None, help="evict tokens whose penalty exceeds this")
    p.add_argument("--context_len", type=_positive_int, default=None, help="default: the model's")
    p.add_argument("--batch_size", type=_positive_int, default=8)
    p.add_argument("--batches", type=_positive_int, default=4)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", default="In the beginning")
    p.add_argument("--max_new_tokens", type=_non_negative_int, default=200)
    p.add_argument("--temperature", type=_temperature, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=_top_k, default=None)
    p.add_argument("--budget", default=None, help="KV budget: one int, or one per layer: 32,16,16,8")
    p.add_argument("--threshold", type=_threshold, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile", action="store_true", help="compile the decoding step (a few seconds; pays off with --budget)"
    )

    p = sub.add_parser("bench", help="quick speed check: paper mode vs standard attention")
    p.add_argument("--lengths", type=_positive_int, nargs="+", default=[256, 1024])
    p.add_argument("--repeats", type=_positive_int, default=3)

    try:  # argparse exits on a usage error (message and usage already printed): hand back its code
        args, unknown = parser.parse_known_args(argv)
        if unknown and args.command != "train":
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "demo":
            from .demo import DemoConfig, run_demo

            kw = dict(out=args.out, data=args.data, tolerance=args.tolerance, progress=not args.no_progress)
            if args.steps is not None:
                kw["steps"] = args.steps
            run_demo(DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw))
        elif args.command == "seed-example":
            seed_example(args.seed)
        elif args.command == "train":
            from .train import TrainConfig, parse_overrides
            from .train import main as train_main

            overrides = [a for a in unknown if a != "--"]
            if any(a in ("-h", "--help") for a in overrides):
                print("options (--key=value):")
                for f in dataclasses.fields(TrainConfig):
                    print(f"  --{f.name}={f.default}")
                return 0
            summary = train_main(parse_overrides(overrides))
            print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
        elif args.command == "eval":
            cmd_eval(args)
        elif args.command == "generate":
            cmd_generate(args)
        elif args.command == "bench":
            cmd_bench(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "CheckpointError":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
