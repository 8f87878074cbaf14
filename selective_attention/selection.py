"""The paper's selection: the penalty F that a layer computes from one head's own scores.

Leviathan, Kalman & Matias (ICLR 2025), in our words (DESIGN §3). With scaled causal logits
``l[k, j] = q[k] . k[j] * scale`` of the selecting head:

1. ``S[k, j] = relu(l[k, j])`` for ``1 <= j < k``, else 0: token k votes to mask earlier token j;
   a token never masks itself and the first token (BOS) is never masked.
2. ``F[i, j] = sum_{k < i} S[k, j]``: the exclusive running sum down the query axis, so k's vote
   only affects queries after k.
3. Every head uses ``softmax_j(l_h[i, j] - F[i, j])``, causal. No stop-gradient, no clamp.

So F >= 0, ``F[:, 0] = 0``, ``F[i, i] = 0`` and ``F[i, j]`` never decreases with i.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["selection_scores", "selection_penalty", "vote_mask", "exclusive_cumsum"]


def vote_mask(Lq: int, Lk: int, *, offset: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Where a vote ``S[k, j]`` may be nonzero: ``1 <= j < k`` (bool ``(Lq, Lk)``).

    Rows are the voting tokens ``k = offset .. offset + Lq - 1``; columns the keys ``j = 0 .. Lk - 1``.
    """
    k = torch.arange(offset, offset + Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    return (j < k) & (j >= 1)


def selection_scores(qs: Tensor, ks: Tensor, *, scale: float | None = None, offset: int = 0) -> Tensor:
    """The votes ``S = relu(qs ks^T * scale)`` restricted to ``1 <= j < k``.

    Args:
        qs: ``[..., Lq, Ds]`` the selecting queries (rows are tokens ``offset ..``).
        ks: ``[..., Lk, Ds]`` the keys (tokens ``0 .. Lk - 1``).
        scale: default ``1 / sqrt(Ds)``.

    Returns:
        ``[..., Lq, Lk]``, zero outside ``1 <= j < k``.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(qs.shape[-1])
    logits = torch.matmul(qs, ks.transpose(-2, -1)) * scale
    allowed = vote_mask(qs.shape[-2], ks.shape[-2], offset=offset, device=qs.device)
    return torch.relu(logits).masked_fill(~allowed, 0.0)


def selection_penalty(q0: Tensor, k0: Tensor, *, scale: float | None = None) -> Tensor:
    """The paper's F from the selecting head's queries and keys (naive: materialises ``[..., L, L]``).

    Args:
        q0: ``[B, L, D]`` (or any ``[..., L, D]``) queries of the selecting head.
        k0: same shape, its keys.
        scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
        F ``[B, L, L]``: ``F[b, i, j] = sum_{k < i} relu(q0[k] . k0[j] * scale)`` over ``1 <= j < k``.
        For inspection and plots; the attention backends never build it whole.

    Example::

        F = selection_penalty(q[:, 0], k[:, 0])     # head 0 of q, k: [B, H, L, D]
        masked = F > 1.0                            # (query, key) pairs down-weighted by > e
    """
    if q0.shape != k0.shape:
        raise ValueError(f"q0 and k0 must have the same shape [..., L, D]; got {tuple(q0.shape)}, {tuple(k0.shape)}.")
    S = selection_scores(q0, k0, scale=scale)  # [..., L, L]
    return exclusive_cumsum(S, dim=-2)  # row i sums the votes of rows k < i


def exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """``out[i] = sum_{k < i} x[k]`` along ``dim`` (a shifted cumsum; ``cumsum - x`` would round)."""
    c = torch.cumsum(x, dim=dim)
    if c.shape[dim] == 0:
        return c
    return torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c.narrow(dim, 0, c.shape[dim] - 1)], dim=dim)
