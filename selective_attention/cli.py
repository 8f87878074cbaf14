"""The ``selective-attention`` command (also ``python -m selective_attention``).

Every subcommand's options are the fields of a dataclass, turned into argparse options by one function,
:func:`add_options`: ``train`` takes :class:`~selective_attention.train.TrainConfig` (its ``model``, a
``GPTConfig``, flattened: ``--n_layer`` beside ``--lr``), ``demo`` :class:`~selective_attention.demo.DemoConfig`,
and ``eval``, ``generate``, ``bench``, ``seed-example`` the option classes below. A field ``name: T = default``
becomes ``--name VALUE`` or ``--name=VALUE``, with:

* its type from the annotation: ``bool`` takes ``--name``, ``--name=true/false`` (yes/no, 1/0), and a default-true
  one also ``--no_name``; ``X | None`` also takes ``none``; ``Sequence[int]`` is comma-separated (``0,2``);
  ``list[int]`` takes several values; ``metadata={"type": f}`` gives a parser of its own (a range check);
* its ``--help`` line from ``metadata={"help": ...}``, else the comment at the end of the field's line, and its
  default (from the instance the options override, so ``train --help`` shows the training defaults);
* dashes and underscores alike in option names (``--selection-layers`` = ``--selection_layers``).

Why argparse built from the dataclasses rather than tyro or jsonargparse: no new dependency for a command of
six subcommands, ``--help`` and usage errors in the standard form (``argument --batches: must be an int >= 1,
got '0'``), and the ``--key=value`` spelling the README and scripts use keeps working; the whole mechanism is
the few functions below. Values are checked twice on purpose: argparse checks each value's type; the config's
``__post_init__`` checks ranges and the rules across fields (``error: --n_layer=0 is invalid: ...``, exit 2).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import math
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .attention import SelectiveAttention

__all__ = ["main", "demo", "seed_example", "add_options", "parse_options", "UsageError"]


# --- options from dataclasses ------------------------------------------------------------------------
class UsageError(ValueError):
    """A bad command line (an unknown option, a value of the wrong type): argparse's message."""

    def __init__(self, message: str, parser: argparse.ArgumentParser | None = None) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of exiting, so library callers get a ValueError."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message, self)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, max_help_position=34)


def int_at_least(low: int, hint: str = ""):
    """An argparse ``type``: an int >= ``low``; argparse reports a bad one naming the option."""

    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}{hint}") from None
        if val < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}{hint}")
        return val

    parse.metavar = "INT"
    return parse


def finite_number(*, positive: bool, hint: str = ""):
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

    parse.metavar = "FLOAT"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expects true/false, got {text!r}")


def _scalar(typ: type):
    def parse(text: str):
        try:
            return typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {typ.__name__}, got {text!r}") from None

    parse.metavar = typ.__name__.upper()
    return parse


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects comma-separated ints like 0,2 (or none), got {text!r}") from None


_int_tuple.metavar = "INTS"


