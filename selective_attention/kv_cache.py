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

Eviction policies (``LayerCache.policy``; each rule is one small function below, for the prompt and
for a step), all under the same budget definition and all protecting the first token (each sequence's
first real token) in every policy:

* ``"selective"`` (the default; the paper): the largest ``Fcum`` goes (:func:`evictions`,
  :func:`keep_after_prefill`, :func:`selective_rule`). On a model without selection ``Fcum`` is 0, so this is a
  sliding window.
* ``"window"``: StreamingLLM-style, the first token (its "attention sink") plus the most recent ones:
  the oldest other token goes (:func:`window_evictions`, :func:`window_keep_after_prefill`, :func:`window_rule`).
* ``"h2o"``: H2O-style heavy hitters, a recent window of ``recent`` tokens (the newest included;
  default half the budget) plus the tokens that received the most attention so far, summed over
  heads and over every query (the prompt's included): the non-recent token with the smallest
  accumulated attention goes, the oldest on ties (:func:`h2o_evictions`,
  :func:`h2o_keep_after_prefill`, :func:`h2o_rule`). Keeping the first token is this package's choice for H2O (the
  paper does not protect it), so every policy keeps the same token that selection never masks. The
  accumulator ``acc`` is one more per-slot buffer (bookkeeping, like ``fcum`` and ``pos``);
  :meth:`LayerCache.step` adds each step's attention weights to it, and :func:`attention_received`
  gives the prompt's (column sums of its attention weights, chunked).

A threshold is a selective rule (it evicts by ``Fcum``): the other policies refuse it. Without one, a step
evicts at most one token, a full layer's: each policy's ``*_rule`` gives the candidates and the score it is chosen
by, the largest score and the oldest on ties, and the new token takes its slot (:meth:`LayerCache.slot_for_next`).

This file is the cache and the policy only: plain tensor functions and a dataclass of buffers. The
attention layer (``model.Attention``) reads and writes it; ``decoding.Decoder`` drives it.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .selection import Selection, exclusive_cumsum, grouped_matmul, is_int, selection_scores, vote_scale

__all__ = [
    "LayerCache",
    "POLICIES",
    "check_policy",
    "check_budget",
    "eviction_score",
    "keep_after_prefill",
    "evictions",
    "selective_rule",
    "window_keep_after_prefill",
    "window_evictions",
    "window_rule",
    "h2o_keep_after_prefill",
    "h2o_evictions",
    "h2o_rule",
    "fcum_after_prompt",
    "prompt_scores",
    "attention_received",
]

# attention weights flushed to 0 before they multiply v, by the softmax's dtype (values; ops/chunked.py's
# _P_FLOOR is a log2 exponent): see LayerCache.step
_WEIGHT_FLOOR = {torch.float32: 2.0**-100, torch.float64: 2.0**-1000}

POLICIES = ("selective", "window", "h2o")  # the eviction policies (module docstring; each one's rules: _POLICY_RULES)


def any_budget(budget: object) -> bool:
    """Whether ``budget`` (None, an int, or one per layer) bounds at least one layer."""
    return any(b is not None for b in (budget if isinstance(budget, (list, tuple)) else [budget]))


def check_threshold_applies(threshold: float | None, selects: bool, cli: bool = False) -> None:
    """Refuse a threshold on a model with no selecting layer (``selects`` false): F = 0 everywhere, so it would evict
    nothing while the cache said it pruned. ``cli``: name the command-line options."""
    if threshold is not None and not selects:
        t, drop, b, h2o = (
            ("--threshold", "--threshold", "--budget", "--policy h2o")
            if cli
            else (f"threshold={threshold}", "threshold", "budget=", "policy='h2o'")
        )
        raise ValueError(
            f"{t} evicts tokens by the penalty F, and this model has no selecting layer (F = 0 everywhere): it would "
            f"evict nothing. Drop {drop}, or use {b} (on this model a sliding window; or {h2o})."
        )


def check_policy(policy: str, threshold: float | None = None, recent: int | None = None, budget: object = ...) -> None:
    """Refuse an unknown policy, a threshold with a policy other than ``"selective"``, ``recent`` with a
    policy other than ``"h2o"`` and (when ``budget`` is given: None, an int or one per layer) a policy other than
    ``"selective"`` with no budget in any layer (each would be silently ignored), a threshold that is not a number
    >= 0, a ``recent`` that is not an int >= 1 and (H2O, ``budget`` given) one that does not fit a layer's budget."""
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0
        or not _as_float(threshold) >= 0  # a float (the cache compares tensors with it): 10**400 does not convert
    ):  # fmt: skip
        raise ValueError(f"threshold must be None or a number >= 0 (Fcum above it is evicted), got {threshold!r}.")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}; got {policy!r}.")
    if threshold is not None and policy != "selective":
        raise ValueError(
            f"threshold applies to policy='selective' only (it evicts by the penalty F); got policy={policy!r}. "
            f"Drop the threshold, or use policy='selective'."
        )
    if recent is not None and policy != "h2o":
        raise ValueError(f"recent (the H2O recent window) applies to policy='h2o' only; got policy={policy!r}.")
    if policy != "selective" and budget is not ... and not any_budget(budget):
        raise ValueError(
            f"policy={policy!r} chooses what a full layer evicts, and no layer has a budget, so none is ever full: "
            "pass a budget as well (budget=..., --budget on the command line)."
        )
    if recent is not None and (isinstance(recent, bool) or not isinstance(recent, numbers.Integral) or recent < 1):
        raise ValueError(f"recent must be an int >= 1 (the newest token included), got {recent!r}.")
    if policy == "h2o" and budget is not ...:
        for b in budget if isinstance(budget, (list, tuple)) else [budget]:
            h2o_recent(b, recent)  # the recent window fits every budget


