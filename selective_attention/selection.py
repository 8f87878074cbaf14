"""The paper's selection: the penalty F that a layer computes from one head's own scores.

Leviathan, Kalman & Matias (ICLR 2025), in our words (DESIGN §3). With scaled causal logits
``l[k, j] = q[k] . k[j] * scale`` of the selecting head:

1. ``S[k, j] = relu(l[k, j])`` for ``1 <= j < k``, else 0: token k votes to mask earlier token j;
   a token never masks itself and the first token (BOS) is never masked.
   With a ``key_padding_mask`` (True = padding), padding is invisible to selection: padding tokens
   neither vote nor receive votes, and the protected token is each sequence's *first real* token
   (key 0 under right or no padding, so nothing changes there; key P under P tokens of left padding,
   so a left-padded sequence gets the same F, at its real tokens, as the unpadded one).
2. ``F[i, j] = sum_{k < i} S[k, j]``: the exclusive running sum down the query axis, so k's vote
   only affects queries after k.
3. Every head uses ``softmax_j(l_h[i, j] - F[i, j])``, causal. No stop-gradient, no clamp.

So F >= 0, ``F[:, 0] = 0`` (``F[:, first real token] = 0``), ``F[i, i] = 0`` and ``F[i, j]`` never
decreases with i.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Selection",
    "Voters",
    "as_selection",
    "selection_scores",
    "selection_penalty",
    "vote_mask",
    "votable_keys",
    "exclusive_cumsum",
    "grouped_matmul",
    "kv_heads",
]


@dataclass(frozen=True)
class Selection:
    """Who votes for F: the one value every layer and cache is configured with (backends receive it resolved for one
    call, as :class:`Voters`; the caches' prefills as :meth:`voters`' pair).

    ``Selection()`` is the paper: head 0's logits vote, one F shared by every head. Variants, each
    off by default and each tested:

    * ``Selection(head=h)``: head h votes instead;
    * ``Selection(per_head=True)``: every head votes with its own logits and gets its own F;
    * ``Selection(projection=True)``: a dedicated query/key pair votes (given to :meth:`voters` as
      ``projected``), so no head serves two roles; with ``per_head``, one pair per head.

    Validated once at construction (and against the head count by :meth:`validate`). A variant of who votes is a
    field here, its case in :meth:`voters` and :meth:`bind`, and its test; a change to the vote rule itself (what S
    is) is not: the rule ``relu(l)`` on ``1 <= j < k`` is also written in each backend's kernels (ops/chunked.py's
    forward clamp and backward gate, ops/triton/kernels.py) and in the decoding step (kv_cache.LayerCache.step's
    votes), each tested against :func:`selection_scores`.
    """

    head: int = 0
    per_head: bool = False
    projection: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.head, bool) or not isinstance(self.head, int) or self.head < 0:
            raise ValueError(f"Selection.head must be an int >= 0 (the voting head), got {self.head!r}.")
        for name in ("per_head", "projection"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Selection.{name} must be True or False, got {getattr(self, name)!r}.")
        if self.head != 0 and (self.per_head or self.projection):
            what = (
                "per_head=True gives every head its own F"
                if self.per_head
                else "projection=True votes with its own q/k"
            )
            raise ValueError(f"Selection(head={self.head}): {what}, so head does not apply; leave head=0.")

    def validate(self, n_heads: int) -> None:
        """Raise unless this selection fits a layer of ``n_heads`` heads."""
        if self.head >= n_heads:
            raise ValueError(
                f"Selection.head={self.head} is not a head of this layer: it has n_heads={n_heads} "
                f"(heads 0 .. {n_heads - 1})."
            )

    @property
    def heads(self) -> slice | None:
        """The layer's own heads that vote, as a slice of the head axis (``slice(h, h + 1)``, or
        ``slice(None)`` with ``per_head``), or None when a dedicated pair votes (``projection``)."""
        if self.projection:
            return None
        return slice(None) if self.per_head else slice(self.head, self.head + 1)

    def n_groups(self, n_heads: int) -> int:
        """How many penalties F a layer computes: ``n_heads`` with ``per_head``, else 1."""
        return n_heads if self.per_head else 1

    def voters(self, q: Tensor, k: Tensor, projected: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The queries and keys whose logits vote, from the layer's ``q`` ``[B, H, L, D]`` and ``k``
        ``[B, Hkv, L, D]`` (or, with ``projection``, the dedicated pair ``projected``): ``qs``
        ``[B, G, L, D]`` and ``ks`` ``[B, Gk, L, D]``, where query head h pairs with key head
        ``h // (H // Hkv)`` (grouped-query attention), so ``Gk = G`` except with ``per_head`` and
        ``Hkv < H`` (``Gk = Hkv``: keys are not repeated; :func:`grouped_matmul` reads them)."""
        if self.projection:
            if projected is None:
                raise ValueError(
                    "Selection(projection=True) votes with a dedicated (qs, ks) pair; pass it as projected."
                )
            return projected
        if self.per_head and q.shape[1] == k.shape[1]:
            return q, k
        heads = self.heads
        return q[:, heads], k[:, kv_heads(heads, q.shape[1], k.shape[1])]

    def bind(self, q: Tensor, k: Tensor, projected: tuple[Tensor, Tensor] | None = None, *, scale: float) -> Voters:
        """Validate this selection against one call's ``q, k`` ``[B, H, L, D]`` (and, with ``projection``,
        the dedicated pair ``projected``) and resolve it into the :class:`Voters` that backends read.

        ``scale`` is the attention logit scale; the votes use it too, except for a dedicated pair of
        another width ``Ds``, which votes with ``1 / sqrt(Ds)``.
        """
        B, H, Lq, D = q.shape
        self.validate(H)
        if Lq != k.shape[-2]:
            raise ValueError(
                f"selection=True is causal self-attention and needs Lq == Lk; got Lq={Lq}, Lk={k.shape[-2]}."
            )
        if not self.projection:
            if D == 0:  # every backend alike (the spec's selection_penalty refuses empty voters)
                raise ValueError(
                    f"selection votes with heads of q and k, which have D = 0 features ({tuple(q.shape)}); the votes "
                    "need D >= 1."
                )
            if projected is not None:
                raise ValueError(
                    f"selection_qk gives a dedicated voting pair, which only {self!r} with projection=True uses; "
                    "pass selection=Selection(projection=True) or drop selection_qk."
                )
            return Voters(scale=scale, heads=self.heads)
        if projected is None:
            raise ValueError(f"{self!r} votes with a dedicated pair: pass selection_qk=(qs, ks), each [B, G, L, Ds].")
        if not (isinstance(projected, (tuple, list)) and len(projected) == 2):
            raise TypeError("selection_qk must be a pair (qs, ks) of [B, G, L, Ds] tensors.")
        qs, ks = projected
        G = self.n_groups(H)
        for name, t in (("qs", qs), ("ks", ks)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"selection_qk {name} must be a 4-D [B, G, L, Ds] tensor.")
            if t.shape[0] != B or t.shape[1] != G or t.shape[2] != Lq:
                raise ValueError(
                    f"selection_qk {name} has shape {tuple(t.shape)}; expected [B, G, L, Ds] with B={B}, L={Lq} "
                    f"and G={G} for {self!r} (G in (1, {H}): one F for all heads, or one per head with "
                    f"per_head=True)."
                )
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"selection_qk {name} must match q's dtype and device ({q.dtype}, {q.device}).")
        if qs.shape != ks.shape:
            raise ValueError(f"selection_qk qs and ks must have one shape; got {tuple(qs.shape)}, {tuple(ks.shape)}.")
        Ds = qs.shape[-1]
        if Ds == 0:
            raise ValueError(
                f"selection_qk qs and ks have Ds = 0 features ({tuple(qs.shape)}); the votes need Ds >= 1."
            )
        return Voters(scale=vote_scale(scale, D, Ds), qs=qs, ks=ks)


