"""One layer's KV cache for exact selective decoding, and its eviction policy (DESIGN §4).

Each layer keeps, per sequence, static buffers of cached keys/values and a running vector ``Fcum``:
``Fcum[j]`` is the penalty F that the *next* query will apply to cached key j. Decoding token t::

    evict        every kept token with Fcum > threshold, then, if the layer is full (budget
                 reached), the one with the largest Fcum; never the first token
    attend with  l_h[t, j] - Fcum[j]           over the kept tokens and t itself (Fcum[t] = 0)
    Fcum[j]  +=  relu(l_0[t, j])                for kept j other than the first token and t

Because F only grows, an evicted token would only have been masked harder later. With no budget
and no threshold this is exactly the full forward pass, one token at a time.

A budget ``b`` means: **at most b tokens per layer are stored and attended at any step, the newest
included**. So the buffers have exactly ``b`` slots, and a step first makes room
(:meth:`LayerCache.make_room`: evicts while the layer is full or a token is over the threshold), then
writes the new token, attends and votes. Evicting at the start of step t+1 rather than the end of
step t changes nothing: Fcum does not move in between. Without a budget the buffers hold the prompt
plus the tokens to generate.

Slots are reused (a free slot has position -1 and ``Fcum = +inf``, so the attention bias ``-Fcum``
already excludes it); positions are tensors. So a step has static shapes and no Python branches on
data: ``torch.compile`` compiles it once.

This file is the cache and the policy only: plain tensor functions and a dataclass of buffers. The
attention layer (``model.Attention``) reads and writes it; ``decoding.Decoder`` drives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .selection import Selection, selection_scores

__all__ = ["LayerCache", "eviction_score", "keep_after_prefill", "evictions", "fcum_after_prompt"]


# --- the policy: plain tensor functions ------------------------------------------------------------
def eviction_score(fcum: Tensor) -> Tensor:
    """``[B, G, n]`` -> ``[B, n]``: a token is dropped for all heads, so with one F per head it counts
    as masked only as much as its least-masking head masks it."""
    return fcum[:, 0] if fcum.shape[1] == 1 else fcum.amin(dim=1)


def keep_after_prefill(
    score: Tensor, budget: int | None, threshold: float | None, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Which of the T prefilled tokens to keep, bool ``[B, T]``: the first always; with a threshold
    those at or under it; with a budget the ``budget - 1`` others with the smallest score (ties: the
    newer kept). The same outcome as evicting the largest-score (oldest on ties) token one at a time.

    With ``key_padding_mask`` (bool ``[B, T]``, True = padding) padding is never kept and "the first"
    is each sequence's first real token."""
    B, T = score.shape
    real = torch.ones(B, T, dtype=torch.bool, device=score.device) if key_padding_mask is None else ~key_padding_mask
    first = real & (real.cumsum(dim=-1) == 1)  # the protected token of each sequence
    cand = real & ~first
    if threshold is not None:
        cand &= score <= threshold
    if budget is not None:
        newest_first = torch.arange(T - 1, -1, -1, device=score.device)
        key = score[:, newest_first].masked_fill(~cand[:, newest_first], float("inf"))
        ranked = newest_first[torch.sort(key, dim=-1, stable=True).indices]  # keep-preference order
        cand &= torch.zeros_like(cand).scatter_(1, ranked[:, : budget - 1], True)
    return cand | first


def evictions(fcum: Tensor, pos: Tensor, budget: int | None, threshold: float | None) -> Tensor:
    """What a step drops before writing its token, bool ``[B, cap]``, from a layer's ``fcum``
    ``[B, G, cap]`` and slot positions ``pos`` ``[B, cap]`` (-1 = free): every token over the
    threshold, then, if the layer is still full, the one with the largest score (the oldest on ties).
    Never the first token. Static shapes, no data-dependent branches."""
    evictable = pos > 0  # kept, and not the first token  [B, cap]
    score = torch.where(evictable, eviction_score(fcum), -float("inf"))  # [B, cap]
    over = score > threshold if threshold is not None else torch.zeros_like(evictable)
    if budget is None:
        return over
    kept = (pos >= 0).sum(-1) - over.sum(-1)  # [B]
    score = score.masked_fill(over, -float("inf"))
    # the victim: the largest score, the oldest on ties (when the layer is full a finite score exists,
    # since a budget >= 2 leaves room for the first token and at least one other)
    tied = score == score.amax(dim=-1, keepdim=True)
    oldest = torch.where(tied, pos, torch.iinfo(torch.long).max).argmin(dim=-1, keepdim=True)  # [B, 1]
    victim = torch.zeros_like(evictable).scatter_(1, oldest, (kept >= budget)[:, None])
    return over | victim


