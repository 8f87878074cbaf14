"""Exact, memory-lean paper-mode attention: query chunks, a carried column sum for F, and a custom
autograd that recomputes in backward (DESIGN §5).

Nothing of size ``[B, H, L, L]`` is ever built: chunk c (queries ``i0 .. i1-1``) only needs keys
``0 .. i1-1`` (causal), so its temporaries are ``[B, H, C, i1]``.

Forward, chunk by chunk, first to last::

    S_c  = relu(qs_c ks^T * s) on 1 <= j < k           # the chunk's votes      [B, G, C, i1]
    F_c  = colsum + exclusive_cumsum_rows(S_c)         # F for the chunk's rows [B, G, C, i1]
    colsum += S_c.sum(rows)                            # carried to later chunks [B, G, L]
    out_c, lse_c = attention(q_c, k, v, bias = -F_c - penalty, causal/removed = -inf)

Backward, the same chunks last to first, each one's keys in tiles of columns (``_key_tile``: the
temporaries ``[B, H, C, width]`` stay within a few MiB, in cache, however long the sequence), with
``dZ_h = P_h * (dO_h V_h^T - rowsum(dO_h * O_h))``; everything but dq is column-wise, so a tile needs
only its own columns (its votes, F and bias too, rebuilt from the chunk's carried column sum)::

    S_t, F_t = as in forward, for the tile's columns   # [B, G, C, width]
    dF_t = -sum_h dZ_h                                 # [B, G, C, width]
    dS_t[k, j] = dcol[j] + sum_{i in c, i > k} dF_t[i, j]   (exclusive suffix sum down columns)
    dcol[tile] += dF_t.sum(rows)                       # carried to earlier chunks
    dl_s = dS_t * 1[S_t > 0];  dqs_c += dl_s ks_t * s;  dks_t += dl_s^T qs_c * s
    dq_c += dZ k_t;  dk_t += dZ^T q_c;  dv_t += P^T dO_c

When the voters are heads of q and k themselves (the paper), the two vote GEMMs are not run: their
products have the shape of those heads' attention gradients, so ``dl_s * s / scale`` is added into the
voting heads' dZ before the dq and dk GEMMs.

The softmax-times-V part runs on PyTorch's fused CPU flash kernel (the one SDPA uses) given the bias;
``lse`` saved in the forward lets backward rebuild ``P_h`` (in base 2: exp2 is cheaper than exp on some
CPUs). Other devices use a plain PyTorch kernel with the same contract. The code carries ``-S`` and
``-colsum`` rather than S and colsum: the bias is ``-F``, so the negation comes free out of the matmul.
The per-block votes and bias and the per-tile products live in buffers reused by every block and tile
(``_Workspace``): fresh ones would cost their page faults each time. In the paper's configuration (one voting head
of q, fp32 / fp64, no penalty, removed keys only as key padding) the elementwise steps around the GEMMs run as two
compiled passes per tile where Numba is installed (``cpu_kernels``, extra ``[cpu]``; :func:`_fused_path`).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..selection import Voters, grouped_matmul, head_range, kv_heads, votable_keys
from . import cpu_kernels, naive
from .transforms import (
    eager_call,
    eager_function,
    reads_values,
    refuse_batched_backward,
    refuse_double_backward,
    unserved_transform,
)

if TYPE_CHECKING:
    from .registry import Request

__all__ = ["chunked_selective_attention", "default_chunk_size", "check_chunk_size", "supports", "attend"]

_NEG_INF = float("-inf")
_LOG2E = 1.4426950408889634  # log2(e)


# --- the attention kernel given an additive bias: out, lse and its backward ------------------------
def _has_cpu_flash() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


@functools.cache
def _cpu_flash_reads_groups() -> bool:
    """Whether PyTorch's CPU flash kernel reads grouped kv heads (query head h from kv head ``h // g``). Older
    releases (seen in 2.5.1 and 2.6.0; 2.13 groups) read kv head h whatever k's head count, past
    the end of k and v: outputs of 1e36 and NaN. Probed once, within bounds: k and v are the first head of a
    two-head buffer whose second head is ones, so a kernel that ignores the grouping returns ones for query
    head 1, where the grouped read (kv head 0: zeros) returns zeros."""
    kv = torch.zeros(1, 2, 1, 8, device="cpu", dtype=torch.float32)
    kv[:, 1] = 1.0
    try:
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            torch.zeros_like(kv), kv[:, :1], kv[:, :1], 0.0, False, scale=1.0
        )
    except RuntimeError:  # a kernel that refuses different head counts
        return False
    return bool((out == 0).all())


def _attn_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``softmax(q k^T * scale + bias) v`` and its row log-sum-exp. q ``[B,H,C,D]``, k ``[B,Hkv,n,D]``,
    v ``[B,Hkv,n,Dv]`` (query head h reads kv head ``h // (H // Hkv)``), bias ``[B, 1|H, C, n]`` -> out
    ``[B,H,C,Dv]``, lse ``[B,H,C]``. Rows must keep at least one key. PyTorch's fused CPU kernel needs
    ``Dv == D`` (other shapes take the plain kernel), and reads grouped kv heads itself in recent PyTorch: in
    older releases they are repeated for it (a copy of the block's keys, ``H / Hkv`` times: 1/C of its work).

    A key that is not finite where a row's bias removes it (a NaN key in the block, ahead of the earlier rows
    that never read it) gives the fused kernel NaN + (-inf) = NaN in those rows; the spec's rows never read it.
    So a block whose rows' log-sum-exp comes back NaN or +inf is redone on the plain kernel, which removes a key
    by assignment (-inf, whatever its logit), as the spec does: one cheap reduction per block, and the redo only
    for non-finite inputs."""
    if q.device.type == "cpu" and q.shape[-1] == v.shape[-1] and _has_cpu_flash():
        kk, vv = k, v
        if k.shape[1] != q.shape[1] and not _cpu_flash_reads_groups():
            kk, vv = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, kk, vv, 0.0, False, attn_mask=bias, scale=scale
        )
        if not _spilled(lse):
            return out, lse
    # in at least float32, as the fused kernel does (backward rebuilds P from float32 logits and this lse)
    wide = _lse_dtype(q.dtype)
    logits = grouped_matmul(q.to(wide), k.to(wide).transpose(-2, -1)).mul_(scale).add_(bias)  # [B, H, C, n]
    lse = torch.logsumexp(logits, dim=-1)
    if _spilled(lse):
        logits.masked_fill_(torch.isneginf(bias), -math.inf)  # a removed key stays removed, even a NaN one
        lse = torch.logsumexp(logits, dim=-1)
    return grouped_matmul(torch.exp(logits - lse[..., None]), v.to(wide)).to(v.dtype), lse


def _spilled(lse: Tensor) -> bool:
    """Whether some row's log-sum-exp is NaN or +inf: it met a non-finite logit (a row of no key is -inf). Summed in
    float64, where finite float32 values cannot overflow."""
    s = float(lse.sum(dtype=torch.float64))
    return math.isnan(s) or s == math.inf


