"""Checkpoints of the training loop: one safetensors file per run, written atomically, read without running code.

``save_checkpoint`` stores ``model.state_dict()``, ``optimizer.state_dict()``, the RNG states and whatever the
run adds (its history, each rank's data stream, the training text's record) with a sha256 over the tensors and
the metadata; ``load_checkpoint`` reads every format version since the first (and refuses a newer one, a corrupt
file or one that fails its checksum with a :class:`CheckpointError` naming the fix); ``model_from_checkpoint``
rebuilds the trained model. What a resume must match (the training config, the tokenizer, the data) is the
training loop's business (:mod:`selective_attention.train`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .model import GPT, GPTConfig

__all__ = [
    "CKPT_NAME",
    "PREVIOUS_CKPT_NAME",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "gpt_config_from_dict",
    "model_state",
    "optimizer_state",
    "tensors_checksum",
    "signed",
]

CKPT_NAME = "ckpt.safetensors"
PREVIOUS_CKPT_NAME = "previous-ckpt.safetensors"  # where --resume=false sets the old run's checkpoint aside
# 3: model.state_dict() and optimizer.state_dict() (tensors in the file, param_groups and other non-tensors as
#    JSON metadata), the aliases of tied weights, GPTConfig.extra, the model config nested in train_config.
# 2: a sha256 of the tensors. 1: no checksum (loads with a warning). 1 and 2 flattened one parameter group's
#    optimizer state into optim.{i}.{name} and the model fields into train_config; both still load and resume.
# 4: format 3 plus the tokenizer ("tokenizer": its kind; a BPE tokenizer's JSON with a sha256). A checkpoint of
#    formats 1-3 is byte level. Written as a new version so that code from before it refuses a BPE checkpoint
#    instead of reading its token ids as bytes.
# 5: format 4 with the checksum over the metadata too (every entry but the checksum, after the tensors): a
#    flipped byte in a config (rope_base, selection, ...) would otherwise load as another model, silently.
FORMAT_VERSION = "5"
READABLE_VERSIONS = ("1", "2", "3", "4", "5")
# formats whose checksum covers the tensors only (a format-5 file relabelled 4 is checked so: a deliberate edit,
# not the single flipped byte the checksum guards against)
_TENSOR_ONLY_CHECKSUM = ("1", "2", "3", "4")


# GPTConfig fields that do not change the model or its training: free-form notes
_MODEL_NOTES = frozenset({"extra"})
# Checkpoint formats 1-2 stored these GPTConfig fields flat in train_config (d_head 0 = None, selection_layers a
# string like "0,2", "" = None)
_LEGACY_MODEL_FIELDS = ("n_layer", "n_head", "d_model", "d_head", "context_len", "dropout", "selection",
                        "selection_layers", "selection_head", "selection_per_head", "selection_projection",
                        "memory_eps", "memory_tau")  # fmt: skip


_AFRESH = "selective-attention train --resume=false starts over in its folder"  # what every command may suggest


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, corrupt, of an unknown format version, or made for another
    model or training config."""


