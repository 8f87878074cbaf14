"""Fast path for user-given masks: hand them to ``F.scaled_dot_product_attention``.

SDPA picks PyTorch's best kernel for the device (flash on CPU and GPU for the causal case). Our
rule "finite F is *subtracted*, +-inf removes" becomes SDPA's additive mask ``-F`` with ``-inf`` at
removed keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import NormalizedMask
from .naive import naive_attention, repeat_kv
from .transforms import eager_call, reads_values, unserved_transform

if TYPE_CHECKING:
    from .registry import Request

__all__ = ["sdpa_attention", "supports", "attend"]


def supports(req: Request) -> str | None:
    """Standard attention with any user mask and dropout; not the paper's F."""
    if req.voters is not None:
        return "backend='sdpa' cannot compute the paper's F; use 'auto' or 'chunked' with selection=True."
    # CPU flash attention has no jvp formula (a float mask's tangent included)
    if transform := unserved_transform(req.q, req.k, req.v, req.mask.penalty, reverse=False):
        return f"backend='sdpa' (PyTorch's fused kernels) cannot serve {transform}; use backend='naive' or 'auto'."
    return None


def attend(req: Request) -> tuple[Tensor, None]:
    """``(out, None)`` (the backend contract)."""
    return sdpa_attention(req.q, req.k, req.v, mask=req.mask, scale=req.scale, dropout_p=req.dropout_p), None


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: NormalizedMask,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """Same result as :func:`~selective_attention.ops.naive.naive_attention` (output only) with
    ``removed = mask.removed_with_causal(Lq, Lk)`` and ``penalty = mask.penalty``.

    Shapes: q ``[B, H, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]`` -> ``[B, H, Lq, Dv]``;
    ``Hkv < H`` is grouped-query attention (SDPA's ``enable_gqa``: query head h reads kv head
    ``h // (H // Hkv)``).
    """
    Lq, Lk = q.shape[-2], k.shape[-2]
    removed, penalty = mask.removed_with_causal(Lq, Lk, q.device), mask.penalty
    # a Python bool under torch.compile(dynamic=True) too (SDPA refuses a SymBool): the branch guards on it
    gqa = True if k.shape[1] != q.shape[1] else False  # noqa: SIM210
    if Lq == 0 or Lk == 0:
        # SDPA kernels reject empty sequences; the answer (zeros) is the spec's.
        g = q.shape[1] // max(k.shape[1], 1)
        k, v = repeat_kv(k, g), repeat_kv(v, g)
        return naive_attention(q, k, v, removed=removed, penalty=penalty, scale=scale)[0]
    # is_causal with a scale <= 0 gives NaN rows in PyTorch's CPU kernel: such calls take the mask below
    if mask.removed is None and penalty is None and (not mask.causal or (Lq == Lk and scale > 0)):
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=mask.causal, scale=scale, enable_gqa=gqa
        )

    if penalty is None:
        bias = torch.zeros((), dtype=q.dtype, device=q.device)
    else:
        bias = -penalty
    dead = None
    if removed is not None:
        # SDPA kernels differ on rows with every key removed (zeros on some, NaN on others):
        # unmask such rows and zero their output ourselves, so every backend gives 0 and a 0 grad.
        dead = removed.all(dim=-1, keepdim=True)  # [b, h, Lq, 1]
        if not reads_values(dead) or dead.any():  # compiled (a graph break) or meta: no value read, the same result
            removed = removed & ~dead
        else:
            dead = None
        bias = bias.masked_fill(removed, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    if removed is not None and out.device.type == "cpu" and eager_call(out) and not bool(out.isfinite().all()):
        # a removed key that is not finite (a NaN or inf key at padding) gives SDPA's kernel NaN + (-inf) = NaN in
        # rows that never read it; the spec removes a key by assignment, whatever its logit: redo the call on the
        # spec's kernel (one reduction over the output per masked eager call on CPU; the redo only for non-finite
        # inputs; under torch.compile and torch.func's transforms, where no value is read, the kernel's result stays)
        k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
        return naive_attention(
            q, k, v, removed=mask.removed_with_causal(Lq, Lk, q.device), penalty=penalty, scale=scale,
            dropout_p=dropout_p,
        )[0]  # fmt: skip
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out
