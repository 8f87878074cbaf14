"""Fused CPU passes of the chunked backend's paper mode, compiled by Numba when it is installed (extra ``[cpu]``).

The chunked backend's GEMMs run near a CPU's peak; what it spends beyond standard attention is the elementwise
work between them, each step a pass of its own over a ``[B, H, C, width]`` tile in eager PyTorch (DESIGN §5,
benchmarks/README.md "Where the time goes"). Two passes here do that work in one sweep each, down a tile's rows,
with the columns in the inner loop (the kernels: ``_numba_passes.py``):

* :func:`votes_to_bias`: a block's votes ``-S`` (a GEMM's output, clamped and masked in place) into the attention
  bias ``-F`` (the running sum down the rows, from the carried column sums), and, in the forward, the column sums
  carried on; in the backward, straight into P's exponent ``-lse log2e - F log2e`` for every head.
* :func:`vote_gradients`: ``dZ_h = P_h (dO_h V_h^T - delta_h)`` for every head, minus F's gradient summed over
  the heads, its suffix sum down the columns, relu's gate, and the vote gradient added into the voting head's dZ.

Running sums go down the rows one at a time, in order (the eager path sums blocks of 64 rows by GEMM): the two
paths round apart in the last bits, each the same in its forward and backward (up to the GEMMs' rounding, as
before). Numba compiles each pass for each dtype on its first call (a second or two each), and keeps the result on
disk (in the package's folder, or Numba's per-user cache folder) where one is writable, else compiles again in each
process. Without Numba (or with ``SELECTIVE_ATTENTION_NUMBA=0``), :func:`available` is False and the chunked backend
runs its eager passes.

Threads: Numba's own pool, as many threads as PyTorch's intra-op threads. One call at a time in a process (a lock:
Numba's fallback "workqueue" pool aborts the process on concurrent calls). Numba's OpenMP pool cannot run in a
process forked from one that used it (it aborts), so a forked child runs the eager passes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["available", "version", "warm_up", "eager_passes", "votes_to_bias", "vote_gradients"]

# SELECTIVE_ATTENTION_NUMBA=0 turns the compiled passes off (the eager ones run), e.g. to compare the two
_ENV = "SELECTIVE_ATTENTION_NUMBA"
# parallel tasks per thread: a task walks a band of columns down every row of the tile (wider bands run their
# inner loops longer; enough bands keep every thread busy)
_TASKS_PER_THREAD = 2
_LOCK = threading.Lock()
_PID: list[int] = []  # the process that first ran a pass (a forked child must not use Numba's OpenMP pool)


@functools.cache
def _passes() -> ModuleType | None:
    """The kernels' module, imported on first use; None without Numba (or with one that fails to load: a broken
    llvmlite raises OSError, not ImportError)."""
    try:
        from . import _numba_passes
    except Exception:
        return None
    return _numba_passes


def available() -> bool:
    """Whether the compiled passes run: Numba loads, ``SELECTIVE_ATTENTION_NUMBA`` is not ``0``, and this is not a
    process forked from one that ran them."""
    if os.environ.get(_ENV, "1") == "0" or (_PID and _PID[0] != os.getpid()):
        return False
    return _passes() is not None


@contextlib.contextmanager
def eager_passes(force: bool = True):
    """Inside, the chunked backend runs its eager CPU passes (``SELECTIVE_ATTENTION_NUMBA=0``, restored after): the
    demo's committed numbers are theirs, and a benchmark times them beside the compiled ones. With ``force=False``
    only where the variable is unset (a user's own setting wins). The switch is read at each forward and each
    backward: wrap both."""
    before = os.environ.get(_ENV)
    if before is not None and not force:
        yield
        return
    os.environ[_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = before


def version() -> str | None:
    """Numba's version where the compiled passes run (:func:`available`), else None."""
    return _passes().numba.__version__ if available() else None


def warm_up(dtype: torch.dtype = torch.float32) -> bool:
    """Import Numba and compile (or load from its disk cache) both passes for ``dtype`` now, on tiny tiles, rather
    than in the first paper-mode call (a second or two each the first time; Numba's ~120 MiB of resident memory, once
    per process). Returns :func:`available`."""
    if not available():
        return False
    Sn = torch.zeros(1, 2, 2, dtype=dtype)
    carry, nlse = torch.zeros(1, 2, dtype=dtype), torch.zeros(1, 1, 2, dtype=dtype)
    out = torch.zeros(1, 1, 2, 2, dtype=dtype)
    votes_to_bias(Sn, carry, 0, out)
    votes_to_bias(Sn, carry, 0, out, nlse)
    vote_gradients(out, out.clone(), nlse, Sn, carry, 0, 1.0)  # one compilation serves every option
    return True


def _columns(B: int, n: int) -> int:
    """Columns per parallel task for a ``[B, ., ., n]`` tile, with Numba's threads set to PyTorch's intra-op
    threads (PyTorch's default: the physical cores; Numba's: the logical CPUs, its most):
    ``_TASKS_PER_THREAD`` tasks a thread, at least 16 columns each."""
    numba = _passes().numba
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    if not _PID:
        _PID.append(os.getpid())
    per_row = -(-_TASKS_PER_THREAD * threads // B)  # tasks per batch row
    return max(16, -(-n // per_row))


def _shapes(**given: tuple[Tensor, tuple[int, ...]]) -> None:
    """Each tensor's shape is the one given: the kernels do not check bounds, so a wrong shape would read or write
    outside a buffer (a ValueError instead)."""
    for name, (t, shape) in given.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"cpu_kernels: {name} has shape {tuple(t.shape)}, expected {shape}")


def _in_dtype(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded to ``dtype``, as the eager passes compare with it (the kernels compare a float32 F with a Python
    float in float64: a tau of 0.1 and F = float32(0.1) fell on the two sides of the memory loss's gate)."""
    return float(torch.tensor(x, dtype=torch.float64).to(dtype))


def votes_to_bias(
    Sn: Tensor,
    carry: Tensor,
    d: int,
    out: Tensor,
    nlse: Tensor | None = None,
    removed: Tensor | None = None,
    dead: Tensor | None = None,
    tau: float | None = None,
    negF: Tensor | None = None,
) -> Tensor | None:
    """A tile's votes into its bias, in place.

    Args:
        Sn: ``[B, C, n]`` (contiguous) the votes' product ``-S`` for rows ``i0 .. i0+C-1`` and tile columns
            ``j0 .. j0+n-1``; clamped to ``[-max, 0]`` and zeroed where a key does not precede its query, in place
            (relu's gate in backward reads it).
        carry: ``[B, n]`` minus the column sums of the votes of the rows before ``i0``. Forward (``nlse`` None):
            moved on past this block's rows, in place.
        d: ``i0 - j0``, the diagonal's first column in the tile (``>= n`` when the tile ends before the block).
        out: (contiguous) forward ``[B, 1, C, n]``: the bias ``-F``, ``-inf`` at future and removed keys; backward
            ``[B, H, C, n]``: P's exponent before the logits, ``nlse_h - F log2e``, ``-inf`` likewise.
        nlse: backward only, ``[B, H, C]``: minus each row's log-sum-exp, in base 2.
        removed: ``[B|1, n]`` bool, keys removed for every row (key padding), except in ``dead`` ``[B|1, C]`` rows
            (every key removed: the caller zeroes their output).
        tau: forward: also return the memory-loss rows ``sum_j min(F, tau)`` ``[B, C]`` (each parallel task sums its
            band of columns, then the bands are added: their last bits depend on the thread count).
        negF: backward: ``[B, C, n]`` (contiguous), filled with ``-F`` (the memory loss's gradient reads it).
    """
    B, C, n = Sn.shape
    if B * C * n == 0:
        return Sn.new_zeros(B, C) if tau is not None and nlse is None else None
    tau = None if tau is None else _in_dtype(tau, Sn.dtype)
    forward = nlse is None
    c = carry.contiguous()  # one memory layout: Numba compiles a pass again for each layout it is given
    nl = out.new_empty(1, 1, 1) if forward else nlse.contiguous()
    for name, t, m in (("removed", removed, n), ("dead", dead, C)):  # [B|1, m]: checked before expanding
        if t is not None and (t.dim() != 2 or t.shape[0] not in (1, B) or t.shape[1] != m):
            raise ValueError(f"cpu_kernels: {name} has shape {tuple(t.shape)}, expected ({B} or 1, {m})")
    u8 = torch.uint8
    rm = Sn.new_zeros(1, 1, dtype=u8) if removed is None else removed.expand(B, n).to(u8).contiguous()
    # read wherever keys are removed: no dead row is all zeros (the kernel does not check bounds)
    dd = Sn.new_zeros(B, C, dtype=u8) if dead is None else dead.expand(B, C).to(u8).contiguous()
    cols = _columns(B, n)
    tasks = -(-n // cols)
    want_mem = forward and tau is not None
    mem = Sn.new_empty(B, tasks if want_mem else 1, C if want_mem else 1)
    nf = Sn.new_empty(1, 1, 1) if negF is None else negF
    H = out.shape[1]
    _shapes(carry=(c, (B, n)), out=(out, (B, 1 if forward else H, C, n)))
    _shapes(**({} if forward else {"nlse": (nl, (B, H, C))}), **({} if negF is None else {"negF": (nf, (B, C, n))}))
    with _LOCK:
        _passes().votes_to_bias(
            Sn.numpy(), c.numpy(), d, -torch.finfo(Sn.dtype).max, nl.numpy(), 1.4426950408889634, out.numpy(),
            forward, cols, rm.numpy(), dd.numpy(), removed is not None, 0.0 if tau is None else tau, mem.numpy(),
            want_mem, nf.numpy(), negF is not None,
        )  # fmt: skip
    if forward and c is not carry:
        carry.copy_(c)
    return mem.sum(dim=1) if want_mem else None


def vote_gradients(
    dZ: Tensor,
    P: Tensor,
    delta: Tensor,
    Sn: Tensor,
    ndcol: Tensor,
    hv: int,
    alpha: float,
    negF: Tensor | None = None,
    dmem: Tensor | None = None,
    tau: float = 0.0,
) -> None:
    """A tile's gradients into the logits, in place (see the module's docstring).

    Args:
        dZ: ``[B, H, C, n]`` (contiguous) ``dO V^T`` on entry; ``P (dO V^T - delta)`` on exit, plus ``alpha`` times
            the vote gradient in head ``hv``.
        P: ``[B, H, C, n]`` (contiguous) the attention weights; delta: ``[B, H, C]`` ``rowsum(dO * O)``.
        Sn: ``[B, C, n]`` the clamped votes (:func:`votes_to_bias`); relu's gate is open where they are negative.
        ndcol: ``[B, n]`` minus the sums of F's gradient over the later blocks' rows; moved on past this block's
            rows, in place.
        hv: the voting head; alpha: ``-sel_scale / scale`` (the vote gradient rides the dq and dk GEMMs).
        negF, dmem, tau: the memory loss's gradient ``dmem`` ``[B, C]`` (of ``sum_j min(F, tau)``), added into F's
            where ``F <= tau``; ``negF`` ``[B, C, n]``: ``-F`` (:func:`votes_to_bias`).
    """
    B, H, C, n = dZ.shape
    if B * C * n == 0:
        return
    tau = _in_dtype(tau, Sn.dtype)
    nd = ndcol.contiguous()
    has_dmem = dmem is not None
    nf = negF if has_dmem else Sn.new_empty(1, 1, 1)
    dm = dmem.to(Sn.dtype).contiguous() if has_dmem else Sn.new_empty(1, 1)
    de = delta.contiguous()
    _shapes(P=(P, (B, H, C, n)), delta=(de, (B, H, C)), Sn=(Sn, (B, C, n)), ndcol=(nd, (B, n)))
    if has_dmem:
        _shapes(negF=(nf, (B, C, n)), dmem=(dm, (B, C)))
    if not 0 <= hv < H:
        raise ValueError(f"cpu_kernels: voting head {hv} out of range for {H} heads")
    with _LOCK:
        _passes().vote_gradients(
            dZ.numpy(), P.numpy(), de.numpy(), Sn.numpy(), nd.numpy(), hv, alpha, _columns(B, n),
            nf.numpy(), dm.numpy(), tau, has_dmem,
        )  # fmt: skip
    if nd is not ndcol:
        ndcol.copy_(nd)