def tensors_checksum(tensors: dict[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (catches flipped bytes that
    would otherwise load as wrong weights and evaluate to ``val_loss: nan``), then, if given, every
    ``metadata`` entry but ``"checksum"``, in key order (format 5 on: a changed config is caught too)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_raw_bytes(t))  # the raw bytes, whatever the dtype
    for key in sorted(metadata or {}):
        if key != "checksum":
            h.update(f"{len(key)}:{key}={len(metadata[key])}:".encode() + metadata[key].encode())
    return h.hexdigest()


def _raw_bytes(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor ``t``, read in place, without NumPy (``Tensor.numpy()`` needs it, and the
    CPU wheel of torch does not install it: saving and loading failed with "Numpy is not available"). Valid while
    ``t`` lives."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def require_safetensors() -> None:
    """Refuse, naming the extra to install, when ``safetensors`` (every checkpoint's format) is missing: called before
    a run trains, so a missing package is not found only when its first checkpoint is written."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"checkpoints are safetensors files and safetensors is not installed ({e}): pip install "
            "'selective-attention[train]' (or pip install safetensors)."
        ) from e


def signed(tensors: dict[str, Tensor], meta: Mapping[str, str]) -> dict[str, str]:
    """``meta`` with the checksum its ``format_version`` stores: over the tensors and (format 5 on) the metadata."""
    meta = {k: v for k, v in meta.items() if k != "checksum"}
    covered = None if meta.get("format_version") in _TENSOR_ONLY_CHECKSUM else meta
    return {**meta, "checksum": "sha256:" + tensors_checksum(tensors, covered)}


def _untie(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop each entry that is the same tensor as an earlier one (tied weights: lm_head.weight is tok_emb.weight;
    safetensors refuses shared memory) -> ``(state, {dropped name: the name it is})``."""
    seen, kept, aliases = {}, {}, {}
    for name, t in state.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        kept[name] = t
    return kept, aliases


def _to_json(obj, what: str) -> str:
    try:
        return json.dumps(obj)
    except TypeError as e:
        raise ValueError(f"cannot save {what} in a checkpoint: {e}; keep it to JSON values (numbers, strings, "
                         f"lists, dicts).") from None  # fmt: skip


def save_checkpoint(
    path: Path, model: GPT, opt: torch.optim.Optimizer, step: int, cfg, tokenizer=None, **extra
) -> None:
    """``model.state_dict()``, ``opt.state_dict()`` and the RNG states in one safetensors file (format
    ``FORMAT_VERSION``): every tensor in the file, the rest (configs, the optimizer's param_groups and non-tensor
    state, the tokenizer (default: bytes; a BPE one as its JSON with a sha256), ``extra`` such as the history) as
    JSON metadata, with a sha256 of the tensors and the metadata. ``cfg``: the run's ``TrainConfig`` (any dataclass;
    stored as ``train_config``). Written to a temp file, fsynced and renamed, so a crash mid-write leaves the
    previous checkpoint intact."""
    require_safetensors()
    from safetensors.torch import save_file

    from .data import ByteTokenizer

    model_state, aliases = _untie(model.state_dict())
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    opt_state = opt.state_dict()
    opt_values: dict[str, dict] = {}  # per-parameter state that is not a tensor
    for pid, st in opt_state["state"].items():
        for name, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"optim.state.{pid}.{name}"] = val.detach().cpu().contiguous()
            else:
                opt_values.setdefault(str(pid), {})[name] = val
    tensors["rng.torch"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":  # dropout on a GPU draws from that device's generator
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    if "data_rng" in extra:  # the single data stream callers passed before per-rank streams: rank 0's
        extra.setdefault("data_rngs", [extra.pop("data_rng")])
    for rank, state in enumerate(extra.pop("data_rngs", [])):  # each rank's data stream: rank 0's is "rng.data"
        tensors["rng.data" if rank == 0 else f"rng.data.{rank}"] = state
    meta = {
        "format_version": FORMAT_VERSION,
        "step": str(step),
        "train_config": _to_json(dataclasses.asdict(cfg), "the training config"),
        "model_config": _to_json(dataclasses.asdict(model.config), "GPTConfig (its extra)"),
        "optimizer": _to_json({"param_groups": opt_state["param_groups"], "state": opt_values}, "the optimizer"),
        "aliases": json.dumps(aliases),
        "tokenizer": json.dumps((tokenizer if tokenizer is not None else ByteTokenizer()).to_dict()),
        "extra": _to_json(extra, "the run's extra state"),
    }
    meta = signed(tensors, meta)
    # a linked checkpoint (on other storage, say) is replaced where it lives: replacing the link itself left the linked
    # file at its old step and wrote the new one on the run folder's disk
    path = path.resolve() if path.is_symlink() and path.exists() else path  # (a dangling link is replaced)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except KeyboardInterrupt:  # Ctrl-C mid-write: no checkpoint-sized temporary left behind
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:  # a full disk, a quota (safetensors raises its own error type for those)
        tmp.unlink(missing_ok=True)
        raise CheckpointError(unwritable(f"the checkpoint {path}", e)) from e
    _umask_permissions(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def unwritable(what: str, e: Exception) -> str:
    """The message of a run's file that could not be written (a full disk, a quota): the checkpoint is intact."""
    return (
        f"could not write {what} ({type(e).__name__}: {getattr(e, 'strerror', None) or e}); the checkpoint already "
        "there, if any, is intact. Free some space (or choose another --out_dir) and resume."
    )


def _umask_permissions(path: Path) -> None:
    """Give ``path`` the permissions a new file gets under this process's umask (safetensors writes 0600 whatever the
    umask; the run's log beside it gets the umask's). Best effort: the umask is read from /proc (setting it to read
    it would change it for every thread a moment), and where it cannot be read, or a file system refuses chmod, the
    file keeps 0600."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
        os.chmod(path, 0o666 & ~umask)
    except (OSError, StopIteration, ValueError, IndexError):
        pass


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (after a power loss the checkpoint is the new one, as the log says), where
    the platform can open a folder (not Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _nested_train_config(d: Mapping[str, object]) -> dict:
    """A stored train_config with the model's fields under "model": formats 1-2 stored them flat."""
    d = dict(d)
    if "model" in d:
        return d
    model = {k: d.pop(k) for k in _LEGACY_MODEL_FIELDS if k in d}
    if model.get("d_head") == 0:
        model["d_head"] = None
    layers = model.get("selection_layers")
    if isinstance(layers, str):
        model["selection_layers"] = [int(s) for s in layers.split(",") if s.strip()] or None
    d["model"] = model
    return d


def gpt_config_from_dict(d: Mapping[str, object]) -> GPTConfig:
    """The GPTConfig ``dataclasses.asdict`` stored: fields missing (added to GPTConfig after the checkpoint was
    written) take their defaults; fields GPTConfig no longer has are dropped with a warning."""
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    dropped = sorted(set(d) - names)
    if dropped:
        warnings.warn(f"ignoring stored model fields this GPTConfig does not have: {dropped}", stacklevel=2)
    kw = {k: v for k, v in d.items() if k in names}
    if kw.get("selection_layers") is not None:
        kw["selection_layers"] = tuple(kw["selection_layers"])
    return GPTConfig(**kw)


def _model_diff(stored: GPTConfig, now: GPTConfig) -> dict[str, tuple]:
    """``{field: (stored, now)}`` over the fields that shape the model or its training (not the notes). Selection
    layers compare by the layers that select: listing every layer is the same model as None; head widths and key/value
    heads by their values (``d_head=None`` is ``d_model // n_head``, ``n_kv_head=None`` is ``n_head``)."""
    resolved = {"d_head": "head_dim", "n_kv_head": "kv_heads"}

    def differs(name: str) -> bool:
        if name in resolved:
            return getattr(stored, resolved[name]) != getattr(now, resolved[name])
        if name == "selection_layers" and stored.selection_layers == now.selection_layers:
            return False  # the same list; whether its layers select is the selection field's difference
        if name == "selection_layers" and stored.n_layer == now.n_layer:
            return [stored.layer_selects(i) for i in range(stored.n_layer)] != [
                now.layer_selects(i) for i in range(now.n_layer)
            ]
        return getattr(stored, name) != getattr(now, name)

    return {
        f.name: (getattr(stored, f.name), getattr(now, f.name))
        for f in dataclasses.fields(GPTConfig)
        if f.name not in _MODEL_NOTES and differs(f.name)
    }


def _file_kind(path: Path) -> str:
    """What a path that is no regular file and no folder is, in words (for an error message)."""
    mode = path.stat().st_mode
    kinds = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device")]  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "a special file")


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read a checkpoint: ``(tensors, metadata)`` with the configs decoded (``train_config`` with the model under
    "model", also for formats 1-2); raises CheckpointError. Reads only tensors and JSON: never runs code."""
    require_safetensors()
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    if path.is_symlink() and not path.exists():  # a link whose target is gone (moved or unmounted storage)
        raise CheckpointError(
            f"{path} is a link to {os.readlink(path)}, which does not exist: restore the target (or the link), or "
            "remove the link to start a new run."
        )
    if not path.exists():
        hf = (  # a save_pretrained folder (hf-demo's output, say)
            " (its folder holds a Hugging Face model, config.json: load that with transformers' from_pretrained)"
            if (path.parent / "config.json").exists()
            else ""
        )
        raise CheckpointError(f"no checkpoint at {path}{hf}; train one with `selective-attention train --out_dir=...`.")
    if not path.is_file():  # opening a FIFO blocks until something writes to it: the load hung, silently
        kind = _file_kind(path)
        raise CheckpointError(
            f"{path} is {kind}, not a regular file: a checkpoint is a file written by selective-attention train "
            f"(its {CKPT_NAME}). Pass that file, or the folder of its run."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            version = raw.get("format_version")
            if version in READABLE_VERSIONS:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        if path.suffix != ".safetensors":  # another kind of file (a text, a .pt): not a damaged checkpoint
            raise CheckpointError(
                f"{path} is not a safetensors file ({type(e).__name__}: {e}): pass a checkpoint, the folder of a "
                f"run (its {CKPT_NAME}) written by selective-attention train."
            ) from e
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a selective-attention checkpoint ({type(e).__name__}: {e}); "
            f"restore it from a copy, or retrain ({_AFRESH})."
        ) from e
    if version is None:
        raise CheckpointError(
            f"{path} is a safetensors file without selective-attention's metadata (no format version): not a "
            f"checkpoint of this library (another library's weights, e.g. a Hugging Face model's: load those with "
            f"transformers' from_pretrained). Pass a checkpoint written by selective-attention train (when training, "
            f"start afresh in its folder with --resume=false, or pass another --out_dir)."
        )
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this selective-attention reads versions "
            f"{', '.join(READABLE_VERSIONS)} (it writes {FORMAT_VERSION}). "
            + (
                "A newer version was written by a newer selective-attention: upgrade it (pip install -U "
                "selective-attention) to read this file."
                if isinstance(version, str) and version.isdigit() and int(version) > int(FORMAT_VERSION)
                else "That is no version selective-attention has written: the file was edited or written by other "
                "code; restore it from a copy, or retrain."
            )
        )
    legacy = version in ("1", "2")
    try:
        meta = {
            "format_version": version,
            "step": int(raw["step"]),
            "train_config": json.loads(raw["train_config"]),
            "model_config": json.loads(raw["model_config"]),
            "extra": json.loads(raw.get("extra", "{}")),
            # formats 1-2: one parameter group's state as optim.{i}.{name}; lm_head.weight tied, not stored
            "optimizer": None if legacy else json.loads(raw["optimizer"]),
            "aliases": {"lm_head.weight": "tok_emb.weight"} if legacy else json.loads(raw["aliases"]),
            # formats 1-3 (no tokenizer stored): byte level
            "tokenizer": json.loads(raw["tokenizer"]) if "tokenizer" in raw else None,
        }
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} has unreadable metadata ({type(e).__name__}: {e}): it is not a selective-attention "
            f"checkpoint of format {version}; restore it from a copy, or retrain ({_AFRESH})."
        ) from None
    kinds = {"train_config": dict, "model_config": dict, "extra": dict, "optimizer": (dict, type(None)),
             "aliases": dict, "tokenizer": (dict, type(None))}  # fmt: skip
    wrong = {k: type(meta[k]).__name__ for k, kind in kinds.items() if not isinstance(meta[k], kind)}
    if wrong:
        raise CheckpointError(
            f"checkpoint {path} has metadata of the wrong kind ({wrong}; each is a JSON object): it is not a "
            f"selective-attention checkpoint of format {version}, or was edited; restore it from a copy, or retrain."
        )
    if version == "1":  # no checksum: a later file relabelled as format 1 (to skip its checksum) is told apart
        later = [k for k in ("tokenizer", "aliases", "optimizer", "checksum") if k in raw]
        later += ["train_config.model"] if "model" in meta["train_config"] else []
        if later:
            raise CheckpointError(
                f"checkpoint {path} says format 1 but holds {later}, which format 1 never stored: a later checkpoint "
                f"whose format was edited (to pass without its checksum); restore it from a copy, or retrain."
            )
    meta["train_config"] = _nested_train_config(meta["train_config"])  # formats 1-2 stored the model's fields flat
    meta["tokenizer"] = _stored_tokenizer(meta["tokenizer"], path)
    checksum = raw.get("checksum")
    if checksum is None and version != "1":  # every format since 2 writes one: it was removed
        raise CheckpointError(
            f"checkpoint {path} (format {version}) has no checksum, which every checkpoint of that format is "
            f"written with: its metadata was edited, so its configs may no longer match its tensors. Restore it "
            f"from a copy, or retrain."
        )
    if checksum is None:
        warnings.warn(
            f"checkpoint {path} has no checksum (written before checksums were stored); its bytes cannot be "
            f"verified (resuming the run saves it again, with one).",
            stacklevel=2,
        )
    elif checksum != "sha256:" + tensors_checksum(tensors, None if version in _TENSOR_ONLY_CHECKSUM else raw):
        what = "tensor bytes" if version in _TENSOR_ONLY_CHECKSUM else "tensor bytes or metadata (configs, tokenizer)"
        raise CheckpointError(
            f"checkpoint {path} fails its checksum: its {what} changed after it was written (disk or copy "
            f"corruption, or an edit); restore it from a copy, or retrain ({_AFRESH})."
        )
    elif version in _TENSOR_ONLY_CHECKSUM:
        warnings.warn(
            f"checkpoint {path} (format {version}) has a checksum over its tensors only: a changed byte in its "
            f"configs (rope_base, selection, ...) cannot be detected (resuming the run saves it again as format "
            f"{FORMAT_VERSION}, whose checksum covers them).",
            stacklevel=2,
        )
    if meta["step"] < 0:  # (after the checksum: a damaged byte is named as damage) a resume would train at lr < 0
        raise CheckpointError(
            f"checkpoint {path} is at step {meta['step']}, which training never writes (steps count from 0): it was "
            f"edited or written by other code; restore it from a copy, or retrain ({_AFRESH})."
        )
    return tensors, meta


def malformed_text_record(meta: dict) -> bool:
    """Whether a loaded checkpoint's record of its training text (``extra["data"]``: source, path, sha256, which eval
    and resume read) is there but not as training writes it (an edit signed again, another writer)."""
    text = meta["extra"].get("data")
    return text is not None and not (
        isinstance(text, dict)
        and all(k in text and isinstance(text[k], (str, type(None))) for k in ("source", "path"))
        and isinstance(text.get("sha256"), str)
    )


def _stored_tokenizer(stored, path: Path):
    """The tokenizer object of a checkpoint's "tokenizer" entry (None: byte level), or a CheckpointError."""
    from .data import tokenizer_from_dict

    try:
        return tokenizer_from_dict(stored)
    except ValueError as e:
        raise CheckpointError(
            f"checkpoint {path} holds a tokenizer this code cannot use: {e} Restore the checkpoint from a copy, "
            f"or retrain it."
        ) from None


def _check_tokenizer_fits(tokenizer, config: GPTConfig, path) -> None:
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"checkpoint {path}'s tokenizer ({tokenizer!r}, {tokenizer.vocab_size} tokens) does not fit its model "
            f"(vocab_size={config.vocab_size}): the checkpoint is damaged or was edited."
        )


def model_state(tensors: dict[str, Tensor], meta: dict) -> dict[str, Tensor]:
    """The model's state dict from a loaded checkpoint, tied weights restored."""
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    for name, same in meta["aliases"].items():
        if name in state:  # a tied weight is stored once: an alias naming a stored tensor would replace it
            raise CheckpointError(
                f"checkpoint alias {name!r} -> {same!r} names a tensor the file also stores: the checkpoint was "
                f"edited or written by other code; restore it from a copy, or retrain."
            )
        if same in state:
            state[name] = state[same]
    return state


def optimizer_state(tensors: dict[str, Tensor], meta: dict, opt: torch.optim.Optimizer, path="checkpoint") -> dict:
    """The optimizer's state dict from a loaded checkpoint, for ``opt.load_state_dict``. Formats 1-2 stored one
    parameter group's state as ``optim.{i}.{name}``: it takes ``opt``'s param_groups. A record not as training writes
    it (no param_groups, a state that is no mapping, a parameter id that is no int) is a CheckpointError."""
    try:
        return _optimizer_state(tensors, meta, opt)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {path}'s optimizer record is not as training writes it ({type(e).__name__}: {e}): it is "
            f"corrupt or edited. Evaluate it (selective-attention eval) if its model loads, or use another --out_dir "
            f"or --resume=false."
        ) from None


