"""How much context a trained selective model needs: loss with a pruned cache, and a per-layer budget
search (DESIGN §4: lower each layer's budget while validation loss stays within a tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import Decoder
from .model import GPT

__all__ = ["pruned_loss", "search_budgets", "BudgetSearch"]


@torch.no_grad()
def pruned_loss(
    model: GPT, x: Tensor, y: Tensor, *, budget: int | Sequence[int] | None = None, threshold: float | None = None
) -> tuple[float, list[int]]:
    """Mean next-token cross-entropy (nats) of ``y`` ``[B, T]`` when ``x`` ``[B, T]`` is read one token
    at a time through a pruned KV cache, and the per-layer occupancy at the end.

    With no budget and no threshold this equals the full forward's loss (the cache is exact)."""
    B, T = x.shape
    dec = Decoder(model, budget=budget, threshold=threshold)
    logits = [dec.prefill(x[:, :1], T - 1)]
    for t in range(1, T):
        logits.append(dec.step(x[:, t]))
    logits = torch.stack(logits, dim=1)  # [B, T, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item(), dec.occupancy()


@dataclass
class BudgetSearch:
    """Result of :func:`search_budgets`."""

    budgets: list[int]
    loss: float  # validation loss with these budgets
    full_loss: float  # validation loss with the full cache
    context: int  # tokens per sequence (the full cache per layer)
    evaluations: list[dict] = field(default_factory=list)

    @property
    def memory_ratio(self) -> float:
        """Full KV memory / pruned KV memory (all layers)."""
        return self.context * len(self.budgets) / sum(self.budgets)


def search_budgets(
    model: GPT,
    x: Tensor,
    y: Tensor,
    *,
    tolerance: float = 0.01,
    progress: bool = False,
) -> BudgetSearch:
    """Per-layer budgets as small as the validation loss allows: layer by layer, binary-search the
    smallest budget that keeps the loss (all layers at their current budgets) within ``tolerance``
    nats of the full cache's. Assumes the loss does not improve when a budget shrinks.

    Args:
        model: a trained GPT (eval mode).
        x, y: validation inputs/targets ``[B, T]``.
        tolerance: allowed loss increase in nats (the paper compares at equal loss, +-0.01).
    """
    T = x.shape[1]
    n = model.config.n_layer
    full, _ = pruned_loss(model, x, y)
    budgets = [T] * n
    evals: list[dict] = []
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="budget search")
        except ImportError:
            bar = None
    for layer in range(n):
        lo, hi = 1, budgets[layer]
        while lo < hi:
            mid = (lo + hi) // 2
            trial = budgets[:layer] + [mid] + budgets[layer + 1 :]
            loss, _ = pruned_loss(model, x, y, budget=trial)
            evals.append({"budgets": trial, "loss": loss})
            if loss <= full + tolerance:
                hi = mid
            else:
                lo = mid + 1
        budgets[layer] = lo
        if bar is not None:
            bar.update(1)
            bar.set_postfix(budgets=str(budgets))
    if bar is not None:
        bar.close()
    final, _ = pruned_loss(model, x, y, budget=budgets)
    return BudgetSearch(budgets=budgets, loss=final, full_loss=full, context=T, evaluations=evals)