def _or_none(parse):
    """``parse``, and ``none`` / ``null`` / an empty value for None (an int tuple: an empty one too)."""

    def parse_optional(text: str):
        if text.strip().lower() in ("none", "null", ""):
            return None
        val = parse(text)
        return None if val == () else val

    parse_optional.metavar = getattr(parse, "metavar", "VALUE")
    return parse_optional


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """``{field: the comment at the end of its line}`` from ``cls``'s source (empty without the source)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        text = tok.string.lstrip("#").strip()
        if tok.type == tokenize.COMMENT and not text.startswith("fmt:"):
            comments[tok.start[0]] = text
    out = {}
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in comments:
            out[node.target.id] = comments[node.end_lineno]
    return out


def _show(value) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return repr(value) if value == "" else str(value)


def _option_fields(cls: type, base, flatten: Sequence[str], exclude: Sequence[str]):
    """``(field, owner class, type hint, default)`` per option of ``cls``: its own fields, and those of the nested
    dataclass fields named in ``flatten`` in their place. Fields of another type (dict, a nested dataclass not
    flattened) and those in ``exclude`` are not options."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if f.name in flatten:
            nested_base = getattr(base, f.name) if base is not None else f.default_factory()
            yield from _option_fields(hints[f.name], nested_base, (), exclude)
            continue
        if base is not None:
            default = getattr(base, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        yield f, cls, hints[f.name], default


def _argument(f: dataclasses.Field, owner: type, hint, default) -> dict | None:
    """The ``add_argument`` keywords of one field, or None for a type that is not an option."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    kw: dict = {}
    if hint is bool:
        kw.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
    elif origin is list:
        (item,) = typing.get_args(hint) or (str,)
        kw.update(nargs="+", type=_scalar(item))
    elif isinstance(origin, type) and issubclass(origin, Sequence) and origin is not str:
        kw.update(type=_int_tuple)
    elif hint in (int, float, str):
        kw.update(type=_scalar(hint))
    else:
        return None
    kw["type"] = f.metadata.get("type", kw["type"])
    kw.setdefault("metavar", getattr(kw["type"], "metavar", "VALUE"))
    if optional:
        kw["type"] = _or_none(kw["type"])
    text = f.metadata.get("help") or field_comments(owner).get(f.name, "")
    if default is dataclasses.MISSING:
        kw["required"] = True
        text += " (required)"
    elif default is not None:
        text += f" (default: {' '.join(map(str, default)) if origin is list else _show(default)})"
    kw["help"] = text.strip().replace("%", "%%")
    return kw


def add_options(
    parser: argparse.ArgumentParser, cls: type, base=None, *, flatten: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[str]:
    """Add an option per field of dataclass ``cls`` to ``parser`` (see the module docstring); the defaults shown
    are ``base``'s (default: the field defaults). Options not given are left out of the parsed namespace, so
    :func:`values_of` returns only what the command line set. Returns the option names."""
    names = []
    for f, owner, hint, default in _option_fields(cls, base, flatten, exclude):
        kw = _argument(f, owner, hint, default)
        if kw is None:
            continue
        parser.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, **kw)
        if kw["type"] is _parse_bool and default is True:
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=f"same as --{f.name}=false")  # fmt: skip
        names.append(f.name)
    return names


def values_of(ns: argparse.Namespace, names: Sequence[str]) -> dict:
    """The options of ``names`` that the command line set."""
    return {k: v for k, v in vars(ns).items() if k in names}


def build(cls: type, values: dict, base=None, *, flatten: Sequence[str] = ()):
    """A ``cls`` from option values: ``base`` (or the defaults) with ``values`` replaced, nested ones included."""
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in flatten:
            nested = typing.get_type_hints(cls)[f.name]
            sub = {k: v for k, v in values.items() if k in {g.name for g in dataclasses.fields(nested)}}
            if sub:
                kw[f.name] = build(nested, sub, getattr(base, f.name) if base is not None else None)
        elif f.name in values:
            kw[f.name] = values[f.name]
    return dataclasses.replace(base, **kw) if base is not None else cls(**kw)


def _normalise(argv: Sequence[str]) -> list[str]:
    """Option names with underscores (``--no-progress`` -> ``--no_progress``); a bare ``--`` dropped."""
    out = []
    for a in argv:
        if a == "--":
            continue
        if a.startswith("--"):
            key, eq, value = a.partition("=")
            a = "--" + key[2:].replace("-", "_") + eq + value
        out.append(a)
    return out


def _refuse_unknown(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> None:
    if not unknown:
        return
    first = unknown[0]
    if not first.startswith("--"):
        parser.error(f"expected --key=value or --key value, got {first!r}")
    key = first.partition("=")[0]
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    parser.error(f"unknown option {key}{hint}; --help lists the options")


TRAIN_OPTIONS = dict(flatten=("model",), exclude=("vocab_size",))  # the vocabulary is the data's


def parse_options(args: Sequence[str], cls: type, base=None, **kw) -> dict:
    """Parse ``args`` against the options of ``cls`` (see :func:`add_options`) -> the values given, by name;
    a bad command line is a :class:`UsageError` (a ValueError) with argparse's message."""
    parser = _Parser(prog=cls.__name__, allow_abbrev=False, formatter_class=_formatter)
    names = add_options(parser, cls, base, **kw)
    ns, unknown = parser.parse_known_args(_normalise(args))
    _refuse_unknown(parser, unknown)
    return values_of(ns, names)


def parse_train_options(args: Sequence[str]) -> dict:
    """The ``train`` command's options: TrainConfig's, the model's beside the training ones."""
    from .train import TrainConfig

    return parse_options(args, TrainConfig, TrainConfig(), **TRAIN_OPTIONS)


# --- the subcommands' options ------------------------------------------------------------------------
_threshold = finite_number(positive=True, hint="; omit --threshold to evict by --budget only")
_temperature = finite_number(positive=False, hint="; 0 = greedy")
_top_k = int_at_least(1, hint="; omit --top_k to sample from every token")
BUDGET_HELP = "KV budget: one int, or one per layer: 32,16,16,8 (omit: the whole context)"


@dataclass
class EvalOptions:
    ckpt: str  # a run folder or a .safetensors checkpoint
    data: str | None = None  # the corpus to evaluate on (omit: the one the model was trained on)
    budget: str | None = field(default=None, metadata={"help": BUDGET_HELP})
    threshold: float | None = field(
        default=None, metadata={"type": _threshold, "help": "evict tokens whose penalty exceeds this"}
    )
    context_len: int | None = field(
        default=None, metadata={"type": positive_int, "help": "tokens per window (omit: the model's)"}
    )
    batch_size: int = field(default=8, metadata={"type": positive_int, "help": "windows (or examples) per batch"})
    batches: int = field(default=4, metadata={"type": positive_int, "help": "batches to evaluate"})
    json: bool = False  # print one JSON object


@dataclass
class GenerateOptions:
    ckpt: str  # a run folder or a .safetensors checkpoint
    prompt: str = "In the beginning"  # the text to continue
    max_new_tokens: int = field(default=200, metadata={"type": non_negative_int, "help": "tokens to generate"})
    temperature: float = field(default=0.8, metadata={"type": _temperature, "help": "sampling temperature; 0 = greedy"})
    top_k: int | None = field(
        default=None, metadata={"type": _top_k, "help": "sample from the k likeliest tokens (omit: from all)"}
    )
    budget: str | None = field(default=None, metadata={"help": BUDGET_HELP})
    threshold: float | None = field(
        default=None, metadata={"type": _threshold, "help": "evict tokens whose penalty exceeds this"}
    )
    seed: int = 0  # sampling seed
    compile: bool = False  # compile the decoding step (a few seconds; pays off with --budget)


@dataclass
class BenchOptions:
    lengths: list[int] = field(
        default_factory=lambda: [256, 1024], metadata={"type": positive_int, "help": "sequence lengths"}
    )
    repeats: int = field(default=3, metadata={"type": positive_int, "help": "timed runs per length (the median)"})


@dataclass
class SeedExampleOptions:
    seed: int = 0  # seed of the random Q, K, V


@dataclass
class DemoMode:
    quick: bool = False  # a ~1 minute version: a tiny model, few steps (DemoConfig.quick)


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


def cmd_eval(args: EvalOptions) -> dict:
    from .pruning import pruned_loss
    from .train import Task, TrainConfig, evaluate, model_from_checkpoint

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
    tc = TrainConfig.from_dict(meta["train_config"])
    tc = dataclasses.replace(tc, batch_size=args.batch_size, eval_batches=args.batches)
    if args.data is not None:
        tc = dataclasses.replace(tc, data=args.data)
    # varassign fixes the length of its examples; a text is cut into windows of --context_len
    T = ctx if tc.data == "varassign" else args.context_len or ctx
    tc = dataclasses.replace(tc, model=dataclasses.replace(tc.model, context_len=T))
    task = Task(tc)
    T = task.val_task.seq_len if task.varassign else T
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


def cmd_generate(args: GenerateOptions) -> str:
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


def cmd_bench(args: BenchOptions) -> None:
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


def _commands() -> dict:
    """``{name: (help, [(options class, base, add_options keywords)], run)}``, in --help order; ``run`` takes the
    options given on the command line, a dict per options class."""
    from .demo import DemoConfig
    from .train import TrainConfig

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
    run_demo(build(DemoConfig, given, base))


def cmd_train(cfg) -> None:
    from .train import main as train_main

    summary = train_main(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


def main(argv: Sequence[str] | None = None) -> int:
    argv = _normalise(sys.argv[1:] if argv is None else argv)
    parser = _Parser(prog="selective-attention", description="Selective attention for PyTorch.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands, subparsers = _commands(), {}
    for name, (text, option_classes, _) in commands.items():
        p = sub.add_parser(name, help=text, description=text, allow_abbrev=False, formatter_class=_formatter)
        subparsers[name] = (p, [add_options(p, cls, base, **kw) for cls, base, kw in option_classes])
    try:
        ns, unknown = parser.parse_known_args(argv)
        p, option_classes = subparsers[ns.command]
        _refuse_unknown(p, unknown)
        values = [values_of(ns, names) for names in option_classes]
    except UsageError as e:  # the usage of the (sub)command and argparse's message, as argparse prints them
        (e.parser or parser).print_usage(sys.stderr)
        print(f"{(e.parser or parser).prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
        commands[ns.command][2](*values)
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