def _optimizer_state(tensors: dict[str, Tensor], meta: dict, opt: torch.optim.Optimizer) -> dict:
    state: dict[int, dict] = {}
    if meta["optimizer"] is None:
        for key, t in tensors.items():
            if key.startswith("optim."):
                i, name = key[len("optim.") :].split(".", 1)
                state.setdefault(int(i), {})[name] = t
        return {"state": state, "param_groups": opt.state_dict()["param_groups"]}
    for key, t in tensors.items():
        if key.startswith("optim.state."):
            pid, name = key[len("optim.state.") :].split(".", 1)
            state.setdefault(int(pid), {})[name] = t
    for pid, values in meta["optimizer"]["state"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = meta["optimizer"]["param_groups"]
    if not isinstance(groups, list):
        raise TypeError(f"param_groups is a {type(groups).__name__}, not a list")
    return {"state": state, "param_groups": groups}


def _load_model_state(model: GPT, state: dict[str, Tensor], path) -> None:
    have = model.state_dict()
    missing, unexpected = [k for k in have if k not in state], [k for k in state if k not in have]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing}, unexpected {unexpected}.")
    # a tied weight (lm_head and the embedding) is one tensor: two stored values for it would load the last, silently
    tied: dict[int, list[str]] = {}
    for name, t in have.items():
        tied.setdefault(t.data_ptr(), []).append(name)
    for names in (n for n in tied.values() if len(n) > 1):
        first = state[names[0]]
        other = [n for n in names[1:] if state[n] is not first and not torch.equal(state[n], first)]
        if other:
            raise CheckpointError(
                f"checkpoint {path} holds different values for the tied weights {[names[0], *other]} (one tensor in "
                f"this model; training stores it once, with an alias): it was edited or written by other code; "
                f"restore it from a copy, or retrain."
            )
    # load_state_dict would cast another dtype silently (an int or bool tensor too): training writes the model's own
    other = {k: str(t.dtype) for k, t in state.items() if t.dtype != have[k].dtype}
    if other:
        raise CheckpointError(
            f"checkpoint {path} holds tensors of another dtype than this model's ({have[next(iter(other))].dtype}): "
            f"{other}. Training writes the model's own dtype: the file was edited; restore it from a copy, or retrain."
        )
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds non-finite weights (NaN or inf) in {bad}, which training never saves: it is "
            f"corrupt or edited; restore it from a copy, or retrain."
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {e}") from None


