"""Training loop: ``main(TrainConfig)`` trains a GPT (standard or selective) on a corpus.

AdamW with linear warmup and cosine decay, gradient clipping, periodic evaluation, a progress bar
with loss and tokens/s, and checkpoints in safetensors written atomically (temp file + fsync + rename)
that hold ``model.state_dict()``, ``optimizer.state_dict()`` and the RNG states with a checksum: a killed
run resumes exactly where it stopped, and only with the training config it was started with. A non-finite
loss or gradient stops the run (``TrainingDiverged``) before it can overwrite the last good checkpoint.
Launched with ``torchrun --nproc_per_node=N`` it trains data-parallel (DDP); otherwise on one
device.

``TrainConfig`` holds the model's config as ``TrainConfig.model`` (a ``GPTConfig``; its ``vocab_size`` is set
from the data at run time). On the command line its fields are options beside the training ones:

    python -m selective_attention train --data=kjv --selection=true --max_steps=600 --out_dir=runs/sel
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import (  # re-exported: the loop's public names since before checkpoint.py
    _AFRESH,
    CKPT_NAME,
    FORMAT_VERSION,
    PREVIOUS_CKPT_NAME,
    READABLE_VERSIONS,
    CheckpointError,
    _check_tokenizer_fits,
    _load_model_state,
    _load_optimizer_state,
    _model_diff,
    _nested_train_config,
    gpt_config_from_dict,
    load_checkpoint,
    malformed_text_record,
    model_from_checkpoint,
    model_state,
    optimizer_state,
    require_safetensors,
    save_checkpoint,
    tensors_checksum,
    unwritable,
)
from .data import VariableAssignment, curriculum_assign
from .model import GPT, GPTConfig, token_loss
from .options import parse_options, seed_error
from .progress import progress as progress_bar

__all__ = [
    "FORMAT_VERSION",
    "config_changes",
    "stale_results_error",
    "READABLE_VERSIONS",
    "tensors_checksum",
    "TrainConfig",
    "Task",
    "main",
    "evaluate",
    "mean_loss",
    "parse_overrides",
    "load_checkpoint",
    "save_checkpoint",
    "model_from_checkpoint",
    "gpt_config_from_dict",
    "CheckpointError",
    "TrainingDiverged",
]


def _default_model() -> GPTConfig:
    return GPTConfig(context_len=128)


@dataclass
class TrainConfig:
    data: str = "kjv"  # kjv | pydoc | varassign | a path to a UTF-8 text file
    out_dir: str = "runs/default"  # checkpoint (ckpt.safetensors) and log.jsonl go here
    # the model (GPTConfig; vocab_size is set from the data at run time). On the command line its fields are
    # options beside these: --n_layer=2 --selection=true
    model: GPTConfig = field(default_factory=_default_model)
    # optimisation
    max_steps: int = 500  # optimizer steps in all (a larger value on resume extends the run)
    batch_size: int = 16  # sequences per step (per process under DDP)
    lr: float = 3e-3  # peak learning rate, after warmup
    min_lr: float = 3e-4  # where the cosine decay ends: the rate the last step (max_steps - 1, 0-based) nears
    warmup_steps: int = 50  # linear warmup from lr / warmup_steps
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    beta1: float = 0.9  # AdamW's beta1
    beta2: float = 0.95  # AdamW's beta2
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = no clipping)
    # bookkeeping
    eval_interval: int = 100  # evaluate every this many steps (and at the end)
    eval_batches: int = 16  # validation batches per evaluation
    ckpt_interval: int = 100  # save a checkpoint every this many steps (and at the end)
    seed: int = 0  # initialisation and data order
    resume: bool = True  # continue from out_dir's checkpoint when there is one
    progress: bool = True  # show a progress bar
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    val_fraction: float = 0.1  # share of a text held out for validation (its end)
    tokenizer: str = "byte"  # byte (UTF-8 bytes, vocab 256) | bpe (trained on the training split; <bos> starts windows)
    bpe_vocab_size: int = 4096  # --tokenizer=bpe: tokens in the vocabulary, <bos> and the 256 bytes included
    va_vars: int = 8  # varassign: number of variables
    va_assign: int = 24  # varassign: assignments per example (with a curriculum: the final count, evaluated on)
    va_assign_start: int = 0  # varassign curriculum: assignments at step 0 (0 = none: va_assign from the start)
    va_ramp_steps: int = 0  # varassign curriculum: steps over which the count grows to va_assign, in equal stages
    va_hold_steps: int = 0  # varassign curriculum: steps at va_assign_start before the growth starts
    stop_after: int = 0  # > 0: stop (as if killed) after this many steps of this process; for tests
    compile: bool = False  # training steps through torch.compile: faster after a one-time compilation (first step)
    # Free to change on resume: RESUMABLE_FIELDS (max_steps extends the run; the lr schedule is recomputed for it).
    allow_config_change: bool = False  # resume even with another data, lr, batch_size, ... (else refused)

    def __post_init__(self) -> None:
        _as_text(self)
        _validate(self)

    @classmethod
    def from_options(cls, values: Mapping[str, object], base: TrainConfig | None = None) -> TrainConfig:
        """A config from flat option values, the model's fields beside the training ones (the command line's
        names): ``TrainConfig.from_options({"lr": 1e-3, "selection": True, "n_layer": 3})``. Fields not given
        come from ``base`` (default ``TrainConfig()``). Every value is checked before the model config is built,
        so a bad one is named as its option (``--n_layer=0 is invalid: it must be an int >= 1.``)."""
        base = base if base is not None else cls()
        model_names = {f.name for f in dataclasses.fields(GPTConfig)}
        own_names = {f.name for f in dataclasses.fields(cls)} - {"model"}
        unknown = sorted(set(values) - model_names - own_names)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join('--' + k for k in unknown)}; `train --help` lists the valid ones."
            )
        if "vocab_size" in values:  # (not an option of the command line)
            raise ValueError(
                f"vocab_size={values['vocab_size']!r} would be ignored: a run sets it from its tokenizer (256 for "
                "bytes; the BPE vocabulary with tokenizer='bpe', sized by bpe_vocab_size); drop it."
            )
        values = {k: (_text(v) if k in TEXT_FIELDS else v) for k, v in values.items()}
        # --out_dir=~/runs/x: the shell expands no ~ after "=", and the run went to a folder named "~" here
        values.update({k: os.path.expanduser(values[k]) for k in ("out_dir", "data")
                       if isinstance(values.get(k), str) and values[k].startswith("~")})  # fmt: skip
        _check_values({**_flat_values(base), **values})
        model = dataclasses.replace(base.model, **{k: v for k, v in values.items() if k in model_names})
        cfg = dataclasses.replace(base, model=model, **{k: v for k, v in values.items() if k in own_names})
        _refuse_ignored(values, cfg)
        return cfg

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> TrainConfig:
        """The config ``dataclasses.asdict`` stored (a checkpoint's ``train_config``; also the flat one of checkpoint
        formats 1-2). Unknown keys are dropped, missing ones take their defaults."""
        d = _nested_train_config(d)
        own = {f.name for f in dataclasses.fields(cls)} - {"model"}
        model = gpt_config_from_dict(d["model"]) if isinstance(d.get("model"), Mapping) else _default_model()
        return cls(model=model, **{k: v for k, v in d.items() if k in own})


VA_VAL_DRAW = 64  # varassign's validation examples are drawn this many at a time (then cut into batches)
# varassign's validation examples come from this seed's stream, a training rank's from seed + 1000 * rank
# (:func:`data_seed`): a run whose training stream would be the validation stream is refused
VA_VAL_SEED = 12345

# Options that may differ between a run and its resume: how long to train (the cosine schedule is recomputed
# for the new max_steps: a longer run's learning rate at the resumed step is higher than where it stopped),
# where and how to run, how often to evaluate and save. The others (data, optimisation, eval_batches, which
# sets what val_loss measures, ...) would silently mix two experiments in one history, so main() refuses them
# without --allow_config_change=true. The model is compared on its own (it must be the same, see _model_diff).
# GPTConfig fields that set how the model trains, not its weights: a resume may change them with --allow_config_change
# (checked with the training config), where another value of any other model field is another model
TRAINING_MODEL_FIELDS = ("dropout", "memory_eps", "memory_tau")
RESUMABLE_FIELDS = frozenset(
    {"max_steps", "resume", "progress", "stop_after", "out_dir", "device", "allow_config_change", "eval_interval",
     "ckpt_interval", "compile"}
)  # fmt: skip


def _flat_values(cfg: TrainConfig) -> dict[str, object]:
    """The option values of ``cfg``: the model's fields beside the training ones (as on the command line)."""
    model = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(GPTConfig)}
    return {**model, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "model"}}


