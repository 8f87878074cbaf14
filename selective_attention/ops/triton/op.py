"""The Triton paper-mode kernels as ``torch.library`` custom ops (traceable by ``torch.compile``).

``selective_attention::paper_fwd(q, k, v, vote_head, scale, sel_scale) -> (out, lse)`` and
``selective_attention::paper_bwd(dout, q, k, v, out, lse, vote_head, scale, sel_scale) -> (dq, dk, dv)``,
with fake (meta) implementations and the autograd formula linking them. ``vote_head = h >= 0``: one F
from head h shared by all heads (the paper, h = 0); ``vote_head = -1``: every head its own F. q is
``[B, H, L, D]``, k and v ``[B, Hkv, L, .]`` (``Hkv < H``: grouped-query attention).

Triton is imported only when a kernel runs, so this module imports without Triton or a GPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...selection import head_range
from ..transforms import (
    eager_call,
    eager_function,
    refuse_batched_backward,
    refuse_double_backward,
    unserved_transform,
)

if TYPE_CHECKING:
    from ..registry import Request

__all__ = ["triton_selective_attention", "is_available", "paper_fwd", "paper_bwd", "supports", "attend"]

# Fill every kernel output with NaN before the kernels write it, so an element they miss fails the
# tests instead of passing on leftover memory (tests turn it on; off by default, it costs a memset).
debug_fill_nan: bool = os.environ.get("SELECTIVE_ATTENTION_TRITON_DEBUG", "") == "1"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton's interpreter multiplies bf16 operands as their raw 16-bit patterns (its tl.dot converts fp8 only)
_INTERPRETER_BF16 = (
    "backend='triton' under Triton's interpreter (TRITON_INTERPRET=1) cannot run bf16: its products read bf16 as "
    "integers. Use float32 or float16 there, or backend='chunked'; compiled on a GPU, bf16 runs."
)
_MAX_D = 128  # larger dims would need their own (untested) GPU block config


def _interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter: as they were built once imported (Triton decides when it
    decorates them), else as the environment says they will be."""
    kernels = sys.modules.get(f"{__package__}.kernels")
    if kernels is not None:
        return kernels.INTERPRETED
    return os.environ.get("TRITON_INTERPRET", "") == "1"


MIN_TRITON = (3, 2)  # Triton 3.1 (what PyTorch 2.5 installs) runs these kernels to NaN in its interpreter


_VERSION: list = []  # Triton's version, once read (at first use: importing Triton takes seconds)


def _triton_version() -> tuple[int, ...] | None:
    """Triton's ``(major, minor)``, or None when it is not installed."""
    if not _VERSION:
        try:
            import triton

            major_minor = re.match(r"(\d+)\.(\d+)", triton.__version__)
            _VERSION.append(tuple(int(g) for g in major_minor.groups()) if major_minor else (0, 0))
        except ImportError:
            _VERSION.append(None)
    return _VERSION[0]


def _too_old() -> str | None:
    """Why the installed Triton cannot run these kernels (older than ``MIN_TRITON``), or None."""
    version = _triton_version()
    if version is None or version >= MIN_TRITON:
        return None
    return (
        f"backend='triton' needs Triton >= {'.'.join(map(str, MIN_TRITON))}, found {'.'.join(map(str, version))} "
        "(PyTorch 2.5 installs 3.1): upgrade torch (2.6 brings Triton 3.2), or use backend='chunked'."
    )


def is_available() -> bool:
    """Triton >= 3.2 is installed and can run here: a CUDA device, or the interpreter (``TRITON_INTERPRET=1``)."""
    if _triton_version() is None or _too_old():
        return False
    return torch.cuda.is_available() or _interpreting()


