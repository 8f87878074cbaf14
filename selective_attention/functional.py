"""Functional selective attention on ``[B, H, L, D]`` tensors: validate once, dispatch to a backend."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .masks import NormalizedMask, causal_removed, normalize_mask
from .ops.naive import naive_attention
from .ops.sdpa import sdpa_attention

__all__ = ["selective_attention", "attention_weights"]

Backend = Literal["auto", "naive", "sdpa"]


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [B, H, L, D], got {t.dim()}-D {tuple(t.shape)}. "
                f"(For [B, L, d_model] inputs use the SelectiveAttention module.)"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}.")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(f"q, k, v must share [B, H]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}.")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length Lk; got k {tuple(k.shape)}, v {tuple(v.shape)}.")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim D; got q {tuple(q.shape)}, k {tuple(k.shape)}.")


def _prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selective_mask: Tensor | None,
    is_causal: bool,
    key_padding_mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
) -> tuple[NormalizedMask, float]:
    _check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}.")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    B, H, Lq, _ = q.shape
    mask = normalize_mask(
        selective_mask,
        B=B,
        H=H,
        Lq=Lq,
        Lk=k.shape[-2],
        dtype=q.dtype,
        device=q.device,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
    )
    return mask, scale


def selective_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selective_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Multi-head selective attention ``softmax(q k^T * scale - F) v``.

    Args:
        q: ``[B, H, Lq, D]`` queries.
        k: ``[B, H, Lk, D]`` keys.
        v: ``[B, H, Lk, Dv]`` values.
        selective_mask: ``None``, bool (True = key removed) or float F (finite values are
            *subtracted* from the scaled logits; +inf or -inf removes the key). 2-D ``(Lq, Lk)`` or
            4-D ``(B|1, H|1, Lq, Lk)``. Example, ``Lq = Lk = 3``, float F::

                F = [[0,   inf, inf],        query 0 sees key 0
                     [0,   0,   inf],        query 1 sees keys 0, 1
                     [2.0, 0,   0  ]]        query 2 sees all, key 0 weighted down by e^-2

        is_causal: also remove future keys, ``j > i + Lk - Lq`` (queries aligned to the end of the
            keys, which for ``Lq == Lk`` is the usual upper triangle).
        key_padding_mask: bool ``(B, Lk)``, True = padding, removed for every query.
        dropout_p: dropout on the attention weights; applied as given (pass 0.0 in eval).
        scale: logit scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (fastest exact path), ``"naive"`` (the spec) or ``"sdpa"``.

    Returns:
        ``[B, H, Lq, Dv]``. A query whose keys are all removed gets zeros (not NaN), and finite
        (zero) gradients.
    """
    mask, scale = _prepare(q, k, v, selective_mask, is_causal, key_padding_mask, dropout_p, scale)
    Lq, Lk = q.shape[-2], k.shape[-2]
    if backend in ("auto", "sdpa"):
        return sdpa_attention(
            q, k, v, removed=mask.removed, penalty=mask.penalty, causal=mask.causal, scale=scale, dropout_p=dropout_p
        )
    if backend == "naive":
        removed = _with_causal(mask, Lq, Lk, q.device)
        return naive_attention(q, k, v, removed=removed, penalty=mask.penalty, scale=scale, dropout_p=dropout_p)[0]
    raise ValueError(f"backend must be one of 'auto', 'naive', 'sdpa'; got {backend!r}.")


def attention_weights(
    q: Tensor,
    k: Tensor,
    selective_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The attention weights ``[B, H, Lq, Lk]`` (before dropout) that :func:`selective_attention`
    uses, for inspection and plots. Same mask arguments; rows with every key removed are 0."""
    mask, scale = _prepare(q, k, k, selective_mask, is_causal, key_padding_mask, 0.0, scale)
    removed = _with_causal(mask, q.shape[-2], k.shape[-2], q.device)
    return naive_attention(q, k, k, removed=removed, penalty=mask.penalty, scale=scale)[1]


def _with_causal(mask: NormalizedMask, Lq: int, Lk: int, device: torch.device) -> Tensor | None:
    """The mask's full removal set, the causal rule written out when it was folded into a flag."""
    if not mask.causal:
        return mask.removed
    return causal_removed(Lq, Lk, device)  # mask.removed is None whenever mask.causal