def config_changes(cfg: TrainConfig, stored: Mapping, ignore: Sequence[str] = ()) -> dict[str, tuple]:
    """``{field: (stored value, cfg's value)}`` for every option (model and training fields, flat) that differs
    between ``cfg`` and ``stored`` (a ``dataclasses.asdict(TrainConfig)``, as result files keep it), but those in
    ``ignore``. A field ``stored`` lacks (added to the code since) counts as its default. For a script that keeps one
    result per config: a result file made with another config is not this run's."""

    def plain(v):  # as JSON keeps it: a tuple is a list there
        return json.loads(json.dumps(v))

    defaults = _flat_values(TrainConfig())
    flat = {**stored.get("model", {}), **{k: v for k, v in stored.items() if k != "model"}}
    old = {k: plain(flat.get(k, defaults[k])) for k in defaults}
    return {k: (old[k], v) for k, v in _flat_values(cfg).items() if k not in ignore and old[k] != plain(v)}


def stale_results_error(stale: Mapping[str, str], folder: Path) -> str:
    """The refusal of result files in ``folder`` made with another config (``{file: what differs}``, from
    :func:`config_changes`), for a report that would pair them with the others as one experiment."""
    shown = "; ".join(f"{name}: {why}" for name, why in list(stale.items())[:3])
    return (
        f"{len(stale)} result files in {folder} were made with another config than this script's ({shown}): move them "
        "away (or restore the config) before a report mixes them with the others."
    )


