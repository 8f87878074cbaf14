"""Functional selective attention on ``[B, H, L, D]`` tensors: validate once, dispatch to a backend."""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
from torch import Tensor

from .masks import NormalizedMask, has_values, normalize_mask
from .ops import naive
from .ops.chunked import check_chunk_size
from .ops.registry import NAMES, PREFERENCE, Request, backend_module, dispatch
from .ops.transforms import reads_values, vmapped
from .selection import Selection, as_selection, selection_penalty

__all__ = ["selective_attention", "attention_weights", "selection_penalty", "Selection"]

Backend = Literal["auto", "triton", "chunked", "sdpa", "naive"]
BACKENDS = NAMES  # "auto", then the backends in the order "auto" tries them


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors as ``torch.autocast`` gives them to ``F.scaled_dot_product_attention``: inside an autocast region
    for their device, floating tensors other than float64 in its dtype (``torch.get_autocast_dtype``); unchanged
    outside one. Under autocast a model's q, k and v may arrive in different dtypes (Hugging Face's rotary embedding
    returns float32 q, k beside a bfloat16 v), which SDPA accepts there."""
    tensors_given = [t for t in tensors if isinstance(t, Tensor)]  # (not next(..., None): torch 2.5 cannot trace it)
    if not tensors_given:
        return tensors
    first = tensors_given[0]
    try:
        enabled = torch.is_autocast_enabled(first.device.type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return tensors
    if not enabled:
        return tensors
    dt = torch.get_autocast_dtype(first.device.type)
    return tuple(
        t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool = False, given: tuple | None = None) -> None:
    """Shapes and dtypes of one call's q, k, v; ``given``: their dtypes as passed, when autocast cast them."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [B, H, L, D], got {t.dim()}-D {tuple(t.shape)}. "
                f"(For [B, L, d_model] inputs use the SelectiveAttention module.)"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}.")
    if not (q.dtype == k.dtype == v.dtype):
        passed = "" if given is None else (
            f" (passed as {', '.join(str(d) for d in given)}; torch.autocast casts all but float64 to its dtype: pass "
            "float64 to none or all of them)"
        )  # fmt: skip
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}{passed}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}.")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be True or False, got {enable_gqa!r}.")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v must share [B, H] (H up to enable_gqa=True); the batch sizes differ: {shapes}.")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads; got {shapes}.")
    H, Hkv = q.shape[1], k.shape[1]
    if H != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"q has H={H} heads but k, v have {Hkv}; pass enable_gqa=True for grouped-query attention "
                f"(k, v with Hkv heads, H % Hkv == 0), or give k, v H heads too. Got {shapes}."
            )
        if Hkv == 0 or H % Hkv:
            raise ValueError(
                f"enable_gqa=True needs the query heads H={H} to be a multiple of the key/value heads "
                f"Hkv={Hkv} (query head h reads key/value head h // (H // Hkv)); got {shapes}."
            )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length Lk; got k {tuple(k.shape)}, v {tuple(v.shape)}.")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim D; got q {tuple(q.shape)}, k {tuple(k.shape)}.")