def vote_scale(scale: float | None, D: int, Ds: int) -> float:
    """The votes' scale, for attention of head size ``D`` at ``scale`` (None: ``1 / sqrt(D)``) and voters of ``Ds``
    features: the attention's own when ``Ds == D`` (the voting heads' logits are their attention logits), else
    ``1 / sqrt(Ds)`` (a dedicated pair of another size). The one rule of every path that computes votes."""
    if Ds != D:
        return 1.0 / math.sqrt(Ds)
    return 1.0 / math.sqrt(D) if scale is None else scale


@dataclass(frozen=True, eq=False)
class Voters:
    """One call's resolved voters, what every paper-mode backend receives (:meth:`Selection.bind`).

    Either ``heads``, a slice of the layer's own heads (``slice(h, h + 1)``: head h votes, one F for
    all heads; ``slice(None)``: every head votes for itself) -- the fast paths then add the vote
    gradients into dq, dk in place -- or a dedicated pair ``qs, ks`` ``[B, G, L, Ds]``. ``scale``
    multiplies the voting logits.
    """

    scale: float
    heads: slice | None = None
    qs: Tensor | None = None
    ks: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.heads is None) == (self.qs is None or self.ks is None):
            raise ValueError("Voters takes either heads (a slice of the layer's heads) or both qs and ks.")

    def tensors(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``(qs, ks)``: the voting heads of ``q`` ``[B, H, L, D]`` and of ``k`` ``[B, Hkv, L, D]`` (query head
        h with key head ``h // (H // Hkv)``: ``qs`` ``[B, G, L, D]``, ``ks`` ``[B, Gk, L, D]``, Gk = Hkv for
        every head voting under grouped-query attention, else G), or the dedicated pair ``[B, G, L, Ds]``."""
        if self.heads is None:
            return self.qs, self.ks
        return q[:, self.heads], k[:, self.kv_heads(q.shape[1], k.shape[1])]

    def kv_heads(self, n_heads: int, n_kv_heads: int) -> slice:
        """The key/value heads that the voting query heads read, as a slice of ``k``'s head axis (needs ``heads``)."""
        if self.heads is None:
            raise ValueError("a dedicated voting pair (qs, ks) has no key/value heads of the layer.")
        return kv_heads(self.heads, n_heads, n_kv_heads)


def head_range(heads: slice, n_heads: int) -> range:
    """The heads of ``n_heads`` that the slice ``heads`` selects: ``range(*heads.indices(n_heads))``, written out for
    unit steps (torch.compile in PyTorch 2.5 and 2.6 cannot trace ``slice.indices``: a graph break in every layer)."""
    if heads.step not in (None, 1):
        return range(*heads.indices(n_heads))

    def bound(i: int | None, default: int) -> int:
        if i is None:
            return default
        return min(max(i + n_heads if i < 0 else i, 0), n_heads)

    return range(bound(heads.start, 0), bound(heads.stop, n_heads))


def kv_heads(heads: slice, n_heads: int, n_kv_heads: int) -> slice:
    """The key/value heads read by the query heads ``heads`` (``slice(h, h + 1)`` or every head,
    ``slice(None)``) of a layer with ``n_heads`` query and ``n_kv_heads`` key/value heads: query head h
    reads key head ``h // (n_heads // n_kv_heads)``, so ``slice(h // g, h // g + 1)``, or every key head."""
    chosen = head_range(heads, n_heads)
    if n_kv_heads == n_heads or len(chosen) == n_heads:
        return heads if n_kv_heads == n_heads else slice(None)
    if len(chosen) != 1:
        raise ValueError(f"heads must be one query head (slice(h, h + 1)) or all {n_heads}; got {heads}.")
    h = chosen[0] // (n_heads // n_kv_heads)
    return slice(h, h + 1)


def grouped_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` per head, for grouped-query attention: ``a`` ``[..., G, M, K]`` and ``b`` ``[..., Gk, K, N]``
    with ``G = g * Gk``; head i of ``a`` multiplies head ``i // g`` of ``b``. Returns ``[..., G, M, N]``.

    ``b`` is never repeated: the g heads of ``a`` that share a head of ``b`` are stacked along M (a copy
    of ``a`` when it is not contiguous there), ``[..., Gk, g * M, K] @ [..., Gk, K, N]``, and the
    result is a view. ``Gk == G`` is a plain ``torch.matmul``."""
    if a.dim() < 3 or b.dim() < 3 or a.shape[-3] == b.shape[-3]:
        return torch.matmul(a, b)
    G, Gk = a.shape[-3], b.shape[-3]
    if a.dim() != b.dim():  # broadcasting over leading dims: torch.matmul's own rule
        return torch.matmul(a, b)
    if Gk == 0 or G % Gk:
        raise ValueError(f"grouped_matmul: {G} heads of a cannot be grouped over {Gk} heads of b.")
    M, K = a.shape[-2:]
    out = torch.matmul(a.reshape(*a.shape[:-3], Gk, (G // Gk) * M, K), b)  # [..., Gk, g*M, N]
    return out.view(*a.shape[:-3], G, M, out.shape[-1])


def _groups_of(pair: object) -> int | None:
    """G of a would-be ``(qs, ks)`` pair, or None when it is malformed (:meth:`Selection.bind` says how)."""
    if isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], Tensor) and pair[0].dim() == 4:
        return pair[0].shape[1]
    return None


def as_selection(
    selection: bool | Selection,
    *,
    head: int | None = None,
    per_head: bool | None = None,
    projection: bool | None = None,
    projected: tuple[Tensor, Tensor] | None = None,
    stacklevel: int = 3,
) -> Selection | None:
    """The public ``selection`` argument as a :class:`Selection` (None = standard attention).

    ``True`` is ``Selection()``, the paper. The deprecated keyword arguments ``selection_head``,
    ``selection_per_head``, ``selection_projection`` (``head``, ``per_head``, ``projection`` here) and
    ``selection=True`` with a ``selection_qk`` pair (``projected``: ``Selection(projection=True)``,
    per head when the pair has G > 1) are mapped here, and only here, with a ``DeprecationWarning``
    (``stacklevel`` as in :func:`warnings.warn`, counted from here: it should point at the user's call).
    """
    legacy = {
        name: value
        for name, value in (
            ("selection_head", head),
            ("selection_per_head", per_head),
            ("selection_projection", projection),
        )
        if value is not None
    }
    if isinstance(selection, Selection):
        if legacy:
            raise ValueError(
                f"selection={selection!r} already says who votes; drop {', '.join(legacy)} "
                "(deprecated aliases of the Selection fields)."
            )
        return selection
    if not isinstance(selection, bool):
        raise TypeError(f"selection must be True, False or a Selection, got {type(selection).__name__}.")
    if not selection:
        if legacy or projected is not None:  # selection_head=0 too (the paper's head, but nothing selects here)
            raise ValueError(
                "selection_head, selection_per_head, selection_projection and selection_qk refine the paper's "
                "selection; pass selection=True (or selection=Selection(...)) to use them."
            )
        return None
    if projected is not None:
        legacy["selection_qk"] = projected
        projection = True
        per_head = per_head or (_groups_of(projected) or 1) > 1
    if legacy:
        sel = Selection(head=head or 0, per_head=bool(per_head), projection=bool(projection))
        warnings.warn(
            f"{', '.join(legacy)} with selection=True {'are' if len(legacy) > 1 else 'is'} deprecated; pass "
            f"selection={sel!r}{' with selection_qk' if projected is not None else ''}.",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return sel
    return Selection()


def votable_keys(key_padding_mask: Tensor) -> Tensor:
    """Keys that may receive votes, bool ``(B, Lk)`` from a ``(B, Lk)`` key_padding_mask (True = padding):
    real tokens other than each sequence's first real one (the protected token, BOS under left padding).

    Without padding this is ``j >= 1``. Built from a running count, O(B Lk)::

        padding  T T F F F        (two tokens of left padding)
        votable  F F F T T        (key 2, the first real token, is protected)
    """
    real = ~key_padding_mask
    return real & (real.cumsum(dim=-1) >= 2)


def vote_mask(
    Lq: int,
    Lk: int,
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Where a vote ``S[k, j]`` may be nonzero: ``1 <= j < k`` (bool ``(Lq, Lk)``).

    Rows are the voting tokens ``k = offset .. offset + Lq - 1``; columns the keys ``j = 0 .. Lk - 1``.
    With ``key_padding_mask`` (bool ``(B, Lk)``, True = padding) it is ``(B, Lq, Lk)``: ``j < k``, the
    voter k and the key j both real, and j not the sequence's first real token (:func:`votable_keys`).
    """
    k = torch.arange(offset, offset + Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    if key_padding_mask is None:
        return (j < k) & (j >= 1)
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be torch.bool (True = padding), got {key_padding_mask.dtype}.")
    if key_padding_mask.dim() != 2 or key_padding_mask.shape[1] != Lk or offset + Lq > Lk:
        raise ValueError(
            f"key_padding_mask must be (B, Lk) with Lk = {Lk} >= offset + Lq = {offset + Lq} (voters are "
            f"tokens of the same sequence); got {tuple(key_padding_mask.shape)}."
        )
    voters = ~key_padding_mask[:, offset : offset + Lq]  # [B, Lq]
    return (j < k) & voters[:, :, None] & votable_keys(key_padding_mask)[:, None, :]


def selection_scores(
    qs: Tensor,
    ks: Tensor,
    *,
    scale: float | None = None,
    offset: int = 0,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The votes ``S = relu(qs ks^T * scale)`` restricted to ``1 <= j < k`` (:func:`vote_mask`).

    Args:
        qs: ``[..., Lq, Ds]`` the selecting queries (rows are tokens ``offset ..``).
        ks: ``[..., Lk, Ds]`` the keys (tokens ``0 .. Lk - 1``); or, grouped-query attention, ``ks``
            ``[..., Gk, Lk, Ds]`` against ``qs`` ``[..., G, Lq, Ds]``: query head i with key head ``i // (G // Gk)``.
        scale: default ``1 / sqrt(Ds)``.
        key_padding_mask: bool ``(B, Lk)``, True = padding; then qs, ks are ``[B, ..., L, Ds]``, padding
            neither votes nor is voted on, and each sequence's first real token is the protected one.

    Returns:
        ``[..., Lq, Lk]``, zero outside the vote mask.
    """
    for name, t in (("qs", qs), ("ks", ks)):
        if not isinstance(t, Tensor) or t.dim() < 2 or not t.is_floating_point() or t.shape[-1] == 0:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating [..., L, Ds] tensor with Ds >= 1, got {got}.")
    if qs.dtype != ks.dtype or qs.shape[-1] != ks.shape[-1]:
        raise ValueError(
            f"qs and ks must share a dtype and a feature size Ds; got qs {qs.dtype} {tuple(qs.shape)}, "
            f"ks {ks.dtype} {tuple(ks.shape)}."
        )
    if scale is None:
        scale = 1.0 / math.sqrt(qs.shape[-1])
    logits = grouped_matmul(qs, ks.transpose(-2, -1)) * scale
    Lq, Lk = qs.shape[-2], ks.shape[-2]
    allowed = vote_mask(Lq, Lk, offset=offset, device=qs.device, key_padding_mask=key_padding_mask)
    if key_padding_mask is not None:
        if logits.dim() < 3 or logits.shape[0] != key_padding_mask.shape[0]:
            raise ValueError(
                f"with key_padding_mask {tuple(key_padding_mask.shape)}, qs and ks must be [B, ..., L, Ds] "
                f"with the same B; got qs {tuple(qs.shape)}."
            )
        allowed = allowed.view(allowed.shape[0], *[1] * (logits.dim() - 3), Lq, Lk)  # [B, 1.., Lq, Lk]
    return torch.relu(logits).masked_fill(~allowed, 0.0)


def selection_penalty(
    q0: Tensor, k0: Tensor, *, scale: float | None = None, key_padding_mask: Tensor | None = None
) -> Tensor:
    """The paper's F from the selecting head's queries and keys (naive: materialises ``[..., L, L]``).

    Args:
        q0: ``[B, L, D]`` (or any ``[..., L, D]``) queries of the selecting head.
        k0: same shape, its keys; or, for grouped-query heads, ``[B, Gk, L, D]`` against ``q0``
            ``[B, G, L, D]`` (``G % Gk == 0``; query head i with key head ``i // (G // Gk)``).
        scale: logit scale, default ``1 / sqrt(D)``.
        key_padding_mask: bool ``(B, L)``, True = padding (q0, k0 then ``[B, ..., L, D]``): padding
            neither votes nor is voted on, and the protected token is each sequence's first real one.

    Returns:
        F ``[..., L, L]`` (``[B, L, L]`` for ``[B, L, D]`` inputs, ``[B, G, L, L]`` for grouped heads):
        ``F[b, i, j] = sum_{k < i} relu(q0[k] . k0[j] * scale)`` over ``1 <= j < k``
        (with padding: over real ``k``, real ``j < k`` other than the first real token).
        For inspection and plots; the attention backends never build it whole.

    Example::

        F = selection_penalty(q[:, 0], k[:, 0])     # head 0 of q, k: [B, H, L, D]
        masked = F > 1.0                            # (query, key) pairs down-weighted by > e
    """
    grouped = (
        q0.dim() == k0.dim() == 4
        and (q0.shape[0], *q0.shape[2:]) == (k0.shape[0], *k0.shape[2:])
        and _divides(k0.shape[1], q0.shape[1])
    )
    if q0.shape != k0.shape and not grouped:
        raise ValueError(
            f"q0 and k0 must have the same shape [..., L, D] (or [B, G, L, D] and [B, Gk, L, D] with G % Gk == 0, "
            f"grouped-query heads); got {tuple(q0.shape)}, {tuple(k0.shape)}."
        )
    S = selection_scores(q0, k0, scale=scale, key_padding_mask=key_padding_mask)  # [..., L, L]
    return exclusive_cumsum(S, dim=-2)  # row i sums the votes of rows k < i


def is_int(x: object) -> bool:
    """An integer, not a bool: a Python int, a numpy integer, a 0-d integer tensor (a bool tensor's index is 0 or 1,
    but True is no count)."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.dtype == torch.bool):
        return False
    if getattr(getattr(x, "dtype", None), "kind", None) == "b":  # a NumPy bool (older NumPy gives it an __index__)
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def layer_indices(layers: object, name: str, n_layers: int | None = None) -> tuple[int, ...]:
    """``layers`` (a sequence of Python, NumPy or 0-d tensor integers) as a tuple of plain ints (``config.json`` and
    checkpoints serialise them), each ``>= 0`` (and ``< n_layers`` when given); else a ``ValueError`` naming ``name``
    (the option as the caller spells it) and the fix. One rule for ``GPTConfig.selection_layers`` and the Hugging Face
    settings' ``layers``."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable) or getattr(layers, "ndim", None) == 0:
        hint = f"; for one layer pass {name}=[{operator.index(layers)}]" if is_int(layers) else ""
        raise ValueError(f"{name} must be a sequence of layer indices (e.g. [0] for one layer){hint}, got {layers!r}.")
    out = tuple(layers)
    bad = [i for i in out if not (is_int(i) and 0 <= operator.index(i) < (n_layers or math.inf))]
    if bad:
        within = f"in [0, n_layer={n_layers})" if n_layers is not None else ">= 0"
        raise ValueError(f"{name} {bad} are not layer indices (ints {within}).")
    return tuple(operator.index(i) for i in out)


def _divides(a: int, b: int) -> bool:
    return a > 0 and b % a == 0


def exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """``out[i] = sum_{k < i} x[k]`` along ``dim`` (a shifted cumsum; ``cumsum - x`` would round)."""
    c = torch.cumsum(x, dim=dim)
    if c.shape[dim] == 0:
        return c
    return torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c.narrow(dim, 0, c.shape[dim] - 1)], dim=dim)