def _check_values(values: Mapping[str, object]) -> None:
    """Raise ValueError naming the option, its value and the valid range for the first bad value.
    GPTConfig checks its fields again, and the rules across fields (d_model % n_head, an even head dim, ...)."""

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"--{name}={values[name]!r} is invalid: it must be {rule}.")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_real(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    v = values
    for name in ("n_layer", "n_head", "d_model", "context_len", "max_steps", "batch_size", "eval_interval",
                 "eval_batches", "ckpt_interval", "va_vars", "va_assign"):  # fmt: skip
        need(is_int(v[name]) and v[name] >= 1, name, "an int >= 1")
    for name in ("warmup_steps", "stop_after", "selection_head"):
        need(is_int(v[name]) and v[name] >= 0, name, "an int >= 0")
    if v["data"] == "varassign":  # elsewhere the option is inert (a stored config may hold any value)
        need(v["va_vars"] <= 26, "va_vars", "an int in [1, 26] (the variables are the letters a-z)")
    need(is_int(v["va_assign_start"]) and 0 <= v["va_assign_start"] <= v["va_assign"], "va_assign_start",
         f"an int in [0, --va_assign={v['va_assign']}] (0 = no curriculum)")  # fmt: skip
    for name in ("va_ramp_steps", "va_hold_steps"):
        need(is_int(v[name]) and v[name] >= 0, name, "an int >= 0")
    if v["va_assign_start"]:
        need(v["va_ramp_steps"] >= 1, "va_ramp_steps", "an int >= 1 with a curriculum (--va_assign_start > 0)")
        if v["data"] != "varassign":
            raise ValueError(f"--va_assign_start={v['va_assign_start']} is a curriculum of --data=varassign; it does "
                             f"not apply to --data={v['data']}: omit it.")  # fmt: skip
    else:
        for name in ("va_ramp_steps", "va_hold_steps"):
            if v[name]:
                raise ValueError(f"--{name}={v[name]} needs a curriculum: set --va_assign_start (the assignments "
                                 f"at step 0) or omit it.")  # fmt: skip
    d_head = v["d_head"]
    need(d_head is None or (is_int(d_head) and d_head >= 1), "d_head", "an int >= 1, or none for d_model // n_head")
    if is_int(v["seed"]) and seed_error(v["seed"]):
        raise ValueError(f"--seed={v['seed']}: {seed_error(v['seed'])}.")
    need(is_int(v["seed"]), "seed", "an int in [-(2**32 - 1), 2**32 - 1]")
    need(is_real(v["lr"]) and v["lr"] > 0, "lr", "a finite number > 0")
    for name in ("min_lr", "weight_decay", "memory_eps"):
        need(is_real(v[name]) and v[name] >= 0, name, "a finite number >= 0")
    need(is_real(v["grad_clip"]) and v["grad_clip"] >= 0, "grad_clip", "a finite number >= 0 (0 = no clipping)")
    need(is_real(v["memory_tau"]) and v["memory_tau"] > 0, "memory_tau", "a finite number > 0")
    for name in ("beta1", "beta2", "dropout"):
        need(is_real(v[name]) and 0 <= v[name] < 1, name, "in [0, 1)")
    need(is_real(v["val_fraction"]) and 0 < v["val_fraction"] < 1, "val_fraction", "in (0, 1): training evaluates")
    for name in ("resume", "progress", "allow_config_change", "compile"):
        need(isinstance(v[name], bool), name, "true or false")
    for name in TEXT_FIELDS:  # (a stored data=5 failed far away, as a traceback)
        need(isinstance(v[name], str), name, "a text (a name or a path)")
    need(v["tokenizer"] in ("byte", "bpe"), "tokenizer", "byte or bpe")
    need(is_int(v["bpe_vocab_size"]) and v["bpe_vocab_size"] >= 257, "bpe_vocab_size",
         "an int >= 257 (<bos> and the 256 bytes)")  # fmt: skip
    if v["tokenizer"] == "bpe" and v["data"] == "varassign":
        raise ValueError("--tokenizer=bpe does not apply to --data=varassign: the task has its own character "
                         "vocabulary; omit --tokenizer.")  # fmt: skip


def _validate(cfg: TrainConfig) -> None:
    if not isinstance(cfg.model, GPTConfig):
        raise ValueError(
            f"TrainConfig.model must be a GPTConfig, got {type(cfg.model).__name__}; build one with "
            f"GPTConfig(...), or use TrainConfig.from_options / from_dict for flat or stored values."
        )
    _check_values(_flat_values(cfg))


TRAIN_OPTIONS = dict(flatten=("model",), exclude=("vocab_size",))  # the model's fields beside the training ones;
# the vocabulary is the data's


def parse_overrides(args: Sequence[str], base: TrainConfig | None = None) -> TrainConfig:
    """``["--lr=1e-3", "--selection=true"]`` (or ``["--lr", "1e-3"]``) -> a TrainConfig, the others from ``base``:
    the ``train`` command's options (see :mod:`selective_attention.options`). A bad one is a ValueError naming it."""
    return TrainConfig.from_options(parse_options(args, TrainConfig, TrainConfig(), **TRAIN_OPTIONS), base)


def inert_fields(cfg: TrainConfig) -> dict[str, str]:
    """The options that have no effect on a run of ``cfg``, each with why: refused when given (``from_options``), and
    not compared when a run resumes (a checkpoint written before they were refused may hold any value)."""
    inert = {}
    if cfg.tokenizer != "bpe":
        inert["bpe_vocab_size"] = "applies to --tokenizer=bpe"
    if cfg.data != "varassign":
        inert["va_vars"] = inert["va_assign"] = "applies to --data=varassign"
    else:
        inert["val_fraction"] = "splits a text corpus; varassign's validation examples are a stream of their own"
    if cfg.model.memory_eps == 0:
        inert["memory_tau"] = "is the memory loss's, which is off (--memory_eps=0)"
    return inert


def _refuse_ignored(given: Mapping[str, object], cfg: TrainConfig) -> None:
    """Refuse an option ``given`` (on the command line, or to :meth:`TrainConfig.from_options`) that this run would
    ignore: it would run as if it were absent, and the user meant something else. Stored configs are not checked
    (``from_dict``): a checkpoint always loads."""
    for name, why in inert_fields(cfg).items():
        if name in given:
            raise ValueError(f"--{name}={given[name]!r} would be ignored: it {why}; drop it.")


# --- data --------------------------------------------------------------------------------------------
class Task:
    """A uniform face over text corpora and the variable-assignment task: training batches, validation
    batches, the tokenizer and its ``vocab_size`` (which the model's is set to).

    ``tokenizer``: the one to use (a checkpoint's, ``meta["tokenizer"]``); default: the one ``cfg`` asks for,
    for ``--tokenizer=bpe`` trained here on the training split of ``cfg.data`` (a line on stderr if
    ``verbose`` and the text is large). Varassign is always byte level (its own character vocabulary)."""

    def __init__(self, cfg: TrainConfig, tokenizer=None, *, verbose: bool = False) -> None:
        from . import data

        self.cfg = cfg
        self.context_len = cfg.model.context_len
        self.varassign = cfg.data == "varassign"
        self.data: dict | None = None  # a text's source, resolved path and sha256 (below)
        if self.varassign:
            kw = dict(n_vars=cfg.va_vars, n_assign=cfg.va_assign)
            self.train_task = data.VariableAssignment(seed=cfg.seed, **kw)
            self.val_task = data.VariableAssignment(seed=VA_VAL_SEED, **kw)  # the same for every run
            if tokenizer is not None and tokenizer.kind != "byte":
                raise ValueError(f"--data=varassign is byte level, but the model's tokenizer is {tokenizer!r}.")
            self.tokenizer = data.ByteTokenizer()
            self.vocab_size = self.train_task.vocab_size
            T = self.train_task.seq_len
            if T > self.context_len:
                raise ValueError(
                    f"varassign examples are {T} tokens, longer than the model's context_len={self.context_len}: "
                    f"a model trained with --context_len >= {T} reads them."
                )
        else:
            text = data.load_text(cfg.data)
            bpe = tokenizer.kind == "bpe" if tokenizer is not None else cfg.tokenizer == "bpe"
            t0, say = time.perf_counter(), verbose and bpe and len(text) > 1_000_000
            if say:  # a few seconds for kjv: say what happens
                what = (f"training a {cfg.bpe_vocab_size}-token BPE on the training split of" if tokenizer is None
                        else f"encoding with the checkpoint's {tokenizer.vocab_size}-token BPE:")  # fmt: skip
                print(f"tokenizer: {what} {cfg.data!r} ({len(text) / 1e6:.1f} M characters)...", end="",
                      file=sys.stderr, flush=True)  # fmt: skip
            if tokenizer is None and cfg.tokenizer == "bpe":
                train_text, _ = data.split_text(text, cfg.val_fraction)  # the training split only
                tokenizer = data.BPETokenizer.train(train_text, cfg.bpe_vocab_size)
                if tokenizer.vocab_size < cfg.bpe_vocab_size:  # the text ran out of pairs worth merging
                    warnings.warn(
                        f"--bpe_vocab_size={cfg.bpe_vocab_size}: the training split of {cfg.data!r} gives only "
                        f"{tokenizer.vocab_size} tokens (it has too few distinct pairs to merge); the model is built "
                        f"for {tokenizer.vocab_size}. Pass --bpe_vocab_size={tokenizer.vocab_size} in a new run to "
                        f"say so (resuming this one keeps --bpe_vocab_size={cfg.bpe_vocab_size}).",
                        stacklevel=2,
                    )
            self.tokenizer = tokenizer if tokenizer is not None else data.ByteTokenizer()
            self.text = data.TextData.from_text(text, cfg.val_fraction, self.tokenizer)
            self.text.source = cfg.data
            path = Path(cfg.data)
            self.data = {  # what a checkpoint records of its text, so that eval and resume read the same one
                "source": cfg.data,
                "path": None if cfg.data in data.corpus_names() or not path.is_file() else str(path.resolve()),
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
            }
            self.vocab_size = self.tokenizer.vocab_size
            if say:
                print(f" done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    def n_assign_at(self, step: int | None) -> int:
        """Varassign: assignments per training example at ``step`` (the curriculum's; ``None``: the final count,
        the one evaluated on)."""
        c = self.cfg
        if step is None:
            return c.va_assign
        return curriculum_assign(step, c.va_assign, c.va_assign_start, c.va_ramp_steps, c.va_hold_steps)

    def batch(self, gen: torch.Generator, step: int | None = None) -> tuple[Tensor, Tensor]:
        """A training batch ``(x, y)``, ``[B, T]`` each (y: the targets, -100 = ignored); on varassign with a
        curriculum its examples have ``n_assign_at(step)`` assignments (``4 n + 3`` tokens per row)."""
        if self.varassign:
            # learn the task, not the random stream: only the answer is a target (-100 is ignored)
            x, y, answer = self.train_task.batch(self.cfg.batch_size, gen, self.n_assign_at(step))
            return x, y.masked_fill(~answer, -100)
        return self.text.batch("train", self.cfg.batch_size, self.context_len, gen)

    def eval_batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """The validation batches ``(x, y, answer)``: ``[B, T]`` each; ``answer`` (bool, the answer tokens of
        varassign) is None on text."""
        if self.varassign:
            # drawn VA_VAL_DRAW at a time and cut into batches: the first n examples are the same whatever the batch
            # size and count (drawn a batch at a time, 16 x 1 and 8 x 2 shared none: other batch sizes, other examples)
            gen = torch.Generator().manual_seed(VA_VAL_SEED)
            B, n = self.cfg.batch_size, self.cfg.eval_batches * self.cfg.batch_size
            draws = [self.val_task.batch(VA_VAL_DRAW, gen) for _ in range(-(-n // VA_VAL_DRAW))]
            xs, ys, answers = (torch.cat(parts)[:n] for parts in zip(*draws))
            for i in range(0, n, B):
                x, y, answer = xs[i : i + B], ys[i : i + B], answers[i : i + B]
                yield x, y.masked_fill(~answer, -100), answer
        else:
            for x, y in self.text.eval_batches("val", self.cfg.batch_size, self.context_len, self.cfg.eval_batches):
                yield x, y, None


@torch.no_grad()
def mean_loss(model: GPT, x: Tensor, y: Tensor) -> float:
    """Mean cross-entropy (nats/token) of ``model`` on ``x, y`` ``[B, T]`` with its full context."""
    return token_loss(model(x), y).item()


@torch.no_grad()
def evaluate(
    model: GPT, task: Task, device: torch.device, logits_fn: Callable[[Tensor], Tensor] | None = None
) -> dict[str, float]:
    """Validation cross-entropy (nats/token; on varassign, of the answers) over every target of the evaluation
    batches, each token weighing the same (a smaller last batch is not overweighted), and answer accuracy.
    ``logits_fn``: ``x [B, T] -> logits [B, T, vocab]`` (default ``model(x)``; e.g. a pruned cache). Runs in
    eval mode and leaves the model in the mode it was in."""
    was_training = model.training
    model.eval()
    logits_fn = model if logits_fn is None else logits_fn
    loss_sum, n_targets, correct, total = 0.0, 0, 0, 0
    for x, y, answer in task.eval_batches():  # y is -100 where it is not a target (varassign: all but the answer)
        x, y = x.to(device), y.to(device)
        logits = logits_fn(x)
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten().long(), reduction="sum").item()
        n_targets += int((y != -100).sum())
        if answer is not None:
            answer = answer.to(device)
            correct += int((logits.argmax(-1)[answer] == y[answer]).sum())
            total += int(answer.sum())
    model.train(was_training)
    out = {"val_loss": loss_sum / n_targets}
    if total:
        out["val_accuracy"] = correct / total
    return out


# --- errors of a run ------------------------------------------------------------------------------------
class TrainingDiverged(RuntimeError, ValueError):
    """The loss or the gradient norm became inf/NaN. The run stopped before the optimizer step, so no
    checkpoint holds the bad weights. A ValueError too: the fix is another option value (a lower --lr),
    and the CLI reports ValueErrors as one ``error:`` line with exit code 2."""

    def __init__(self, message: str, step: int, loss: float, grad_norm: float) -> None:
        super().__init__(message)
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


# --- the loop ----------------------------------------------------------------------------------------
def lr_schedule(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _logged(key: str, value):
    """A log row's value: floats to 5 decimals, the learning rate to 4 significant digits."""
    if not isinstance(value, float):
        return value
    return float(f"{value:.4g}") if key == "lr" else round(value, 5)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The training run's learning rate at ``step`` (:func:`lr_schedule` with ``cfg``'s settings)."""
    return lr_schedule(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps)


def data_seed(cfg: TrainConfig, rank: int) -> int:
    """The seed of a rank's training-data stream: ``seed + 1000 * rank``. On varassign it must not be
    ``VA_VAL_SEED``, whose stream is the validation set (the model would be evaluated on its training data)."""
    s = cfg.seed + 1000 * rank
    # torch's CPU generator keeps a seed's low 32 bits only: 12345 + 2**32 is the validation stream too
    if cfg.data == "varassign" and (s - VA_VAL_SEED) % 2**32 == 0:
        raise ValueError(
            f"--seed={cfg.seed} makes rank {rank}'s varassign training stream (seed + 1000 * rank = {s}) the "
            f"validation stream (seed {VA_VAL_SEED}; torch keeps a seed's low 32 bits): the model would be evaluated "
            f"on its training examples. Choose another --seed."
        )
    return s


def _optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())  # one group: every weight decays (checkpoints hold any param_groups)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def _device(cfg: TrainConfig, rank: int) -> torch.device:
    """The device of ``--device`` (auto | cpu | cuda | cuda:N | mps), or a ValueError naming the available ones."""
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    available = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(n_cuda)] if n_cuda else []) + (["mps"] * mps)
    if cfg.device == "auto":
        return torch.device(f"cuda:{rank % n_cuda}" if n_cuda else "cpu")
    why = "it is not a device name"
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        device = None
    if device is not None:
        if device.type == "cpu":
            return device
        if device.type == "cuda":
            if n_cuda and (device.index is None or device.index < n_cuda):
                return device
            why = f"this machine has {n_cuda} CUDA devices" if n_cuda else "there is no CUDA device (or no CUDA build)"
        elif device.type == "mps" and mps:
            return device
        else:
            why = f"{device.type} is not available here"
    raise ValueError(f"--device={cfg.device!r} cannot be used: {why}; available here: {', '.join(available)}.")


def check_out_dir(out_dir: Path, option: str = "--out_dir") -> None:
    """Create ``out_dir`` and write a probe file in it: an unusable folder (a file's path, no permission) fails now,
    with a ``ValueError`` naming ``option``, not at the first save."""
    probe = out_dir / f".write-probe-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")  # a byte: a full disk creates an empty file but refuses data
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"{option}={str(out_dir)!r} is not a writable folder ({type(e).__name__}: {e.strerror or e}); "
            f"choose another {option}."
        ) from None


# Fields a resume cannot change, not even with --allow_config_change: what they set is already fixed in the run
_FIXED_ON_RESUME = {
    "seed": "a resumed run's random states (weights, data order, dropout) come from the checkpoint: a new seed "
    "would be recorded in it but never used",
    "val_fraction": "another split would move text the model trained on into validation (or validation text into "
    "training): its later val_loss would not be held out",
}


def _check_train_config(
    cfg: TrainConfig, stored: dict, path: Path, trained: GPTConfig, same_file: bool = False
) -> None:
    """Refuse to resume with another training config (see RESUMABLE_FIELDS), unless allowed. A field the stored
    config lacks (added since) counts as its default. ``same_file``: ``--data`` names the file the checkpoint was
    trained on (its resolved path and sha256), however spelled (a relative path from another folder)."""
    # the training fields only (the model's are checked against the weights): the stored ones under this model, but
    # for the model fields that set how it trains, not its weights (TRAINING_MODEL_FIELDS), which are compared here
    # (from ``trained``, the checkpoint's model config that its weights are checked against: one record, not two)
    as_now = {
        **stored,
        "model": {**dataclasses.asdict(cfg.model), **{k: getattr(trained, k) for k in TRAINING_MODEL_FIELDS}},
    }
    changes = config_changes(cfg, as_now)
    old, now = {k: a for k, (a, _) in changes.items()}, {k: b for k, (_, b) in changes.items()}
    try:
        stored_cfg = TrainConfig.from_dict(as_now)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} holds a training config this code refuses ({e}): it was edited or written by other "
            f"code; restore it from a copy, or retrain ({_AFRESH})."
        ) from None
    inert = set(inert_fields(cfg)) & set(inert_fields(stored_cfg))  # no effect in either run: not a change
    if same_file:
        inert.add("data")
    changed = [k for k in now if k not in RESUMABLE_FIELDS | inert]
    if not changed:
        return
    fixed = {k: why for k, why in _FIXED_ON_RESUME.items() if k in changed}
    if fixed:  # not even with --allow_config_change
        raise CheckpointError(
            f"checkpoint {path}: "
            + "; ".join(
                f"--{k}={now[k]!r} differs from the checkpoint's {old[k]!r}, and {why}" for k, why in fixed.items()
            )
            + ". Resume with the checkpoint's value, or start a new run (--resume=false or another --out_dir)."
        )
    diff = ", ".join(f"{k}: {old[k]!r} (checkpoint) vs {now[k]!r} (now)" for k in changed)
    if not cfg.allow_config_change:
        raise CheckpointError(
            f"checkpoint {path} was trained with another config: {diff}. Pass --allow_config_change=true to "
            f"continue it with the new values, use the checkpoint's values, another --out_dir, or --resume=false."
        )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"note: resuming {path} with a changed config: {diff}", file=sys.stderr)


def _check_tokenizer_config(cfg: TrainConfig, stored: dict, path: Path) -> None:
    """Refuse to resume with another tokenizer, even with --allow_config_change: the model's embeddings are the
    checkpoint's tokens. A stored config without the fields (written before them) was byte level."""
    kind, size = stored.get("tokenizer", "byte"), stored.get("bpe_vocab_size", TrainConfig.bpe_vocab_size)
    if kind != cfg.tokenizer or (kind == "bpe" and size != cfg.bpe_vocab_size):

        def spell(kind: str, size: int) -> str:
            return "--tokenizer=byte" if kind == "byte" else f"--tokenizer=bpe --bpe_vocab_size={size}"

        was, now = spell(kind, size), spell(cfg.tokenizer, cfg.bpe_vocab_size)
        raise CheckpointError(
            f"checkpoint {path} was trained with {was}, this run asks for {now}: a run cannot change its tokenizer "
            f"(the model's embeddings are its tokens), not even with --allow_config_change; use the checkpoint's "
            f"options, another --out_dir, or --resume=false."
        )


def _grad_norm(model: GPT, grad_clip: float) -> Tensor:
    """The total gradient norm (before clipping), clipping to ``grad_clip`` when it is > 0."""
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6: clipping at inf scales by 1 (exact)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def _diverged(
    step: int, loss: float, grad_norm: float, cfg: TrainConfig, last_ckpt: int | None, what: str, update: bool = False
):
    """The error of a run stopped at ``step`` (1-based); ``update``: the optimizer's update made the weights
    non-finite (checked before a save, so no checkpoint holds them), else the step's loss or gradient was."""
    if last_ckpt is None:
        kept = "no checkpoint of this run was written"
    elif last_ckpt == step - 1 and not update:
        # the failing step was the first from that checkpoint's weights: its loss or gradient came from them, and a
        # resume would run the same batch through them again (a learning rate acts only after it)
        kept = (
            f"the last checkpoint (step {last_ckpt}) in {cfg.out_dir} holds the weights whose step {step} failed: "
            "resumed, it fails there again whatever --lr, so start over with --resume=false (or another --out_dir)"
        )
    else:
        kept = (
            f"the last good checkpoint (step {last_ckpt}) in {cfg.out_dir} is untouched: continue it with the new "
            f"value and --allow_config_change=true, or start over with --resume=false"
        )
    lower = f"--lr={cfg.lr / 10:g}" + (f" --min_lr={cfg.lr / 100:g}" if cfg.min_lr > cfg.lr / 10 else "")
    return TrainingDiverged(
        f"training diverged at step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g} ({what}); lower --lr "
        f"(now {cfg.lr:g}), e.g. {lower}, or warm up longer with --warmup_steps; {kept}.",
        step,
        loss,
        grad_norm,
    )


LOCK_NAME = ".train.lock"  # in out_dir while a run writes there: its process id


@contextlib.contextmanager
def _run_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s lock for one run: a second run into the same folder at once (its log rows and checkpoints
    would mix with this one's) is refused, naming the process. A lock whose process is gone (a killed run) is taken
    over. The lock file is made whole (process id written) before it is linked in, so no run reads a half-made one.
    POSIX only (elsewhere a process cannot be probed safely): there, no lock."""
    if os.name != "posix":
        yield
        return
    path, mine = out_dir / LOCK_NAME, out_dir / f"{LOCK_NAME}.{os.getpid()}"
    try:
        try:
            mine.write_text(str(os.getpid()))
        except OSError as e:  # a full disk: one line, not a traceback (and no half-written file left)
            raise ValueError(unwritable(str(mine), e)) from None
        while True:
            try:
                os.link(mine, path)
                break
            except FileExistsError:
                try:
                    pid = int(path.read_text())
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise ValueError(
                        f"another training run (process {pid}) is writing to --out_dir={str(out_dir)!r}: wait for it "
                        f"to finish, or choose another --out_dir (if no such run exists, delete {path})."
                    ) from None
                path.unlink(missing_ok=True)  # its run is gone: take the folder over
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check (POSIX)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


TEXT_FIELDS = ("data", "out_dir", "device")  # stored as text (JSON); also taken as path objects and a torch.device


def _text(value: object) -> object:
    """A path (``pathlib.Path``) or a ``torch.device`` as the text the command line gives; anything else as it is (the
    validation names a value of another kind)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value) if isinstance(value, torch.device) else value


def _as_text(cfg: TrainConfig) -> None:
    """``data`` and ``out_dir`` given as paths, and ``device`` as a ``torch.device``, as text: the checkpoint stores the
    config as JSON, and a path object failed there, at the first save, after the run had trained."""
    for name in TEXT_FIELDS:
        setattr(cfg, name, _text(getattr(cfg, name)))


def main(cfg: TrainConfig) -> dict:
    """Train (or resume) and return a summary: final validation loss, throughput, the eval curve."""
    _as_text(cfg)  # again, as the validation: the fields may have been assigned after construction
    _validate(cfg)
    # an empty --out_dir= was the current folder: a run's checkpoint and log landed beside the user's files. Checked
    # here, for a run, not in _validate: a stored config (an older checkpoint's) must still load for eval
    for name, what in (("out_dir", "a folder, e.g. --out_dir=runs/sel"),
                       ("data", "a built-in corpus (kjv, pydoc), varassign or a text file's path")):  # fmt: skip
        value = getattr(cfg, name)
        if not value.strip():  # (text: _validate checked)
            raise ValueError(f"--{name}={value!r} is invalid: it must be {what}.")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:  # RANK=1 alone trained on another stream and wrote nothing (only rank 0 writes), rc 0
        raise ValueError(
            f"RANK={rank} with WORLD_SIZE={os.environ.get('WORLD_SIZE', '(unset)')}: a rank must be in "
            "[0, WORLD_SIZE). A distributed launcher (torchrun) sets both; for one process unset RANK."
        )
    require_safetensors()  # before training: the checkpoints need it (a missing one failed at the first save)
    if cfg.warmup_steps > cfg.max_steps and rank == 0:
        warnings.warn(
            f"--warmup_steps={cfg.warmup_steps} > --max_steps={cfg.max_steps}: the learning rate only warms up "
            f"(to {lr_at(cfg.max_steps - 1, cfg):.3g} at the last step, never --lr={cfg.lr:g}) and never decays; "
            f"pass a shorter warmup, e.g. --warmup_steps={max(1, cfg.max_steps // 10)}.",
            stacklevel=2,
        )
    if cfg.data == "varassign" and rank == 0:
        _warn_if_validation_is_trained_on(cfg)
    if rank != 0:  # only rank 0 writes
        return _main(cfg)
    out_dir = Path(cfg.out_dir)
    # the folders this run creates, deepest first (of the path as the OS resolves it: "missing/../kept" is kept)
    real = Path(os.path.normpath(out_dir.absolute()))
    made = [d for d in (real, *real.parents) if not d.exists()]
    check_out_dir(out_dir)
    try:
        with _run_lock(out_dir):
            return _main(cfg)
    except BaseException:
        # refused before writing anything (a bad --data): leave none of the folders it made
        with contextlib.suppress(OSError):  # a folder gone or filled meanwhile: the run's own error matters
            for d in made:
                if any(d.iterdir()):
                    break
                d.rmdir()
        raise


def _warn_if_validation_is_trained_on(cfg: TrainConfig) -> None:
    """varassign's validation examples are another seed's stream of the same examples as training's, not other
    examples: where there are few (few variables and assignments), training draws most of them, and the validation
    accuracy is then not held out. Warn when about 5% or more of them would be training examples (an upper
    bound under a curriculum, whose earlier steps draw shorter examples)."""
    space = VariableAssignment(n_vars=cfg.va_vars, n_assign=cfg.va_assign).n_examples()
    draws = cfg.max_steps * cfg.batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    seen = -math.expm1(-draws / space)  # the chance that a uniform draw of the space was drawn in training
    if seen >= 0.05:
        warnings.warn(
            f"--data=varassign with --va_vars={cfg.va_vars} --va_assign={cfg.va_assign} has {space:,} distinct "
            f"examples, and this run trains on up to {draws:,}: about {seen:.0%} of the validation examples are "
            "training examples too, so its validation accuracy is not held out. Use more --va_assign or --va_vars.",
            stacklevel=3,
        )


def _main(cfg: TrainConfig) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = _device(cfg, rank)
    out_dir = Path(cfg.out_dir)
    main_proc = rank == 0
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    ckpt_path = out_dir / CKPT_NAME
    torch.manual_seed(cfg.seed)
    # (a link whose target is gone is loaded too, to be refused: training would start over and replace it)
    resumed = load_checkpoint(ckpt_path) if cfg.resume and (ckpt_path.exists() or ckpt_path.is_symlink()) else None
    if resumed is not None:  # the model's token ids are its checkpoint's tokenizer's: resume with that one
        _check_tokenizer_config(cfg, resumed[1]["train_config"], ckpt_path)
    stored_tokenizer = resumed[1]["tokenizer"] if resumed is not None else None
    task = Task(cfg, tokenizer=stored_tokenizer, verbose=cfg.progress and main_proc)
    if not task.varassign:  # both splits hold a window: found now, not at the first evaluation after training
        for split in ("train", "val"):
            task.text._split(split, cfg.model.context_len)
    stored_lrs = None if resumed is None else tuple(resumed[1]["train_config"].get(k) for k in ("lr", "min_lr"))
    if cfg.min_lr > cfg.lr and stored_lrs != (cfg.lr, cfg.min_lr):  # a stored config as it was always resumes
        raise ValueError(
            f"--min_lr={cfg.min_lr:g} is above --lr={cfg.lr:g}: the cosine schedule goes from lr down to min_lr, so "
            f"it would rise instead; pass --min_lr <= lr (e.g. --min_lr={cfg.lr / 10:g})."
        )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=task.vocab_size))
    model = GPT(cfg.model).to(device)
    opt = _optimizer(model, cfg)
    data_gen = torch.Generator().manual_seed(data_seed(cfg, rank))
    start, history, last_ckpt = 0, [], None
    if resumed is not None:
        tensors, meta = resumed
        try:
            stored = gpt_config_from_dict(meta["model_config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ckpt_path} holds a model config this code refuses: {e}") from None
        _check_tokenizer_fits(task.tokenizer, stored, ckpt_path)
        inert = set(inert_fields(cfg)) & set(inert_fields(dataclasses.replace(cfg, model=stored)))
        inert |= set(TRAINING_MODEL_FIELDS)  # how it trains, not its weights: compared with the training config
        diff = {k: v for k, v in _model_diff(stored, model.config).items() if k not in inert}
        if diff:
            raise CheckpointError(
                f"checkpoint {ckpt_path} was made for another model (field: (checkpoint, now)) {diff}; "
                f"use another --out_dir or --resume=false."
            )
        _check_training_state(tensors, meta, ckpt_path)
        text = meta["extra"].get("data")
        same_file = (
            text is not None and task.data is not None and text.get("path") is not None
            and (text["path"], text["sha256"]) == (task.data["path"], task.data["sha256"])
        )  # fmt: skip
        _check_train_config(cfg, meta["train_config"], ckpt_path, stored, same_file)
        _check_same_text(text, task.data, ckpt_path, cfg.allow_config_change)
        _load_model_state(model, model_state(tensors, meta), ckpt_path)
        _load_optimizer_state(opt, optimizer_state(tensors, meta, opt, ckpt_path), ckpt_path, meta["step"])
        torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        _restore_data_rng(data_gen, tensors, meta, rank, world, ckpt_path)
        start = last_ckpt = meta["step"]
        if start > cfg.max_steps:
            raise CheckpointError(
                f"checkpoint {ckpt_path} is at step {start}, past --max_steps={cfg.max_steps}: this run would train "
                f"nothing and report the step-{start} model as a {cfg.max_steps}-step one. Pass --max_steps >= "
                f"{start} to continue it, `selective-attention eval --ckpt={out_dir}` to evaluate it, another "
                f"--out_dir, or --resume=false."
            )
        # rank 0's alone, as it is the only one that evaluates: another rank's summary would report the checkpoint's
        # last evaluation as the final model's (an uninterrupted run's other ranks report none)
        history = [row for row in meta["extra"].get("history", []) if row.get("step", 0) <= start] if main_proc else []
        planned = meta["train_config"].get("max_steps")
        if main_proc and planned is not None and planned != cfg.max_steps and start < cfg.max_steps:
            was = lr_at(start, dataclasses.replace(cfg, max_steps=planned))
            print(
                f"note: --max_steps={cfg.max_steps}, the checkpoint's run was planned for {planned}: the "
                f"learning-rate schedule is recomputed for {cfg.max_steps} steps (step {start + 1} trains at "
                f"{lr_at(start, cfg):.3g}, {was:.3g} in the old schedule; log.jsonl's rows give each step's lr)",
                file=sys.stderr,
            )
    if main_proc and not cfg.resume and ckpt_path.exists():
        # starting over (every check passed): the old run's checkpoint must not outlive its emptied log (a run
        # killed before its first save would leave it for the next resume); it is set aside, not deleted
        aside = out_dir / PREVIOUS_CKPT_NAME
        replaced = " (replacing the one an earlier --resume=false set aside there)" if aside.exists() else ""
        ckpt_path.replace(aside)
        print(f"--resume=false: the previous run's checkpoint is moved to {aside}{replaced}", file=sys.stderr)
    if main_proc:
        # the log is the history so far: a resume drops the rows a killed run logged after its checkpoint
        # (they are trained and logged again), a fresh run starts an empty one
        _write_log(out_dir, history)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model)
    if cfg.compile:  # forward and backward; evaluation stays eager (the module itself)
        train_model = torch.compile(train_model)
    failed = False
    bar = progress_bar(cfg.max_steps, out_dir.name, enabled=cfg.progress and main_proc, initial=start)
    try:
        # a varassign row is one example (4 n_assign + 3 inputs; the final length under a curriculum), not a window
        tokens_per_step = cfg.batch_size * (task.val_task.seq_len if task.varassign else cfg.model.context_len) * world
        # tokens/s of the training steps alone: evaluations, checkpoints (and with --compile the first step, which
        # compiles) are off the clock
        train_seconds, tok_seen, last = 0.0, 0, {}
        model.train()
        step = start
        evaluated = bool(history) and history[-1].get("step") == start and "val_loss" in history[-1]
        if main_proc and start == cfg.max_steps and not evaluated:
            # a checkpoint saved between evaluations, resumed with --max_steps at its step: no step trains, and the
            # evaluation a run takes at its end is taken now (it reported an earlier step's val_loss, or none)
            history.append({k: _logged(k, v) for k, v in {"step": start, **evaluate(model, task, device)}.items()})
            _log(out_dir, history[-1])
        for step in range(start, cfg.max_steps):
            if cfg.stop_after and step - start >= cfg.stop_after:
                return {"rank": rank, "stopped_at": step, "out_dir": str(out_dir)}
            t_step = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            x, y = task.batch(data_gen, step)
            x, y = x.to(device), y.to(device)
            loss, stats = train_model(x, y)  # through DDP's forward when distributed, so gradients sync
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = _grad_norm(model, cfg.grad_clip)
            # one host sync for all; checked before opt.step so the weights (and any later checkpoint) stay finite
            parts = torch.stack([p.detach().float() for p in (grad_norm, loss, *stats.values())])
            if world > 1:
                # the loss and its parts are each rank's own batch's: averaged over the ranks, as the gradients are
                # (the logged loss is the whole step's, not rank 0's), and a rank's NaN or inf reaches every rank,
                # which then stop together; the gradient norm, of the averaged gradients, is every rank's already
                summed = parts[1:].clone()
                torch.distributed.all_reduce(summed)
                parts[1:] = summed / world
            norm_val, loss_val, *part_vals = parts.tolist()
            stats = dict(zip(stats, part_vals))
            bad = not (math.isfinite(loss_val) and math.isfinite(norm_val))
            if bad:
                raise _diverged(step + 1, loss_val, norm_val, cfg, last_ckpt, f"lr {lr_at(step, cfg):.3g} at that step")
            opt.step()
            seconds = time.perf_counter() - t_step
            if cfg.compile and step == start and step + 1 < cfg.max_steps:
                tps = x.numel() * world / seconds  # the step that compiled: its own rate, off the run's clock
            else:
                tok_seen += x.numel() * world
                train_seconds += seconds
                tps = tok_seen / train_seconds
            last = {"step": step + 1, "loss": loss_val, "lr": lr_at(step, cfg), "tokens_per_s": tps, **stats}
            if task.varassign and cfg.va_assign_start:  # the curriculum's stage (evaluation is on va_assign)
                last["va_assign"] = task.n_assign_at(step)
            done = step + 1 == cfg.max_steps
            main_proc_worked = (step + 1) % cfg.eval_interval == 0 or done  # the same on every rank
            if main_proc and main_proc_worked:
                ev = evaluate(model, task, device)
                last.update(ev)
                # 5 decimals; the learning rate 4 significant digits (5 decimals would log 1e-6 as 0)
                history.append({k: _logged(k, v) for k, v in last.items()})
                _log(out_dir, history[-1])
            save = (step + 1) % cfg.ckpt_interval == 0 or done  # the same on every rank
            main_proc_worked = main_proc_worked or save
            if save:
                data_rngs = _gather(data_gen.get_state(), world, device)  # every rank's stream: all ranks take part
            if main_proc and save:
                if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
                    # a finite step whose update overflowed: the next forward would catch it, after this save
                    raise _diverged(
                        step + 1, loss_val, norm_val, cfg, last_ckpt, "the update made weights inf/NaN", update=True
                    )
                save_checkpoint(
                    ckpt_path, model, opt, step + 1, cfg, task.tokenizer, data_rngs=data_rngs, world_size=world,
                    history=history, data=task.data,
                )  # fmt: skip
                last_ckpt = step + 1
            if world > 1 and main_proc_worked:
                # the other ranks wait here, off the clock, while rank 0 evaluates or saves: their next step's time
                # counted that wait (rank 1 reported half the training rate with an evaluation every 2 steps)
                torch.distributed.barrier()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", **(
                {"val": f"{last['val_loss']:.3f}"} if "val_loss" in last else {}
            ))  # fmt: skip
    except BaseException as e:
        failed = True
        if isinstance(e, KeyboardInterrupt) and main_proc:  # Ctrl-C: say what is kept and how to go on
            bar.close()
            again = "the same command again" if cfg.resume else "the command again without --resume=false"
            kept = (
                f"the checkpoint in {out_dir} holds step {last_ckpt}: run {again} to continue from it (a resumed run "
                "trains as an uninterrupted one)"
                if last_ckpt is not None
                else "no checkpoint of this run was written"
            )
            print(f"interrupted: {kept}.", file=sys.stderr)
        raise
    finally:
        bar.close()
        if world > 1 and not failed:
            # Drop DDP's reducer before the process group: tearing the group down (or exiting) while the reducer
            # is alive aborts the process at random in gloo ("terminate called without an active exception").
            # After a failure the traceback's frames may still hold DDP, so the teardown is left to process exit,
            # where Python prints the traceback first, rather than risk an abort here that would hide it.
            del train_model
            gc.collect()
            torch.distributed.destroy_process_group()
    final = history[-1] if history else {}
    return {
        "rank": rank,
        "param_checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
        "out_dir": str(out_dir),
        "steps": cfg.max_steps,
        "start_step": start,  # > 0: resumed there, and tokens_per_s covers the steps after it only
        "params": model.num_params(),
        "tokens_per_step": tokens_per_step,
        # a resume of a finished run trains no step: the tokens/s its history logged, not 0
        "tokens_per_s": last.get(
            "tokens_per_s", next((r["tokens_per_s"] for r in reversed(history) if "tokens_per_s" in r), 0.0)
        ),
        "val_loss": final.get("val_loss"),
        "val_accuracy": final.get("val_accuracy"),
        "history": history,
    }


def _check_same_text(stored: dict | None, now: dict | None, path: Path, allowed: bool) -> None:
    """Refuse to resume on another text than the checkpoint was trained on (the same --data name read from another
    folder, or an edited file): the run would mix two corpora. Checkpoints before the record: not checked."""
    if stored is None or now is None or stored["sha256"] == now["sha256"] or allowed:
        return
    raise CheckpointError(
        f"checkpoint {path} was trained on {stored['path'] or stored['source']} (sha256 {stored['sha256'][:12]}...); "
        f"--data={now['source']} now reads {now['path'] or 'a text'} with sha256 {now['sha256'][:12]}...: another "
        f"text. Pass the checkpoint's file as --data, --allow_config_change=true to continue on this text, another "
        f"--out_dir, or --resume=false."
    )


def _gather(state: Tensor, world: int, device: torch.device) -> list[Tensor]:
    """Every rank's ``state`` (a data generator's: a byte tensor of the same size on every rank), in rank order, on
    the CPU; called by all ranks together. Through the training device (NCCL moves CUDA tensors only)."""
    if world == 1:
        return [state]
    mine = state.to(device)
    states = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(states, mine)
    return [t.cpu() for t in states]


def _check_training_state(tensors: dict, meta: dict, path: Path) -> None:
    """Refuse what a resume reads besides the model and the optimizer when it is not as training writes it (an edit
    signed again, another writer): each was a raw KeyError, TypeError or AttributeError, or a wrong message."""
    extra, problems = meta["extra"], []
    rng = tensors.get("rng.torch")
    size = torch.get_rng_state().numel()  # a CPU generator's state, torch's and each data stream's alike
    if not isinstance(rng, Tensor) or rng.dtype != torch.uint8 or rng.shape != (size,):
        problems.append(f"the random state 'rng.torch' (1-D uint8, {size} bytes) is missing or of another kind")
    data = [k for k in tensors if k == "rng.data" or k.startswith("rng.data.")]
    if any(tensors[k].dtype != torch.uint8 or tensors[k].shape != (size,) for k in data):
        problems.append(f"a data-stream random state ({', '.join(data)}; 1-D uint8, {size} bytes) is of another kind")
    if malformed_text_record(meta):
        problems.append("'data' (the training text's source, path and sha256) is malformed")
    history = extra.get("history", [])
    if not isinstance(history, list) or not all(
        isinstance(r, dict) and isinstance(r.get("step", 0), int) for r in history
    ):
        problems.append("'history' is not a list of log rows (JSON objects with an int step)")
    world = extra.get("world_size")
    if world is not None and (isinstance(world, bool) or not isinstance(world, int) or world < 1):
        problems.append(f"'world_size' is {world!r}, not an int >= 1")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} cannot be resumed: {'; '.join(problems)}, which training never writes: it is corrupt "
            f"or edited. Evaluate it (selective-attention eval) if its model loads, or use another --out_dir or "
            f"--resume=false."
        )