def _request(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selective_mask: Tensor | None,
    *,
    is_causal: bool,
    key_padding_mask: Tensor | None,
    selection: bool | Selection,
    selection_qk: tuple[Tensor, Tensor] | None,
    dropout_p: float,
    scale: float | None,
    chunk_size: int | None = None,
    memory_tau: float | None = None,
    selection_head: int | None = None,
    selection_per_head: bool | None = None,
    enable_gqa: bool = False,
    backend: str = "auto",
) -> Request:
    """Validate one call, once, into the :class:`~selective_attention.ops.registry.Request` every backend reads (under
    ``torch.autocast``, q, k, v and a ``selection_qk`` pair in its dtype first: :func:`autocast_inputs`)."""
    given = tuple(getattr(t, "dtype", None) for t in (q, k, v))
    q, k, v = autocast_inputs(q, k, v)
    if isinstance(selection_qk, (tuple, list)) and len(selection_qk) == 2:
        selection_qk = autocast_inputs(*selection_qk)
    cast = given != tuple(getattr(t, "dtype", None) for t in (q, k, v))
    _check_qkv(q, k, v, enable_gqa, given if cast else None)
    if not isinstance(is_causal, bool):  # a truthy "false" or tensor would silently mask the future
        raise TypeError(f"is_causal must be True or False, got {is_causal!r}.")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}.")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(
            f"scale must be a finite number (a Python or NumPy real; default 1 / sqrt(D)), got {scale!r}"
            + (": pass float(scale)." if isinstance(scale, Tensor) else ".")
        )
    scale = float(scale)  # a numpy scalar too
    for name, m in (("selective_mask", selective_mask), ("key_padding_mask", key_padding_mask)):
        if isinstance(m, Tensor) and vmapped(m):
            raise ValueError(
                f"torch.vmap over {name} is not supported: its values are checked and folded in Python, which vmap "
                f"cannot batch. Give the per-example masks a batch dimension instead ({name} takes "
                f"{'[B, H, Lq, Lk]' if name == 'selective_mask' else '[B, Lk]'}), or vmap over q, k, v with one "
                f"mask shared by every example."
            )
    chosen = as_selection(
        selection, head=selection_head, per_head=selection_per_head, projected=selection_qk, stacklevel=4
    )
    B, H, Lq, _ = q.shape
    voters = None if chosen is None else chosen.bind(q, k, selection_qk, scale=scale)  # validated once, against H
    if memory_tau is not None and (
        voters is None
        or isinstance(memory_tau, bool)
        or not isinstance(memory_tau, numbers.Real)
        or not 0 < memory_tau < math.inf
    ):  # tau = inf would count nothing: a memory loss of 0 with no gradient
        if voters is None:
            raise ValueError(
                f"memory_tau={memory_tau!r} counts the keys masked by the paper's F, and selection is off: pass "
                "selection=True (or a Selection), or drop memory_tau."
            )
        raise ValueError(f"memory_tau must be a finite number > 0; got {memory_tau!r}.")
    # Compiled calls read no mask value (a graph break) unless the Triton kernel, which takes no mask, could serve
    # the call once an all-False mask were dropped: every other kernel (SDPA's included) takes masks as they are.
    # nor do calls on tensors without values (the meta device, fake tensors)
    read_values = reads_values(q)
    triton_here = backend == "triton" or (backend == "auto" and q.device.type in PREFERENCE["triton"][1])
    # (compiled: the tracer's tensors are fake, and has_values is not traced; meta or fake in eager: nothing to read)
    if not read_values and (torch.compiler.is_compiling() or has_values(q)) and triton_here:
        plain = Request(q, k, v, NormalizedMask(None, None, False), scale, voters, memory_tau, dropout_p, chunk_size)
        read_values = backend_module("triton").supports(plain) is None
    mask = normalize_mask(
        selective_mask,
        B=B,
        H=H,
        Lq=Lq,
        Lk=k.shape[-2],
        dtype=q.dtype,
        device=q.device,
        # paper mode is causal in every backend; folding is_causal into the mask too would turn a
        # [B, 1, 1, L] key padding mask into [B, 1, L, L]
        is_causal=is_causal and chosen is None,
        key_padding_mask=key_padding_mask,
        read_values=read_values,
    )
    return Request(q, k, v, mask, scale, voters, memory_tau, dropout_p, chunk_size)