def _as_float(x: numbers.Real) -> float:
    """``float(x)``, NaN where it does not convert (an int beyond a float's range)."""
    try:
        return float(x)
    except OverflowError:
        return math.nan


def check_budget(b: object) -> int:
    """One layer's budget as an int (numpy or 0-d tensor integers accepted), or a ValueError: it must be >= 2, room
    for the first token (always kept) and the newest (always attended)."""
    value = operator.index(b) if is_int(b) else None
    if value is None or value < 2:
        raise ValueError(
            f"every budget must be an int >= 2 (the first token is always kept, and the newest is attended); got "
            f"{b!r}. Pass None for a layer that keeps everything."
        )
    return value


def budget_value(budget: object) -> int | list[int | None] | None:
    """A budget argument as ``None`` (keep everything), one int for every layer, or a list with one int (or None)
    per layer: Python, numpy and 0-d tensor integers, lists, tuples, 1-D arrays and 1-D tensors; each int >= 2
    (:func:`check_budget`). A ValueError names anything else."""
    if budget is None:
        return None
    if isinstance(budget, (Sequence, Tensor)) or type(budget).__name__ == "ndarray":  # a list, or a 1-D array
        if getattr(budget, "ndim", 1) == 1 and not isinstance(budget, (str, bytes)):
            return [None if b is None else check_budget(b) for b in budget]
    return check_budget(budget)


