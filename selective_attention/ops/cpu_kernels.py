"""Fused CPU passes of the chunked backend's paper mode, compiled by Numba when it is installed (extra ``[cpu]``).

The chunked backend's GEMMs run near a CPU's peak; what it spends beyond standard attention is the elementwise
work between them, each step a pass of its own over a ``[B, H, C, width]`` tile in eager PyTorch (DESIGN §5,
benchmarks/README.md "Where the time goes"). Two passes here do that work in one sweep each, down a tile's rows,
with the columns in the inner loop:

* :func:`votes_to_bias`: a block's votes ``-S`` (a GEMM's output, clamped and masked in place) into the attention
  bias ``-F`` (the running sum down the rows, from the carried column sums), and, in the forward, the column sums
  carried on; in the backward, straight into P's exponent ``-lse log2e - F log2e`` for every head.
* :func:`vote_gradients`: ``dZ_h = P_h (dO_h V_h^T - delta_h)`` for every head, minus F's gradient summed over
  the heads, its suffix sum down the columns, relu's gate, and the vote gradient added into the voting head's dZ.

Running sums go down the rows one at a time, in order (the eager path sums blocks of 64 rows by GEMM): the two
paths round apart in the last bits, each the same in its forward and backward. Numba compiles each pass on its
first call in a process (about a second; cached on disk where the package's folder is writable). Without Numba,
:func:`available` is False and the chunked backend runs its eager passes.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:  # optional: the chunked backend runs without it
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised by the CI step without the extra
    numba = None

__all__ = ["available", "votes_to_bias", "vote_gradients"]

# parallel tasks per thread: a task walks a band of columns down every row of the tile (wider bands run their
# inner loops longer; enough bands keep every thread busy)
_TASKS_PER_THREAD = int(os.environ.get("SA_TPT", "2"))
# SELECTIVE_ATTENTION_NUMBA=0 turns the compiled passes off (the eager ones run), e.g. to compare the two
_ENV = "SELECTIVE_ATTENTION_NUMBA"


def available() -> bool:
    """Whether the compiled passes can run: Numba imports and ``SELECTIVE_ATTENTION_NUMBA`` is not ``0``."""
    return numba is not None and os.environ.get(_ENV, "1") != "0"


def _can_cache() -> bool:
    """Whether Numba can keep compiled code on disk for this module (the package's folder, or the user's cache
    folder): without a writable one, ``cache=True`` raises at decoration, so the passes compile in each process."""
    try:
        numba.njit(cache=True)(_probe)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return False
    return True


def _probe() -> None:  # pragma: no cover - never called
    pass


if numba is not None:
    _CACHE = _can_cache()

    @njit(parallel=True, nogil=True, cache=_CACHE, boundscheck=False)
    def _votes_to_bias(Sn, carry, d, neg_max, nlse, log2e, out, forward, cols):  # pragma: no cover - compiled
        B, C, n = Sn.shape
        H = out.shape[1]
        tasks = (n + cols - 1) // cols
        for t in prange(B * tasks):
            b = t // tasks
            c0 = (t % tasks) * cols
            w = min(cols, n - c0)
            acc = carry[b, c0 : c0 + w].copy()
            for r in range(C):
                s_row = Sn[b, r, c0 : c0 + w]
                edge = d + r - c0  # tile columns >= this are the row's own key and the future (no vote)
                for j in range(w):
                    s = s_row[j]
                    if s > 0.0:
                        s = 0.0
                    elif s < neg_max:
                        s = neg_max
                    if j >= edge:
                        s = 0.0
                    s_row[j] = s
                if forward:
                    o_row = out[b, 0, r, c0 : c0 + w]
                    for j in range(w):
                        o_row[j] = acc[j] if j <= edge else -math.inf
                else:
                    for h in range(H):
                        x = nlse[b, h, r]
                        o_row = out[b, h, r, c0 : c0 + w]
                        for j in range(w):
                            o_row[j] = x + log2e * acc[j] if j <= edge else -math.inf
                for j in range(w):
                    acc[j] += s_row[j]
            if forward:
                carry[b, c0 : c0 + w] = acc

    @njit(parallel=True, nogil=True, cache=_CACHE, boundscheck=False)
    def _vote_gradients(dZ, P, delta, Sn, ndcol, hv, alpha, cols):  # pragma: no cover - compiled
        B, H, C, n = dZ.shape
        tasks = (n + cols - 1) // cols
        for t in prange(B * tasks):
            b = t // tasks
            c0 = (t % tasks) * cols
            w = min(cols, n - c0)
            acc = ndcol[b, c0 : c0 + w].copy()  # minus the sums of dF over the later rows
            ndf = acc.copy()
            for r in range(C - 1, -1, -1):
                for j in range(w):
                    ndf[j] = 0.0
                for h in range(H):
                    x = delta[b, h, r]
                    z_row = dZ[b, h, r, c0 : c0 + w]
                    p_row = P[b, h, r, c0 : c0 + w]
                    for j in range(w):
                        z = p_row[j] * (z_row[j] - x)
                        z_row[j] = z
                        ndf[j] += z
                s_row = Sn[b, r, c0 : c0 + w]
                v_row = dZ[b, hv, r, c0 : c0 + w]
                for j in range(w):
                    if s_row[j] < 0.0:  # relu's open gate (the votes are clamped to [-max, 0])
                        v_row[j] += alpha * acc[j]
                    acc[j] += ndf[j]
            ndcol[b, c0 : c0 + w] = acc


def _columns(B: int, n: int) -> int:
    """Columns per parallel task for a ``[B, ., ., n]`` tile, with Numba's threads set to PyTorch's intra-op
    threads (both default to the cores): ``_TASKS_PER_THREAD`` tasks a thread, at least 16 columns each."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    per_row = -(-_TASKS_PER_THREAD * threads // B)  # tasks per batch row
    return max(16, -(-n // per_row))


def votes_to_bias(Sn: Tensor, carry: Tensor, d: int, out: Tensor, nlse: Tensor | None = None) -> None:
    """A tile's votes into its bias, in place.

    Args:
        Sn: ``[B, C, n]`` the votes' product ``-S`` for rows ``i0 .. i0+C-1`` and tile columns ``j0 .. j0+n-1``;
            clamped to ``[-max, 0]`` and zeroed where a key does not precede its query, in place (relu's gate in
            backward reads it).
        carry: ``[B, n]`` minus the column sums of the votes of the rows before ``i0``. Forward
            (``nlse`` None): moved on past this block's rows, in place.
        d: ``i0 - j0``, the diagonal's first column in the tile (``>= n`` when the tile ends before the block).
        out: forward ``[B, 1, C, n]``: the bias ``-F``, ``-inf`` at future keys; backward ``[B, H, C, n]``: P's
            exponent before the logits, ``nlse_h - F log2e``, ``-inf`` at future keys.
        nlse: backward only, ``[B, H, C]``: minus each row's log-sum-exp, in base 2.
    """
    forward = nlse is None
    neg_max = -torch.finfo(Sn.dtype).max
    nl = out.new_empty(1, 1, 1) if forward else nlse
    _votes_to_bias(
        Sn.numpy(),
        carry.numpy(),
        d,
        neg_max,
        nl.numpy(),
        1.4426950408889634,
        out.numpy(),
        forward,
        _columns(Sn.shape[0], Sn.shape[2]),
    )


def vote_gradients(dZ: Tensor, P: Tensor, delta: Tensor, Sn: Tensor, ndcol: Tensor, hv: int, alpha: float) -> None:
    """A tile's gradients into the logits, in place (see the module's docstring).

    Args:
        dZ: ``[B, H, C, n]`` ``dO V^T`` on entry; ``P (dO V^T - delta)`` on exit, plus ``alpha`` times the vote
            gradient in head ``hv``.
        P: ``[B, H, C, n]`` the attention weights; delta: ``[B, H, C]`` ``rowsum(dO * O)``.
        Sn: ``[B, C, n]`` the clamped votes (:func:`votes_to_bias`); relu's gate is open where they are negative.
        ndcol: ``[B, n]`` minus the sums of F's gradient over the later blocks' rows; moved on past this block's
            rows, in place.
        hv: the voting head; alpha: ``-sel_scale / scale`` (the vote gradient rides the dq and dk GEMMs).
    """
    cols = _columns(dZ.shape[0], dZ.shape[3])
    _vote_gradients(dZ.numpy(), P.numpy(), delta.numpy(), Sn.numpy(), ndcol.numpy(), hv, alpha, cols)