def selective_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selective_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    selection: bool | Selection = False,
    selection_qk: tuple[Tensor, Tensor] | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: Backend = "auto",
    chunk_size: int | None = None,
    memory_tau: float | None = None,
    selection_head: int | None = None,
    selection_per_head: bool | None = None,
    enable_gqa: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-head selective attention ``softmax(q k^T * scale - F) v``.

    Args:
        q: ``[B, H, Lq, D]`` queries.
        k: ``[B, H, Lk, D]`` keys (``[B, Hkv, Lk, D]`` with ``enable_gqa``).
        v: ``[B, H, Lk, Dv]`` values (``[B, Hkv, Lk, Dv]`` with ``enable_gqa``).
        selective_mask: ``None``, bool (True = key removed) or float F (finite values are
            *subtracted* from the scaled logits; +inf or -inf removes the key). 2-D ``(Lq, Lk)`` or
            4-D ``(B|1, H|1, Lq, Lk)``. Example, ``Lq = Lk = 3``, float F::

                F = [[0,   inf, inf],        query 0 sees key 0
                     [0,   0,   inf],        query 1 sees keys 0, 1
                     [2.0, 0,   0  ]]        query 2 sees all, key 0 weighted down by e^-2

        is_causal: also remove future keys, ``j > i + Lk - Lq`` (queries aligned to the end of the
            keys, which for ``Lq == Lk`` is the usual upper triangle).
        key_padding_mask: bool ``(B, Lk)``, True = padding, removed for every query. With
            ``selection``, padding is also invisible to the votes (it neither votes nor is voted on)
            and the protected token is each sequence's first real one, so a left-padded sequence
            gives, at its real rows, the unpadded sequence's outputs (rows with no real key: zeros).
        selection: the paper's selective attention (causal self-attention; ``is_causal`` is implied).
            ``True`` is ``Selection()``, the paper: F is computed from head 0's own logits,
            ``F[i, j] = sum_{k<i} relu(l_0[k, j])`` over ``1 <= j < k``, and subtracted from every
            head. A :class:`~selective_attention.selection.Selection` says who votes otherwise
            (``head=h``, ``per_head=True``, ``projection=True``). A user mask adds to F. Key 0 (BOS) is
            never masked; under key padding the first non-padding key takes its place::

                key_padding_mask  T T F F F      (left padding, P = 2)
                protected key         ^          (key 2; key 0 without padding or with right padding)
        selection_qk: the dedicated voting pair of ``Selection(projection=True)`` (required there,
            refused elsewhere): ``(qs, ks)``, each ``[B, G, L, Ds]`` (e.g. from a dedicated
            projection); G = 1 shares one F across heads, G = H (``per_head=True``) gives each head
            its own. Votes use ``scale`` when ``Ds == D``, else ``1 / sqrt(Ds)``.
        dropout_p: dropout on the attention weights; applied as given (pass 0.0 in eval).
        scale: logit scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` takes the first backend that serves the call, in this order:
            ``"triton"`` (paper mode, the fused GPU kernel: CUDA with Triton installed, heads of q/k
            voting, no user mask, key padding, dropout or ``memory_tau``), ``"chunked"`` (paper mode,
            exact and memory-lean, no dropout), ``"sdpa"`` (standard attention, any mask, dropout) and
            ``"naive"`` (the spec: everything, paper mode with dropout included). A named backend runs
            the call or raises ``ValueError`` saying why it cannot, and what to use instead.
        chunk_size: for ``"chunked"``, an int >= 1: the unit of the query blocks it walks (a block spans
            several; ``None``: ``default_chunk_size``, 64, or 32 once ``[B, H, 64, L]`` temporaries would pass
            4 MiB). Any other value raises ``ValueError``.
        memory_tau: with ``selection``, also return the paper's soft count of masked keys per query,
            ``sum_j min(F[i, j], tau) / tau`` as ``[B, G, L]`` (G = 1, or H with per-head F; float32 for
            float16 / bfloat16 inputs: the loss subtracts them from a count of ~L tokens), differentiable:
            the memory loss is built from it (:mod:`selective_attention.model`).
        selection_head, selection_per_head: deprecated aliases of ``Selection(head=...)`` and
            ``Selection(per_head=...)`` (with ``selection=True``); a ``DeprecationWarning`` says what to
            pass instead. So is ``selection=True`` with ``selection_qk`` (``Selection(projection=True)``).
        enable_gqa: grouped-query attention, as in ``F.scaled_dot_product_attention``: ``k``, ``v`` have
            ``Hkv`` heads, ``H % Hkv == 0``, and query head h reads key/value head ``h // (H // Hkv)``
            (no backend repeats the keys except the naive spec). In paper mode a voting query head h
            votes with key head ``h // (H // Hkv)`` (the paper's head 0 with key head 0); masks and a
            dedicated ``selection_qk`` pair keep their shapes (H query heads). Without it, ``Hkv != H``
            is an error.

    Inside ``torch.autocast``, q, k, v (and ``selection_qk``) are first cast to the autocast dtype, as autocast
    does for ``F.scaled_dot_product_attention`` (float64 tensors excepted).

    Returns:
        ``[B, H, Lq, Dv]`` (and the ``[B, G, L]`` masked counts when ``memory_tau`` is given). A query
        whose keys are all removed gets zeros (not NaN), and finite (zero) gradients.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    chunk_size = check_chunk_size(chunk_size)
    req = _request(
        q, k, v, selective_mask, is_causal=is_causal, key_padding_mask=key_padding_mask, selection=selection,
        selection_qk=selection_qk, dropout_p=dropout_p, scale=scale, chunk_size=chunk_size, memory_tau=memory_tau,
        selection_head=selection_head, selection_per_head=selection_per_head, enable_gqa=enable_gqa, backend=backend,
    )  # fmt: skip
    out, rows = dispatch(backend, req)
    return out if memory_tau is None else (out, rows)


def attention_weights(
    q: Tensor,
    k: Tensor,
    selective_mask: Tensor | None = None,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    selection: bool | Selection = False,
    selection_qk: tuple[Tensor, Tensor] | None = None,
    scale: float | None = None,
    selection_head: int | None = None,
    selection_per_head: bool | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """The attention weights ``[B, H, Lq, Lk]`` (before dropout) that :func:`selective_attention`
    uses, for inspection and plots: ``q`` ``[B, H, Lq, D]``, ``k`` ``[B, H, Lk, D]`` (``[B, Hkv, Lk, D]``
    with ``enable_gqa``). Same mask and selection arguments (and autocast) as :func:`selective_attention`; rows with
    every key removed are 0."""
    req = _request(
        q, k, k, selective_mask, is_causal=is_causal, key_padding_mask=key_padding_mask, selection=selection,
        selection_qk=selection_qk, dropout_p=0.0, scale=scale, selection_head=selection_head,
        selection_per_head=selection_per_head, enable_gqa=enable_gqa,
    )  # fmt: skip
    return naive.weights(req)