def h2o_recent(budget: int | None, recent: int | None) -> int | None:
    """The recent window of an H2O layer with ``budget``: ``recent``, or half the budget (at least 1). It must
    leave a slot for the first token: ``1 <= recent <= budget - 1``."""
    if budget is None:
        return recent
    r = max(1, budget // 2) if recent is None else recent
    if not 1 <= r <= budget - 1:
        raise ValueError(
            f"recent={r} does not fit budget={budget}: the recent window (the newest token included) and the "
            f"first token share the budget, so 1 <= recent <= budget - 1 = {budget - 1}."
        )
    return r


# --- the policies: plain tensor functions (shared helpers first) ----------------------------------------
def _first_and_real(shape: tuple[int, int], device, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(first, real)``, bool ``[B, T]``: each sequence's protected first real token, and its real tokens."""
    B, T = shape
    real = torch.ones(B, T, dtype=torch.bool, device=device) if key_padding_mask is None else ~key_padding_mask
    return real & (real.cumsum(dim=-1) == 1), real


def _keep_smallest(key: Tensor, cand: Tensor, n: Tensor | int) -> Tensor:
    """Of the candidates ``cand`` (bool ``[B, T]``), the ``n`` (per row: ``[B]``) with the smallest ``key``,
    the newer kept on ties: what evicting the largest (the oldest on ties) one at a time leaves."""
    B, T = key.shape
    newest_first = torch.arange(T - 1, -1, -1, device=key.device)
    k = key[:, newest_first].masked_fill(~cand[:, newest_first], float("inf"))
    ranked = newest_first[torch.sort(k, dim=-1, stable=True).indices]  # keep-preference order  [B, T]
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(T, device=key.device).expand(B, T))
    n = torch.as_tensor(n, device=key.device).view(-1, 1)
    return cand & (rank < n)


def _largest(score: Tensor, candidates: Tensor, pos: Tensor) -> Tensor:
    """``[B]``: each row's ``candidates`` slot (bool ``[B, cap]``) with the largest ``score`` (never its dtype's lowest
    value), the oldest (smallest position ``pos``) on ties; any slot in a row without candidates (all of its slots
    tie at the lowest value)."""
    # (masked_fill takes its value as a number; where() would first make it a tensor: two more ops, and a decode
    # step pays per op)
    lowest = -float("inf") if score.is_floating_point() else torch.iinfo(score.dtype).min  # window: -pos, integers
    score = score.masked_fill(~candidates, lowest)
    # all but the best candidates, unless there are none (and none with a NaN score: every slot ties, the oldest wins,
    # as in make_room's path)
    untied = score < score.amax(dim=-1, keepdim=True)
    return pos.masked_fill(untied, torch.iinfo(torch.long).max).argmin(dim=-1)


def _evict_largest(score: Tensor, evictable: Tensor, pos: Tensor, full: Tensor) -> Tensor:
    """Bool ``[B, cap]``: in each row where ``full`` (``[B]``), the ``evictable`` slot with the largest
    ``score``, the oldest (smallest position) on ties; nothing elsewhere."""
    victim = _largest(score, evictable, pos)[:, None]  # [B, 1]
    return torch.zeros_like(evictable).scatter_(1, victim, full[:, None])


# --- selective (the paper): the largest Fcum --------------------------------------------------------------
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
    first, real = _first_and_real(score.shape, score.device, key_padding_mask)
    cand = real & ~first
    if threshold is not None:
        cand &= score <= threshold
    if budget is not None:
        cand = _keep_smallest(score, cand, budget - 1)
    return cand | first


def evictions(fcum: Tensor, pos: Tensor, budget: int | None, threshold: float | None) -> Tensor:
    """What a step drops before writing its token, bool ``[B, cap]``, from a layer's ``fcum``
    ``[B, G, cap]`` and slot positions ``pos`` ``[B, cap]`` (-1 = free): every token over the
    threshold, then, if the layer is still full, the one with the largest score (the oldest on ties).
    Never the first token. Static shapes, no data-dependent branches."""
    score, evictable = selective_rule(fcum, pos)
    over = evictable & (score > threshold) if threshold is not None else torch.zeros_like(evictable)
    if budget is None:
        return over
    full = (pos >= 0).sum(-1) - over.sum(-1) >= budget  # [B]
    # (when the layer is full an evictable token is left: a budget >= 2 holds the first and another)
    victim = _evict_largest(score, evictable & ~over, pos, full)
    return over | victim


def selective_rule(fcum: Tensor, pos: Tensor, free: bool = False) -> tuple[Tensor, Tensor]:
    """``(score, candidates)`` ``[B, cap]`` each: a full selective layer evicts the candidate (kept, not the first
    token) with the largest score (its Fcum), the oldest on ties. ``free``: free slots are candidates too (each
    rule scores them above every kept token: here Fcum is +inf), so the choice is the first free slot, if any."""
    return eviction_score(fcum), (pos != 0) if free else (pos > 0)


# --- the sliding window + first token (StreamingLLM-style) ---------------------------------------------
def window_keep_after_prefill(
    shape: tuple[int, int], budget: int | None, key_padding_mask: Tensor | None = None, *, device=None
) -> Tensor:
    """Which of the T prefilled tokens a sliding window keeps, bool ``[B, T]`` (``shape`` = ``(B, T)``): the
    first (the attention sink) and the ``budget - 1`` newest others; padding never."""
    first, real = _first_and_real(shape, device, key_padding_mask)
    if budget is None:
        return real
    age = -torch.arange(shape[1], dtype=torch.float32, device=real.device).expand(shape)  # the newest: smallest
    return first | _keep_smallest(age, real & ~first, budget - 1)


def window_evictions(pos: Tensor, budget: int | None) -> Tensor:
    """What a sliding-window step drops before writing its token, bool ``[B, cap]`` (``pos`` ``[B, cap]``,
    -1 = free): if the layer is full, the oldest token other than the first."""
    if budget is None:
        return torch.zeros_like(pos, dtype=torch.bool)
    full = (pos >= 0).sum(-1) >= budget  # [B]
    return _evict_largest(*window_rule(pos), pos, full)


def window_rule(pos: Tensor, free: bool = False) -> tuple[Tensor, Tensor]:
    """``(score, candidates)`` ``[B, cap]`` each: a full window layer evicts the oldest candidate (kept, not the
    first token): the largest ``-pos``. ``free``: as in :func:`selective_rule` (a free slot scores 1)."""
    return -pos, (pos != 0) if free else (pos > 0)


# --- heavy hitters + a recent window (H2O-style) --------------------------------------------------------
def h2o_keep_after_prefill(
    acc: Tensor, budget: int | None, recent: int | None, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Which of the T prefilled tokens H2O keeps, bool ``[B, T]``, from the attention each received
    ``acc`` ``[B, T]``: the first, the ``recent`` newest (the recent window, the last prompt token
    included), and of the others those with the largest ``acc`` up to ``budget`` tokens in all (the
    newer on ties). The same as evicting the smallest-``acc`` (oldest on ties) non-recent token one at a
    time: nothing attends in between, so ``acc`` does not move. Padding is never kept."""
    first, real = _first_and_real(acc.shape, acc.device, key_padding_mask)
    if budget is None:
        return real
    rpos = real.long().cumsum(-1) - 1  # positions from the first real token
    newest = rpos.amax(-1, keepdim=True)
    in_window = real & ~first & (rpos > newest - recent)
    heavy = _keep_smallest(-acc, real & ~first & ~in_window, budget - 1 - in_window.sum(-1))
    return first | in_window | heavy


def h2o_evictions(acc: Tensor, pos: Tensor, budget: int | None, recent: int | None) -> Tensor:
    """What an H2O step drops before writing its token, bool ``[B, cap]``, from the accumulated attention
    ``acc`` ``[B, cap]`` and positions ``pos``: if the layer is full, of the tokens outside the recent
    window (the ``recent - 1`` newest stored, which stay with the token about to be written) and other
    than the first, the one with the smallest ``acc``, the oldest on ties."""
    if budget is None:
        return torch.zeros_like(pos, dtype=torch.bool)
    full = (pos >= 0).sum(-1) >= budget
    return _evict_largest(*h2o_rule(acc, pos, recent), pos, full)


def h2o_rule(acc: Tensor, pos: Tensor, recent: int, free: bool = False) -> tuple[Tensor, Tensor]:
    """``(score, candidates)`` ``[B, cap]`` each: a full H2O layer evicts, of the tokens outside the recent window
    and other than the first, the one with the smallest ``acc`` (the largest ``-acc``), the oldest on ties.
    ``free``: as in :func:`selective_rule` (a free slot scores 0, the most, since ``acc``, attention received, is
    never negative; and it is the oldest on ties). The window is the ``recent - 1`` newest *stored* tokens, by rank,
    not by position: a Hugging Face cache's positions count padding inside a prompt (a gap), which position
    arithmetic would take into the window, evicting a recent real token (and the prefill's window counts real
    tokens only)."""
    if recent > 1:  # the (recent - 1)-th largest position: a row's stored positions are distinct (free slots: -1)
        oldest_recent = torch.topk(pos, recent - 1, dim=-1).values[:, -1:]
        candidates = (pos > 0) & (pos < oldest_recent)  # (fewer stored than that: -1, no candidate)
    else:
        candidates = pos > 0
    return -acc, (candidates | (pos < 0)) if free else candidates


@dataclass(frozen=True)
class _Rules:
    """One eviction policy, whole: its three rules, each reading a :class:`LayerCache` ``c``. ``keep(c, fcum, acc,
    key_padding_mask)``: the prompt tokens kept after the prefill, bool ``[B, T]``; ``evictions(c)``: what is dropped
    before a token is written, bool ``[B, cap]``; ``rule(c)``: ``(score, candidates)`` of a full budgeted layer's
    step, free slots included (the largest is the slot written). A policy is one entry of :data:`_POLICY_RULES`."""

    keep: object
    evictions: object
    rule: object


def _window_keep(c, fcum, acc, key_padding_mask):
    return window_keep_after_prefill(fcum[:, 0].shape, c.budget, key_padding_mask, device=fcum.device)


_POLICY_RULES = {
    "selective": _Rules(
        keep=lambda c, fcum, acc, kpm: keep_after_prefill(eviction_score(fcum), c.budget, c.threshold, kpm),
        evictions=lambda c: evictions(c.fcum, c.pos, c.budget, c.threshold),
        rule=lambda c: selective_rule(c.fcum, c.pos, free=True),
    ),
    "window": _Rules(
        keep=_window_keep,
        evictions=lambda c: window_evictions(c.pos, c.budget),
        rule=lambda c: window_rule(c.pos, free=True),
    ),
    "h2o": _Rules(
        # an unbudgeted H2O layer tracks no attention and keeps every real token, as a window without a budget
        keep=lambda c, fcum, acc, kpm: (
            _window_keep(c, fcum, acc, kpm) if c.acc is None else h2o_keep_after_prefill(acc, c.budget, c.recent, kpm)
        ),
        evictions=lambda c: h2o_evictions(c.acc, c.pos, c.budget, c.recent),
        rule=lambda c: h2o_rule(c.acc, c.pos, c.recent, free=True),
    ),
}
if tuple(_POLICY_RULES) != POLICIES:  # pragma: no cover - a policy added to one and not the other
    raise AssertionError(
        f"kv_cache.POLICIES {POLICIES} and the rules {tuple(_POLICY_RULES)} must name the same policies"
    )


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
    # summed in at least fp32 (as the cache keeps it): in bf16 a column's sum stops growing near 128 / vote
    out = qs.new_zeros(qs.shape[0], qs.shape[1], qs.shape[2], dtype=torch.promote_types(qs.dtype, torch.float32))
    scale = 1.0 / math.sqrt(qs.shape[-1]) if scale is None else scale
    for i0 in range(0, qs.shape[2], chunk):
        rows = qs[:, :, i0 : i0 + chunk]
        votes = selection_scores(rows, ks, scale=scale, offset=i0, key_padding_mask=key_padding_mask)
        out += votes.sum(dim=-2, dtype=out.dtype)
    return out


def prompt_scores(
    q: Tensor,
    k: Tensor,
    selection: Selection | None,
    projected: tuple[Tensor, Tensor] | None = None,
    *,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    received: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """What a layer's cache starts from after a prompt, from the layer's ``q`` ``[B, H, T, D]``, ``k``
    ``[B, Hkv, T, D]`` (and, with ``projection``, the dedicated pair ``projected``): ``(fcum, acc)``. ``fcum``
    ``[B, G, T]``, the votes scaled by :func:`~selective_attention.selection.vote_scale` (``scale``: the attention's,
    default ``1 / sqrt(D)``; without ``selection`` zeros ``[B, 1, T]``: nothing is ever masked); with ``received``
    (an H2O cache) ``acc`` ``[B, T]``, the attention each token received (:func:`attention_received`), else None.
    One rule for the GPT's prefill and the Hugging Face cache's."""
    voters = None if selection is None else selection.voters(q, k, projected)
    if voters is None:
        fcum = q.new_zeros(q.shape[0], 1, q.shape[2])
    else:
        at = vote_scale(scale, q.shape[-1], voters[0].shape[-1])
        fcum = fcum_after_prompt(*voters, scale=at, key_padding_mask=key_padding_mask)
    acc = attention_received(q, k, voters, scale=scale, key_padding_mask=key_padding_mask) if received else None
    return fcum, acc


def attention_received(
    q: Tensor,
    k: Tensor,
    voters: tuple[Tensor, Tensor] | None = None,
    chunk: int = 64,
    *,
    scale: float | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The attention each of a prompt's T tokens received, ``[B, T]``: the column sums of the prompt's causal
    attention weights, summed over the heads and over all T queries (H2O's score after the prompt). With
    ``key_padding_mask`` (bool ``[B, T]``, True = padding) padding is no key, no query and no voter (each sequence's
    first real token the protected one): a padded sequence's real tokens receive what the unpadded sequence's do.

    ``q`` ``[B, H, T, D]``, ``k`` ``[B, Hkv, T, D]`` (grouped-query heads read, not repeated); ``scale``: the
    logits' (default ``1 / sqrt(D)``). With ``voters`` (``qs, ks``: :meth:`Selection.voters`) the weights
    are selective attention's, ``softmax(q k^T * scale - F)`` with F from the voters' logits at the same
    ``scale`` when they have q's head size (as :meth:`Selection.bind` scales them; a dedicated pair of
    another size ``Ds``: ``1 / sqrt(Ds)``), carried from chunk to chunk. Chunked over the queries:
    ``[B, H, chunk, T]`` at a time, never ``[B, H, T, T]``. Summed in at least float32."""
    B, H, T, D = q.shape
    votes_at = None if voters is None else vote_scale(scale, D, voters[0].shape[-1])
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(B, T, dtype=acc_dtype, device=q.device)
    carry = None  # column sums of the votes of the rows before the chunk  [B, G, T]
    keys = torch.arange(T, device=q.device)
    kt = k.transpose(-2, -1)
    for i0 in range(0, T, chunk):
        rows = q[:, :, i0 : i0 + chunk]
        logits = (grouped_matmul(rows, kt) * scale).to(acc_dtype)  # [B, H, C, T]
        future = keys[None, :] > keys[i0 : i0 + rows.shape[2], None]  # [C, T]
        logits = logits.masked_fill(future, -float("inf"))
        pad_rows = None
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], -float("inf"))
            # a padding query attends to nothing (left padding has no real key before it: a row of -inf); its
            # weights are zeroed below, so any finite row does
            pad_rows = key_padding_mask[:, None, i0 : i0 + rows.shape[2], None]  # [B, 1, C, 1]
            logits = logits.masked_fill(pad_rows, 0.0)
        if voters is not None:
            qs, ks = voters
            S = selection_scores(
                qs[:, :, i0 : i0 + chunk], ks, scale=votes_at, offset=i0, key_padding_mask=key_padding_mask
            ).to(acc_dtype)  # [B, G, C, T]
            carry = torch.zeros_like(S[:, :, 0]) if carry is None else carry
            logits = logits - (carry[:, :, None] + exclusive_cumsum(S, dim=-2))  # F of these rows; G = 1 or H
            carry = carry + S.sum(dim=-2)
        weights = torch.softmax(logits, dim=-1)
        if pad_rows is not None:
            weights = weights.masked_fill(pad_rows, 0.0)
        out += weights.sum(dim=(1, 2))
    return out


