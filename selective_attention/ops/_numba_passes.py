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
def votes_to_bias(Sn, carry, d, neg_max, nlse, log2e, out, forward, cols):  # pragma: no cover - compiled
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
def vote_gradients(dZ, P, delta, Sn, ndcol, hv, alpha, cols):  # pragma: no cover - compiled
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