# Backward flushes to an exact 0 every P below 2^_P_FLOOR[dtype]: a subnormal number (below the dtype's smallest
# normal, "tiny") costs Intel CPUs a microcode assist in every operation that reads or writes it, ~100x the time. A
# trained selective model's F pushes many weights down there; P itself is kept >= tiny by the floor, and 48 octaves
# more keep dZ = P * (dO v - delta) normal too whenever |dO v - delta| >= 2^-48 (so the dq and dk GEMMs, which read
# dZ, stay fast: a demo checkpoint's training step ran 1.7x slower without them). What is dropped is below 2^-78 of a
# row that sums to 1 (fp32, bf16; fp64: 2^-974): each dropped term of a gradient is below ~1e-23 of |dO v_j - delta|
# |k_j| (of its largest entry, unless key norms differ by many orders: a key of norm 1e25 beside norms of 1 lost an
# entry whole in a constructed test; an entry itself that small, ~1e-25, can become 0; fp64: bit for bit here).
# float16's range is too short for the margin (tiny is 2^-14): its floor stays at tiny.
_P_FLOOR = {
    dt: math.log2(torch.finfo(dt).tiny) + (0 if dt == torch.float16 else 48)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


class _Workspace:
    """Flat buffers reused by every block and tile of one forward or backward: a fresh multi-MiB tensor per
    block costs its page faults each time (glibc serves such sizes by mmap), which on some CPUs take
    longer than the GEMM that fills it. ``sizes``: the elements each named buffer may hold, allocated on
    first use; ``ws(name, *shape)`` is a contiguous view of the front of one."""

    def __init__(self, like: Tensor, **sizes: int) -> None:
        self.like, self.sizes, self.bufs = like, sizes, {}

    def __call__(self, name: str, *shape: int) -> Tensor:
        if name not in self.bufs:
            self.bufs[name] = self.like.new_empty(self.sizes[name])
        return self.bufs[name][: math.prod(shape)].view(shape)


# --- one chunk's F and bias ---------------------------------------------------------------------------
class _VoteOperands:
    """What every chunk's votes need, built once per call (and again in backward, bit for bit).

    ``qn = -qs * sel_scale`` ``[B, G, L, Ds]`` and ``ks`` ``[B, Gk, L, Ds]`` (``Gk < G`` when every head
    of a grouped-query layer votes: head i with key head ``i // (G // Gk)``, never repeated), so
    ``min(qn ks^T, 0) = -S`` comes out of the matmul already negated and scaled (the bias is ``-F``).
    In float16 / bfloat16 the scale is applied after the matmul instead (``qn = -qs``, ``post = sel_scale``):
    rounding ``qs * sel_scale`` first would move a near-zero vote by a rounding of ``|qs| |ks|`` and flip its
    sign, hence its relu gate, and a flipped gate moves the voting head's gradient by a sum over later queries;
    key 0 is zeroed, so its votes are ``relu(0) = 0`` (the first token is never masked) with no
    per-chunk masking. With ``pad`` (bool ``[B, L]``, True = padding) the same zeroing keeps padding
    out of the votes (its qn and ks rows) and protects each sequence's first real token (its ks row):
    O(B L), no mask of size L x L. ``no_vote``: j >= k inside a chunk's diagonal block (itself and
    the future); ``future``: j > k."""

    def __init__(self, qs: Tensor, ks: Tensor, sel_scale: float, chunk: int, pad: Tensor | None = None) -> None:
        self.post = sel_scale if qs.dtype in (torch.float16, torch.bfloat16) else 1.0  # see above
        self.qn = qs * -sel_scale if self.post == 1.0 else -qs
        self.ks = ks.clone()
        self.ks[:, :, 0] = 0.0
        if pad is not None:
            self.qn.masked_fill_(pad[:, None, :, None], 0.0)  # padding does not vote
            self.ks.masked_fill_(
                ~votable_keys(pad)[:, None, :, None], 0.0
            )  # nor is it, or the first real token, voted on
        n = min(chunk, qs.shape[2])  # a chunk never has more rows than the sequence
        masks = _diagonal_masks(n, qs.dtype, qs.device)
        self.no_vote, self.future = masks["no_vote"], masks["future"]
        # Running sums down a chunk's rows: torch.cumsum along rows is slow on CPU (a strided scan), a
        # GEMM with a strictly lower triangle of ones over blocks of rows is several times faster. Only
        # on CPU, in eager, with finite voters: a NaN or inf vote times 0 would reach the rows above it.
        self.above = None
        # Non-finite voters: the zeroed rows above (key 0, padding) give 0 * NaN = NaN votes, which the spec masks
        # to 0; then they are masked explicitly (keys [B|1, 1, 1, L], voting rows [B, 1, L, 1]), one pass a block.
        self.voted_keys = self.voting_rows = None
        self.vote_keep = self.causal_add = None
        if reads_values(qs):
            # one reduction instead of isfinite's four passes: a NaN or inf makes the sum non-finite (an
            # overflowing sum of finite voters only takes the exact, slower paths too). Of the operands as the votes
            # read them (contiguous, faster to sum): a NaN in a zeroed row (key 0, padding) never reaches a vote, and
            # a scaled voter that overflows to inf is caught here
            finite = math.isfinite(float(self.qn.sum() + self.ks.sum()))
            if not finite:
                keys = votable_keys(pad) if pad is not None else torch.arange(qs.shape[2], device=qs.device)[None] > 0
                self.voted_keys = keys[:, None, None, :]
                self.voting_rows = None if pad is None else ~pad[:, None, :, None]
            if qs.device.type == "cpu" and finite:
                self.above = masks["above"]
            if finite:
                self.vote_keep, self.causal_add = masks["vote_keep"], masks["causal_add"]


def _diagonal_masks(n: int, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """The constant masks of a chunk's diagonal block of ``n`` rows (see :class:`_VoteOperands`), read-only:
    ``no_vote`` (bool ``[n, n]``, j >= k), ``future`` (j > k), ``vote_keep`` (1 where j < k, in ``dtype``),
    ``causal_add`` (``-inf`` where j > k, else 0) and ``above`` (ones strictly below the diagonal, ``[b, b]`` with
    b = min(n, 64): the running sums' GEMM operand). Built once per size, dtype and device (each call built them
    again: ~8 small ops, 0.3 ms, twice per forward and backward, ~2% of a short sequence's attention), except in
    a tracing or dispatch mode, whose tensors must not outlive it."""
    key = (n, dtype, device)
    plain = torch._C._len_torch_dispatch_stack() == 0 and torch.device(device).type != "meta"
    hit = _MASKS.get(key) if plain else None  # a mode (fake tensors, make_fx) gets its own tensors
    if hit is not None:
        return hit
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, whatever mode the first call ran in
        no_vote = torch.ones(n, n, dtype=torch.bool, device=device).triu_()
        future = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)
        b = min(n, _ROW_BLOCK)
        masks = {
            "no_vote": no_vote,
            "future": future,
            # the two diagonal masks as arithmetic, exact on finite votes: masked_fill_ with a broadcast [n, n]
            # mask ran 8x slower than a multiply or an add (CPU, fp32, a [2, 1, 256, 256] block)
            "vote_keep": (~no_vote).to(dtype),
            "causal_add": torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(future, _NEG_INF),
            "above": torch.ones(b, b, dtype=dtype, device=device).tril_(-1),
        }
    if plain and type(no_vote) is Tensor:
        _MASKS[key] = masks
    return masks


_MASKS: dict[tuple, dict[str, Tensor]] = {}


def _chunk_bias(
    vt: _VoteOperands,
    ncol: Tensor,
    removed: Tensor | None,
    dead: Tensor | None,
    penalty: Tensor | None,
    i0: int,
    i1: int,
    keep_F: bool = False,
    ws: _Workspace | None = None,
    j0: int = 0,
    j1: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Rows ``i0 .. i1-1`` and key columns ``j0 .. j1-1`` (default: all of the rows' keys, ``0 .. i1-1``; a tile
    either ends before ``i0`` or holds the diagonal block ``i0 .. i1-1`` whole): the negated votes ``-S``
    ``[B, G, C, n]``, the attention bias ``[B, G|H, C, n]`` (``-(F + penalty)``, ``-inf`` at future and removed
    keys) and (``keep_F``) F. Every step is column-wise, so a tile's values are those columns of the whole rows'
    (up to the GEMMs' rounding).
    ``ncol`` ``[B, G, L]``: minus the column sums of the votes of all earlier rows. ``dead`` ``[b, h, L, 1]``: rows
    whose keys are all removed; ``removed`` is not applied to them (the caller zeroes their output), so no row is
    all ``-inf``. With ``ws``, the votes and the bias are views of its buffers ``votes`` and ``bias``
    (``[B, G, C, n]`` each), valid until the next call."""
    C = i1 - i0
    j1 = i1 if j1 is None else j1
    n = j1 - j0
    if j1 > i0 and (j0 > i0 or j1 != i1):
        raise ValueError(f"key tile {j0}:{j1} cuts the diagonal block of rows {i0}:{i1}")
    d = i0 - j0  # the diagonal block's first column in the tile (when j1 > i0)
    # -S; finite voters can still overflow to -inf: clamped to -max, so that 0 * vote stays 0 in the
    # row sums below (a sum of two such votes is -inf either way)
    qn, ksT = vt.qn[:, :, i0:i1], vt.ks[:, :, j0:j1].transpose(-2, -1)
    B, G = qn.shape[:2]
    if ws is not None and ksT.shape[1] == G:
        Sn = torch.matmul(qn, ksT, out=ws("votes", B, G, C, n))
    else:
        Sn = grouped_matmul(qn, ksT)  # ks may have G / g heads
    if vt.post != 1.0:
        Sn.mul_(vt.post)  # after the product: its sign is the exact product's
    Sn.clamp_(min=-torch.finfo(Sn.dtype).max, max=0.0)
    # Votes need j < k. Keys before the chunk (j < i0 <= k) all satisfy it, so only the diagonal
    # block needs masking: O(C^2), not O(C * i1).
    if j1 > i0:
        if vt.vote_keep is not None:
            Sn[..., d:].mul_(vt.vote_keep[:C, :C])
        else:
            Sn[..., d:].masked_fill_(vt.no_vote[:C, :C], 0.0)
    if vt.voted_keys is not None:  # non-finite voters (see _VoteOperands)
        Sn.masked_fill_(~vt.voted_keys[..., j0:j1], 0.0)
        if vt.voting_rows is not None:
            Sn.masked_fill_(~vt.voting_rows[:, :, i0:i1], 0.0)
    # -F of row k = the earlier chunks' sums + this chunk's rows above k: one running sum down the rows
    bias = _exclusive_rows(vt.above, Sn, ncol[:, :, None, j0:j1], None if ws is None else ws("bias", B, G, C, n))
    F_kept = bias.neg() if keep_F else None
    if penalty is not None:
        bias = bias - _rows(penalty, i0, i1, j0, j1)
    if j1 > i0:
        if vt.causal_add is not None and penalty is None:  # causal; -max <= -S, so the bias is finite or -inf
            bias[..., d:].add_(vt.causal_add[:C, :C])
        else:
            bias[..., d:].masked_fill_(vt.future[:C, :C], _NEG_INF)
    if removed is not None:
        rm = _rows(removed, i0, i1, j0, j1)
        if dead is not None:  # per chunk: on a [B, 1, 1, L] mask a global `removed & ~dead` is [B, 1, L, L]
            rm = rm & ~dead[:, :, i0:i1]
        bias = bias.masked_fill(rm, _NEG_INF)
    return Sn, bias, F_kept


def _fused_path(vt: _VoteOperands, heads: slice | None, scale: float, removed: Tensor | None, penalty) -> bool:
    """Whether a call's votes and vote gradients run :mod:`.cpu_kernels`' compiled passes: on CPU (Numba installed),
    float32 / float64, finite voters (``vt.above``), one voting head that is a head of q (the paper's), no penalty,
    removed keys only as key padding (the same keys for every query and head, ``[B|1, 1, 1, L]``); memory-loss rows
    or not. Forward and backward decide alike."""
    return (
        vt.above is not None
        and vt.qn.dtype in (torch.float32, torch.float64)
        and vt.qn.shape[1] == 1
        and heads is not None
        and scale != 0.0
        and (removed is None or tuple(removed.shape[1:]) == (1, 1, vt.qn.shape[2]))
        and penalty is None
        and cpu_kernels.available()
    )


def _fused_votes(
    vt: _VoteOperands,
    carry: Tensor,
    i0: int,
    i1: int,
    j0: int,
    j1: int,
    ws: _Workspace,
    out: Tensor,
    removed: Tensor | None,
    dead: Tensor | None,
    nlse: Tensor | None = None,
    tau: float | None = None,
    negF: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The compiled counterpart of :func:`_chunk_bias` (see :func:`_fused_path`): ``(votes, rows)``, the tile's votes
    ``-S`` ``[B, C, n]`` (clamped and masked), and in the forward with ``tau`` the memory-loss rows ``[B, C]``, with
    ``out`` filled by :func:`.cpu_kernels.votes_to_bias` (forward: the bias, and ``carry`` ``[B, 1, L]`` moved past
    the rows; backward, given ``nlse``: P's exponent before the logits, and ``-F`` into ``negF`` if given)."""
    B, C, n = vt.qn.shape[0], i1 - i0, j1 - j0
    Sn = torch.matmul(vt.qn[:, :, i0:i1], vt.ks[:, :, j0:j1].transpose(-2, -1), out=ws("votes", B, 1, C, n))[:, 0]
    rows = cpu_kernels.votes_to_bias(
        Sn, carry[:, 0, j0:j1], i0 - j0 if j1 > i0 else n, out, nlse,
        None if removed is None else removed[:, 0, 0, j0:j1], None if dead is None else dead[:, 0, i0:i1, 0],
        tau, negF,
    )  # fmt: skip
    return Sn, rows


# rows per block of the running-sum GEMM: 2 * 64 flops per element, still cheap. 32 rows (half the flops) ran the
# running sums alone 15-25% faster on an Intel Xeon, but a training step within noise, and it changes their summation
# order: the demo's selective model then trained to 1.6120 nats/byte instead of 1.5928 (the same code with 64 rows
# gives 1.5928 to the last digit), so the committed results would no longer reproduce. Kept at 64.
_ROW_BLOCK = 64


def _exclusive_rows(above: Tensor | None, x: Tensor, start: Tensor, out: Tensor | None = None) -> Tensor:
    """``start + sum_{r < k} x[..., r, :]`` for every row k of ``x`` ``[B, G, C, n]``; ``start``
    ``[B, G, 1, n]``. With ``above`` (``[b, b]``, ones strictly below the diagonal): a GEMM within
    blocks of b rows plus a running sum over the blocks' totals, written into ``out`` if given;
    otherwise one running sum."""
    if above is None:
        return torch.cat([start, x[:, :, :-1]], dim=2).cumsum_(dim=2)
    B, G, C, n = x.shape
    b = above.shape[0]
    nb, t = divmod(C, b)
    out = torch.empty_like(x) if out is None else out
    carry = start  # start + the totals of the blocks so far
    if nb:
        main = x[:, :, : nb * b].view(B, G, nb, b, n)
        if nb > 1 or t:
            carry = torch.cat([start, main.sum(dim=3)], dim=2).cumsum_(dim=2)  # [B, G, nb + 1, n]
        main_out = out[:, :, : nb * b].view(B, G, nb, b, n)
        torch.matmul(above, main, out=main_out).add_(carry[:, :, :nb, None])
    if t:
        torch.matmul(above[:t, :t], x[:, :, nb * b :], out=out[:, :, nb * b :]).add_(carry[:, :, nb:])
    return out


def _exclusive_rows_below(above: Tensor | None, x: Tensor, start: Tensor) -> Tensor:
    """``start + sum_{r > k} x[..., r, :]`` for every row k of ``x`` ``[B, G, C, n]`` (the mirror of
    :func:`_exclusive_rows`: a suffix sum down the columns); ``start`` ``[B, G, 1, n]``. With ``above``:
    within blocks of b rows a GEMM with its transpose (ones strictly above the diagonal), plus the sums
    of the blocks below, added last to first; otherwise one running sum."""
    if above is None:
        return (x.sum(dim=2, keepdim=True) - x.cumsum(dim=2)).add_(start)
    B, G, C, n = x.shape
    below = above.T  # row k of below @ x sums the rows r > k
    b = below.shape[0]
    nb, t = divmod(C, b)
    if nb == 0 or (nb == 1 and t == 0):  # one block: no block below it (its carry is start, exactly)
        return torch.matmul(below[:C, :C], x).add_(start)
    main = x[:, :, : nb * b].view(B, G, nb, b, n)
    totals = [main.sum(dim=3)] + ([x[:, :, nb * b :].sum(dim=2, keepdim=True)] if t else [])
    # carry[m] = start + the totals of the blocks after block m
    carry = torch.cat([*totals, start], dim=2).flip(2).cumsum_(dim=2).flip(2)[:, :, 1:]
    out = torch.matmul(below, main).add_(carry[:, :, :nb, None]).view(B, G, nb * b, n)
    if t == 0:
        return out
    tail = torch.matmul(below[:t, :t], x[:, :, nb * b :]).add_(carry[:, :, nb:])
    return torch.cat([out, tail], dim=2)


def _keep_where_negative(grad: Tensor, x: Tensor) -> Tensor:
    """``grad`` zeroed where ``x >= 0``, in place (``x`` is clamped to ``[-max, 0]``: its negative entries are
    relu's open gate). One fused pass: ``grad.mul_(x < 0)`` makes a bool tensor, converts it to ``grad``'s
    dtype and multiplies, ~8x the time (measured on CPU, fp32, a 1 MiB tile); hardtanh's backward keeps the
    gradient where ``min < x < max``, and here no ``x`` is ``-inf``."""
    return torch.ops.aten.hardtanh_backward.grad_input(grad, x, _NEG_INF, 0.0, grad_input=grad)


_TILE_BYTES = 4 * 2**20  # the backward's [B, H, C, width] tiles: 4 MiB, the forward's temporaries' size


def _key_tile(BH: int, C: int, L: int, itemsize: int) -> int:
    """Key columns per backward tile for query blocks of C rows: ``[BH, C, width]`` within ``_TILE_BYTES``,
    a multiple of C (at least C), at most L."""
    width = _TILE_BYTES // max(1, BH * C * itemsize)
    return min(L, max(C, width - width % C))


def default_chunk_size(B: int, H: int, L: int, itemsize: int = 4) -> int:
    """Query rows per chunk: 64, or 32 once ``[B, H, 64, L]`` temporaries would pass ``_TILE_BYTES``. The unit of
    the query blocks that forward and backward walk (:func:`_forward_blocks` of them per block).

    Measured on CPU: 32-128 rows run at about the same speed, larger chunks are slower (temporaries
    fall out of cache) and smaller ones pay Python overhead per chunk. The temporaries grow like
    ``B H C L`` and standard attention's own buffers like ``B H L D``, so a fixed C of about D/2
    keeps the extra memory a fixed fraction of SDPA's at every length."""
    return 64 if B * H * 64 * L * itemsize <= _TILE_BYTES else 32


def _forward_blocks(
    H: int, G: int, L: int, chunk: int, removed: Tensor | None, penalty: Tensor | None, max_rows: int | None = None
) -> int:
    """How many chunks one query block spans, in forward and backward alike. The forward's temporaries
    (votes and bias) have the bias's heads, usually G = 1, where the backward's have all H but are
    tiled by keys (:func:`_key_tile`): up to ``H // heads`` chunks per block keep the forward's the
    size of ``H`` chunks, and the forward then makes that many times fewer, larger calls to the fused
    kernel (whose query blocks grow with the rows it is given), the backward fewer, larger GEMMs, and
    both fewer per-op overheads (what limits short sequences). At most L / 4 rows, though: the kernel,
    given a bias, computes the upper half of each block's diagonal part too, and that waste grows like
    block / L; and at most ``max_rows`` (:func:`_block_rows`)."""
    hb = max(G, *(1 if m is None else m.shape[1] for m in (removed, penalty)))
    n = min(H // hb, L // (4 * chunk))
    return max(1, n if max_rows is None else min(n, max_rows // chunk))


def _block_rows(BH: int, itemsize: int) -> int:
    """The most rows of a query block whose backward tiles ``[BH, C, width]`` can span two blocks of key
    columns (``width = 2 C``) within ``_TILE_BYTES``: larger blocks would shrink the tiles to one block of
    columns, or grow them out of cache (measured: 512-row blocks at L = 2048 are slower than 256)."""
    return math.isqrt(_TILE_BYTES // max(1, 2 * BH * itemsize))


def check_chunk_size(chunk_size: object) -> int | None:
    """``chunk_size`` as an int (a NumPy integer too), or None (the default); a ``ValueError`` unless it is an
    integer >= 1."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool) and chunk_size >= 1:
        return int(chunk_size)
    raise ValueError(
        f"chunk_size={chunk_size!r} is invalid: pass an int >= 1 (query rows per chunk), "
        f"or None for the default (default_chunk_size)."
    )


def _block_span(q: Tensor, G: int, chunk: int, removed: Tensor | None, penalty: Tensor | None) -> int:
    """Query rows per block of forward and backward alike (a multiple of ``chunk``), for q ``[B, H, L, D]``
    (contiguous) and G voting heads."""
    B, H, L, _ = q.shape
    return chunk * _forward_blocks(H, G, L, chunk, removed, penalty, _block_rows(B * H, q.element_size()))


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the rows' log-sum-exp is kept in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _forward(q, k, v, qs, ks, heads, removed, dead, pad, penalty, scale, sel_scale, chunk, tau):
    """``(out, mem, lse, carries)``: the attention, the memory-loss rows (``[B, G, 0]`` without ``tau``), and
    what backward needs: the rows' log-sum-exp ``[B, H, L]`` and the column sums carried into each block
    ``[blocks, B, G, L]``. The voters are ``(qs, ks)``, or, when ``heads`` is a slice, those heads of q, k."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if heads is not None:
        qs, ks = q[:, heads], k[:, kv_heads(heads, q.shape[1], k.shape[1])]
    B, H, L, _ = q.shape
    G = qs.shape[1]
    out = v.new_empty(B, H, L, v.shape[-1])
    # the rows' log-sum-exp in at least float32, as the kernel returns it: stored in float16 / bfloat16 (ulp 1/32 and
    # 1/4 at 50), backward's P rows summed to 1.03 (fp16) and P moved by up to 13% (bf16)
    lse = q.new_empty(B, H, L, dtype=_lse_dtype(q.dtype))
    fchunk = _block_span(q, G, chunk, removed, penalty)
    vt = _VoteOperands(qs, ks, sel_scale, fchunk, pad)
    ws = _Workspace(qs, votes=B * G * min(fchunk, L) * L, bias=B * G * min(fchunk, L) * L)
    ncol = qs.new_zeros(B, G, L)  # minus the column sums of the votes so far
    # memory-loss rows: sum_j min(F[i, j], tau), only when asked for (tau given)
    # summed in at least float32, like the naive spec's (they are subtracted from a count of ~L tokens)
    mem = qs.new_zeros(B, G, L if tau is not None else 0, dtype=torch.promote_types(qs.dtype, torch.float32))
    carries = qs.new_empty(-(-L // fchunk), B, G, L)  # ncol at each chunk's start: backward rebuilds F from it
    tau_F = None if tau is None else naive.tau_in(qs.dtype, tau)  # min(F, tau) in F's dtype
    fused = _fused_path(vt, heads, scale, removed, penalty)
    for i0 in range(0, L, fchunk):
        i1 = min(i0 + fchunk, L)
        carries[i0 // fchunk] = ncol
        if fused:  # the bias, ncol moved on (and the memory-loss rows), in one compiled pass
            bias = ws("bias", B, 1, i1 - i0, i1)
            _, rows = _fused_votes(vt, ncol, i0, i1, 0, i1, ws, bias, removed, dead, tau=tau_F)
            if rows is not None:
                mem[:, 0, i0:i1] = rows
        else:
            Sn, bias, Fc = _chunk_bias(vt, ncol, removed, dead, penalty, i0, i1, keep_F=tau is not None, ws=ws)
            if Fc is not None:
                mem[:, :, i0:i1] = Fc.clamp_(max=tau_F).sum(dim=-1, dtype=mem.dtype)
            ncol[:, :, :i1] += Sn.sum(dim=2)
        o_c, lse_c = _attn_fwd(q[:, :, i0:i1], k[:, :, :i1], v[:, :, :i1], bias, scale)
        out[:, :, i0:i1] = o_c
        lse[:, :, i0:i1] = lse_c
    return out, mem, lse, carries


def _backward(
    q,
    k,
    v,
    qs,
    ks,
    heads,
    penalty,
    removed,
    dead,
    pad,
    out,
    lse,
    carries,
    dout,
    dmem,
    scale,
    sel_scale,
    chunk,
    tau,
    want_dpen,
):
    """``(dq, dk, dv, dqs, dks, dpen)`` (``dqs, dks`` None when the voters are ``heads`` of q, k: their vote
    gradients are added into dq, dk; ``dpen`` None unless ``want_dpen``)."""
    if tau is None:
        dmem = None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, L, D = q.shape
    tau_F = None if tau is None else naive.tau_in(q.dtype if qs is None else qs.dtype, tau)
    Hkv = k.shape[1]
    g = H // Hkv  # query heads per kv head (grouped-query attention; 1: multi-head)
    dout = dout.contiguous()
    # dk, dv (and a dedicated pair's dks) sum every query block's tiles: in float16 / bfloat16 they are summed in
    # float32 and rounded once at the end (summed in the dtype, their errors grew with L: 6x the spec's at L = 8192)
    acc = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
    # The voting heads' own vote gradients (sel_scale dl ks, sel_scale dl^T qs) have the shape of their
    # attention gradients (scale dZ k, scale dZ^T q): dl * sel_scale / scale added into their dZ rides
    # the dq and dk GEMMs. A dedicated pair (qs, ks) gets GEMMs of its own.
    fold = heads is not None and scale != 0.0
    if heads is None:
        dqs, dks = torch.zeros_like(qs), torch.zeros_like(ks, dtype=acc)
    else:
        kvh = kv_heads(heads, H, Hkv)
        qs, ks, dqs, dks = q[:, heads], k[:, kvh], dq[:, heads], dk[:, kvh]
    G, Gk = qs.shape[1], ks.shape[1]  # Gk = G, or Hkv < G when every head of a grouped-query layer votes
    fchunk = _block_span(q, G, chunk, removed, penalty)
    vt = _VoteOperands(qs, ks, sel_scale, fchunk, pad)
    dpen = torch.zeros_like(penalty) if want_dpen else None
    ndcol = qs.new_zeros(B, G, L)  # minus the column sums of dF over the queries of later blocks
    delta = (dout * out).sum(-1)  # [B, H, L]: rowsum(dO * O)
    # The g query heads of one kv head are one GEMM operand: per block, their rows stacked head after
    # head, [B*Hkv, g*C, .] (a copy of the block's rows when g > 1, a view when g = 1), so keys and
    # values are never repeated and dk, dv sum over the group inside the GEMM.
    q5, do5 = (t.view(B, Hkv, g, L, t.shape[-1]) for t in (q, dout))
    nlse5 = lse.view(B, Hkv, g, L, 1) * -_LOG2E  # -lse in base 2
    delta5 = delta.view(B, Hkv, g, L, 1)

    def rows(t5: Tensor, i0: int, i1: int) -> Tensor:  # [B, Hkv, g, L, X] -> [B*Hkv, g*C, X]
        return t5[:, :, :, i0:i1].reshape(B * Hkv, g * (i1 - i0), t5.shape[-1])

    # [B*Hkv, L, D] views: the per-tile matmuls accumulate into their key rows in place (baddbmm_)
    k3, v3 = (t.view(B * Hkv, L, t.shape[-1]) for t in (k, v))
    dk3, dv3 = (t.view(B * Hkv, L, t.shape[-1]) for t in (dk, dv))
    kT, vT = k3.transpose(-2, -1), v3.transpose(-2, -1)
    # float16 / bfloat16: P's logits (q k^T s, as the forward's kernel formed them: its float32 lse is of those),
    # exponent (logits - lse + bias, each term ~|logit|) and dZ in float32, rounded once for the GEMMs. Rounded to the
    # dtype at each step (and lse kept in it), the gradients' errors were up to 10x the spec's in the same dtype; now
    # each is below the spec's (measured at logits of ~20, B2 H4 L256 D32)
    half = q.dtype in (torch.float16, torch.bfloat16)
    kTf = k3.float().transpose(-2, -1) if half else None
    a = scale * _LOG2E
    width = _key_tile(B * H, fchunk, L, q.element_size())
    rows_max = min(fchunk, L)
    ws = _Workspace(
        q, votes=B * G * rows_max * width, bias=B * G * rows_max * width,
        P=B * H * rows_max * width, dZ=B * H * rows_max * width, kv=B * Hkv * width * max(D, v.shape[-1]),
    )  # fmt: skip
    wsf = _Workspace(
        q.new_empty(0, dtype=torch.float32), P=B * H * rows_max * width, dZ=B * H * rows_max * width,
        kv=B * Hkv * width * D if half else 0,
    )  # fmt: skip
    # Query blocks = the forward's chunks, last to first. Each block's keys 0 .. i1-1 are walked in tiles of
    # `width` columns; every step below is column-wise except dq's sum over keys, so a tile sees only its own
    # columns (and ndcol, minus the later blocks' sums of dF in those columns), and its votes, F and bias are rebuilt
    # from the forward's carry for its columns alone (the forward's products and running sums, per column; equal
    # to them up to the GEMMs' rounding, which may depend on the column count, as P's logits always did):
    #
    #            keys 0 ............................ i1
    #   rows i0  [ tile j0:j1 | tile | ... | diagonal ]   <- block (a tile's votes, F, bias: [B, G|H, C, width])
    #        i1
    fused = _fused_path(vt, heads, scale, removed, penalty)
    for i0 in reversed(range(0, L, fchunk)):
        i1 = min(i0 + fchunk, L)
        C = i1 - i0
        qc, doc = rows(q5, i0, i1), rows(do5, i0, i1)  # [B*Hkv, g*C, D]
        qf = qc.float() if half else qc
        qa, nlse_c, delta_c = qf * a, nlse5[:, :, :, i0:i1], rows(delta5, i0, i1)
        qn_c = vt.qn[:, :, i0:i1]
        dq_c = torch.zeros_like(qc)  # sum over the tiles of dZ k
        dqs_c = None if fold else torch.zeros_like(qn_c)  # sum over the tiles of dl ks
        dmem_c = None if dmem is None else dmem[:, :, i0:i1, None]
        for j0 in range(0, i1, width):
            j1 = min(j0 + width, i1)
            n = j1 - j0
            P3 = ws("P", B * Hkv, g * C, n)  # [B*Hkv, g*C, n]
            # float16 / bfloat16: the logits in float32, as the forward's kernel formed them (its lse is of those)
            Pw3 = wsf("P", B * Hkv, g * C, n) if half else P3
            # P = softmax rebuilt from the saved lse, in base 2: exp2(q k^T s log2e - lse log2e + bias log2e)
            # (bias log2e - lse first, one pass, then the GEMM adds the logits into it: a pass fewer than a GEMM, a
            # subtraction and an addition). The tile's votes, bias and F [B, G|H, C, n] are rebuilt from the forward's
            # carry: a block's whole rows would be [B, G, C, i1] each (8 MiB of the peak at B1 H8 L4096)
            if fused:  # votes, bias and P's exponent in one compiled pass (.cpu_kernels); -F kept for the memory loss
                negF = None if dmem is None else ws("bias", B, C, n)
                Sn, _ = _fused_votes(
                    vt, carries[i0 // fchunk], i0, i1, j0, j1, ws, P3.view(B, H, C, n), removed, dead,
                    nlse_c.reshape(B, H, C), negF=negF,
                )  # fmt: skip
            else:
                Sn, bias, F_t = _chunk_bias(
                    vt, carries[i0 // fchunk], removed, dead, penalty, i0, i1, dmem is not None, ws=ws, j0=j0, j1=j1
                )
                bias5 = bias.unflatten(1, (Hkv, g)) if bias.shape[1] > 1 else bias[:, :, None]
                torch.add(nlse_c, bias5, alpha=_LOG2E, out=Pw3.view(B, Hkv, g, C, n))
            Pw3.baddbmm_(qa, kTf[:, :, j0:j1] if half else kT[:, :, j0:j1])
            # no subnormal P, nor (mostly) dZ: see _P_FLOOR
            torch.nn.functional.threshold_(Pw3, _P_FLOOR[Pw3.dtype], _NEG_INF).exp2_()
            if half:
                P3.copy_(Pw3)
            # dV = P^T dO. Into a workspace, then added: a GEMM into the strided rows dv3[:, j0:j1] runs
            # one call per head.
            dv3[:, j0:j1].add_(torch.bmm(P3.transpose(-2, -1), doc, out=ws("kv", B * Hkv, n, v.shape[-1])))
            # dZ = P * (dO V^T - delta), the gradient into the logits (and, negated, into F)
            dZ3 = torch.bmm(doc, vT[:, :, j0:j1], out=ws("dZ", B * Hkv, g * C, n))
            if fused:  # dZ, and the vote gradients through it into the voting head's dZ, in one compiled pass
                cpu_kernels.vote_gradients(
                    dZ3.view(B, H, C, n), P3.view(B, H, C, n), delta_c.view(B, H, C), Sn, ndcol[:, 0, j0:j1],
                    heads.start, -sel_scale / scale, negF, None if dmem is None else dmem[:, 0, i0:i1], tau_F or 0.0,
                )  # fmt: skip
                _dq_dk(dq_c, dk3, dZ3, dZ3, k3, qf, ws, scale, j0, j1)
                continue
            if half:
                dZw3 = torch.sub(dZ3, delta_c, out=wsf("dZ", B * Hkv, g * C, n)).mul_(Pw3)
            else:
                dZw3 = dZ3.sub_(delta_c).mul_(P3)
            del P3, Pw3
            dZ = dZw3.view(B, H, C, n)  # head h = (kv head, member) in order: a view
            if want_dpen:
                _accumulate_broadcast(dpen, -dZ, i0, i1, j0, j1)
            # minus F's gradient, -dF = sum_h dZ_h [B, G, C, n], and everything after it negated (exactly: negation
            # never rounds), which spares the pass that would negate it
            ndF = dZ.sum(dim=1, keepdim=True) if G == 1 else dZ
            ndF = ndF.to(vt.qn.dtype)  # the votes' dtype (half: rounded once, from float32)
            if dmem_c is not None:  # d/dF sum_j min(F, tau) = 1 unless F > tau (the spec's: 1 at F = tau and NaN)
                # (out of place: ndF may be dZ; computed in float32 with half votes and rounded once, as add_ did)
                ndF = (ndF - dmem_c * (F_t > tau_F).logical_not_()).to(vt.qn.dtype)
            # -dS[k, j] = -(sum over later queries i > k of dF[i, j]): later blocks (ndcol) + this one
            ndS = _exclusive_rows_below(vt.above, ndF, ndcol[:, :, None, j0:j1])
            ndcol[:, :, j0:j1] += ndF.sum(dim=2)
            # relu' and the vote mask (S is 0 off it); l = sel_scale qs ks^T, and qn = -sel_scale qs
            ndl = _keep_where_negative(ndS, Sn)  # -dl
            if fold:  # zeroed voter rows (key 0, padding) have dl = 0 there, so q, k stand in for qs, ks
                dZ[:, heads].add_(ndl, alpha=-sel_scale / scale)
            else:
                dqs_c -= grouped_matmul(ndl, vt.ks[:, :, j0:j1])
                if Gk == G:
                    dks[:, :, j0:j1].add_(torch.matmul(ndl.transpose(-2, -1), qn_c), alpha=vt.post)
                else:  # the g voters of one key head as one GEMM: their gradients sum in it
                    ndlg = ndl.reshape(B, Gk, (G // Gk) * C, n)
                    qng = qn_c.reshape(B, Gk, (G // Gk) * C, qn_c.shape[-1])
                    dks[:, :, j0:j1].add_(torch.matmul(ndlg.transpose(-2, -1), qng), alpha=vt.post)
            del dZ, ndF, ndS, ndl
            if half:
                dZ3.copy_(dZw3)
            _dq_dk(dq_c, dk3, dZ3, dZw3, k3, qf, wsf if half else ws, scale, j0, j1)
            del dZw3
            del dZ3
        dq[:, :, i0:i1] = dq_c.mul_(scale).view(B, Hkv, g, C, D).flatten(1, 2)
        if not fold:
            dqs[:, :, i0:i1].add_(dqs_c, alpha=sel_scale)  # after dq's rows: dqs may be a view of them
    if heads is not None:
        dqs = dks = None
    else:
        dks = dks.to(ks.dtype)
    dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    _refuse_overflow((dq, dk, dv, dqs, dks), (q, k, v, qs, ks, dout, penalty))
    return dq, dk, dv, dqs, dks, dpen


def _dq_dk(dq_c, dk3, dZ3, dZw3, k3, qf, ws, scale, j0, j1) -> None:
    """A tile's share of dq and dk: ``dq_c += dZ k`` (s applied once per block) and ``dk += s dZ^T q``; half inputs:
    dk in float32, from dZ before its rounding (``dZw3``; a block's product rounded to the dtype and summed over the
    blocks was 3-12x the spec's error at 256 blocks)."""
    dq_c.baddbmm_(dZ3, k3[:, j0:j1])
    BH, _, n = dZ3.shape
    dk3[:, j0:j1].add_(torch.bmm(dZw3.transpose(-2, -1), qf, out=ws("kv", BH, n, qf.shape[-1])), alpha=scale)


def _refuse_overflow(grads: tuple[Tensor | None, ...], inputs: tuple[Tensor | None, ...]) -> None:
    """Raise when the gradients hold a NaN or inf and every input is finite: the backward's rebuilt weights overflowed
    (float32 logits beyond ~1e9: the base-2 rebuild rounds apart from the forward's kernel by ~1e-7 of a logit, and
    2^128 overflows). One min-max pass per gradient; the inputs are read only then (non-finite inputs spread into the
    gradients in every backend, the spec's too, and are not refused)."""
    present = [g for g in grads if g is not None and g.numel()]
    if not present or not reads_values(present[0]):
        return
    if all(math.isfinite(float(lo)) and math.isfinite(float(hi)) for lo, hi in map(torch.aminmax, present)):
        return  # (one pass each, no temporary; NaN and inf reach the min or the max)
    if all(bool(torch.isfinite(t).all()) for t in inputs if t is not None):
        raise FloatingPointError(
            "the chunked backward overflowed: its gradients hold NaN or inf from finite inputs. It rebuilds the "
            "attention weights from the forward's log-sum-exp in float32, which fails at logits beyond ~1e9 (and "
            "loses precision from ~1e6: about 1e-7 of the largest |logit|, relative). Use backend='naive' (exact, "
            "builds [B, H, L, L]) for such inputs, or float64, or keep the logits smaller (scale q and k down)."
        )


# --- as torch.library custom ops: torch.compile runs them as they are --------------------------------------
# Traced by inductor, the blocks and tiles above compiled to code 1.6-1.9x slower than these eager kernels
# (measured: fwd+bwd at L = 256-2048, fp32 CPU), and the dispatch broke the graph. As custom ops with fake
# (shape-only) implementations, a compiled model keeps one graph and calls them as they run in eager.
# ``heads`` crosses as ``(h0, h1)`` (the voters are ``q[:, h0:h1]``) when ``qs`` is None. Eager calls skip the op
# (:class:`_EagerChunked`).
@torch.library.custom_op("selective_attention::chunked_fwd", mutates_args=())
def chunked_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qs: Tensor | None,
    ks: Tensor | None,
    h0: int,
    h1: int,
    removed: Tensor | None,
    dead: Tensor | None,
    pad: Tensor | None,
    penalty: Tensor | None,
    scale: float,
    sel_scale: float,
    chunk: int,
    tau: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _fwd_impl(q, k, v, qs, ks, h0, h1, removed, dead, pad, penalty, scale, sel_scale, chunk, tau)


def _fwd_impl(q, k, v, qs, ks, h0, h1, removed, dead, pad, penalty, scale, sel_scale, chunk, tau):
    """:func:`chunked_fwd`'s body, for the op and for :class:`_EagerChunked` alike."""
    heads = slice(h0, h1) if qs is None else None
    return _forward(q, k, v, qs, ks, heads, removed, dead, pad, penalty, scale, sel_scale, chunk, tau)


@chunked_fwd.register_fake
def _chunked_fwd_fake(q, k, v, qs, ks, h0, h1, removed, dead, pad, penalty, scale, sel_scale, chunk, tau):
    q = q.contiguous()
    B, H, L, _ = q.shape
    like, G = (q, h1 - h0) if qs is None else (qs, qs.shape[1])
    nb = -(-L // _block_span(q, G, chunk, removed, penalty))
    mem = like.new_empty(B, G, L if tau is not None else 0, dtype=torch.promote_types(like.dtype, torch.float32))
    lse = q.new_empty(B, H, L, dtype=_lse_dtype(q.dtype))
    return v.new_empty(B, H, L, v.shape[-1]), mem, lse, like.new_empty(nb, B, G, L)


@torch.library.custom_op("selective_attention::chunked_bwd", mutates_args=())
def chunked_bwd(
    dout: Tensor,
    dmem: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qs: Tensor | None,
    ks: Tensor | None,
    h0: int,
    h1: int,
    penalty: Tensor | None,
    removed: Tensor | None,
    dead: Tensor | None,
    pad: Tensor | None,
    out: Tensor,
    lse: Tensor,
    carries: Tensor,
    scale: float,
    sel_scale: float,
    chunk: int,
    tau: float | None,
    want_dpen: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dqs, dks, dpen)``; the ones that do not exist are empty ``[0]`` tensors."""
    return _bwd_impl(
        dout, dmem, q, k, v, qs, ks, h0, h1, penalty, removed, dead, pad, out, lse, carries, scale, sel_scale, chunk,
        tau, want_dpen,
    )  # fmt: skip


def _bwd_impl(
    dout, dmem, q, k, v, qs, ks, h0, h1, penalty, removed, dead, pad, out, lse, carries, scale, sel_scale, chunk, tau,
    want_dpen,
):  # fmt: skip
    """:func:`chunked_bwd`'s body, for the op and for :class:`_EagerChunked` alike."""
    heads = slice(h0, h1) if qs is None else None
    grads = _backward(
        q, k, v, qs, ks, heads, penalty, removed, dead, pad, out, lse, carries, dout, dmem, scale, sel_scale,
        chunk, tau, want_dpen,
    )  # fmt: skip
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@chunked_bwd.register_fake
def _chunked_bwd_fake(
    dout, dmem, q, k, v, qs, ks, h0, h1, penalty, removed, dead, pad, out, lse, carries, scale, sel_scale, chunk, tau,
    want_dpen,
):  # fmt: skip
    grads = [torch.empty_like(q.contiguous()), torch.zeros_like(k.contiguous()), torch.zeros_like(v.contiguous())]
    grads += [q.new_empty(0), q.new_empty(0)] if qs is None else [torch.zeros_like(qs), torch.zeros_like(ks)]
    grads.append(torch.zeros_like(penalty) if want_dpen else q.new_empty(0))
    return tuple(grads)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, qs, ks, h0, h1, removed, dead, pad, penalty, scale, sel_scale, chunk, tau = inputs
    out, _, lse, carries = output
    ctx.save_for_backward(q, k, v, qs, ks, penalty, removed, dead, pad, out, lse, carries)
    ctx.args = h0, h1, scale, sel_scale, chunk, tau
    ctx.mark_non_differentiable(*output[2:], *output[1:2] * (tau is None))


_PENALTY = 10  # penalty's place among chunked_fwd's inputs


def _chunked_fwd_backward(ctx, dout, dmem, _dlse, _dcarries):
    q, k, v, qs, ks, penalty, removed, dead, pad, out, lse, carries = saved = ctx.saved_tensors
    h0, h1, scale, sel_scale, chunk, tau = ctx.args
    refuse_batched_backward(dout, "chunked")
    want_dpen = penalty is not None and ctx.needs_input_grad[_PENALTY]
    bwd = _bwd_impl if eager_call(*saved, dout, dmem) else chunked_bwd  # see _EagerChunked
    with torch.no_grad():
        dq, dk, dv, dqs, dks, dpen = bwd(
            dout, None if tau is None else dmem, q, k, v, qs, ks, h0, h1, penalty, removed, dead, pad, out, lse,
            carries, scale, sel_scale, chunk, tau, want_dpen,
        )  # fmt: skip
    grads = (dq, dk, dv, None if qs is None else dqs, None if qs is None else dks, *[None] * 5)
    grads += (dpen if want_dpen else None, None, None, None, None)
    if torch.is_grad_enabled():  # create_graph=True: these gradients must not be differentiated
        grads = refuse_double_backward(grads, (*saved[:6], dout, dmem), "chunked")
    return grads


chunked_fwd.register_autograd(_chunked_fwd_backward, setup_context=_setup_context)


# eager calls (transforms.eager_call) run this: the op's first call imports torch._dynamo, even in eager code
_EagerChunked = eager_function("_EagerChunked", _fwd_impl, _setup_context, _chunked_fwd_backward)


def _apply(q, k, v, qs, ks, heads, removed, dead, pad, penalty, scale, sel_scale, chunk, tau) -> tuple[Tensor, Tensor]:
    """``(out, mem)`` through the custom ops, or in eager calls through the same functions as a plain
    ``autograd.Function`` (``heads``: a slice of q's heads, or None with ``qs, ks``)."""
    h0 = h1 = 0
    if heads is not None:
        chosen = head_range(heads, q.shape[1])
        h0, h1 = chosen.start, chosen.stop
    fwd = _EagerChunked.apply if eager_call(q, k, v, qs, ks, removed, dead, pad, penalty) else chunked_fwd
    out, mem, _, _ = fwd(
        q, k, v, qs, ks, h0, h1, removed, dead, pad, penalty, float(scale), float(sel_scale), chunk,
        None if tau is None else float(tau),
    )  # fmt: skip
    return out, mem


def _rows(mask: Tensor, i0: int, i1: int, j0: int = 0, j1: int | None = None) -> Tensor:
    """Rows ``i0 .. i1-1`` and keys ``j0 .. j1-1`` (default ``0 .. i1-1``) of a ``[b, h, L|1, L|1]`` mask; a
    mask with one row (the same keys for every query, like key padding) broadcasts over the rows, one with one
    column over the keys."""
    j1 = i1 if j1 is None else j1
    rows = mask[:, :, i0:i1] if mask.shape[2] != 1 else mask
    return rows[..., j0:j1] if mask.shape[3] != 1 else rows


def _accumulate_broadcast(dst: Tensor, grad: Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
    """``_rows(dst, i0, i1, j0, j1) += grad``, summed over the dims where ``dst`` broadcasts (size 1)."""
    dims = [d for d in (0, 1, 2, 3) if dst.shape[d] == 1 and grad.shape[d] != 1]
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    _rows(dst, i0, i1, j0, j1).add_(grad)


def chunked_selective_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    voters: Voters,
    *,
    removed: Tensor | None = None,
    penalty: Tensor | None = None,
    scale: float,
    chunk_size: int | None = None,
    tau: float | None = None,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Causal selective attention with the paper's F, exact, never building ``[B, H, L, L]``.

    Args:
        q: ``[B, H, L, D]``; k: ``[B, Hkv, L, D]``; v: ``[B, Hkv, L, Dv]``. ``Hkv < H`` (``H % Hkv == 0``)
            is grouped-query attention: query head h reads key/value head ``h // (H // Hkv)``; keys and
            values are never repeated (the group's queries share one GEMM, and dk, dv sum over it).
        voters: who votes (:meth:`~selective_attention.selection.Selection.bind`): heads of ``q``
            (``slice(0, 1)``: head 0, the paper; ``slice(None)``: every head its own F) with their key
            heads of ``k``, whose vote gradients are added into dq, dk in place, or a dedicated pair
            ``qs, ks`` ``[B, G, L, Ds]`` with G = 1 (one F shared by all heads) or G = H; gradients flow
            into them.
        removed: bool, broadcasts to ``[B, H, L, L]``; True = key removed (on top of causal). A mask
            with one query row (``[B, 1, 1, L]``, key padding) stays that size: memory O(B L).
        penalty: float, broadcasts to ``[B, H, L, L]``; added to F.
        scale: attention logit scale (the votes' is ``voters.scale``).
        chunk_size: the unit of the query blocks (default: :func:`default_chunk_size`); forward and
            backward walk blocks of a multiple of it (:func:`_forward_blocks`), the backward each
            block's keys in tiles (:func:`_key_tile`).
        tau: also return ``sum_j min(F[i, j], tau)`` per row, ``[B, G, L]`` (the memory loss's
            soft count of masked tokens, times tau), differentiable.
        key_padding_mask: bool ``[B, L]``, True = padding, for the votes only (pass the padding in
            ``removed`` too to remove the keys): padding neither votes nor is voted on, and each
            sequence's first real token is the protected one (the paper's BOS).

    Returns:
        ``(out [B, H, L, Dv], rows [B, G, L] or None)``; a query whose every key is removed gets zeros.
    """
    if not isinstance(voters, Voters):
        raise TypeError(f"voters must be a selection.Voters (Selection.bind), got {type(voters).__name__}.")
    B, H, L, _ = q.shape
    if L == 0:
        raise ValueError("chunked_selective_attention needs L >= 1; the dispatcher sends L = 0 to the naive path.")
    chunk_size = check_chunk_size(chunk_size)
    chunk = default_chunk_size(B, H, L, q.element_size()) if chunk_size is None else chunk_size
    dead = None
    if removed is not None:
        # [b, h, 1, 1], every key or none: as a key-padding mask (its dead rows were [b, h, 1, 1], sliced to nothing
        # past row 0: a sequence with every key removed raised)
        if removed.shape[2] == removed.shape[3] == 1:
            removed = removed.expand(*removed.shape[:3], L)
        # Rows with every key removed: let the kernel see them unmasked, then zero their output (and
        # so their gradient) here, instead of trusting each kernel's all--inf behaviour.
        if removed.shape[2] == 1:  # the same keys for every query: row i is dead iff keys 0..i all are removed
            dead = ((~removed).cumsum(dim=-1) == 0).transpose(-2, -1)  # [b, h, L, 1], no [L, L] tensor
        else:
            future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1)
            dead = (removed | future).all(dim=-1, keepdim=True)  # [b, h, L, 1]
    # shortcuts only (an all-False mask gives the same result), skipped under torch.compile: reading a value
    # would break the graph (or, on meta or fake tensors, fail)
    if reads_values(q):
        if dead is not None and not dead.any():
            dead = None
        if key_padding_mask is not None and not key_padding_mask.any():
            key_padding_mask = None
    qs, ks, heads = voters.qs, voters.ks, voters.heads
    out, rows = _apply(
        q, k, v, qs, ks, heads, removed, dead, key_padding_mask, penalty, scale, voters.scale, chunk, tau
    )
    out = out if dead is None else out.masked_fill(dead, 0.0)
    return out, (rows if tau is not None else None)


def supports(req: Request) -> str | None:
    """Paper mode (any voters, user masks, key padding, memory rows), without dropout, outside forward-mode AD and
    ``torch.func``'s gradient transforms (:mod:`.transforms`)."""
    if req.voters is None:
        return "backend='chunked' is the paper-mode path; pass selection=True or use 'sdpa'."
    if req.dropout_p > 0.0:
        return (
            "backend='chunked' has no attention dropout; use dropout_p=0.0 (SelectiveAttention(..., dropout=0.0), or "
            "the module in eval mode) or backend='naive'."
        )
    if transform := unserved_transform(req.q, req.k, req.v, req.voters.qs, req.voters.ks, req.mask.penalty):
        return f"backend='chunked' (a hand-written backward) cannot serve {transform}; use backend='naive' or 'auto'."
    return None


def attend(req: Request) -> tuple[Tensor, Tensor | None]:
    """``(out, memory-loss rows or None)`` (the backend contract)."""
    if req.q.shape[-2] == 0:
        return naive.attend(req)  # nothing to chunk: the spec's empty answer
    out, rows = chunked_selective_attention(
        req.q, req.k, req.v, req.voters, removed=req.mask.removed, penalty=req.mask.penalty, scale=req.scale,
        chunk_size=req.chunk_size, tau=req.tau, key_padding_mask=req.mask.padding,
    )  # fmt: skip
    return out, (None if req.tau is None else rows / req.tau)
