"""KV cache with exact selective decoding and context pruning (DESIGN §4).

Each layer keeps, per sequence, static buffers of cached keys/values and a running vector ``Fcum``:
``Fcum[j]`` is the penalty F that the *next* query will apply to cached key j. Decoding token t::

    attend with  l_h[t, j] - Fcum[j]           over the kept tokens and t itself (Fcum[t] = 0)
    Fcum[j]  +=  relu(l_0[t, j])                for kept j other than the first token and t
    evict        the kept token with the largest Fcum (never the first) while over the budget,
                 or every token with Fcum > threshold

Because F only grows, an evicted token would only have been masked harder later. With no budget
and no threshold this is exactly the full forward pass, one token at a time.

Buffers are allocated once (capacity ``budget + 1``, or the whole sequence without pruning) and
slots are reused (a free slot has position -1 and ``Fcum = +inf``, so the attention bias ``-Fcum``
already excludes it); the position is a tensor. So :meth:`Decoder.step` has
static shapes and no Python branches on data: ``torch.compile`` compiles it once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import GPT

__all__ = ["Decoder", "LayerCache"]


@dataclass
class LayerCache:
    """One layer's cache. Shapes: ``k, v [B, H, cap, D]``, ``fcum [B, G, cap]`` (+inf at free slots),
    ``pos [B, cap]`` (-1 at free slots); ``ks [B, G, cap, D]`` for a dedicated selector."""

    k: Tensor
    v: Tensor
    fcum: Tensor
    pos: Tensor
    ks: Tensor | None
    budget: int | None

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
        """Bytes of the kept keys and values (the most any sequence of the batch keeps, times B)."""
        per_token = (self.k[:, :, 0].numel() + self.v[:, :, 0].numel()) * self.k.element_size()
        return int(self.occupancy().max().item()) * per_token


def _eviction_score(fcum: Tensor) -> Tensor:
    """``[B, G, n]`` -> ``[B, n]``: a token is dropped for all heads, so with one F per head it counts
    as masked only as much as its least-masking head masks it."""
    return fcum[:, 0] if fcum.shape[1] == 1 else fcum.amin(dim=1)


def _keep_after_prefill(score: Tensor, budget: int | None, threshold: float | None) -> Tensor:
    """Which of the T prefilled tokens to keep, bool ``[B, T]``: the first always; with a threshold
    those at or under it; with a budget the ``budget - 1`` others with the smallest score (ties: the
    newer kept). The same outcome as evicting the largest-score (oldest on ties) token one at a time."""
    B, T = score.shape
    cand = torch.ones(B, T, dtype=torch.bool, device=score.device)
    cand[:, 0] = False
    if threshold is not None:
        cand &= score <= threshold
    if budget is not None:
        newest_first = torch.arange(T - 1, -1, -1, device=score.device)
        key = score[:, newest_first].masked_fill(~cand[:, newest_first], float("inf"))
        ranked = newest_first[torch.sort(key, dim=-1, stable=True).indices]  # keep-preference order
        cand &= torch.zeros_like(cand).scatter_(1, ranked[:, : budget - 1], True)
    cand[:, 0] = True
    return cand


class Decoder:
    """Incremental decoding for a :class:`~selective_attention.model.GPT`.

    Args:
        model: the model (its weights are used as they are; call ``model.eval()`` first).
        budget: max tokens kept per layer (int for all layers, or a list, one per layer); ``None``
            keeps everything. Layers without selection have Fcum = 0, so for them a budget is a
            sliding window that keeps the first token.
        threshold: evict any token whose Fcum exceeds this (after the step that pushed it over).
        compile: run :meth:`step` through ``torch.compile`` (inductor; static shapes, so it compiles
            once, a few seconds, and again only for another model, batch size, cache size or
            threshold; past dynamo's recompile limit, 8 by default, it runs eager). It pays off
            with a pruned cache, where the step is small and eager op overhead dominates (~1.7x
            faster on a 2-core CPU); with a full cache on CPU the compiled step was slower than eager.

    Example::

        dec = Decoder(model, budget=64)
        logits = dec.prefill(prompt, max_new_tokens=100)      # [B, vocab]
        tok = logits.argmax(-1); logits = dec.step(tok)      # one token at a time
        dec.occupancy(), dec.kv_bytes()                      # per layer: kept tokens, bytes
    """

    def __init__(
        self,
        model: GPT,
        *,
        budget: int | Sequence[int] | None = None,
        threshold: float | None = None,
        compile: bool = False,
    ) -> None:
        n = model.config.n_layer
        if budget is None:
            budgets: list[int | None] = [None] * n
        elif isinstance(budget, int) and not isinstance(budget, bool):
            budgets = [budget] * n
        elif isinstance(budget, Sequence) and not isinstance(budget, str):
            if len(budget) != n:
                raise ValueError(f"budget has {len(budget)} entries but the model has n_layer={n} layers.")
            budgets = list(budget)
        else:
            raise TypeError(f"budget must be an int, a list of n_layer={n} ints, or None; got {budget!r}.")
        for b in budgets:
            if b is not None and (not isinstance(b, int) or b < 1):
                raise ValueError(f"every budget must be an int >= 1 (the first token is always kept); got {b!r}.")
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold!r}.")
        self.model = model
        self.budgets = budgets
        self.threshold = threshold
        self.caches: list[LayerCache] = []
        self.t: Tensor | None = None  # position of the next token, a 0-d long tensor
        self._step = _compiled_step() if compile else _step

    @property
    def prunes(self) -> bool:
        return self.threshold is not None or any(b is not None for b in self.budgets)

    # --- prefill -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, idx: Tensor, max_new_tokens: int = 0) -> Tensor:
        """Run the prompt ``idx`` ``[B, T]`` exactly, fill the caches (pruned to budget), and return
        the next-token logits ``[B, vocab]``. Caches hold room for ``max_new_tokens`` more."""
        model, cfg = self.model, self.model.config
        model.check_idx(idx)
        B, T = idx.shape
        if T == 0:
            raise ValueError("the prompt must hold at least one token (e.g. a BOS token).")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        if not self.prunes and T + max_new_tokens > cfg.context_len:
            raise ValueError(
                f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds context_len={cfg.context_len}; "
                f"pass budget=... (or threshold=...) to decode past it with a pruned cache."
            )
        x = model.tok_emb(idx)
        pos = model.rope(torch.arange(T, device=idx.device), x.dtype)
        self.caches = []
        for block, budget in zip(model.blocks, self.budgets):
            attn = block.attn
            q, k, v, sel = attn.project(block.norm1(x), pos)
            y, _ = attn.attend(q, k, v, sel)
            x = x + attn.merge(y)
            x = x + block.mlp(block.norm2(x))
            G = attn.n_groups
            fcum = attn.vote_colsums(q, k, sel) if attn.selects else q.new_zeros(B, 1, T)  # [B, G, T]
            keep = _keep_after_prefill(_eviction_score(fcum), budget, self.threshold)
            cap = (budget + 1) if budget is not None else T + max_new_tokens
            cap = max(cap, int(keep.sum(-1).max()) + 1)
            H, D = k.shape[1], k.shape[-1]
            cache = LayerCache(
                k=k.new_zeros(B, H, cap, D),
                v=v.new_zeros(B, H, cap, v.shape[-1]),
                fcum=fcum.new_full((B, G, cap), float("inf")),
                pos=torch.full((B, cap), -1, dtype=torch.long, device=idx.device),
                ks=None if sel is None else k.new_zeros(B, G, cap, D),
                budget=budget,
            )
            for b in range(B):  # compact the kept tokens to the front, in position order
                kept = keep[b].nonzero().squeeze(-1)
                n = kept.numel()
                cache.k[b, :, :n] = k[b, :, kept]
                cache.v[b, :, :n] = v[b, :, kept]
                cache.fcum[b, :, :n] = fcum[b, :, kept]
                cache.pos[b, :n] = kept
                if sel is not None:
                    cache.ks[b, :, :n] = sel[1][b, :, kept]
            self.caches.append(cache)
        self.t = torch.tensor(T, device=idx.device)
        return model.lm_head(model.norm(x[:, -1]))

    # --- one token -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Feed ``token`` ``[B]`` at the current position; return the next logits ``[B, vocab]``."""
        if self.t is None:
            raise RuntimeError("call prefill(prompt) before step().")
        return self._step(self.model, self.caches, token, self.t, self.threshold)

    # --- reporting -----------------------------------------------------------------------------------
    def occupancy(self) -> list[int]:
        """Kept tokens per layer (the most any sequence of the batch keeps)."""
        return [int(c.occupancy().max().item()) for c in self.caches]

    def kv_bytes(self) -> list[int]:
        """Bytes of kept keys and values per layer."""
        return [c.kv_bytes() for c in self.caches]

    # --- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Prefill ``idx`` ``[B, T]`` and sample ``max_new_tokens``; returns ``[B, T + max_new_tokens]``."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}.")
        logits = self.prefill(idx, max_new_tokens)
        out = [idx]
        for n in range(max_new_tokens):
            tok = sample(logits, temperature, top_k, generator)
            out.append(tok[:, None])
            if n + 1 < max_new_tokens:
                logits = self.step(tok)
        return torch.cat(out, dim=1)


def _step(model: GPT, caches: list[LayerCache], token: Tensor, t: Tensor, threshold: float | None) -> Tensor:
    """One decoding step through every layer (updates the caches and ``t`` in place). Called under
    no_grad by :meth:`Decoder.step`, so a compiled version always sees the same grad mode."""
    x = model.tok_emb(token[:, None])  # [B, 1, C]
    pos = model.rope(t.view(1), x.dtype)  # once for all layers
    for block, cache in zip(model.blocks, caches):
        x = x + _decode_attention(block.attn, cache, block.norm1(x), pos, t, threshold)
        x = x + block.mlp(block.norm2(x))
    t += 1
    return model.lm_head(model.norm(x[:, -1]))


@functools.cache
def _compiled_step():
    """``_step`` through torch.compile, built once per process (dynamo caches per model and shapes)."""
    return torch.compile(_step, dynamic=False)


def sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """``[B, vocab]`` -> ``[B]`` token ids; ``temperature == 0`` is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def _decode_attention(attn, cache: LayerCache, h: Tensor, rope, t: Tensor, threshold: float | None) -> Tensor:
    """One token through one layer's attention with its cache: ``h`` ``[B, 1, C]`` -> ``[B, 1, C]``.

    Static shapes, no data-dependent Python branches (compiles once)."""
    q, k, v, sel = attn.project(h, rope)  # [B, H, 1, D]
    B, H, _, D = q.shape
    # write the new token into the first free slot (position -1: the smallest)
    slot = cache.pos.argmin(dim=-1)  # [B]
    cache.k.scatter_(2, slot.view(B, 1, 1, 1).expand(B, H, 1, D), k)
    cache.v.scatter_(2, slot.view(B, 1, 1, 1).expand(B, H, 1, v.shape[-1]), v)
    cache.fcum.scatter_(2, slot.view(B, 1, 1).expand(B, cache.fcum.shape[1], 1), 0.0)
    cache.pos.scatter_(1, slot[:, None], t.view(1, 1).expand(B, 1))
    if sel is not None:
        cache.ks.scatter_(2, slot.view(B, 1, 1, 1).expand(B, sel[1].shape[1], 1, D), sel[1])

    scale = 1.0 / D**0.5
    logits = torch.matmul(q, cache.k.transpose(-2, -1)) * scale  # [B, H, 1, cap]
    # free slots hold Fcum = +inf: the bias -Fcum removes them with no extra mask
    y = torch.matmul(torch.softmax(logits - cache.fcum[:, :, None, :], dim=-1), cache.v)  # [B, H, 1, D]

    evictable = cache.pos > 0  # kept, and not the first token  [B, cap]
    if attn.selects:
        # votes of the new token: relu of the voting head's logits, for kept tokens other than the
        # first and itself (DESIGN §3), added to Fcum after attending (they affect later queries only)
        if sel is not None:
            vl = torch.matmul(sel[0], cache.ks.transpose(-2, -1)) * scale  # [B, G, 1, cap]
        elif attn.per_head:
            vl = logits
        else:
            vl = logits[:, attn.selection_head : attn.selection_head + 1]
        voted = evictable.scatter(1, slot[:, None], False)
        cache.fcum += torch.relu(vl[:, :, 0, :]) * voted[:, None, :]

    # prune: never the first token; the budget is checked every step (static shapes; the branches below
    # are on the configuration only)
    budget = cache.budget
    if threshold is None and budget is None:
        return attn.merge(y)
    score = torch.where(evictable, _eviction_score(cache.fcum), -float("inf"))  # [B, cap]
    drop = score > threshold if threshold is not None else None
    if budget is not None:
        kept = cache.valid.sum(-1)  # [B]
        if drop is not None:
            kept = kept - drop.sum(-1)
            score = score.masked_fill(drop, -float("inf"))
        # the victim: the largest score, the oldest on ties (when over budget a finite score exists)
        tied = score == score.amax(dim=-1, keepdim=True)
        oldest = torch.where(tied, cache.pos, torch.iinfo(torch.long).max).argmin(dim=-1, keepdim=True)  # [B, 1]
        victim = torch.zeros_like(evictable).scatter_(1, oldest, (kept > budget)[:, None])
        drop = victim if drop is None else drop | victim
    cache.pos.masked_fill_(drop, -1)
    cache.fcum.masked_fill_(drop[:, None, :], float("inf"))
    return attn.merge(y)