def _load_optimizer_state(opt: torch.optim.Optimizer, state: dict, path, step: int = 0) -> None:
    """Restore the optimizer's state; its hyperparameters stay those of the config it was built from (a resume
    with --allow_config_change=true trains with the new ones). A checkpoint past step 0 must hold some state: one
    without any would resume with every moment at zero, silently."""
    if step > 0 and not state.get("state"):
        raise CheckpointError(
            f"checkpoint {path} is at step {step} but holds no optimizer state (its moments), which training always "
            f"saves: it was edited or written by other code, and a resume would restart AdamW's moments from zero. "
            f"Evaluate it (selective-attention eval), or use another --out_dir or --resume=false."
        )
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {path}'s optimizer state does not fit this model's optimizer ({type(e).__name__}: {e}); "
            f"use another --out_dir or --resume=false."
        ) from None
    for g, h in zip(opt.param_groups, hyper):
        g.update(h)
    # load_state_dict checks the groups, not the tensors: a moment of another shape crashed inside the first step, and
    # a NaN in one stopped the run as "training diverged ... lower --lr"
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, t in opt.state.get(p, {}).items():
            if not isinstance(t, Tensor):
                continue
            scalar = t.dim() == 0  # AdamW's step count
            shaped = scalar or t.shape == p.shape
            if not shaped or (t.is_floating_point() and not torch.isfinite(t).all()):
                what = f"shape {tuple(t.shape)}" if not shaped else "non-finite values (NaN or inf)"
            elif (key == "step" or "exp_avg_sq" in key) and bool((t < 0).any()):
                what = "negative values (a step count, or a mean of squares)"
            else:
                continue
            raise CheckpointError(
                f"checkpoint {path}'s optimizer state {key!r} of parameter {i} (shape {tuple(p.shape)}) has "
                f"{what}, which training never saves: it is corrupt or edited; restore it from a copy, or "
                f"retrain ({_AFRESH})."
            )


def _check_shapes(config: GPTConfig, state: dict[str, Tensor], path) -> None:
    """The model config's parameter shapes against the stored tensors', read from a model built on the meta device
    (no memory): an edited size (mlp_ratio=1e9) is refused by name before the real model is allocated for it."""
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in GPT(config).state_dict().items()}
    other = {k: (tuple(state[k].shape), tuple(s)) for k, s in shapes.items() if k in state and state[k].shape != s}
    if other:
        raise CheckpointError(
            f"checkpoint {path}'s model config does not fit its tensors (name: (stored, config's)) {other}: it was "
            f"edited or written by other code; restore it from a copy, or retrain."
        )


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the trained model of a checkpoint (eval mode), of any readable format version; its tokenizer is
    ``meta["tokenizer"]`` (a ``ByteTokenizer`` for checkpoints from before tokenizers were stored)."""
    tensors, meta = load_checkpoint(path)
    try:
        config = gpt_config_from_dict(meta["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} holds a model config this code refuses: {e}") from None
    _check_tokenizer_fits(meta["tokenizer"], config, path)
    state = model_state(tensors, meta)
    _check_shapes(config, state, path)
    model = GPT(config)
    _load_model_state(model, state, path)
    return model.to(device).eval(), meta