def _scaled_product(a: Tensor, bT: Tensor, scale: float) -> Tensor:
    """``a @ bT * scale`` for ``a`` ``[N, m, d]``, ``bT`` ``[N, d, n]``.

    Under torch.compile (inductor, CPU) a bmm of one row (m = 1: one query per kv head) is lowered to a multiply and
    a sum, into which the query's producer (the rotary embedding) is fused and recomputed for every cached key: a
    compiled full-cache decoding step at 2,048 slots ran 4x slower than eager. So one row goes through ``baddbmm``
    (beta 0: its first operand, a ``[N, 1, 1]`` view, is not read), which stays a library call; in eager it gives
    bmm-then-scale's numbers to the bit (fp32 and fp64, measured on an AMD EPYC). Several rows (grouped-query heads)
    keep ``bmm`` (a library call there too): with them baddbmm rounds differently (~1 ulp), and a Hugging Face
    model's decoding would change in its last bits."""
    if a.shape[1] == 1:
        return torch.baddbmm(bT[:, :1, :1], a, bT, beta=0.0, alpha=scale)
    return torch.bmm(a, bT) * scale


# --- the buffers ------------------------------------------------------------------------------------
@dataclass
class LayerCache:
    """One layer's cache and its policy. Shapes: ``k, v [B, Hkv, cap, D]`` (the layer's key/value heads:
    H, or fewer under grouped-query attention), ``fcum [B, G, cap]`` (+inf at free slots), ``pos [B, cap]``
    (-1 at free slots); ``ks [B, G, cap, D]`` for a dedicated selector; ``acc [B, cap]`` (policy ``"h2o"``
    with a budget only: the attention each slot's token received so far, summed over heads; 0 at free slots). ``fcum``
    and ``acc`` are running sums, kept in at least fp32 whatever the model's dtype. With a budget,
    ``cap == budget``."""

    k: Tensor
    v: Tensor
    fcum: Tensor
    pos: Tensor
    ks: Tensor | None
    budget: int | None = None  # at most this many tokens stored and attended, the newest included
    threshold: float | None = None  # evict any token whose Fcum exceeds this (policy "selective" only)
    policy: str = "selective"  # which token goes when the layer is full: "selective", "window" or "h2o"
    recent: int | None = None  # "h2o": the recent window, the newest token included (default: budget // 2)
    acc: Tensor | None = None  # "h2o": accumulated attention received per slot [B, cap]
    # an unbudgeted layer: at least the most tokens any row holds (the prompt's kept + the steps since), counted on
    # the host, so that only a layer that may be full pays a device read to find out (see slot_for_next)
    upper: int = 0

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
        policy: str = "selective",
        recent: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LayerCache:
        """Free buffers of ``capacity`` slots (a layer with a budget needs ``capacity == budget``).
        ``n_heads``: the key/value heads stored (``Hkv``; the query heads only without grouped-query
        attention); ``n_groups``: the penalties F (1, or the query heads H with one F per head);
        ``policy``, ``recent``: see the module docstring."""
        if budget is not None:
            budget = check_budget(budget)  # budget 1 would leave only the first token's slot: it was evicted
            if capacity != budget:
                raise ValueError(f"a layer with budget={budget} has exactly that many slots, got capacity={capacity}.")
        check_policy(policy, threshold, recent)
        threshold = None if threshold is None else float(threshold)  # any real number (a Fraction), as a float
        recent = h2o_recent(budget, recent) if policy == "h2o" else None
        B, H, G, D = batch_size, n_heads, n_groups, head_dim
        tracks = policy == "h2o" and budget is not None  # H2O's attention received, summed
        kw = dict(dtype=dtype, device=device)
        # running sums in at least fp32: one step's vote added to a bf16 Fcum of ~128 rounds away
        acc_dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        return cls(
            k=torch.zeros(B, H, capacity, D, **kw),
            v=torch.zeros(B, H, capacity, D, **kw),
            fcum=torch.full((B, G, capacity), float("inf"), dtype=acc_dtype, device=device),
            pos=torch.full((B, capacity), -1, dtype=torch.long, device=device),
            ks=torch.zeros(B, G, capacity, D, **kw) if selector_keys else None,
            budget=budget,
            threshold=threshold,
            policy=policy,
            recent=recent,
            # (an unbudgeted layer never evicts: no attention to track, and no prompt attention to compute)
            acc=torch.zeros(B, capacity, dtype=acc_dtype, device=device) if tracks else None,
        )  # fmt: skip

    @property
    def tracks_attention(self) -> bool:
        """Whether the policy needs the attention each token received (``"h2o"`` with a budget; an unbudgeted layer
        never evicts): then :meth:`fill` needs the prompt's (:func:`attention_received`) and :meth:`step` adds each
        step's."""
        return self.acc is not None

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
        buffers, for the whole batch. Per-slot bookkeeping (``fcum``, ``pos``, ``acc``) is not counted."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.ks) if t is not None)

    # --- prefill -----------------------------------------------------------------------------------
    def fill(
        self,
        k: Tensor,
        v: Tensor,
        fcum: Tensor,
        ks: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        acc: Tensor | None = None,
    ) -> None:
        """Store a prompt read exactly: ``k, v`` ``[B, Hkv, T, D]``, its ``fcum`` ``[B, G, T]`` (and the
        selector's keys ``[B, G, T, D]``; with policy ``"h2o"``, ``acc`` ``[B, T]``, the attention each token
        received: :func:`attention_received`). Keeps what the policy allows (:meth:`keep_after_prefill`),
        compacted to the front of the buffers in position order. Positions count from each sequence's
        first real token (``key_padding_mask``, bool ``[B, T]``, True = padding; without it, from 0): the
        protected token is at position 0 and padding is never stored."""
        if self.tracks_attention and acc is None:
            raise ValueError("policy 'h2o' keeps the tokens that received the most attention: pass the prompt's acc.")
        keep = self.keep_after_prefill(fcum, acc, key_padding_mask)  # [B, T]
        kept = int(keep.sum(-1).max())
        if kept > self.capacity:
            raise ValueError(f"{kept} prompt tokens to keep, but the cache has {self.capacity} slots.")
        # a cache filled before (another prompt's tokens): every slot free first, or the old ones past the new
        # prompt's would stay kept
        self.pos.fill_(-1)
        self.fcum.fill_(float("inf"))
        if self.acc is not None:
            self.acc.zero_()
        self.upper = kept
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
            if self.acc is not None:
                self.acc[b, :n] = acc[b, kept]

    def keep_after_prefill(self, fcum: Tensor, acc: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        """Which prompt tokens this layer's policy keeps, bool ``[B, T]`` (one of the ``*keep_after_prefill``)."""
        return _POLICY_RULES[self.policy].keep(self, fcum, acc, key_padding_mask)

    def grown(self, capacity: int) -> LayerCache:
        """A copy of this (unbudgeted) cache with ``capacity`` slots, the new ones free: for callers that
        cannot size the buffers in advance (:class:`selective_attention.hf.SelectiveCache`)."""
        if self.budget is not None or capacity < self.capacity:
            raise ValueError(f"only an unbudgeted cache grows, to at least {self.capacity} slots; got {capacity}.")
        B, Hkv, cap, D = self.k.shape
        new = LayerCache.empty(
            B, capacity, n_heads=Hkv, n_groups=self.fcum.shape[1], head_dim=D, selector_keys=self.ks is not None,
            threshold=self.threshold, policy=self.policy, recent=self.recent, dtype=self.k.dtype, device=self.k.device,
        )  # fmt: skip
        if self.v.shape[-1] != D:
            new.v = self.v.new_zeros(B, Hkv, capacity, self.v.shape[-1])
        new.upper = self.upper
        for name in ("k", "v", "fcum", "pos", "ks", "acc"):
            old = getattr(self, name)
            if old is not None:
                (getattr(new, name)[:, :, :cap] if old.dim() >= 3 else getattr(new, name)[:, :cap]).copy_(old)
        return new

    # --- one step: make room, write, (attend: the layer's), vote ---------------------------------------
    def evictions(self) -> Tensor:
        """What this layer's policy drops before a new token is written, bool ``[B, cap]`` (one of the
        ``*evictions`` functions; a branch on the configuration only)."""
        return _POLICY_RULES[self.policy].evictions(self)

    def make_room(self) -> None:
        """Evict what the policy drops before a new token is written (:meth:`evictions`)."""
        if self.budget is None and self.threshold is None:  # a branch on the configuration only
            return
        drop = self.evictions()
        self.pos.masked_fill_(drop, -1)
        self.fcum.masked_fill_(drop[:, None, :], float("inf"))
        if self.acc is not None:
            self.acc.masked_fill_(drop, 0.0)

    def slot_for_next(self) -> Tensor:
        """Make room for a new token (:meth:`make_room`) and return the slot each sequence writes it to, ``[B]``:
        the first free one. Without a threshold a step evicts at most one token, a full layer's, and a full layer
        has no free slot (``cap == budget``), so the new token takes the victim's slot: nothing is marked free
        first. Each rule scores a free slot above every kept token, so the largest of the rule's candidates and
        the free slots is the first free slot, or the victim: the same state as :meth:`make_room` and a search for
        the free slot in 7 small ops, not ~25 (what eager decoding pays per op, not per element, is most of a
        pruned step's time)."""
        # branches on the configuration only (a cache built directly, not by empty(), may have spare slots)
        if self.budget is None or self.threshold is not None or self.capacity != self.budget:
            self.make_room()
            if self.budget is None:
                if torch.compiler.is_compiling():  # not counted in a compiled step: later eager calls read the device
                    self.upper = self.capacity
                else:
                    self._check_not_full()
            return self.pos.argmin(dim=-1)  # a free slot has position -1: the smallest
        return _largest(*_POLICY_RULES[self.policy].rule(self), self.pos)

    def _check_not_full(self) -> None:
        """Refuse a step into an unbudgeted layer with no free slot in some row (eager calls): the new token would
        take the slot with the smallest position, the protected first token's. Read on the device only once the
        host count :attr:`upper` says the layer may be full (a threshold may have freed slots since)."""
        if self.upper >= self.capacity and bool((self.pos >= 0).all(dim=-1).any()):
            raise ValueError(
                f"this layer has no budget and its {self.capacity} slots are full: a new token would overwrite the "
                "first one (layers before it may already hold this token: start again from new caches). Size the "
                "caches for the prompt plus every token to generate (GPT.new_caches(max_len=...), or "
                "Decoder.prefill(..., max_new_tokens=...)), or give the layer a budget."
            )
        self.upper += 1

    def write(
        self, k: Tensor, v: Tensor, input_pos: Tensor, ks: Tensor | None = None, slot: Tensor | None = None
    ) -> Tensor:
        """Write one token (``k, v`` ``[B, Hkv, 1, D]``, selector key ``[B, G, 1, D]``) at position
        ``input_pos`` (``[1]``, or ``[B]``: one per sequence, counted from its first real token) into ``slot``
        ``[B]`` (default: each sequence's first free slot; with none free, the slot of the smallest position, the
        first token's: :meth:`slot_for_next` refuses that), with ``Fcum = 0`` (and no attention received yet);
        returns the slots ``[B]``."""
        B, H = k.shape[:2]
        slot = self.pos.argmin(dim=-1) if slot is None else slot  # a free slot has position -1: the smallest
        # in the cache's dtype: under autocast a Linear's k, v are bf16 while the buffers keep the model's
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        slots = slot[:, None]  # [B, 1]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (k, v, ks, self.k, self.v)):
            # a step recorded by autograd (an HF training forward through a SelectiveCache): earlier steps' products
            # saved these buffers for their backward, so new buffers replace them instead of being written in place
            at = slot.view(B, 1, 1, 1)
            self.k = self.k.scatter(2, at.expand(k.shape), k)
            self.v = self.v.scatter(2, at.expand(v.shape), v)
            if ks is not None:
                self.ks = self.ks.scatter(2, at.expand(ks.shape), ks.to(self.ks.dtype))
        elif torch.compiler.is_compiling():
            # compiled: the keys and values by index_put_, not scatter_: inductor applied a scatter_ into the cache
            # buffers to a copy of the whole cache, every step, which the attention then read through the scatter's
            # index arithmetic (a compiled full-cache step at 2,048 slots ran 4x slower than eager); index_put_
            # writes in place
            rows, heads = torch.arange(B, device=slot.device)[:, None], torch.arange(H, device=slot.device)
            self.k.index_put_((rows, heads, slots), k[:, :, 0])
            self.v.index_put_((rows, heads, slots), v[:, :, 0])
            if ks is not None:
                voters = heads if ks.shape[1] == H else torch.arange(ks.shape[1], device=slot.device)
                self.ks.index_put_((rows, voters, slots), ks[:, :, 0].to(self.ks.dtype))
        else:
            # eager: scatter_ along the slots, a third of index_put_'s cost per call (9 against 25 us for a
            # [8, 2, 64, 32] buffer on an Intel Xeon; its advanced indexing builds and broadcasts three index
            # tensors): the same assignment, so the same values
            at = slot.view(B, 1, 1, 1)
            self.k.scatter_(2, at.expand(k.shape), k)
            self.v.scatter_(2, at.expand(v.shape), v)
            if ks is not None:
                self.ks.scatter_(2, at.expand(ks.shape), ks.to(self.ks.dtype))
        self.fcum.scatter_(2, slot.view(B, 1, 1).expand(B, self.fcum.shape[1], 1), 0.0)
        self.pos.scatter_(1, slots, input_pos.view(-1, 1).expand(B, 1))
        if self.acc is not None:
            self.acc.scatter_(1, slots, 0.0)
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
        """One token through the cache -> ``[B, H, 1, Dv]``: make room by the policy (so at most ``budget``
        tokens are stored and attended, the new one included), write it, attend with ``-Fcum``, add its
        votes and (policy ``"h2o"``) its attention weights, summed over heads, to ``acc``.

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
        # q is checked before the write: a step refused after it would leave the token stored (and one evicted)
        B, Hkv, _, D = self.k.shape
        if q.dim() != 4 or q.shape[0] != B or q.shape[2] != 1 or q.shape[3] != D or q.shape[1] % Hkv:
            raise ValueError(
                f"q must be [B={B}, H, 1, D={D}] with H a multiple of the cache's {Hkv} kv heads, got "
                f"{tuple(q.shape)}; the cache is unchanged."
            )
        slot = self.write(k, v, input_pos, ks=None if selector is None else selector[1], slot=self.slot_for_next())
        B, H, _, D = q.shape
        Hkv, cap = self.k.shape[1], self.k.shape[2]
        scale = 1.0 / math.sqrt(D) if scale is None else scale
        qg = q.reshape(B * Hkv, H // Hkv, D)  # [B*Hkv, g, D]: query head h = (kv head, member)
        # (products of [B*Hkv, ., .] views: matmul of the 4-d tensors folds them to that in 7 ops; per op, not per
        # element, is what a pruned step pays most). reshape, not view: a Hugging Face model's q is a transposed view
        k3, v3 = self.k.reshape(B * Hkv, cap, D), self.v.reshape(B * Hkv, cap, self.v.shape[-1])
        logits = _scaled_product(qg, k3.transpose(1, 2), scale).view(B, H, 1, cap)
        # free slots hold Fcum = +inf: the bias -Fcum removes them with no extra mask
        fp = torch.promote_types(q.dtype, torch.float32)
        p = torch.softmax(logits.to(fp) - self.fcum[:, :, None, :].to(fp), dim=-1)  # [B, H, 1, cap]
        if self.acc is not None:  # H2O: the attention each slot received, summed over heads
            self.acc += p.sum(dim=(1, 2)).to(self.acc.dtype)
        # weights below 2^-100 (float64: 2^-1000) to an exact 0 before they multiply v: a trained model's F sends
        # some into subnormal numbers, which cost Intel CPUs a microcode assist each (the demo checkpoint's full-cache
        # step: 3-8% faster); invisible in the output (a row sums to 1)
        # (out of place: softmax's backward reads its output, for a step run with gradients, as an HF training forward
        # through a SelectiveCache)
        p = torch.nn.functional.threshold(p, _WEIGHT_FLOOR[p.dtype], 0.0).to(self.v.dtype)
        y = torch.bmm(p.view(B * Hkv, H // Hkv, cap), v3).view(B, H, 1, self.v.shape[-1])
        if selection is not None:
            if selection.heads is not None:  # voting heads: their logits are the attention logits just computed
                votes = logits[:, selection.heads]  # [B, G, 1, cap]
            else:  # a dedicated pair: its own logits against the cached selector keys
                qs = selector[0]
                vscale = vote_scale(scale, D, qs.shape[-1])
                G, Ds = qs.shape[1], qs.shape[-1]
                ks3 = self.ks.reshape(B * G, cap, Ds).transpose(1, 2)
                votes = _scaled_product(qs.reshape(B * G, 1, Ds), ks3, vscale).view(B, G, 1, cap)
            self.add_votes(votes, slot)
        return y

    def add_votes(self, vote_logits: Tensor, slot: Tensor) -> None:
        """Add the new token's votes ``relu(vote_logits)`` (``[B, G, 1, cap]``, the voters' scaled
        logits against every slot) to ``Fcum``, for kept tokens other than the first and the new one
        in ``slot`` ``[B]`` (DESIGN §3): after attending, as they affect later queries only."""
        unvoted = (self.pos <= 0).scatter_(1, slot[:, None], True)  # [B, cap]
        # masked, then relu in place: relu's backward reads its output, which must stay as it is (a step with gradients)
        self.fcum += vote_logits[:, :, 0, :].masked_fill(unvoted[:, None, :], 0.0).relu_()

    # --- for the decoder's eager checks ---------------------------------------------------------------
    def attended_next(self) -> int:
        """How many tokens the next step would attend to (the most over the batch): the kept ones
        that survive its evictions, and the new one."""
        drop = self.evictions()
        return int((self.valid.sum(-1) - drop.sum(-1) + 1).max())
