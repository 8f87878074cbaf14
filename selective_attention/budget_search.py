"""How much context a trained selective model needs: loss with a pruned cache, and a per-layer budget
search (DESIGN §4: lower each layer's budget while the validation loss stays at a target).

A budget b is the most tokens a layer stores and attends to at any step, the newest included, and
every ratio here counts all b slots. "At equal loss" is the paper's "same validation perplexity": the
target is the full-cache *standard* model's loss, with no tolerance unless one is asked for; and a
searched budget holds only if it also meets the target on held-out windows that the search never saw
(check with :func:`pruned_loss` on those).

Every function takes the eviction ``policy`` (``"selective"``, the paper's, by default; ``"window"``,
``"h2o"`` for the KV-compression baselines; ``recent`` for H2O's recent window) under the same budget
definition, on any model: :mod:`selective_attention.kv_cache`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .decoding import Decoder
from .kv_cache import any_budget, check_policy
from .model import GPT, token_loss
from .progress import progress as progress_bar

__all__ = [
    "pruned_logits",
    "pruned_slots",
    "pruned_loss",
    "search_budgets",
    "BudgetSearch",
    "KV_METHODS",
    "uniform_budgets",
    "smallest_budget_at",
]

# The KV-compression methods compared at equal memory (DESIGN §4): name -> (which model it prunes, the
# eviction policy). One list for the demo, the reproduction and experiments/kv_curves.py.
KV_METHODS = {
    "standard + window": ("standard", "window"),  # StreamingLLM-style: the first token + the most recent
    "standard + H2O": ("standard", "h2o"),  # H2O-style: heavy hitters + a recent window
    "selective + selective": ("selective", "selective"),  # the paper: the largest penalty F goes
    "selective + window": ("selective", "window"),  # does the selective model alone do it?
}


def uniform_budgets(context: int, smallest: int = 4) -> list[int]:
    """Budgets ``smallest, 2*smallest, ...`` below ``context``: the x axis of a loss-vs-memory curve."""
    if isinstance(smallest, bool) or not isinstance(smallest, int) or smallest < 2:
        raise ValueError(
            f"smallest must be an int >= 2 (a budget holds the first token and the newest), got {smallest!r}."
        )
    out, b = [], smallest
    while b < context:
        out.append(b)
        b *= 2
    return out


def smallest_budget_at(points: Sequence[tuple[int, float]], target: float, full: float | None = None) -> int | None:
    """Read a loss-vs-budget curve: the smallest budget from which on the loss is at or under ``target`` at
    every larger budget of ``points`` (``(budget, loss)`` pairs, any order), or None if the largest is above it.
    A lucky dip below the target under a budget that misses it does not count, and neither does any budget when
    ``full``, the same model's full-cache loss (the largest budget of all), is above the target. A NaN loss (a
    diverged run) or target is never at or under anything."""
    if full is not None and not full <= target:
        return None
    best = None
    for budget, loss in sorted(points, reverse=True):
        if not loss <= target:
            break
        best = budget
    return best


@torch.no_grad()
def _decoder(model: GPT, T: int, budget, threshold: float | None, policy: str, recent: int | None) -> Decoder:
    """The Decoder :func:`pruned_logits` reads windows of ``T`` tokens through (and :func:`pruned_slots` sizes)."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"windows must hold at least one token, got T={T!r}.")
    if not any_budget(budget):  # nothing is evicted by any policy (a curve's full-cache point): the exact cache
        check_policy(policy, threshold, recent)
        policy, recent = "selective", None
    dec = Decoder(model, budget=budget, threshold=threshold, policy=policy, recent=recent)
    ctx = model.config.context_len
    if T > ctx and threshold is None and not dec._bounded:  # the Decoder would name its prompt and max_new_tokens
        raise ValueError(
            f"windows of T={T} tokens exceed the model's context_len={ctx}: read them with a budget of at most "
            f"{ctx} for every layer (budget=...), or use windows of at most {ctx} tokens."
        )
    return dec


