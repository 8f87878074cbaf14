"""The executable spec: selective attention in the clearest PyTorch, materialising everything.

Every fast path is tested against this file for outputs and gradients. As a backend
(:mod:`~selective_attention.ops.registry`) it serves every request, dropout included. Grouped-query
keys and values (``Hkv < H`` heads) are simply repeated to H heads (:func:`repeat_kv`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import causal_removed
from ..selection import selection_penalty

if TYPE_CHECKING:
    from .registry import Request

__all__ = ["naive_attention", "naive_selective_attention", "repeat_kv", "supports", "attend", "weights"]


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    removed: Tensor | None = None,
    penalty: Tensor | None = None,
    scale: float,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """``softmax(q k^T * scale - penalty, removed keys excluded) v``.

    Args:
        q: ``[B, H, Lq, D]``; k: ``[B, H, Lk, D]``; v: ``[B, H, Lk, Dv]``.
        removed: bool, broadcasts to ``[B, H, Lq, Lk]``; True = weight exactly 0.
        penalty: float, broadcasts to ``[B, H, Lq, Lk]``; subtracted from the scaled logits.
        scale: multiplies ``q k^T`` (usually ``1 / sqrt(D)``).
        dropout_p: dropout on the attention weights (applied as given: pass 0 in eval).

    Returns:
        ``(out [B, H, Lq, Dv], weights [B, H, Lq, Lk])``; ``weights`` are before dropout. A query
        whose keys are all removed gets zero weights and a zero output (not NaN).
    """
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B, H, Lq, Lk]
    if penalty is not None:
        logits = logits - penalty
    if removed is not None:
        logits = logits.masked_fill(removed, float("-inf"))
        # A row with every key removed is all -inf and softmax would give NaN; give it a harmless
        # finite row and zero its weights after, so both the output and its gradients are 0.
        dead = removed.all(dim=-1, keepdim=True)  # [b, h, Lq, 1]
        logits = logits.masked_fill(dead, 0.0)
        weights = torch.softmax(logits, dim=-1).masked_fill(dead, 0.0)
    else:
        weights = torch.softmax(logits, dim=-1)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights
    return torch.matmul(dropped, v), weights


def naive_selective_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qs: Tensor,
    ks: Tensor,
    *,
    removed: Tensor | None = None,
    penalty: Tensor | None = None,
    scale: float,
    sel_scale: float,
    dropout_p: float = 0.0,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's causal selective attention, materialising F ``[B, G, L, L]`` and the weights.

    Args:
        q, k: ``[B, H, L, D]``; v: ``[B, H, L, Dv]``.
        qs, ks: ``[B, G, L, Ds]``, the selecting queries/keys; G = 1 (one F for all heads) or H.
        removed, penalty: user masks as in :func:`naive_attention` (penalties add to F).
        scale: attention logit scale; sel_scale: the votes' logit scale.
        key_padding_mask: bool ``(B, L)``, True = padding, for the votes only (removing the padding
            keys is ``removed``'s job): padding neither votes nor is voted on, and each sequence's
            first real token is the protected one (:func:`~selective_attention.selection.vote_mask`).

    Returns:
        ``(out [B, H, L, Dv], weights [B, H, L, L], F [B, G, L, L])`` (F without the user penalty).
    """
    L = q.shape[-2]
    F = selection_penalty(qs, ks, scale=sel_scale, key_padding_mask=key_padding_mask)  # [B, G, L, L]
    future = causal_removed(L, L, q.device)
    removed = future if removed is None else removed | future
    total = F if penalty is None else F + penalty
    out, weights = naive_attention(q, k, v, removed=removed, penalty=total, scale=scale, dropout_p=dropout_p)
    return out, weights, F


def repeat_kv(k: Tensor, group: int) -> Tensor:
    """Grouped-query keys or values ``[B, Hkv, L, D]`` as ``[B, Hkv * group, L, D]``: head h of the
    result is head ``h // group`` of ``k`` (what the spec attends to; the fast paths never build it)."""
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def _run(req: Request) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(out, weights, F or None)`` for a request: the paper's F when it has voters. Grouped-query
    keys and values are repeated to H heads first (query head h reads key/value head ``h // group``)."""
    q, mask = req.q, req.mask
    k, v = repeat_kv(req.k, req.group), repeat_kv(req.v, req.group)
    if req.voters is None:
        removed = mask.removed_with_causal(q.shape[-2], k.shape[-2], q.device)
        out, w = naive_attention(
            q, k, v, removed=removed, penalty=mask.penalty, scale=req.scale, dropout_p=req.dropout_p
        )
        return out, w, None
    qs, ks = req.voters.tensors(q, k)
    return naive_selective_attention(
        q, k, v, qs, ks, removed=mask.removed, penalty=mask.penalty, scale=req.scale, sel_scale=req.voters.scale,
        dropout_p=req.dropout_p, key_padding_mask=mask.padding,
    )  # fmt: skip


def supports(req: Request) -> str | None:
    """The spec serves every request."""
    return None


def attend(req: Request) -> tuple[Tensor, Tensor | None]:
    """``(out, memory-loss rows or None)`` (the backend contract)."""
    out, _, F = _run(req)
    if req.tau is None:
        return out, None
    # summed in at least float32: the memory loss subtracts these rows from the count of tokens (~ L), where
    # bfloat16's spacing is 8 at L = 1024: max_i of such differences would be mostly rounding
    acc = torch.promote_types(F.dtype, torch.float32)
    # min(F, tau) with derivative 1 unless F > tau (1 at F = tau), written out: clamp's own subgradient at F = tau
    # is 1 before PyTorch 2.14 and 0 from it. NaN stays NaN (not tau), as in the chunked forward's clamp
    tau = tau_in(F.dtype, req.tau)
    capped = torch.where(F > tau, tau, F)
    return out, capped.sum(-1, dtype=acc) / req.tau


def tau_in(dtype: torch.dtype, tau: float) -> float:
    """``tau`` as ``min(F, tau)`` in ``dtype`` may use it: beyond the dtype's range (70000 in float16) it caps no
    finite F, so it is ``inf`` there (PyTorch refuses to convert it: torch 2.5 in where() and comparisons, every
    version in clamp_)."""
    return tau if tau <= torch.finfo(dtype).max else math.inf


def weights(req: Request) -> Tensor:
    """The attention weights ``[B, H, Lq, Lk]`` before dropout (0 on rows with every key removed)."""
    return _run(req)[1]
