"""The Numba kernels of :mod:`.cpu_kernels` (imported only through it, on first use: importing Numba takes a few
tenths of a second, which a process that never runs the chunked backend on CPU should not pay)."""

from __future__ import annotations

import math

import numba
from numba import njit, prange


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


_CACHE = _can_cache()


@njit(parallel=True, nogil=True, cache=_CACHE, boundscheck=False)
def votes_to_bias(
    Sn, carry, d, neg_max, nlse, log2e, out, forward, cols, removed, dead, has_removed, tau, mem, want_mem, negF, want_F
):  # pragma: no cover - compiled
    """See cpu_kernels.votes_to_bias. ``removed`` [B, n] / ``dead`` [B, C] (uint8, with ``has_removed``): removed
    keys get -inf except in dead rows; ``mem`` [B, tasks, C] (``want_mem``, forward): each task's share of
    sum_j min(F, tau); ``negF`` [B, C, n] (``want_F``, backward): -F."""
    B, C, n = Sn.shape
    H = out.shape[1]
    tasks = (n + cols - 1) // cols
    for t in prange(B * tasks):
        b = t // tasks
        task = t % tasks
        c0 = task * cols
        w = min(cols, n - c0)
        acc = carry[b, c0 : c0 + w].copy()  # -F of the current row: the votes of the rows above it
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
            if want_mem:
                m = 0.0
                for j in range(w):
                    f = -acc[j]
                    m += f if not f > tau else tau  # min(F, tau), NaN kept (as clamp)
                mem[b, task, r] = m
            if want_F:
                f_row = negF[b, r, c0 : c0 + w]
                for j in range(w):
                    f_row[j] = acc[j]
            keep_removed = has_removed and dead[b, r] != 0  # a dead row keeps its removed keys (zeroed later)
            for h in range(1 if forward else H):
                x = 0.0 if forward else nlse[b, h, r]
                a = 1.0 if forward else log2e
                o_row = out[b, h, r, c0 : c0 + w]
                for j in range(w):
                    o_row[j] = x + a * acc[j] if j <= edge else -math.inf
                if has_removed and not keep_removed:
                    rm_row = removed[b, c0 : c0 + w]
                    for j in range(w):
                        if rm_row[j] != 0:
                            o_row[j] = -math.inf
            for j in range(w):
                acc[j] += s_row[j]
        if forward:
            carry[b, c0 : c0 + w] = acc


@njit(parallel=True, nogil=True, cache=_CACHE, boundscheck=False)
def vote_gradients(dZ, P, delta, Sn, ndcol, hv, alpha, cols, negF, dmem, tau, has_dmem):  # pragma: no cover - compiled
    """See cpu_kernels.vote_gradients. With ``has_dmem``: minus the memory loss's gradient ``dmem`` [B, C] into
    -dF where ``F <= tau`` (``negF`` [B, C, n] is -F; NaN counts as inside, as the eager passes')."""
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
            if has_dmem:
                g = dmem[b, r]
                f_row = negF[b, r, c0 : c0 + w]
                for j in range(w):
                    if not (-f_row[j] > tau):
                        ndf[j] -= g
            s_row = Sn[b, r, c0 : c0 + w]
            v_row = dZ[b, hv, r, c0 : c0 + w]
            for j in range(w):
                if s_row[j] < 0.0:  # relu's open gate (the votes are clamped to [-max, 0])
                    v_row[j] += alpha * acc[j]
                acc[j] += ndf[j]
        ndcol[b, c0 : c0 + w] = acc