def pruned_logits(
    model: GPT,
    x: Tensor,
    *,
    budget: int | Sequence[int | None] | None = None,
    threshold: float | None = None,
    policy: str = "selective",
    recent: int | None = None,
) -> tuple[Tensor, list[int]]:
    """Next-token logits ``[B, T, vocab]`` when ``x`` ``[B, T]`` is read one token at a time through a
    KV cache pruned by ``policy`` (:class:`~selective_attention.decoding.Decoder`), and the most tokens each
    layer held at any step (any sequence of the batch). With no budget and no threshold (or a budget >= T)
    they equal the full forward's logits (the cache is exact), whatever the policy."""
    T = x.shape[1]
    dec = _decoder(model, T, budget, threshold, policy, recent)
    logits = [dec.prefill(x[:, :1], T - 1)]
    peak = dec.occupancy()
    for t in range(1, T):
        logits.append(dec.step(x[:, t]))
        if threshold is not None:  # a threshold evicts and admits: the occupancy goes down and up again
            peak = [max(a, b) for a, b in zip(peak, dec.occupancy())]
    if threshold is None:  # a budget alone only ever evicts to make room: the last step holds the most
        peak = dec.occupancy()
    return torch.stack(logits, dim=1), peak


def pruned_slots(
    model: GPT,
    T: int,
    *,
    budget: int | Sequence[int | None] | None = None,
    threshold: float | None = None,
    policy: str = "selective",
    recent: int | None = None,
) -> list[int]:
    """The key/value slots per layer (per sequence) that :func:`pruned_logits`' caches allocate for windows of
    ``T`` tokens: a layer's budget, or T without one. What a run with static buffers stores, against the peak
    that ``pruned_logits`` reports as held: with a threshold alone that peak may be far below it (the memory a
    cache that grew and shrank would need), and a budget above T allocates the budget."""
    dec = _decoder(model, T, budget, threshold, policy, recent)
    dec.prefill(torch.zeros(1, 1, dtype=torch.long), T - 1)
    return [c.capacity for c in dec.caches]


def _check_windows(x: Tensor, y: Tensor) -> None:
    """Inputs ``x`` and targets ``y``: integer tensors of one shape ``[B, T]``."""
    for name, t in (("x", x), ("y", y)):
        ids = isinstance(t, Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
        if not ids or t.dim() != 2:
            raise ValueError(
                f"{name} must be an integer tensor of token ids [B, T]; got "
                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}."
            )
    if x.shape != y.shape:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have one shape [B, T] (the targets of x).")
    if x.numel() == 0:
        raise ValueError(f"the windows are empty: x and y are {tuple(x.shape)}; give at least one window of 1+ tokens.")


def pruned_loss(
    model: GPT,
    x: Tensor,
    y: Tensor,
    *,
    budget: int | Sequence[int | None] | None = None,
    threshold: float | None = None,
    policy: str = "selective",
    recent: int | None = None,
) -> tuple[float, list[int]]:
    """Mean next-token cross-entropy (nats) of ``y`` ``[B, T]`` (-100 = not scored) when ``x`` ``[B, T]``
    is read through a KV cache pruned by ``policy`` (:func:`pruned_logits`), and the most tokens each layer
    held at any step."""
    _check_windows(x, y)
    if not (y != -100).any():
        raise ValueError("pruned_loss: every target is -100 (ignored), so there is no loss to compute.")
    logits, occupancy = pruned_logits(model, x, budget=budget, threshold=threshold, policy=policy, recent=recent)
    return token_loss(logits, y).item(), occupancy


@dataclass
class BudgetSearch:
    """Result of :func:`search_budgets`."""

    budgets: list[int]  # per layer: tokens stored and attended at most, the newest included
    loss: float  # search-window loss with these budgets
    full_loss: float  # search-window loss of the same model with the full cache
    target: float  # the loss the budgets had to stay at or under (before the tolerance)
    tolerance: float  # nats allowed above the target (0 = the paper's equal loss)
    context: int  # tokens per sequence (the full cache per layer)
    policy: str = "selective"  # the eviction policy the budgets were searched with
    evaluations: list[dict] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        """Whether these budgets keep the loss at ``target + tolerance``: False when even the full cache is above it
        (then every budget is the full context, and ``memory_ratio`` is 1 by that, not by a search)."""
        return self.loss <= self.target + self.tolerance

    @property
    def saves_memory(self) -> bool:
        """Whether some layer's budget is below the full context while the loss stays at ``target + tolerance``
        (``reached`` alone is also true when every budget is the full context)."""
        return self.reached and any(b < self.context for b in self.budgets)

    @property
    def memory_ratio(self) -> float:
        """Full KV memory / pruned KV memory, all layers: every slot of every budget counts."""
        return self.context * len(self.budgets) / sum(self.budgets)


