"""Triton kernels for paper-mode selective attention, forward and backward (DESIGN §5).

Imported lazily by :mod:`.op` (Triton decides at decoration time whether it interprets, so
``TRITON_INTERPRET=1`` must be set before the first call). Notation: ``G`` = number of F's (1 when
every head shares the voting head's F, H with one F per head); ``hv`` the voting head of head h's F;
``s`` the attention scale, ``ss`` the votes' scale; all head-major tensors contiguous: q ``[B, H, L, D]``,
k, v ``[B, HKV, L, D]`` (grouped-query attention when ``HKV < H``: query head h reads kv head
``h // (H // HKV)``, and the voting head hv votes with kv head ``hv // (H // HKV)``).

Kernels, in launch order (grid: one program per block and per (b, h), or (b, g) for pass 1)::

    forward   _vote_carry   carry[b, g, r, j] = sum_{k < r*BM} S[k, j]        [B, G, L/BM, L] fp32
              _fwd          out, lse: flash loop over key blocks, F rebuilt per tile
    backward  _vote_carry   the same carry at the backward's query granularity
              _delta        delta[i] = rowsum(dO * O)
              _bwd_kv       per key block and kv head, over the query heads of its group and
                            their query blocks last to first: dK, dV, dks (+ dcarry)
              _bwd_q        per query block: dQ, dqs

An F tile (query rows ``i0 .. i0+BM``, key columns ``j0 .. j0+BN``) is never stored: it is rebuilt
from the carried column sums of the earlier query blocks plus an exclusive cumsum of the tile's own
votes down its rows. Every head's program rebuilds it (for the paper all H heads share one F, so the
vote GEMM is repeated H times: one extra ``BM x BN x D`` GEMM and one row scan per tile next to
attention's two GEMMs, in exchange for no cross-program traffic and H-fold parallelism).

Backward needs ``dS[k, j] = -sum_h sum_{i > k} dZ_h[i, j]``. It is linear in the heads, so each head
computes its own share ``dS_h``, and its share of ``dqs = (dS * 1[S > 0]) ks * ss`` and ``dks``: the
shares are summed over heads on the host (one ``[B, H, L, D]`` fp32 buffer each, not ``L x L``). With
one F per head the share is the whole thing and lands straight in dq/dk (one GEMM: the attention and
vote gradients share an operand). The suffix sum down a key column is carried in registers by the
key-block program (``_bwd_kv`` walks its query blocks last to first); the query-block program
(``_bwd_q``) reads it from ``dcarry[b, h, c, j] = sum_{i >= (c+1)*BM_q} dZ_h[i, j]``, which
``_bwd_kv`` writes at the query blocks' boundaries: ``[B, H, L/BM_q, L]`` fp32, the price of a
deterministic backward without atomics. Under grouped-query attention one ``_bwd_kv`` program owns a
key block of one kv head and walks the query heads of its group one after the other, so dK, dV (and
the group's share of dks) sum over the group in its registers: no two programs write one kv row. No
atomics anywhere: results are bitwise reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["Config", "config_for", "forward", "backward"]


# --- tiles shared by every kernel -----------------------------------------------------------------
@triton.jit
def _votes(qs, ks, offs_m, offs_n, L, sel_scale, PREC: tl.constexpr):
    """Votes ``S[k, j] = relu(qs[k] . ks[j] * ss)`` on ``1 <= j < k < L``, else 0."""
    # [BLOCK_M, BLOCK_N]
    s = tl.dot(qs, tl.trans(ks), input_precision=PREC) * sel_scale
    keep = (offs_n[None, :] < offs_m[:, None]) & (offs_n[None, :] >= 1) & (offs_m[:, None] < L)
    return tl.where(keep & (s > 0.0), s, 0.0)


@triton.jit
def _row_scan(x, AFTER: tl.constexpr, DOT_SCANS: tl.constexpr):
    """Exclusive sums down the rows of ``x`` [R, C] fp32: ``sum_{k < i} x[k, j]`` (``sum_{k > i}`` with AFTER).

    ``DOT_SCANS`` (a dtype): as a product with the 0/1 triangle on the tensor cores. ``tl.bfloat16``: x split in
    two bf16 parts (hi + lo: 16 of fp32's 24 mantissa bits, error <= 2^-17 |x| per term, summed in fp32), which an
    H200 runs faster than ``tl.cumsum``'s scan (benchmarks/README.md); 16-bit attention's own rounding is 2^-8 or
    2^-11. ``tl.float32``: one fp32 product (the interpreter's: it cannot multiply bf16). None: the scan, which
    rounds like the sum it came from (|F| ulp): fp32 inputs keep it. Unlike the scan, a product spreads an inf
    (a vote or dZ beyond fp32's range, |x| >= ~3.4e38) to its whole tile column as NaN."""
    if DOT_SCANS is None:
        if AFTER:
            return tl.sum(x, axis=0)[None, :] - tl.cumsum(x, axis=0)
        else:
            return tl.cumsum(x, axis=0) - x
    else:
        r = tl.arange(0, x.shape[0])
        if AFTER:
            tri = (r[:, None] < r[None, :]).to(DOT_SCANS)
        else:
            tri = (r[:, None] > r[None, :]).to(DOT_SCANS)
        if DOT_SCANS == tl.float32:
            return tl.dot(tri, x, input_precision="ieee")
        else:
            hi = x.to(DOT_SCANS)
            lo = (x - hi.to(tl.float32)).to(DOT_SCANS)
            return tl.dot(tri, hi) + tl.dot(tri, lo)


@triton.jit
def _penalty(s, carry, DOT_SCANS: tl.constexpr):
    """``F[i, j] = carry[j] + sum_{k in tile, k < i} S[k, j]``: earlier blocks' votes plus the tile's own."""
    # [BLOCK_M, BLOCK_N]
    return carry[None, :] + _row_scan(s, False, DOT_SCANS)


@triton.jit
def _logits(q, k, s_tile, carry, offs_m, offs_n, scale, PREC: tl.constexpr, DOT_SCANS: tl.constexpr):
    """``Z = q k^T * s - F``, ``-inf`` at future keys.

    Padding rows (``>= L``, q = 0, never stored) keep finite logits at their causal keys, so no
    row is all ``-inf`` and no NaN is made even in lanes that are thrown away."""
    # [BLOCK_M, BLOCK_N]
    f = _penalty(s_tile, carry, DOT_SCANS)
    z = tl.dot(q, tl.trans(k), input_precision=PREC) * scale - f
    return tl.where(offs_n[None, :] <= offs_m[:, None], z, float("-inf"))


@triton.jit
def _vote_grad(dz, later, s_tile, DOT_SCANS: tl.constexpr):
    """``dS_h * 1[S > 0]``: ``dS_h[k, j] = -(later[j] + sum_{i in tile, i > k} dZ_h[i, j])``.

    Returns the new column sums of dZ_h (``later`` for the next tile up) too."""
    # [BLOCK_M, BLOCK_N]
    tot = tl.sum(dz, axis=0)
    ds = -(later[None, :] + _row_scan(dz, True, DOT_SCANS))
    # where, not a product: S is 0 off the vote mask, and ds there may hold anything
    return tl.where(s_tile > 0.0, ds, 0.0), later + tot


@triton.jit
def _load_rows(base, offs_r, offs_d, L, D):
    # [ROWS, D_PAD], zero beyond L and beyond D
    mask = (offs_r[:, None] < L) & (offs_d[None, :] < D)
    return tl.load(base + offs_r[:, None] * D + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, x, offs_r, offs_d, L, D):
    tl.store(
        base + offs_r[:, None] * D + offs_d[None, :],
        x.to(base.dtype.element_ty),
        mask=(offs_r[:, None] < L) & (offs_d[None, :] < D),
    )


@triton.jit
def _vote_ids(bh, H, VOTE_HEAD, PER_HEAD: tl.constexpr):
    """For the program of ``bh = b * H + h``: ``(b, g, bv)``, its batch, the index of its F in the
    ``[B, G]``-flattened carries, and the voting head's flat index ``b * H + hv``."""
    b = bh // H
    if PER_HEAD:
        g = bh
        bv = bh
    else:
        g = b
        bv = b * H + VOTE_HEAD
    return b, g, bv


@triton.jit
def _kv_ids(bh, H, HKV, VOTE_HEAD, PER_HEAD: tl.constexpr):
    """For query head ``bh = b * H + h``: ``(bkv, bkvv)``, the flat ``[B, HKV]`` indices of its kv head
    ``h // (H // HKV)`` and of the voting head's kv head (its own with one F per head)."""
    b = bh // H
    grp = H // HKV
    bkv = b * HKV + (bh % H) // grp
    if PER_HEAD:
        bkvv = bkv
    else:
        bkvv = b * HKV + VOTE_HEAD // grp
    return bkv, bkvv


@triton.jit
def _voter_rows(X, own, bv, offs_r, offs_d, L, D, PER_HEAD: tl.constexpr):
    """The voting head's rows of ``X``: with one F per head, the rows this program already loaded."""
    if PER_HEAD:
        rows = own
    else:
        rows = _load_rows(X + bv * L * D, offs_r, offs_d, L, D)
    return rows


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, bh, bv, offs_m, offs_d, offs_dv, L, D, DV, PER_HEAD: tl.constexpr):
    """What the backward needs of a query block: q, dO, the voter's qs, lse and delta."""
    q = _load_rows(Q + bh * L * D, offs_m, offs_d, L, D)  # [BLOCK_M, D_PAD]
    do = _load_rows(DO + bh * L * DV, offs_m, offs_dv, L, DV)  # [BLOCK_M, DV_PAD]
    qs = _voter_rows(Q, q, bv, offs_m, offs_d, L, D, PER_HEAD)
    lse = tl.load(LSE + bh * L + offs_m, mask=offs_m < L, other=0.0)  # [BLOCK_M]
    delta = tl.load(DELTA + bh * L + offs_m, mask=offs_m < L, other=0.0)
    return q, do, qs, lse, delta


@triton.jit
def _bwd_tile(
    q, k, v, do, qs, ks, lse, delta, carry, later, offs_m, offs_n, L, scale, sel_scale,
    PREC: tl.constexpr, DOT_SCANS: tl.constexpr,
):  # fmt: skip
    """One ``[BLOCK_M, BLOCK_N]`` tile of the backward, shared by both passes: ``P`` rebuilt from lse,
    ``dZ = P (dP - delta)``, and the vote gradient with the updated suffix sum (see ``_vote_grad``)."""
    s_tile = _votes(qs, ks, offs_m, offs_n, L, sel_scale, PREC)
    p = tl.exp(_logits(q, k, s_tile, carry, offs_m, offs_n, scale, PREC, DOT_SCANS) - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    dz = p * (dp - delta[:, None])
    dl, later = _vote_grad(dz, later, s_tile, DOT_SCANS)
    return p, dz, dl, later


# --- pass 1: column sums of the votes, carried over query blocks ------------------------------------
@triton.jit
def _vote_carry_kernel(
    Q, K, CARRY, sel_scale, L, H, HKV, VOTE_HEAD, N_R,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PER_HEAD: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """``CARRY[b, g, r, j] = sum_{k < r * BLOCK_R} S[k, j]``, all ``r < N_R``, ``j < L``.

    One program per (key block, b, g) walks the row blocks first to last: the exclusive prefix over
    blocks is the running sum itself, so there is no second pass and no atomics."""
    pid_n = tl.program_id(0)
    bg = tl.program_id(1).to(tl.int64)
    if PER_HEAD:
        b = bg // H
        hv = bg % H
    else:
        b = bg
        hv = VOTE_HEAD
    qs_base = Q + (b * H + hv) * L * D
    ks_base = K + (b * HKV + hv // (H // HKV)) * L * D
    carry_base = CARRY + bg * N_R * L
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    ks = _load_rows(ks_base, offs_n, offs_d, L, D)  # [BLOCK_N, D_PAD]
    col = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Rows before the block holding row j0 = pid_n * BLOCK_N cannot vote on columns >= j0 (k > j).
    first = (pid_n * BLOCK_N) // BLOCK_R
    for r in range(0, first + 1):
        tl.store(carry_base + r * L + offs_n, col, mask=offs_n < L)
    for r in range(first, N_R - 1):
        offs_r = r * BLOCK_R + tl.arange(0, BLOCK_R)
        qs = _load_rows(qs_base, offs_r, offs_d, L, D)  # [BLOCK_R, D_PAD]
        # [BLOCK_R, BLOCK_N]
        s = _votes(qs, ks, offs_r, offs_n, L, sel_scale, PREC)
        col += tl.sum(s, axis=0)
        tl.store(carry_base + (r + 1) * L + offs_n, col, mask=offs_n < L)


# --- pass 2: forward ---------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    Q, K, V, CARRY, OUT, LSE, scale, sel_scale, L, H, HKV, VOTE_HEAD, N_CARRY,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CARRY_ROWS: tl.constexpr,
    PER_HEAD: tl.constexpr, PREC: tl.constexpr, DOT_SCANS: tl.constexpr,
):  # fmt: skip
    """One program per (query block, b, h): flash attention over key blocks ``<=`` the diagonal."""
    pid_m = tl.cdiv(L, BLOCK_M) - 1 - tl.program_id(0)  # longest rows first: better tail balance
    bh = tl.program_id(1).to(tl.int64)
    b, g, bv = _vote_ids(bh, H, VOTE_HEAD, PER_HEAD)
    bkv, bkvv = _kv_ids(bh, H, HKV, VOTE_HEAD, PER_HEAD)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = _load_rows(Q + bh * L * D, offs_m, offs_d, L, D)  # [BLOCK_M, D_PAD]
    qs = _voter_rows(Q, q, bv, offs_m, offs_d, L, D, PER_HEAD)  # [BLOCK_M, D_PAD]
    carry_base = CARRY + (g * N_CARRY + (pid_m * BLOCK_M) // CARRY_ROWS) * L
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, L)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K + bkv * L * D, offs_n, offs_d, L, D)  # [BLOCK_N, D_PAD]
        v = _load_rows(V + bkv * L * DV, offs_n, offs_dv, L, DV)  # [BLOCK_N, DV_PAD]
        ks = _voter_rows(K, k, bkvv, offs_n, offs_d, L, D, PER_HEAD)
        carry = tl.load(carry_base + offs_n, mask=offs_n < L, other=0.0)  # [BLOCK_N]
        # [BLOCK_M, BLOCK_N]
        s_tile = _votes(qs, ks, offs_m, offs_n, L, sel_scale, PREC)
        z = _logits(q, k, s_tile, carry, offs_m, offs_n, scale, PREC, DOT_SCANS)
        # column 0 is causal for every row, so m_new is finite from the first tile on
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        p = tl.exp(z - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # [BLOCK_M, DV_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    _store_rows(OUT + bh * L * DV, acc / l_i[:, None], offs_m, offs_dv, L, DV)
    tl.store(LSE + bh * L + offs_m, m_i + tl.log(l_i), mask=offs_m < L)


# --- backward -------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(OUT, DO, DELTA, L, DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """``delta[i] = sum_d dO[i, d] * O[i, d]`` (fp32), the softmax backward's row term."""
    bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DV_PAD)
    o = _load_rows(OUT + bh * L * DV, offs_m, offs_d, L, DV).to(tl.float32)  # [BLOCK_M, DV_PAD]
    do = _load_rows(DO + bh * L * DV, offs_m, offs_d, L, DV).to(tl.float32)
    tl.store(DELTA + bh * L + offs_m, tl.sum(o * do, axis=1), mask=offs_m < L)


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, CARRY, DCARRY, DK, DV_OUT, DKS,
    scale, sel_scale, L, H, HKV, VOTE_HEAD, N_CARRY, N_DCARRY,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CARRY_ROWS: tl.constexpr, DCARRY_ROWS: tl.constexpr,
    PER_HEAD: tl.constexpr, PREC: tl.constexpr, DOT_SCANS: tl.constexpr,
):  # fmt: skip
    """One program per (key block, b, kv head): dK, dV and the vote share ``dks`` of this key block.

    Walks the query heads of the kv head's group (one, without grouped-query attention) and, for
    each, its query blocks last to first, carrying ``later[j] = sum_{i after the block} dZ_h[i, j]``:
    the exclusive suffix sum that turns dF into dS, the mirror of pass 1. At each boundary that is a
    multiple of DCARRY_ROWS (the q-pass's block) it leaves ``later`` in DCARRY for ``_bwd_q``. dK, dV
    and dks sum over the group here: each kv row has one writer."""
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1).to(tl.int64)  # b * HKV + kv head
    grp = H // HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    k = _load_rows(K + bkv * L * D, offs_n, offs_d, L, D)  # [BLOCK_N, D_PAD]
    v = _load_rows(V + bkv * L * DV, offs_n, offs_dv, L, DV)  # [BLOCK_N, DV_PAD]
    if PER_HEAD:  # each query head votes with its own kv head: this one
        ks = k
    else:
        ks = _load_rows(K + ((bkv // HKV) * HKV + VOTE_HEAD // grp) * L * D, offs_n, offs_d, L, D)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], dtype=tl.float32)
    dks = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    n_m = tl.cdiv(L, BLOCK_M)
    m_lo = (pid_n * BLOCK_N) // BLOCK_M  # earlier query blocks see none of these keys
    for gi in range(0, grp):
        bh = (bkv // HKV) * H + (bkv % HKV) * grp + gi  # b * H + query head
        b, g, bv = _vote_ids(bh, H, VOTE_HEAD, PER_HEAD)
        later = tl.zeros([BLOCK_N], dtype=tl.float32)
        for it in range(0, n_m - m_lo):
            m = n_m - 1 - it
            boundary = (m + 1) * BLOCK_M  # `later` sums the rows >= boundary
            if (boundary % DCARRY_ROWS == 0) & (boundary < L):
                c = boundary // DCARRY_ROWS - 1
                tl.store(DCARRY + (bh * N_DCARRY + c) * L + offs_n, later, mask=offs_n < L)
            offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
            q, do, qs, lse, delta = _query_rows(Q, DO, LSE, DELTA, bh, bv, offs_m, offs_d, offs_dv, L, D, DV, PER_HEAD)
            carry = tl.load(
                CARRY + (g * N_CARRY + (m * BLOCK_M) // CARRY_ROWS) * L + offs_n, mask=offs_n < L, other=0.0
            )
            # [BLOCK_M, BLOCK_N]
            p, dz, dl, later = _bwd_tile(
                q, k, v, do, qs, ks, lse, delta, carry, later, offs_m, offs_n, L, scale, sel_scale, PREC, DOT_SCANS
            )
            # [BLOCK_N, DV_PAD]
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
            # [BLOCK_N, D_PAD]
            if PER_HEAD:  # q is the voter too: one GEMM for both roles
                dk += tl.dot(tl.trans(dz * scale + dl * sel_scale).to(q.dtype), q, input_precision=PREC)
            else:
                dk += tl.dot(tl.trans(dz).to(q.dtype), q, input_precision=PREC) * scale
                dks += tl.dot(tl.trans(dl).to(q.dtype), qs, input_precision=PREC) * sel_scale
    _store_rows(DK + bkv * L * D, dk, offs_n, offs_d, L, D)
    _store_rows(DV_OUT + bkv * L * DV, dv, offs_n, offs_dv, L, DV)
    if not PER_HEAD:
        _store_rows(DKS + bkv * L * D, dks, offs_n, offs_d, L, D)


@triton.jit
def _bwd_q_kernel(
    Q, K, V, DO, LSE, DELTA, CARRY, DCARRY, DQ, DQS,
    scale, sel_scale, L, H, HKV, VOTE_HEAD, N_CARRY, N_DCARRY,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CARRY_ROWS: tl.constexpr,
    PER_HEAD: tl.constexpr, PREC: tl.constexpr, DOT_SCANS: tl.constexpr,
):  # fmt: skip
    """One program per (query block, b, h): dQ and the vote share ``dqs`` of this query block.

    ``DCARRY[b, h, pid_m, j]`` (from ``_bwd_kv``) holds the dZ_h column sums of all later rows."""
    pid_m = tl.cdiv(L, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, g, bv = _vote_ids(bh, H, VOTE_HEAD, PER_HEAD)
    bkv, bkvv = _kv_ids(bh, H, HKV, VOTE_HEAD, PER_HEAD)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q, do, qs, lse, delta = _query_rows(Q, DO, LSE, DELTA, bh, bv, offs_m, offs_d, offs_dv, L, D, DV, PER_HEAD)
    carry_base = CARRY + (g * N_CARRY + (pid_m * BLOCK_M) // CARRY_ROWS) * L
    hi = tl.minimum((pid_m + 1) * BLOCK_M, L)
    has_later = hi < L  # the last block has no later rows: its entry of DCARRY is never written
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dqs = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K + bkv * L * D, offs_n, offs_d, L, D)  # [BLOCK_N, D_PAD]
        v = _load_rows(V + bkv * L * DV, offs_n, offs_dv, L, DV)  # [BLOCK_N, DV_PAD]
        ks = _voter_rows(K, k, bkvv, offs_n, offs_d, L, D, PER_HEAD)
        carry = tl.load(carry_base + offs_n, mask=offs_n < L, other=0.0)  # [BLOCK_N]
        later = tl.load(DCARRY + (bh * N_DCARRY + pid_m) * L + offs_n, mask=(offs_n < hi) & has_later, other=0.0)
        # [BLOCK_M, BLOCK_N]
        _, dz, dl, _ = _bwd_tile(
            q, k, v, do, qs, ks, lse, delta, carry, later, offs_m, offs_n, L, scale, sel_scale, PREC, DOT_SCANS
        )
        # [BLOCK_M, D_PAD]
        if PER_HEAD:
            dq += tl.dot((dz * scale + dl * sel_scale).to(k.dtype), k, input_precision=PREC)
        else:
            dq += tl.dot(dz.to(k.dtype), k, input_precision=PREC) * scale
            dqs += tl.dot(dl.to(k.dtype), ks, input_precision=PREC) * sel_scale
    _store_rows(DQ + bh * L * D, dq, offs_m, offs_d, L, D)
    if not PER_HEAD:
        _store_rows(DQS + bh * L * D, dqs, offs_m, offs_d, L, D)


# Whether Triton interprets these kernels: fixed when they were decorated (TRITON_INTERPRET=1 then), whatever the
# environment says later.
INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"


# --- launchers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Block sizes. Constraints: ``bwd_q_m % bwd_kv_m == 0`` (the q-pass reads the carries the kv-pass
    leaves at its own boundaries), every block >= 16 (``tl.dot``), powers of two."""

    fwd_m: int
    fwd_n: int
    bwd_kv_m: int
    bwd_kv_n: int
    bwd_q_m: int
    bwd_q_n: int
    carry_n: int  # key columns per pass-1 program
    fwd_warps: int = 4
    bwd_warps: int = 4
    fwd_stages: int = 2
    bwd_stages: int = 2
    # the tiles' row scans as products with a triangle (see _row_scan); None: for 16-bit inputs, not fp32
    dot_scans: bool | None = None

    def scan_dtype(self, dtype: torch.dtype):
        """``_row_scan``'s DOT_SCANS for inputs of ``dtype``: None (tl.cumsum), or the products' operand dtype:
        bf16 when compiled, fp32 when these kernels are interpreted (it cannot multiply bf16)."""
        if not (dtype != torch.float32 if self.dot_scans is None else self.dot_scans):
            return None
        return tl.float32 if INTERPRETED else tl.bfloat16

    def __post_init__(self):
        names = ("fwd_m", "fwd_n", "bwd_kv_m", "bwd_kv_n", "bwd_q_m", "bwd_q_n", "carry_n")
        blocks = {f: getattr(self, f) for f in names}
        bad = {f: b for f, b in blocks.items() if not (isinstance(b, int) and b >= 16 and b & (b - 1) == 0)}
        if bad:  # op._launch_limit counts the carries' rows as L / 16 at most, too
            raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot's smallest); got {bad}.")
        if self.bwd_q_m % self.bwd_kv_m:
            raise ValueError(f"bwd_q_m ({self.bwd_q_m}) must be a multiple of bwd_kv_m ({self.bwd_kv_m}).")


# 16-bit inputs: blocks from benchmarks/triton_tune.py on an NVIDIA H200 (Triton 3.6, bf16, L = 8192, 16k tokens;
# results/nvidia-h200/history/run{2,3}_*), forward and backward timed apart. Forward: 64 query rows, 4 warps (128
# rows with 8 warps: 17-18% slower at D = 64, 2-3% at D = 128); 3 stages, the fastest with dot scans (run 3). Kv
# pass: 32 rows. D = 128's backward is not run 3's fastest (a q pass of 128 rows, 8 warps: 22.5 against 27.1 ms),
# which measured correct there but has not run the GPU tests yet: the next GPU session's first check. Other GPUs
# may prefer other blocks: rerun the script there.
_GPU = {
    64: Config(64, 32, 32, 64, 64, 32, 64, fwd_warps=4, bwd_warps=4, fwd_stages=3, bwd_stages=3),
    128: Config(64, 32, 32, 64, 64, 32, 64, fwd_warps=4, bwd_warps=4, fwd_stages=3, bwd_stages=2),
}
# fp32 tiles are twice the bytes: with tf32 dots (tensor cores keep them in shared memory) the first _GPU's
# forward asked an H100/H200 for ~246 KB of the 227 KB a block may have (compiled ahead of time for sm_90: Triton
# 3.6 and 3.8). Half the query rows, 4 warps and 2 stages stay under ~197 KB in both precisions, D = 64 and 128.
_GPU_FP32 = {
    64: Config(64, 32, 32, 64, 64, 32, 64, fwd_warps=4, bwd_warps=4),
    128: Config(64, 32, 32, 32, 64, 32, 64, fwd_warps=4, bwd_warps=4),
}
# The interpreter runs tiles as numpy arrays: small, unequal blocks exercise every carry and tail
# (L = 100 spans 4-7 blocks in each pass, kv and q passes disagree on the query block).
INTERPRET_CONFIG = Config(32, 16, 16, 32, 32, 16, 16)


def config_for(D: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Config:
    """Block sizes for head dim ``D`` and the inputs' ``dtype`` on ``device`` (the interpreter's off CUDA)."""
    if device.type != "cuda":
        return INTERPRET_CONFIG
    table = _GPU_FP32 if dtype == torch.float32 else _GPU
    return table[64] if D <= 64 else table[128]


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul setting: full fp32 unless the user allowed tf32 (ignored for 16-bit)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _empty(debug: bool, *shape, dtype, device) -> Tensor:
    """A buffer every element of which the kernels write: NaN-filled under ``debug`` so a miss shows."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(math.nan) if debug else t


def _vote_carry(q: Tensor, k: Tensor, vote_head: int, sel_scale: float, rows: int, cfg: Config, debug: bool) -> Tensor:
    """``[B, G, ceil(L / rows), L]`` fp32: the votes' column sums over all query rows before each block."""
    B, H, L, D = q.shape
    HKV = k.shape[1]
    per_head = vote_head < 0
    G = H if per_head else 1
    n_r = triton.cdiv(L, rows)
    carry = _empty(debug, B, G, n_r, L, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(L, cfg.carry_n), B * G)
    _vote_carry_kernel[grid](
        q, k, carry, sel_scale, L, H, HKV, max(vote_head, 0), n_r,
        D=D, D_PAD=_pad(D), BLOCK_R=rows, BLOCK_N=cfg.carry_n, PER_HEAD=per_head, PREC=_precision(q.dtype),
        num_warps=4,
    )  # fmt: skip
    return carry


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    vote_head: int,
    scale: float,
    sel_scale: float,
    debug: bool = False,
    cfg: Config | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out [B, H, L, DV], lse [B, H, L] fp32)``; q ``[B, H, L, D]``, k, v ``[B, HKV, L, D|DV]`` contiguous,
    ``vote_head = -1``: per-head F. ``cfg``: block sizes (default :func:`config_for`; the tuning benchmark's)."""
    B, H, L, D = q.shape
    HKV = k.shape[1]
    DV = v.shape[-1]
    cfg = cfg or config_for(D, q.device, q.dtype)
    carry = _vote_carry(q, k, vote_head, sel_scale, cfg.fwd_m, cfg, debug)
    out = _empty(debug, B, H, L, DV, dtype=v.dtype, device=q.device)
    lse = _empty(debug, B, H, L, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(L, cfg.fwd_m), B * H)
    _fwd_kernel[grid](
        q, k, v, carry, out, lse, scale, sel_scale, L, H, HKV, max(vote_head, 0), carry.shape[2],
        D=D, D_PAD=_pad(D), DV=DV, DV_PAD=_pad(DV), BLOCK_M=cfg.fwd_m, BLOCK_N=cfg.fwd_n, CARRY_ROWS=cfg.fwd_m,
        PER_HEAD=vote_head < 0, PREC=_precision(q.dtype), DOT_SCANS=cfg.scan_dtype(q.dtype),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )  # fmt: skip
    return out, lse


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    vote_head: int,
    scale: float,
    sel_scale: float,
    debug: bool = False,
    cfg: Config | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` including the vote gradients of the voting head(s); all inputs contiguous (k, v
    with ``HKV`` heads: dk, dv too). ``cfg`` as in :func:`forward`: the forward's own need not be the same."""
    B, H, L, D = q.shape
    HKV = k.shape[1]
    DV = v.shape[-1]
    cfg = cfg or config_for(D, q.device, q.dtype)
    per_head = vote_head < 0
    prec = _precision(q.dtype)
    dev = q.device
    # The carries at the kv-pass's query granularity; the q-pass's blocks are multiples of it.
    carry = _vote_carry(q, k, vote_head, sel_scale, cfg.bwd_kv_m, cfg, debug)
    delta = _empty(debug, B, H, L, dtype=torch.float32, device=dev)
    _delta_kernel[(triton.cdiv(L, 64), B * H)](out, dout, delta, L, DV=DV, DV_PAD=_pad(DV), BLOCK_M=64)
    n_dcarry = triton.cdiv(L, cfg.bwd_q_m)
    # only the entries the q-pass reads are written (boundaries inside L, columns left of them)
    dcarry = _empty(debug, B, H, n_dcarry, L, dtype=torch.float32, device=dev)
    dq = _empty(debug, B, H, L, D, dtype=q.dtype, device=dev)
    dk = _empty(debug, B, HKV, L, D, dtype=k.dtype, device=dev)
    dv = _empty(debug, B, HKV, L, DV, dtype=v.dtype, device=dev)
    # one F shared by all heads: each head's share of the voting head's vote gradients (for dks, each
    # kv head's group's share), summed below; per-head F: unused placeholders
    dqs = _empty(debug, *((1,) if per_head else (B, H, L, D)), dtype=torch.float32, device=dev)
    dks = _empty(debug, *((1,) if per_head else (B, HKV, L, D)), dtype=torch.float32, device=dev)
    common = dict(D=D, D_PAD=_pad(D), DV=DV, DV_PAD=_pad(DV), PER_HEAD=per_head, PREC=prec,
                  DOT_SCANS=cfg.scan_dtype(q.dtype))  # fmt: skip
    _bwd_kv_kernel[(triton.cdiv(L, cfg.bwd_kv_n), B * HKV)](
        q, k, v, dout, lse, delta, carry, dcarry, dk, dv, dks,
        scale, sel_scale, L, H, HKV, max(vote_head, 0), carry.shape[2], n_dcarry,
        BLOCK_M=cfg.bwd_kv_m, BLOCK_N=cfg.bwd_kv_n, CARRY_ROWS=cfg.bwd_kv_m, DCARRY_ROWS=cfg.bwd_q_m,
        num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages, **common,
    )  # fmt: skip
    _bwd_q_kernel[(n_dcarry, B * H)](
        q, k, v, dout, lse, delta, carry, dcarry, dq, dqs,
        scale, sel_scale, L, H, HKV, max(vote_head, 0), carry.shape[2], n_dcarry,
        BLOCK_M=cfg.bwd_q_m, BLOCK_N=cfg.bwd_q_n, CARRY_ROWS=cfg.bwd_kv_m,
        num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages, **common,
    )  # fmt: skip
    if not per_head:
        hv, hkv = vote_head, vote_head // (H // HKV)
        dq[:, hv] = (dq[:, hv].float() + dqs.sum(dim=1)).to(dq.dtype)
        dk[:, hkv] = (dk[:, hkv].float() + dks.sum(dim=1)).to(dk.dtype)
    return dq, dk, dv
