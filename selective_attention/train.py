"""Training loop: ``main(TrainConfig)`` trains a GPT (standard or selective) on a corpus.

AdamW with linear warmup and cosine decay, gradient clipping, periodic evaluation, a progress bar
with loss and tokens/s, and checkpoints in safetensors written atomically (temp file + rename) that
hold the model, the optimizer and the RNG states: a killed run resumes exactly where it stopped.
Launched with ``torchrun --nproc_per_node=N`` it trains data-parallel (DDP); otherwise on one
device.

    python -m selective_attention train --data=kjv --selection=true --max_steps=600 --out_dir=runs/sel
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
import time
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import GPT, GPTConfig

__all__ = ["TrainConfig", "main", "parse_overrides", "load_checkpoint", "save_checkpoint", "CheckpointError"]

CKPT_NAME = "ckpt.safetensors"
FORMAT_VERSION = "1"


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

    def model_config(self, vocab_size: int = 256) -> GPTConfig:
        layers = tuple(int(s) for s in self.selection_layers.split(",") if s.strip()) or None
        return GPTConfig(
            vocab_size=vocab_size,
            context_len=self.context_len,
            n_layer=self.n_layer,
            n_head=self.n_head,
            d_model=self.d_model,
            d_head=self.d_head or None,
            dropout=self.dropout,
            selection=self.selection,
            selection_layers=layers,
            selection_head=self.selection_head,
            selection_per_head=self.selection_per_head,
            selection_projection=self.selection_projection,
            memory_tau=self.memory_tau,
            memory_eps=self.memory_eps,
        )


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
    """Mean validation cross-entropy (nats/token; on varassign, of the answers), and answer accuracy."""
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
    model.train()
    out = {"val_loss": sum(losses) / len(losses)}
    if total:
        out["val_accuracy"] = correct / total
    return out


# --- checkpoints -------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, corrupt, or made for another model."""


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
    if cfg.device == "auto":
        return torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def main(cfg: TrainConfig) -> dict:
    """Train (or resume) and return a summary: final validation loss, throughput, the eval curve."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = _device(cfg, rank)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CKPT_NAME
    torch.manual_seed(cfg.seed)
    task = _Task(cfg)
    model = GPT(cfg.model_config()).to(device)
    opt = _optimizer(model, cfg)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
    start, history = 0, []
    if cfg.resume and ckpt_path.exists():
        tensors, meta = load_checkpoint(ckpt_path)
        want, got = _model_config_dict(model.config), meta["model_config"]
        diff = {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
        if diff:
            raise CheckpointError(
                f"checkpoint {ckpt_path} was made for another model (field: (checkpoint, now)) {diff}; "
                f"use another --out_dir or --resume=false."
            )
        _load_model_state(model, tensors, ckpt_path)
        for i, p in enumerate(opt.param_groups[0]["params"]):
            st = {k.split(".", 2)[2]: v.to(device) for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
            if st:
                opt.state[p] = st
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.data" in tensors:
            data_gen.set_state(tensors["rng.data"])
        start = meta["step"]
        history = meta["extra"].get("history", [])
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model)
    failed = False
    try:
        main_proc = rank == 0
        bar = _progress(cfg, start) if main_proc else None
        tokens_per_step = cfg.batch_size * cfg.context_len * world
        t_start, tok_seen, last = time.perf_counter(), 0, {}
        model.train()
        step = start
        for step in range(start, cfg.max_steps):
            if cfg.stop_after and step - start >= cfg.stop_after:
                if bar is not None:
                    bar.close()
                return {"stopped_at": step, "out_dir": str(out_dir)}
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            x, y = task.batch(data_gen)
            x, y = x.to(device), y.to(device)
            loss, stats = train_model(x, y)  # through DDP's forward when distributed, so gradients sync
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            tok_seen += x.numel() * world
            tps = tok_seen / (time.perf_counter() - t_start)
            last = {"step": step + 1, "loss": loss.item(), "tokens_per_s": tps, **stats}
            done = step + 1 == cfg.max_steps
            if main_proc and ((step + 1) % cfg.eval_interval == 0 or done):
                ev = evaluate(model, task, device)
                last.update(ev)
                history.append({k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()})
                _log(out_dir, history[-1])
            if main_proc and ((step + 1) % cfg.ckpt_interval == 0 or done):
                save_checkpoint(ckpt_path, model, opt, step + 1, cfg, data_rng=data_gen.get_state(), history=history)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tps:,.0f}", **(
                    {"val": f"{last['val_loss']:.3f}"} if "val_loss" in last else {}
                ))  # fmt: skip
        if bar is not None:
            bar.close()
    except BaseException:
        failed = True
        raise
    finally:
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


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.max_steps, initial=start, desc=Path(cfg.out_dir).name, file=sys.stderr, dynamic_ncols=True)


def _log(out_dir: Path, row: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