def search_budgets(
    model: GPT,
    x: Tensor,
    y: Tensor,
    *,
    target: float | None = None,
    tolerance: float = 0.0,
    policy: str = "selective",
    recent: int | None = None,
    progress: bool = False,
) -> BudgetSearch:
    """Per-layer budgets as small as the loss allows: layer by layer, binary-search the smallest budget
    (>= 2: the first token and the newest; with an H2O ``recent``, >= recent + 1) that keeps the loss on
    ``x, y`` (all layers at their current budgets) at most ``target + tolerance``. That is the smallest
    passing budget when the loss does not improve as a budget shrinks; where it does (a pruned cache can
    score better than a fuller one), it is a passing budget b whose b - 1 fails (or the smallest allowed),
    and smaller ones may pass too. ``loss`` is recomputed for the returned budgets, and ``reached`` says
    whether it meets the goal (not when even the full cache misses it: the budgets then stay at the full
    context).

    Args:
        model: a trained GPT (eval mode).
        x, y: search windows, inputs/targets ``[B, T]``; keep other windows to check the result on.
        target: the loss to match, e.g. the full-cache standard model's loss on ``x, y`` (the paper's
            "equal validation perplexity"). Default: this model's own full-cache loss.
        tolerance: nats allowed above ``target``; 0 by default. Report it next to every ratio it gives.
        policy, recent: the eviction policy (and H2O's recent window; default half of each budget) the
            budgets are searched with (:func:`pruned_logits`).
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 <= tolerance < math.inf:
        raise ValueError(f"tolerance must be a finite number of nats >= 0, got {tolerance!r}.")
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, numbers.Real) or not math.isfinite(target)
    ):
        raise ValueError(f"target must be a finite loss (a number), got {target!r}.")
    _check_windows(x, y)
    check_policy(policy, None, recent)
    T = x.shape[1]
    if T < 2:
        raise ValueError(f"the search windows must hold at least 2 tokens, got T={T}.")
    if T > model.config.context_len:  # the search starts from the full cache's loss, which holds at most context_len
        raise ValueError(
            f"the search windows of T={T} tokens exceed the model's context_len={model.config.context_len}: the "
            f"search starts from the full cache's loss, so use windows of at most {model.config.context_len} tokens."
        )
    if recent is not None and recent + 1 > T:
        raise ValueError(f"recent={recent} leaves no budget within the windows' T={T} tokens: use recent <= {T - 1}.")
    n = model.config.n_layer
    full, _ = pruned_loss(model, x, y)
    goal = (full if target is None else target) + tolerance
    budgets = [T] * n
    evals: list[dict] = []
    bar = progress_bar(n, "budget search", enabled=progress)
    # even the full cache misses the goal: no budget is "at equal loss", whatever a pruned cache scores (one can score
    # better than the full one), so the budgets stay at the full context (smallest_budget_at's rule, too)
    for layer in range(n if full <= goal else 0):
        lo, hi = 2 if recent is None else recent + 1, budgets[layer]  # room for the first token (and the window)
        while lo < hi:
            mid = (lo + hi) // 2
            trial = budgets[:layer] + [mid] + budgets[layer + 1 :]
            loss, _ = pruned_loss(model, x, y, budget=trial, policy=policy, recent=recent)
            evals.append({"budgets": trial, "loss": loss})
            if loss <= goal:
                hi = mid
            else:
                lo = mid + 1
        budgets[layer] = lo
        bar.update(1)
        bar.set_postfix(budgets=str(budgets))
    bar.close()
    final, _ = pruned_loss(model, x, y, budget=budgets, policy=policy, recent=recent)
    return BudgetSearch(
        budgets=budgets,
        loss=final,
        full_loss=full,
        target=full if target is None else target,
        tolerance=tolerance,
        context=T,
        policy=policy,
        evaluations=evals,
    )
