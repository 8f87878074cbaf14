"""KV cache with exact selective decoding and context pruning (DESIGN §4).

Each layer keeps, per sequence, static buffers of cached keys/values and a running vector ``Fcum``:
``Fcum[j]`` is the penalty F that the *next* query will apply to cached key j. Decoding token t::

    evict        every kept token with Fcum > threshold, then, if the layer is full (budget
                 reached), the one with the largest Fcum; never the first token
    attend with  l_h[t, j] - Fcum[j]           over the kept tokens and t itself (Fcum[t] = 0)
    Fcum[j]  +=  relu(l_0[t, j])                for kept j other than the first token and t

Because F only grows, an evicted token would only have been masked harder later. With no budget
and no threshold this is exactly the full forward pass, one token at a time.

A budget ``b`` means: **at most b tokens per layer are stored and attended at any step, the newest
included** (DESIGN §4). So the buffers have exactly ``b`` slots, and a step first makes room (evicts
while the layer is full or a token is over the threshold), then writes the new token, attends and
votes. Evicting at the start of step t+1 rather than the end of step t changes nothing: Fcum does not
move in between. Without a budget the buffers hold the prompt plus ``max_new_tokens``.

Slots are reused (a free slot has position -1 and ``Fcum = +inf``, so the attention bias ``-Fcum``
already excludes it); the position is a tensor. So the step has static shapes and no Python branches
on data: ``torch.compile`` compiles it once. :meth:`Decoder.step` itself (eager, around the step)
checks what would otherwise go silently wrong: a token out of the vocabulary, a step past the
buffers' capacity, more tokens attended than the model's ``context_len``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import GPT, _as_ids

__all__ = ["Decoder", "LayerCache"]


@dataclass
class LayerCache:
    """One layer's cache. Shapes: ``k, v [B, H, cap, D]``, ``fcum [B, G, cap]`` (+inf at free slots),
    ``pos [B, cap]`` (-1 at free slots); ``ks [B, G, cap, D]`` for a dedicated selector. With a
    budget, ``cap == budget``."""

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
        """Bytes of every stored key/value slot, free or kept: the k, v (and dedicated selector key)
        buffers, for the whole batch. Per-slot bookkeeping (``fcum``, ``pos``) is not counted."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.ks) if t is not None)


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
        budget: per layer, the most tokens stored and attended at any step, the newest included (an
            int for all layers, or a list, one per layer; each >= 2: the first token and the newest);
            ``None`` keeps everything. Layers without selection have Fcum = 0, so for them a budget
            is a sliding window that keeps the first token.
        threshold: evict any token whose Fcum exceeds this (before the next step attends).
        compile: run :meth:`step` through ``torch.compile`` (inductor; static shapes, so it compiles
            once, a few seconds, and again only for another model, batch size, cache size or
            threshold; past dynamo's recompile limit, 8 by default, it runs eager). It pays off
            with a pruned cache, where the step is small and eager op overhead dominates (~1.7x
            faster on a 2-core CPU); with a full cache on CPU the compiled step was slower than eager.

    Example::

        dec = Decoder(model, budget=64)
        logits = dec.prefill(prompt, max_new_tokens=100)      # [B, vocab]
        tok = logits.argmax(-1); logits = dec.step(tok)      # one token at a time
        dec.occupancy(), dec.kv_bytes()                      # per layer: tokens attended, bytes
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
            if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 2):
                raise ValueError(
                    f"every budget must be an int >= 2 (the first token is always kept, and the newest is "
                    f"attended); got {b!r}. Pass budget=None for a layer that keeps everything."
                )
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold!r}.")
        self.model = model
        self.budgets = budgets
        self.threshold = threshold
        self.caches: list[LayerCache] = []
        self.t: Tensor | None = None  # position of the next token, a 0-d long tensor
        self._pos = 0  # the same position as a Python int, for the checks in step()
        self._room = 0  # steps left before an unbudgeted layer's buffers are full
        self._max_new = 0
        self._step = _compiled_step() if compile else _step

    @property
    def prunes(self) -> bool:
        return self.threshold is not None or any(b is not None for b in self.budgets)

    @property
    def _bounded(self) -> bool:
        """Every layer attends to at most ``context_len`` tokens whatever happens (budgets within it)."""
        return all(b is not None and b <= self.model.config.context_len for b in self.budgets)

    # --- prefill -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, idx: Tensor, max_new_tokens: int = 0) -> Tensor:
        """Run the prompt ``idx`` ``[B, T]`` exactly, fill the caches (pruned to budget), and return
        the next-token logits ``[B, vocab]``. Caches hold room for ``max_new_tokens`` more."""
        model, cfg = self.model, self.model.config
        idx = _as_ids(idx)  # any integer dtype (uint8 bytes, say) is read as long
        model.check_idx(idx)
        B, T = idx.shape
        if T == 0:
            raise ValueError("the prompt must hold at least one token (e.g. a BOS token).")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
        if T > cfg.context_len:
            raise ValueError(
                f"prompt length {T} exceeds context_len={cfg.context_len}: the prompt is read exactly, every "
                f"token attending to all before it; pass its last {cfg.context_len} tokens."
            )
        if self.threshold is None and not self._bounded and T + max_new_tokens > cfg.context_len:
            raise ValueError(
                f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds context_len={cfg.context_len}; "
                f"pass budget=... (at most {cfg.context_len} for every layer) to decode past it with a pruned cache."
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
            cap = budget if budget is not None else T + max_new_tokens
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
        self._pos, self._room, self._max_new = T, max_new_tokens, max_new_tokens
        return model.lm_head(model.norm(x[:, -1]))

    # --- one token -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Feed ``token`` ``[B]`` at the current position; return the next logits ``[B, vocab]``."""
        if self.t is None:
            raise RuntimeError("call prefill(prompt) before step().")
        self._check_step(token)
        logits = self._step(self.model, self.caches, token.long(), self.t, self.threshold)
        self._pos += 1
        self._room -= 1
        return logits

    def _check_step(self, token: Tensor) -> None:
        """Refuse what the static-shape step would do silently wrong (checked before it runs)."""
        B = self.caches[0].k.shape[0]
        if not isinstance(token, Tensor) or token.shape != (B,) or token.is_floating_point() or token.is_complex():
            raise ValueError(
                f"token must be an integer tensor of shape [B] = [{B}], one id per sequence; got "
                f"{getattr(token, 'dtype', type(token).__name__)} {tuple(getattr(token, 'shape', ()))}."
            )
        vocab = self.model.config.vocab_size
        lo, hi = int(token.min()), int(token.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token ids must be in [0, vocab_size={vocab}); got range [{lo}, {hi}].")
        unbudgeted = any(b is None for b in self.budgets)
        if unbudgeted and self._room <= 0:
            # a layer without a budget has one slot per token; a further write would overwrite the oldest
            raise ValueError(
                f"the caches were sized by prefill(..., max_new_tokens={self._max_new}) and are full after "
                f"{self._pos} tokens; pass a larger max_new_tokens to prefill (or a budget for every layer)."
            )
        ctx = self.model.config.context_len
        if self._pos + 1 > ctx and not self._bounded:
            attended = max(_attended_next(c, self.threshold) for c in self.caches)
            if attended > ctx:
                raise ValueError(
                    f"decoding position {self._pos} would attend to {attended} tokens in a layer, more than "
                    f"context_len={ctx}; pass a budget of at most {ctx} for every layer to decode past it."
                )

    # --- reporting -----------------------------------------------------------------------------------
    def occupancy(self) -> list[int]:
        """Tokens stored per layer, the most any sequence of the batch stores: after a step, the
        tokens that step attended to (the newest included)."""
        return [int(c.occupancy().max().item()) for c in self.caches]

    def kv_bytes(self) -> list[int]:
        """Bytes of every stored key/value slot per layer (see :meth:`LayerCache.kv_bytes`)."""
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


def _attended_next(cache: LayerCache, threshold: float | None) -> int:
    """How many tokens the next step would attend to in this layer (the most over the batch): the
    kept ones that survive its evictions, and the new one."""
    drop = _evictions(cache, threshold)
    kept = cache.valid.sum(-1) - drop.sum(-1) + 1
    return int(kept.max())


def _evictions(cache: LayerCache, threshold: float | None) -> Tensor:
    """What a step drops before writing its token, bool ``[B, cap]``:
    every token over the threshold, then, if the layer is still full, the one with the largest score
    (the oldest on ties). Never the first token. Static shapes, no data-dependent branches."""
    evictable = cache.pos > 0  # kept, and not the first token  [B, cap]
    score = torch.where(evictable, _eviction_score(cache.fcum), -float("inf"))  # [B, cap]
    over = score > threshold if threshold is not None else torch.zeros_like(evictable)
    if cache.budget is None:
        return over
    kept = cache.valid.sum(-1) - over.sum(-1)  # [B]
    score = score.masked_fill(over, -float("inf"))
    # the victim: the largest score, the oldest on ties (when the layer is full a finite score exists,
    # since a budget >= 2 leaves room for the first token and at least one other)
    tied = score == score.amax(dim=-1, keepdim=True)
    oldest = torch.where(tied, cache.pos, torch.iinfo(torch.long).max).argmin(dim=-1, keepdim=True)  # [B, 1]
    victim = torch.zeros_like(evictable).scatter_(1, oldest, (kept >= cache.budget)[:, None])
    return over | victim


def _decode_attention(attn, cache: LayerCache, h: Tensor, rope, t: Tensor, threshold: float | None) -> Tensor:
    """One token through one layer's attention with its cache: ``h`` ``[B, 1, C]`` -> ``[B, 1, C]``.

    Makes room first (so at most ``budget`` tokens are stored and attended, the new one included),
    then writes the token, attends, and adds its votes. Static shapes, no data-dependent Python
    branches (compiles once)."""
    if threshold is not None or cache.budget is not None:  # a branch on the configuration only
        drop = _evictions(cache, threshold)
        cache.pos.masked_fill_(drop, -1)
        cache.fcum.masked_fill_(drop[:, None, :], float("inf"))

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

    if attn.selects:
        # votes of the new token: relu of the voting head's logits, for kept tokens other than the
        # first and itself (DESIGN §3), added to Fcum after attending (they affect later queries only)
        if sel is not None:
            vl = torch.matmul(sel[0], cache.ks.transpose(-2, -1)) * scale  # [B, G, 1, cap]
        elif attn.per_head:
            vl = logits
        else:
            vl = logits[:, attn.selection_head : attn.selection_head + 1]
        voted = (cache.pos > 0).scatter(1, slot[:, None], False)
        cache.fcum += torch.relu(vl[:, :, 0, :]) * voted[:, None, :]
    return attn.merge(y)
