"""One contract for every backend, and the dispatcher that picks one.

A backend is a module with two functions of one :class:`Request`:

* ``supports(req) -> str | None``: None when it can serve the request, else the reason, a sentence
  that names the fix (a named backend that cannot serve raises :class:`BackendRefused` with it);
* ``attend(req) -> (out, rows)``: ``out`` ``[B, H, Lq, Dv]``; ``rows`` the memory loss's soft count
  of masked keys ``sum_j min(F[i, j], tau) / tau`` ``[B, G, L]`` (summed in at least float32) when
  ``req.tau`` is given, else None.

``backend="auto"`` takes the first of :data:`PREFERENCE` that supports the request on its device.
Adding a backend: its module (``supports`` + ``attend``, with a test against ``ops/naive.py``) and
one line in :data:`PREFERENCE`.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from ..callers import caller_level
from ..masks import NormalizedMask
from ..selection import Voters

__all__ = ["Request", "BackendRefused", "PREFERENCE", "NAMES", "backend_module", "choose", "dispatch"]


@dataclass(frozen=True, eq=False)
class Request:
    """One validated attention call, what every backend reads.

    Attributes:
        q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``: ``Hkv = H``, or fewer
            (grouped-query attention, ``H % Hkv == 0``): query head h reads key/value head ``h // group``.
        mask: the user's masks (:class:`~selective_attention.masks.NormalizedMask`). With ``voters``
            it was built without ``is_causal``: paper mode is causal self-attention in every backend.
        scale: the attention logit scale.
        voters: who votes for the paper's F (:class:`~selective_attention.selection.Voters`), or
            None for standard attention.
        tau: return the memory-loss rows with this tau (paper mode only), or None.
        dropout_p: dropout on the attention weights, applied as given.
        chunk_size: query rows per chunk, for the backends that walk chunks (None: their default).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: NormalizedMask
    scale: float
    voters: Voters | None = None
    tau: float | None = None
    dropout_p: float = 0.0
    chunk_size: int | None = None

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads ``Hkv`` (the query heads H, or fewer under grouped-query attention)."""
        return self.k.shape[1]

    @property
    def group(self) -> int:
        """Query heads per key/value head, ``H // Hkv`` (1: standard multi-head attention)."""
        return self.q.shape[1] // self.k.shape[1] if self.k.shape[1] else 1


class BackendRefused(ValueError, NotImplementedError):
    """A named backend cannot serve this request; the message says why and what to use instead.

    A ``ValueError`` (and, as before this contract, a ``NotImplementedError``)."""


# backend name -> (module under selective_attention.ops, devices where "auto" may pick it; None: any).
# The Triton kernels also run on CPU under TRITON_INTERPRET=1, for tests only: "auto" never picks them there.
PREFERENCE: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "triton": ("triton", ("cuda",)),
    "chunked": ("chunked", None),
    "sdpa": ("sdpa", None),
    "naive": ("naive", None),  # serves every request: the spec
}
NAMES = ("auto", *PREFERENCE)


def backend_module(name: str) -> ModuleType:
    """The module implementing backend ``name``."""
    return _MODULES[name]


# Imported here, once (none of them imports Triton): an import inside ``dispatch`` would break the graph of a
# model under ``torch.compile`` at every attention call.
_MODULES: dict[str, ModuleType] = {
    name: importlib.import_module(f".{mod}", __package__) for name, (mod, _) in PREFERENCE.items()
}


def choose(backend: str, req: Request) -> str:
    """The backend that serves ``req``: ``backend`` itself when named (or :class:`BackendRefused` with its
    reason), the first of :data:`PREFERENCE` that supports it on its device for ``"auto"``."""
    if backend == "auto":
        device = req.q.device.type
        refusals = {}
        for name, (_, devices) in PREFERENCE.items():
            if devices is None or device in devices:
                reason = backend_module(name).supports(req)
                if reason is None:
                    if name == "naive" and req.voters is not None:
                        _warn_materialising(req, refusals)
                    return name
                refusals[name] = reason
        raise AssertionError("unreachable: the naive backend serves every request")
    if backend not in PREFERENCE:
        raise ValueError(f"backend must be one of {NAMES}; got {backend!r}.")
    reason = backend_module(backend).supports(req)
    if reason is not None:
        raise BackendRefused(reason)
    return backend


# a paper-mode call that "auto" sends to the naive spec warns when the weights it builds are at least this large
NAIVE_WARN_BYTES = 256 * 2**20


def _warn_materialising(req: Request, refusals: dict[str, str]) -> None:
    """Warn that ``backend="auto"`` runs a large paper-mode call on the naive spec, which builds ``[B, H, Lq, Lk]``
    (the weights and F), with the memory-lean backends' reasons for refusing it (each names its fix: most often
    attention dropout, the seed module's default ``dropout=0.1`` in training mode)."""
    B, H, Lq, _ = req.q.shape
    size = B * H * Lq * req.k.shape[-2] * req.q.element_size()
    if size < NAIVE_WARN_BYTES or torch.compiler.is_compiling():
        return
    why = " ".join(f"{name}: {reason}" for name, reason in refusals.items() if name != "sdpa")
    warnings.warn(
        f"backend='auto' runs this paper-mode call on the naive spec, which builds [B, H, Lq, Lk] tensors "
        f"({size / 2**20:.0f} MiB each here), because the memory-lean backends cannot serve it. {why}",
        stacklevel=caller_level(),
    )


def dispatch(backend: str, req: Request) -> tuple[Tensor, Tensor | None]:
    """Run ``req`` on ``backend`` (a name of :data:`NAMES`): ``(out, memory-loss rows or None)``."""
    return backend_module(choose(backend, req)).attend(req)
