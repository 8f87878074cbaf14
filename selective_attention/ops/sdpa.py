"""Fast path for user-given masks: hand them to ``F.scaled_dot_product_attention``.

SDPA picks PyTorch's best kernel for the device (flash on CPU and GPU for the causal case). Our
rule "finite F is *subtracted*, +-inf removes" becomes SDPA's additive mask ``-F`` with ``-inf`` at
removed keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import causal_removed
from .naive import naive_attention

__all__ = ["sdpa_attention"]


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    removed: Tensor | None = None,
    penalty: Tensor | None = None,
    causal: bool = False,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """Same contract as :func:`~selective_attention.ops.naive.naive_attention` (output only), plus
    ``causal``: also remove keys ``j > i + Lk - Lq``.

    Shapes: q ``[B, H, Lq, D]``, k ``[B, H, Lk, D]``, v ``[B, H, Lk, Dv]`` -> ``[B, H, Lq, Dv]``.
    """
    Lq, Lk = q.shape[-2], k.shape[-2]
    if Lq == 0 or Lk == 0:
        # SDPA kernels reject empty sequences; the answer (zeros) is the spec's.
        removed = causal_removed(Lq, Lk, q.device) if causal else removed
        return naive_attention(q, k, v, removed=removed, penalty=penalty, scale=scale)[0]
    if removed is None and penalty is None and (not causal or Lq == Lk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)

    if causal:
        rule = causal_removed(Lq, Lk, q.device)
        removed = rule if removed is None else removed | rule
    if penalty is None:
        bias = torch.zeros((), dtype=q.dtype, device=q.device)
    else:
        bias = -penalty
    dead = None
    if removed is not None:
        # SDPA kernels differ on rows with every key removed (zeros on some, NaN on others):
        # unmask such rows and zero their output ourselves, so every backend gives 0 and a 0 grad.
        dead = removed.all(dim=-1, keepdim=True)  # [b, h, Lq, 1]
        if dead.any():
            removed = removed & ~dead
        else:
            dead = None
        bias = bias.masked_fill(removed, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out