def _on(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensors' (cuda:1 inputs with device 0 current
    would be read out of another device's memory)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_op_args(q: Tensor, k: Tensor, v: Tensor, vote_head: int) -> None:
    """The raw op's own checks (:func:`triton_selective_attention` checks more, with the user's names): the kernels
    index heads and rows by these, and read out of bounds otherwise (NaN, or another tensor's memory)."""
    dims_ok = q.dim() == k.dim() == v.dim() == 4
    B, H, L = q.shape[:3] if dims_ok else (0, 0, 0)
    Hkv = k.shape[1] if dims_ok else 0
    if not dims_ok or Hkv == 0 or H % Hkv or k.shape[:3] != (B, Hkv, L):
        raise ValueError(
            f"paper_fwd needs q [B, H, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] with H % Hkv == 0; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    if v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"paper_fwd: k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}.")
    if not -1 <= vote_head < H:
        raise ValueError(f"paper_fwd: vote_head={vote_head} must be a head of q (0 .. {H - 1}) or -1 (every head).")


@torch.library.custom_op("selective_attention::paper_fwd", mutates_args=())
def paper_fwd(q: Tensor, k: Tensor, v: Tensor, vote_head: int, scale: float, sel_scale: float) -> tuple[Tensor, Tensor]:
    return _fwd_impl(q, k, v, vote_head, scale, sel_scale)


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, vote_head: int, scale: float, sel_scale: float) -> tuple[Tensor, Tensor]:
    """:func:`paper_fwd`'s body, for the op and for :class:`_EagerPaper` alike."""
    _check_op_args(q, k, v, vote_head)
    B, H, L, _ = q.shape
    if L == 0:
        return v.new_empty(B, H, 0, v.shape[-1]), q.new_empty(B, H, 0, dtype=torch.float32)
    from . import kernels

    with _on(q):
        return kernels.forward(
            q.contiguous(), k.contiguous(), v.contiguous(), vote_head, scale, sel_scale, debug=debug_fill_nan
        )


@paper_fwd.register_fake
def _paper_fwd_fake(q, k, v, vote_head, scale, sel_scale):
    B, H, L, _ = q.shape
    return q.new_empty(B, H, L, v.shape[-1]), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("selective_attention::paper_bwd", mutates_args=())
def paper_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    vote_head: int,
    scale: float,
    sel_scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(dout, q, k, v, out, lse, vote_head, scale, sel_scale)


def _bwd_impl(dout, q, k, v, out, lse, vote_head, scale, sel_scale) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`paper_bwd`'s body, for the op and for :class:`_EagerPaper` alike."""
    if q.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    from . import kernels

    q, k, v, out, lse, dout = (t.contiguous() for t in (q, k, v, out, lse, dout))
    with _on(q):
        return kernels.backward(dout, q, k, v, out, lse, vote_head, scale, sel_scale, debug=debug_fill_nan)