def fcum_after_prompt(
    qs: Tensor, ks: Tensor, chunk: int = 256, *, scale: float | None = None, key_padding_mask: Tensor | None = None
) -> Tensor:
    """``Fcum`` after a prompt of T tokens, ``[B, G, T]``: ``sum_k S[k, j]`` over all T voting rows,
    the F that the query after the prompt sees, from the voters ``qs`` ``[B, G, T, D]`` and ``ks``
    ``[B, G, T, D]`` (or ``[B, Gk, T, D]``, grouped-query heads: query head i with key head ``i // (G // Gk)``,
    not repeated). ``scale``: the voting logits' (default ``1 / sqrt(D)``). ``key_padding_mask`` (bool
    ``[B, T]``, True = padding): padding neither votes nor is voted on and each sequence's first real
    token is the protected one (:func:`~selective_attention.selection.vote_mask`). Chunked over the
    voting rows: never ``[B, G, T, T]``."""
    out = qs.new_zeros(qs.shape[0], qs.shape[1], qs.shape[2])
    scale = 1.0 / math.sqrt(qs.shape[-1]) if scale is None else scale
    for i0 in range(0, qs.shape[2], chunk):
        rows = qs[:, :, i0 : i0 + chunk]
        out += selection_scores(rows, ks, scale=scale, offset=i0, key_padding_mask=key_padding_mask).sum(dim=-2)
    return out