def _restore_data_rng(gen: torch.Generator, tensors: dict, meta: dict, rank: int, world: int, path: Path) -> None:
    """Set this rank's data generator to where the checkpoint's run left it: each rank has its own stream (checkpoints
    before per-rank states held rank 0's only). A run with another number of processes is refused: its ranks would
    read other streams, and each step another number of examples."""
    stored_world = meta["extra"].get("world_size")  # None: written before it was stored
    if stored_world is not None and stored_world != world:
        raise CheckpointError(
            f"checkpoint {path} was written by a run of {stored_world} training process(es); this one has {world}, "
            f"whose ranks would read other data streams, and each step another number of examples. Resume it with "
            f"{stored_world} (torchrun --nproc_per_node={stored_world}), or use another --out_dir or --resume=false."
        )
    key = "rng.data" if rank == 0 else f"rng.data.{rank}"
    if key not in tensors or (stored_world is None and world > 1):
        raise CheckpointError(
            f"checkpoint {path} holds no data-stream state for {'rank ' + str(rank) if world > 1 else 'its run'} "
            f"(written before each rank's was stored): a resume cannot continue the same data. Start over with "
            f"another --out_dir or --resume=false."
        )
    gen.set_state(tensors[key])


def _write_log(out_dir: Path, rows: list[dict]) -> None:
    path = out_dir / "log.jsonl"
    try:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    except OSError as e:
        raise ValueError(unwritable(str(path), e)) from None


def _log(out_dir: Path, row: dict) -> None:
    path = out_dir / "log.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise ValueError(unwritable(str(path), e)) from None
