"""Training loop: ``main(TrainConfig)`` trains a GPT (standard or selective) on a corpus.

AdamW with linear warmup and cosine decay, gradient clipping, periodic evaluation, a progress bar
with loss and tokens/s, and checkpoints in safetensors written atomically (temp file + rename) that
hold the model, the optimizer and the RNG states with a checksum: a killed run resumes exactly where it
stopped, and only with the training config it was started with. A non-finite loss or gradient stops the
run (``TrainingDiverged``) before it can overwrite the last good checkpoint.
Launched with ``torchrun --nproc_per_node=N`` it trains data-parallel (DDP); otherwise on one
device.

    python -m selective_attention train --data=kjv --selection=true --max_steps=600 --out_dir=runs/sel
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import sys
import time
import types
import typing
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import GPT, GPTConfig
from .progress import progress as progress_bar

__all__ = [
    "TrainConfig",
    "main",
    "parse_overrides",
    "load_checkpoint",
    "save_checkpoint",
    "CheckpointError",
    "TrainingDiverged",
]

CKPT_NAME = "ckpt.safetensors"
FORMAT_VERSION = "2"  # 2 adds a sha256 of the tensors; version 1 files (no checksum) still load, with a warning


@dataclass
class TrainConfig:
    data: str = "kjv"  # kjv | pydoc | varassign | a path to a UTF-8 text file
    out_dir: str = "runs/default"
    # model (see GPTConfig)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_head: int = 0  # 0 = d_model // n_head
    context_len: int = 128
    dropout: float = 0.0
    selection: bool = False
    selection_layers: str = ""  # e.g. "0,2"; empty = every layer
    selection_head: int = 0
    selection_per_head: bool = False
    selection_projection: bool = False
    memory_eps: float = 0.0  # the paper's memory loss weight (0.1 in the paper); 0 = off
    memory_tau: float = 1.0
    # optimisation
    max_steps: int = 500
    batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bookkeeping
    eval_interval: int = 100
    eval_batches: int = 16
    ckpt_interval: int = 100
    seed: int = 0
    resume: bool = True  # continue from out_dir's checkpoint when there is one
    progress: bool = True
    device: str = "auto"  # auto | cpu | cuda
    val_fraction: float = 0.1
    va_vars: int = 8  # varassign: number of variables
    va_assign: int = 24  # varassign: assignments per example
    stop_after: int = 0  # > 0: stop (as if killed) after this many steps of this process; for tests
    # Resuming with another training config (data, lr, batch_size, ...) is refused unless this is true.
    # Free to change on resume: RESUMABLE_FIELDS (max_steps extends the run and stretches the lr schedule).
    allow_config_change: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    def selection_layer_indices(self) -> tuple[int, ...] | None:
        parts = [s.strip() for s in self.selection_layers.split(",") if s.strip()]
        try:
            return tuple(int(s) for s in parts) or None
        except ValueError:
            raise ValueError(
                f"--selection_layers={self.selection_layers!r} must be comma-separated layer indices like 0,2 "
                f"(empty = every layer)."
            ) from None

    def model_config(self, vocab_size: int = 256) -> GPTConfig:
        return GPTConfig(
            vocab_size=vocab_size,
            context_len=self.context_len,
            n_layer=self.n_layer,
            n_head=self.n_head,
            d_model=self.d_model,
            d_head=self.d_head or None,
            dropout=self.dropout,
            selection=self.selection,
            selection_layers=self.selection_layer_indices(),
            selection_head=self.selection_head,
            selection_per_head=self.selection_per_head,
            selection_projection=self.selection_projection,
            memory_tau=self.memory_tau,
            memory_eps=self.memory_eps,
        )


# Options that may differ between a run and its resume: how long to train (a longer max_steps also stretches
# the cosine schedule from the resumed step on), where and how to run, how often to evaluate and save. The
# others (data, optimisation, eval_batches, which sets what val_loss measures, ...) would silently mix two
# experiments in one history, so main() refuses them without --allow_config_change=true.
RESUMABLE_FIELDS = frozenset(
    {"max_steps", "resume", "progress", "stop_after", "out_dir", "device", "allow_config_change", "eval_interval",
     "ckpt_interval"}
)  # fmt: skip
# Compared on resume as the model config they build (GPTConfig), which also reads "0, 2" and "0,2" as equal.
_MODEL_FIELDS = frozenset(
    {"n_layer", "n_head", "d_model", "d_head", "context_len", "dropout", "selection", "selection_layers",
     "selection_head", "selection_per_head", "selection_projection", "memory_eps", "memory_tau"}
)  # fmt: skip


def _validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the option, its value and the valid range for the first bad field."""

    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"--{name}={getattr(cfg, name)!r} is invalid: it must be {rule}.")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_real(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for name in ("n_layer", "n_head", "d_model", "context_len", "max_steps", "batch_size", "eval_interval",
                 "eval_batches", "ckpt_interval", "va_vars", "va_assign"):  # fmt: skip
        need(is_int(getattr(cfg, name)) and getattr(cfg, name) >= 1, name, "an int >= 1")
    for name in ("d_head", "warmup_steps", "stop_after", "selection_head"):
        need(is_int(getattr(cfg, name)) and getattr(cfg, name) >= 0, name, "an int >= 0")
    need(is_int(cfg.seed), "seed", "an int")
    need(is_real(cfg.lr) and cfg.lr > 0, "lr", "a finite number > 0")
    for name in ("min_lr", "weight_decay", "memory_eps"):
        need(is_real(getattr(cfg, name)) and getattr(cfg, name) >= 0, name, "a finite number >= 0")
    need(is_real(cfg.grad_clip) and cfg.grad_clip >= 0, "grad_clip", "a finite number >= 0 (0 = no clipping)")
    need(is_real(cfg.memory_tau) and cfg.memory_tau > 0, "memory_tau", "a finite number > 0")
    for name in ("beta1", "beta2", "dropout"):
        need(is_real(getattr(cfg, name)) and 0 <= getattr(cfg, name) < 1, name, "in [0, 1)")
    need(is_real(cfg.val_fraction) and 0 < cfg.val_fraction < 1, "val_fraction", "in (0, 1): training evaluates")
    cfg.model_config()  # GPTConfig's checks across fields: d_model % n_head, an even head dim, layer indices


# --- --key=value overrides ---------------------------------------------------------------------------
def _convert(name: str, raw: str, typ) -> object:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        typ = args[0]
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects true/false, got {raw!r}.")
    try:
        return typ(raw)
    except ValueError:
        raise ValueError(f"--{name} expects {typ.__name__}, got {raw!r}.") from None


def parse_overrides(args: Sequence[str], cls=TrainConfig, base=None):
    """``["--lr=1e-3", "--selection=true"]`` -> a ``cls`` instance; unknown keys raise naming the valid ones."""
    cfg = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    updates = {}
    for a in args:
        if not a.startswith("--") or "=" not in a:
            raise ValueError(f"expected --key=value, got {a!r}.")
        key, raw = a[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in names:
            raise ValueError(f"unknown option --{key}; valid: {', '.join(sorted(names))}.")
        updates[key] = _convert(key, raw, hints[key])
    return dataclasses.replace(cfg, **updates)


# --- data --------------------------------------------------------------------------------------------
class _Task:
    """A uniform face over text corpora and the variable-assignment task."""

    def __init__(self, cfg: TrainConfig) -> None:
        from . import data

        self.cfg = cfg
        self.varassign = cfg.data == "varassign"
        if self.varassign:
            kw = dict(n_vars=cfg.va_vars, n_assign=cfg.va_assign)
            self.train_task = data.VariableAssignment(seed=cfg.seed, **kw)
            self.val_task = data.VariableAssignment(seed=cfg.seed + 10_000, **kw)  # another stream
            T = self.train_task.batch(1, torch.Generator().manual_seed(0))[0].shape[1]
            if T > cfg.context_len:
                raise ValueError(f"varassign examples are {T} tokens; set --context_len >= {T}.")
        else:
            self.text = data.TextData.from_name(cfg.data, val_fraction=cfg.val_fraction)

    def batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.varassign:
            # learn the task, not the random stream: only the answer is a target (-100 is ignored)
            x, y, answer = self.train_task.batch(self.cfg.batch_size, gen)
            return x, y.masked_fill(~answer, -100)
        return self.text.batch("train", self.cfg.batch_size, self.cfg.context_len, gen)

    def eval_batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        if self.varassign:
            gen = torch.Generator().manual_seed(12345)
            for _ in range(self.cfg.eval_batches):
                x, y, answer = self.val_task.batch(self.cfg.batch_size, gen)
                yield x, y.masked_fill(~answer, -100), answer
        else:
            for x, y in self.text.eval_batches("val", self.cfg.batch_size, self.cfg.context_len, self.cfg.eval_batches):
                yield x, y, None


@torch.no_grad()
def evaluate(model: GPT, task: _Task, device: torch.device) -> dict[str, float]:
    """Mean validation cross-entropy (nats/token; on varassign, of the answers), and answer accuracy.
    Runs in eval mode and leaves the model in the mode it was in."""
    was_training = model.training
    model.eval()
    losses, correct, total = [], 0, 0
    for x, y, answer in task.eval_batches():
        x, y = x.to(device), y.to(device)
        logits = model(x)
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item())
        if answer is not None:
            answer = answer.to(device)
            correct += int((logits.argmax(-1)[answer] == y[answer]).sum())
            total += int(answer.sum())
    model.train(was_training)
    out = {"val_loss": sum(losses) / len(losses)}
    if total:
        out["val_accuracy"] = correct / total
    return out


# --- checkpoints -------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, corrupt, or made for another model or training config."""


class TrainingDiverged(RuntimeError, ValueError):
    """The loss or the gradient norm became inf/NaN. The run stopped before the optimizer step, so no
    checkpoint holds the bad weights. A ValueError too: the fix is another option value (a lower --lr),
    and the CLI reports ValueErrors as one ``error:`` line with exit code 2."""

    def __init__(self, message: str, step: int, loss: float, grad_norm: float) -> None:
        super().__init__(message)
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


def tensors_checksum(tensors: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (catches flipped bytes that
    would otherwise load as wrong weights and evaluate to ``val_loss: nan``)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the raw bytes, whatever the dtype
    return h.hexdigest()


def save_checkpoint(path: Path, model: GPT, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig, **extra) -> None:
    """Model, optimizer and RNG states in one safetensors file, written to a temp file and renamed,
    so a crash mid-write leaves the previous checkpoint intact."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.pop("model.lm_head.weight", None)  # tied to tok_emb.weight; safetensors refuses shared storage
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for name, val in opt.state.get(p, {}).items():
            tensors[f"optim.{i}.{name}"] = torch.as_tensor(val).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if "data_rng" in extra:
        tensors["rng.data"] = extra.pop("data_rng")
    meta = {
        "format_version": FORMAT_VERSION,
        "step": str(step),
        "train_config": json.dumps(dataclasses.asdict(cfg)),
        "model_config": json.dumps(_model_config_dict(model.config)),
        "extra": json.dumps(extra),
        "checksum": "sha256:" + tensors_checksum(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _model_config_dict(c: GPTConfig) -> dict:
    d = dataclasses.asdict(c)
    d.pop("extra", None)
    if d.get("selection_layers") is not None:
        d["selection_layers"] = list(d["selection_layers"])
    return d


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint: ``(tensors, metadata)`` with the configs decoded; raises CheckpointError."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; train one with `selective-attention train --out_dir=...`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        checksum = meta.get("checksum")
        meta = {
            "step": int(meta["step"]),
            "train_config": json.loads(meta["train_config"]),
            "model_config": json.loads(meta["model_config"]),
            "extra": json.loads(meta.get("extra", "{}")),
            "format_version": meta["format_version"],
        }
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a selective-attention checkpoint ({type(e).__name__}: {e}); "
            f"delete it, or start over with --resume=false."
        ) from e
    if checksum is None:
        warnings.warn(
            f"checkpoint {path} has no checksum (written before checksums were stored); its bytes cannot be "
            f"verified (resuming the run saves it again, with one).",
            stacklevel=2,
        )
    elif checksum != "sha256:" + tensors_checksum(tensors):
        raise CheckpointError(
            f"checkpoint {path} fails its checksum: its tensor bytes changed after it was written (disk or copy "
            f"corruption); restore it from a copy, or delete it and start over with --resume=false."
        )
    return tensors, meta


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the trained model of a checkpoint (eval mode)."""
    tensors, meta = load_checkpoint(path)
    mc = meta["model_config"]
    if mc.get("selection_layers") is not None:
        mc["selection_layers"] = tuple(mc["selection_layers"])
    model = GPT(GPTConfig(**mc))
    _load_model_state(model, tensors, path)
    return model.to(device).eval(), meta


def _load_model_state(model: GPT, tensors: dict[str, Tensor], path) -> None:
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing}, unexpected {unexpected}.")


# --- the loop ----------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())  # one group, a fixed order: checkpoints index into it
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


def _check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and write a probe file in it: an unusable folder fails now, not at the first save."""
    probe = out_dir / f".write-probe-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"--out_dir={str(out_dir)!r} is not a writable folder ({type(e).__name__}: {e.strerror or e}); "
            f"choose another --out_dir."
        ) from None


def _check_train_config(cfg: TrainConfig, stored: dict, path: Path) -> None:
    """Refuse to resume with another training config (see RESUMABLE_FIELDS), unless allowed."""
    now = dataclasses.asdict(cfg)
    skip = RESUMABLE_FIELDS | _MODEL_FIELDS
    changed = [k for k in now if k in stored and k not in skip and stored[k] != now[k]]
    if not changed:
        return
    diff = ", ".join(f"{k}: {stored[k]!r} (checkpoint) vs {now[k]!r} (now)" for k in changed)
    if not cfg.allow_config_change:
        raise CheckpointError(
            f"checkpoint {path} was trained with another config: {diff}. Pass --allow_config_change=true to "
            f"continue it with the new values, use the checkpoint's values, another --out_dir, or --resume=false."
        )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"note: resuming {path} with a changed config: {diff}", file=sys.stderr)


def _grad_norm(model: GPT, grad_clip: float) -> Tensor:
    """The total gradient norm (before clipping), clipping to ``grad_clip`` when it is > 0."""
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def _diverged(step: int, loss: float, grad_norm: float, cfg: TrainConfig, last_ckpt: int | None, what: str):
    kept = (
        f"the last good checkpoint (step {last_ckpt}) in {cfg.out_dir} is untouched: continue it with the new "
        f"value and --allow_config_change=true, or start over with --resume=false"
        if last_ckpt is not None
        else "no checkpoint of this run was written"
    )
    return TrainingDiverged(
        f"training diverged at step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g} ({what}); lower --lr "
        f"(now {cfg.lr:g}), e.g. --lr={cfg.lr / 10:g}, or warm up longer with --warmup_steps; {kept}.",
        step,
        loss,
        grad_norm,
    )


def main(cfg: TrainConfig) -> dict:
    """Train (or resume) and return a summary: final validation loss, throughput, the eval curve."""
    _validate(cfg)  # again: the fields may have been assigned after construction
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = _device(cfg, rank)
    out_dir = Path(cfg.out_dir)
    main_proc = rank == 0
    if main_proc:  # only rank 0 writes
        _check_out_dir(out_dir)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    ckpt_path = out_dir / CKPT_NAME
    torch.manual_seed(cfg.seed)
    task = _Task(cfg)
    model = GPT(cfg.model_config()).to(device)
    opt = _optimizer(model, cfg)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
    start, history, last_ckpt = 0, [], None
    if cfg.resume and ckpt_path.exists():
        tensors, meta = load_checkpoint(ckpt_path)
        want, got = _model_config_dict(model.config), meta["model_config"]
        diff = {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
        if diff:
            raise CheckpointError(
                f"checkpoint {ckpt_path} was made for another model (field: (checkpoint, now)) {diff}; "
                f"use another --out_dir or --resume=false."
            )
        _check_train_config(cfg, meta["train_config"], ckpt_path)
        _load_model_state(model, tensors, ckpt_path)
        for i, p in enumerate(opt.param_groups[0]["params"]):
            st = {k.split(".", 2)[2]: v.to(device) for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
            if st:
                opt.state[p] = st
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.data" in tensors:
            data_gen.set_state(tensors["rng.data"])
        start = last_ckpt = meta["step"]
        history = [row for row in meta["extra"].get("history", []) if row.get("step", 0) <= start]
    if main_proc:
        # the log is the history so far: a resume drops the rows a killed run logged after its checkpoint
        # (they are trained and logged again), a fresh run starts an empty one
        _write_log(out_dir, history)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model)
    failed = False
    bar = progress_bar(cfg.max_steps, out_dir.name, enabled=cfg.progress and main_proc, initial=start)
    try:
        tokens_per_step = cfg.batch_size * cfg.context_len * world
        t_start, tok_seen, last = time.perf_counter(), 0, {}
        model.train()
        step = start
        for step in range(start, cfg.max_steps):
            if cfg.stop_after and step - start >= cfg.stop_after:
                return {"stopped_at": step, "out_dir": str(out_dir)}
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            x, y = task.batch(data_gen)
            x, y = x.to(device), y.to(device)
            loss, stats = train_model(x, y)  # through DDP's forward when distributed, so gradients sync
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = _grad_norm(model, cfg.grad_clip)
            # one sync for both; checked before opt.step so the weights (and any later checkpoint) stay finite
            loss_val, norm_val = torch.stack([loss.detach().float(), grad_norm.detach().float()]).tolist()
            bad = not (math.isfinite(loss_val) and math.isfinite(norm_val))
            if world > 1:  # the gradients are averaged but the loss is per rank: every rank must stop together
                flag = torch.tensor([float(bad)], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                bad = flag.item() > 0
            if bad:
                raise _diverged(step + 1, loss_val, norm_val, cfg, last_ckpt, f"lr {lr_at(step, cfg):.3g} at that step")
            opt.step()
            tok_seen += x.numel() * world
            tps = tok_seen / (time.perf_counter() - t_start)
            last = {"step": step + 1, "loss": loss_val, "tokens_per_s": tps, **stats}
            done = step + 1 == cfg.max_steps
            if main_proc and ((step + 1) % cfg.eval_interval == 0 or done):
                ev = evaluate(model, task, device)
                last.update(ev)
                history.append({k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()})
                _log(out_dir, history[-1])
            if main_proc and ((step + 1) % cfg.ckpt_interval == 0 or done):
                if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
                    # a finite step whose update overflowed: the next forward would catch it, after this save
                    raise _diverged(step + 1, loss_val, norm_val, cfg, last_ckpt, "the update made weights inf/NaN")
                save_checkpoint(ckpt_path, model, opt, step + 1, cfg, data_rng=data_gen.get_state(), history=history)
                last_ckpt = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", **(
                {"val": f"{last['val_loss']:.3f}"} if "val_loss" in last else {}
            ))  # fmt: skip
    except BaseException:
        failed = True
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
        "params": model.num_params(),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": last.get("tokens_per_s", 0.0),
        "val_loss": final.get("val_loss"),
        "val_accuracy": final.get("val_accuracy"),
        "history": history,
    }


def _write_log(out_dir: Path, rows: list[dict]) -> None:
    (out_dir / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _log(out_dir: Path, row: dict) -> None:
    with open(out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