@paper_bwd.register_fake
def _paper_bwd_fake(dout, q, k, v, out, lse, vote_head, scale, sel_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, vote_head, scale, sel_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.vote_head, ctx.scale, ctx.sel_scale = vote_head, scale, sel_scale
    # lse is what backward rebuilds P from, not a result: its gradient is not computed, so it must not look
    # differentiable (a loss on it got a gradient of 0, silently)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    refuse_batched_backward(dout, "triton")
    bwd = _bwd_impl if eager_call(q, k, v, out, lse, dout) else paper_bwd  # see _EagerPaper
    with torch.no_grad():
        grads = bwd(dout, q, k, v, out, lse, ctx.vote_head, ctx.scale, ctx.sel_scale)
    if torch.is_grad_enabled():  # create_graph=True: these gradients must not be differentiated
        grads = refuse_double_backward(grads, (q, k, v, dout), "triton")
    return (*grads, None, None, None)


paper_fwd.register_autograd(_backward, setup_context=_setup_context)


# eager calls (transforms.eager_call) run this: the op's first call imports torch._dynamo, even in eager code
_EagerPaper = eager_function("_EagerPaper", _fwd_impl, _setup_context, _backward)


def _vote_head(heads: slice, H: int) -> int:
    """``slice(h, h + 1)`` -> h (one shared F); every head (``slice(None)``) -> -1 (one F per head)."""
    if not isinstance(heads, slice):
        raise TypeError(f"heads must be a slice (slice(h, h + 1) or slice(None)), got {type(heads).__name__}.")
    chosen = head_range(heads, H)
    if len(chosen) == H:  # includes H = 1: one head voting for itself is the per-head case
        return -1
    if len(chosen) == 1:
        return chosen[0]
    raise ValueError(
        f"heads must select one voting head (slice(h, h + 1)) or all H={H} heads (slice(None)); "
        f"got {heads} -> heads {list(chosen)}."
    )


def triton_selective_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    heads: slice,
    scale: float,
    sel_scale: float,
) -> Tensor:
    """The paper's causal selective attention on a GPU with fused Triton kernels (forward and backward).

    F and the attention weights are never built: each ``[BLOCK_M, BLOCK_N]`` tile of F is rebuilt
    from carried column sums of the votes (see :mod:`.kernels`). For query ``i`` and key ``j``
    (``x`` = attended, ``.`` = removed; votes ``S[k, j]`` only for ``1 <= j < k``)::

        j:  0 1 2 3          F[i, j] = sum_{k < i} S[k, j]
        i=0 x . . .          out_h[i] = sum_{j <= i} softmax_j(q_h[i].k_h[j] * scale - F[i, j]) v_h[j]
        i=1 x x . .
        i=2 x x x .          S[k, j] = relu(qs[k].ks[j] * sel_scale), (qs, ks) = (q, k)[:, voting head]
        i=3 x x x x

    Args:
        q: ``[B, H, L, D]``; k: ``[B, Hkv, L, D]``; v: ``[B, Hkv, L, Dv]``; ``Hkv < H`` (``H % Hkv == 0``)
            is grouped-query attention: query head h reads kv head ``h // (H // Hkv)``, never repeated.
            One dtype of fp32, fp16, bf16; CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``,
            for tests: slow). D, Dv <= 128.
        heads: ``slice(h, h + 1)``: F from head h (with its kv head), shared by all heads (the paper:
            h = 0); ``slice(None)``: every head its own F from its own logits. Both roles' gradients
            reach q, k.
        scale: attention logit scale; sel_scale: the votes' logit scale.

    User masks, key padding, dropout and memory-loss rows are the chunked (or naive) backend's: the
    dispatcher asks :func:`supports` before it sends a request here.

    Returns:
        ``[B, H, L, Dv]`` in the inputs' dtype. Differentiable in q, k, v (dk, dv summed over each group).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D [B, H, L, D] tensor, got {getattr(t, 'shape', type(t))}.")
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    if (k.shape[0], *k.shape[2:]) != (B, L, D) or v.shape[:3] != k.shape[:3] or Hkv == 0 or H % Hkv:
        raise ValueError(
            f"q must be [B, H, L, D], k [B, Hkv, L, D] and v [B, Hkv, L, Dv] with H % Hkv == 0 (self-attention); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise TypeError(f"q, k, v must share one dtype of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}.")
    if q.shape[-1] > _MAX_D or v.shape[-1] > _MAX_D:
        raise ValueError(f"head dims up to {_MAX_D} are supported; got D={q.shape[-1]}, Dv={v.shape[-1]}.")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"the Triton backend needs CUDA tensors, got {q.device}. (Tests run it on CPU with "
            "TRITON_INTERPRET=1 set before Triton is first imported.)"
        )
    if q.dtype == torch.bfloat16 and _interpreting():
        raise TypeError(_INTERPRETER_BF16)
    if old := _too_old():
        raise RuntimeError(old)
    vote_head = _vote_head(heads, q.shape[1])
    fwd = _EagerPaper.apply if eager_call(q, k, v) else paper_fwd
    return fwd(q, k, v, vote_head, float(scale), float(sel_scale))[0]


def supports(req: Request) -> str | None:
    """The paper's F from heads of q/k, no user masks, no dropout, no memory rows; fp32/fp16/bf16,
    head dims up to 128; CUDA (or the interpreter, for tests)."""
    mask, voters = req.mask, req.voters
    if voters is None:
        return "backend='triton' is the paper-mode path; pass selection=True or use 'sdpa'."
    if voters.heads is None:
        return (
            "backend='triton' votes with heads of q/k; a dedicated pair (Selection(projection=True) with "
            "selection_qk) needs 'chunked'."
        )
    if req.dropout_p > 0.0:
        return (
            "backend='triton' has no attention dropout; use dropout_p=0.0 (SelectiveAttention(..., dropout=0.0), or "
            "the module in eval mode) or backend='naive'."
        )
    if transform := unserved_transform(req.q, req.k, req.v):
        return f"backend='triton' (a hand-written backward) cannot serve {transform}; use backend='naive' or 'auto'."
    if req.tau is not None:
        return "backend='triton' does not return memory-loss rows (memory_tau); use backend='chunked'."
    if not mask.is_plain:
        given = ["key_padding_mask"] if mask.padding is not None else []
        if mask.penalty is not None or (mask.removed is not None and mask.padding is None):
            given.insert(0, "user masks (selective_mask)")
        return (
            f"backend='triton' computes the paper's F only; not supported: {', '.join(given)}. "
            "Use backend='chunked' (or 'auto') for selective_mask, key_padding_mask or memory_tau."
        )
    q, v = req.q, req.v
    if q.dtype not in _DTYPES:
        return f"backend='triton' runs {', '.join(str(d) for d in _DTYPES)}; got {q.dtype}: use backend='chunked'."
    if q.dtype == torch.bfloat16 and _interpreting():
        return _INTERPRETER_BF16
    if q.shape[-1] > _MAX_D or v.shape[-1] > _MAX_D:
        return f"backend='triton' supports head dims up to {_MAX_D}; got D={q.shape[-1]}, Dv={v.shape[-1]}."
    if limit := _launch_limit(q, req.k, v):
        return limit
    if old := _too_old():
        return old
    if _triton_version() is None:
        return "backend='triton' needs Triton (pip install triton) and a CUDA device; use backend='chunked'."
    if not is_available():
        return "backend='triton' needs a CUDA device (Triton is installed; none is visible); use backend='chunked'."
    if q.device.type != "cuda" and not _interpreting():
        return (
            f"backend='triton' needs CUDA tensors, got {q.device}. (Tests run it on CPU with "
            "TRITON_INTERPRET=1 set before Triton is first imported.)"
        )
    return None


_GRID_Y_MAX = 65535  # CUDA's limit on a grid's second axis, where the kernels put B * H (or B * Hkv)
_INT32_ELEMENTS = 2**31  # offsets within one (batch, head) slice are int32 (the slices' bases are int64)


def _launch_limit(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the kernels cannot be launched for these sizes, or None: B * H beyond a grid axis, or one (batch, head)
    slice of 2^31 elements or more: of q, k or v (``L * D``), or of the per-block column sums of the votes and of
    their gradients (``[~L/16, L]`` at most)."""
    B, H, L, _ = q.shape
    if B * H > _GRID_Y_MAX:
        return (
            f"backend='triton' launches one program per (batch, head) on a grid axis of at most {_GRID_Y_MAX}; got "
            f"B * H = {B * H}: split the batch, or use backend='chunked'."
        )
    biggest = max(L * max(q.shape[-1], k.shape[-1], v.shape[-1]), (L // 16 + 1) * L)
    if biggest >= _INT32_ELEMENTS:
        return (
            f"backend='triton' indexes within one (batch, head) with 32-bit offsets, and at L={L} a slice holds "
            f"{biggest:,} elements (2^31 or more); use backend='chunked'."
        )
    return None


def attend(req: Request) -> tuple[Tensor, None]:
    """``(out, None)`` (the backend contract)."""
    out = triton_selective_attention(
        req.q, req.k, req.v, heads=req.voters.heads, scale=req.scale, sel_scale=req.voters.scale
    )
    return out, None