# --- the buffers ------------------------------------------------------------------------------------
@dataclass
class LayerCache:
    """One layer's cache and its policy. Shapes: ``k, v [B, Hkv, cap, D]`` (the layer's key/value heads:
    H, or fewer under grouped-query attention), ``fcum [B, G, cap]`` (+inf at free slots), ``pos [B, cap]``
    (-1 at free slots); ``ks [B, G, cap, D]`` for a dedicated selector. With a budget, ``cap == budget``."""

    k: Tensor
    v: Tensor
    fcum: Tensor
    pos: Tensor
    ks: Tensor | None
    budget: int | None = None  # at most this many tokens stored and attended, the newest included
    threshold: float | None = None  # evict any token whose Fcum exceeds this

    @classmethod
    def empty(
        cls,
        batch_size: int,
        capacity: int,
        *,
        n_heads: int,
        n_groups: int,
        head_dim: int,
        selector_keys: bool = False,
        budget: int | None = None,
        threshold: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LayerCache:
        """Free buffers of ``capacity`` slots (a layer with a budget needs ``capacity == budget``).
        ``n_heads``: the key/value heads stored (``Hkv``; the query heads only without grouped-query
        attention); ``n_groups``: the penalties F (1, or the query heads H with one F per head)."""
        if budget is not None and capacity != budget:
            raise ValueError(f"a layer with budget={budget} has exactly that many slots, got capacity={capacity}.")
        B, H, G, D = batch_size, n_heads, n_groups, head_dim
        kw = dict(dtype=dtype, device=device)
        return cls(
            k=torch.zeros(B, H, capacity, D, **kw),
            v=torch.zeros(B, H, capacity, D, **kw),
            fcum=torch.full((B, G, capacity), float("inf"), **kw),
            pos=torch.full((B, capacity), -1, dtype=torch.long, device=device),
            ks=torch.zeros(B, G, capacity, D, **kw) if selector_keys else None,
            budget=budget,
            threshold=threshold,
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def valid(self) -> Tensor:
        """Kept slots, bool ``[B, cap]``."""
        return self.pos >= 0

    def occupancy(self) -> Tensor:
        """Kept tokens per sequence, ``[B]``."""
        return self.valid.sum(-1)

    def kv_bytes(self) -> int:
        """Bytes of every stored key/value slot, free or kept: the k, v (and dedicated selector key)
        buffers, for the whole batch. Per-slot bookkeeping (``fcum``, ``pos``) is not counted."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.ks) if t is not None)

    # --- prefill -----------------------------------------------------------------------------------
    def fill(
        self, k: Tensor, v: Tensor, fcum: Tensor, ks: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> None:
        """Store a prompt read exactly: ``k, v`` ``[B, Hkv, T, D]``, its ``fcum`` ``[B, G, T]`` (and the
        selector's keys ``[B, G, T, D]``). Keeps what the policy allows (:func:`keep_after_prefill`),
        compacted to the front of the buffers in position order. Positions count from each sequence's
        first real token (``key_padding_mask``, bool ``[B, T]``, True = padding; without it, from 0): the
        protected token is at position 0 and padding is never stored."""
        keep = keep_after_prefill(eviction_score(fcum), self.budget, self.threshold, key_padding_mask)  # [B, T]
        if int(keep.sum(-1).max()) > self.capacity:
            raise ValueError(
                f"{int(keep.sum(-1).max())} prompt tokens to keep, but the cache has {self.capacity} slots."
            )
        first = 0 if key_padding_mask is None else (~key_padding_mask).long().argmax(dim=-1)  # [B]
        for b in range(k.shape[0]):
            kept = keep[b].nonzero().squeeze(-1)
            n = kept.numel()
            self.k[b, :, :n] = k[b, :, kept]
            self.v[b, :, :n] = v[b, :, kept]
            self.fcum[b, :, :n] = fcum[b, :, kept]
            self.pos[b, :n] = kept - (first if isinstance(first, int) else first[b])
            if ks is not None:
                self.ks[b, :, :n] = ks[b, :, kept]

    def grown(self, capacity: int) -> LayerCache:
        """A copy of this (unbudgeted) cache with ``capacity`` slots, the new ones free: for callers that
        cannot size the buffers in advance (:class:`selective_attention.hf.SelectiveCache`)."""
        if self.budget is not None or capacity < self.capacity:
            raise ValueError(f"only an unbudgeted cache grows, to at least {self.capacity} slots; got {capacity}.")
        B, Hkv, cap, D = self.k.shape
        new = LayerCache.empty(
            B, capacity, n_heads=Hkv, n_groups=self.fcum.shape[1], head_dim=D, selector_keys=self.ks is not None,
            threshold=self.threshold, dtype=self.k.dtype, device=self.k.device,
        )  # fmt: skip
        if self.v.shape[-1] != D:
            new.v = self.v.new_zeros(B, Hkv, capacity, self.v.shape[-1])
        for name in ("k", "v", "fcum", "pos", "ks"):
            old = getattr(self, name)
            if old is not None:
                (getattr(new, name)[:, :, :cap] if old.dim() >= 3 else getattr(new, name)[:, :cap]).copy_(old)
        return new

    # --- one step: make room, write, (attend: the layer's), vote ---------------------------------------
    def make_room(self) -> None:
        """Evict what the policy drops before a new token is written (:func:`evictions`)."""
        if self.budget is None and self.threshold is None:  # a branch on the configuration only
            return
        drop = evictions(self.fcum, self.pos, self.budget, self.threshold)
        self.pos.masked_fill_(drop, -1)
        self.fcum.masked_fill_(drop[:, None, :], float("inf"))

    def write(self, k: Tensor, v: Tensor, input_pos: Tensor, ks: Tensor | None = None) -> Tensor:
        """Write one token (``k, v`` ``[B, Hkv, 1, D]``, selector key ``[B, G, 1, D]``) at position
        ``input_pos`` (``[1]``, or ``[B]``: one per sequence, counted from its first real token) into each
        sequence's first free slot, with ``Fcum = 0``; returns the slots ``[B]``."""
        B, H, _, D = k.shape
        slot = self.pos.argmin(dim=-1)  # a free slot has position -1: the smallest  [B]
        self.k.scatter_(2, slot.view(B, 1, 1, 1).expand(B, H, 1, D), k)
        self.v.scatter_(2, slot.view(B, 1, 1, 1).expand(B, H, 1, v.shape[-1]), v)
        self.fcum.scatter_(2, slot.view(B, 1, 1).expand(B, self.fcum.shape[1], 1), 0.0)
        self.pos.scatter_(1, slot[:, None], input_pos.view(-1, 1).expand(B, 1))
        if ks is not None:
            self.ks.scatter_(2, slot.view(B, 1, 1, 1).expand(B, ks.shape[1], 1, ks.shape[-1]), ks)
        return slot

    def step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        input_pos: Tensor,
        selection: Selection | None = None,
        selector: tuple[Tensor, Tensor] | None = None,
        *,
        scale: float | None = None,
    ) -> Tensor:
        """One token through the cache -> ``[B, H, 1, Dv]``: make room (so at most ``budget`` tokens are
        stored and attended, the new one included), write it, attend with ``-Fcum``, and add its votes.

        Args:
            q: ``[B, H, 1, D]`` the token's queries; k, v: ``[B, Hkv, 1, D]`` its keys and values
                (grouped-query attention: the g query heads of a kv head are one ``[B, Hkv, g, D]``
                matrix against its cached keys; nothing is repeated).
            input_pos: ``[1]`` or ``[B]``, the token's position (see :meth:`write`).
            selection: who votes (``None``: a standard layer, no votes); a voting head's votes are its
                attention logits, already computed.
            selector: a dedicated voting pair's ``(qs, ks)`` ``[B, G, 1, Ds]`` (``Selection(projection=True)``).
            scale: the logit scale (default ``1 / sqrt(D)``).

        Static shapes, no data-dependent Python branches: compiles once. The softmax runs in at least
        float32."""
        self.make_room()
        slot = self.write(k, v, input_pos, ks=None if selector is None else selector[1])
        B, H, _, D = q.shape
        Hkv, cap = self.k.shape[1], self.k.shape[2]
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        qg = q.reshape(B, Hkv, H // Hkv, D)  # [B, Hkv, g, D]: query head h = (kv head, member)
        logits = (torch.matmul(qg, self.k.transpose(-2, -1)) * scale).view(B, H, 1, cap)  # [B, H, 1, cap]
        # free slots hold Fcum = +inf: the bias -Fcum removes them with no extra mask
        acc = torch.promote_types(q.dtype, torch.float32)
        p = torch.softmax(logits.to(acc) - self.fcum[:, :, None, :].to(acc), dim=-1).to(v.dtype)  # [B, H, 1, cap]
        y = torch.matmul(p.view(B, Hkv, H // Hkv, cap), self.v).view(B, H, 1, self.v.shape[-1])
        if selection is not None:
            if selection.heads is not None:  # voting heads: their logits are the attention logits just computed
                votes = logits[:, selection.heads]  # [B, G, 1, cap]
            else:  # a dedicated pair: its own logits against the cached selector keys
                qs = selector[0]
                vscale = scale if qs.shape[-1] == D else 1.0 / math.sqrt(qs.shape[-1])
                votes = torch.matmul(qs, self.ks.transpose(-2, -1)) * vscale  # [B, G, 1, cap]
            self.add_votes(votes, slot)
        return y

    def add_votes(self, vote_logits: Tensor, slot: Tensor) -> None:
        """Add the new token's votes ``relu(vote_logits)`` (``[B, G, 1, cap]``, the voters' scaled
        logits against every slot) to ``Fcum``, for kept tokens other than the first and the new one
        in ``slot`` ``[B]`` (DESIGN §3): after attending, as they affect later queries only."""
        voted = (self.pos > 0).scatter(1, slot[:, None], False)  # [B, cap]
        self.fcum += torch.relu(vote_logits[:, :, 0, :]) * voted[:, None, :]

    # --- for the decoder's eager checks ---------------------------------------------------------------
    def attended_next(self) -> int:
        """How many tokens the next step would attend to (the most over the batch): the kept ones
        that survive its evictions, and the new one."""
        drop = evictions(self.fcum, self.pos, self.budget, self.threshold)
        return int((self.valid.sum(-1) - drop.sum(-1) + 1).max())
