"""``SelectiveAttention``: the seed's multi-head module, ``[B, L, d_model]`` in and out."""

from __future__ import annotations

import numbers
import operator

import torch
from torch import Tensor, nn

from .functional import BACKENDS, Backend, attention_weights, selective_attention
from .selection import Selection, as_selection, is_int, selection_penalty

__all__ = ["SelectiveAttention"]


class SelectiveAttention(nn.Module):
    """Multi-head attention ``softmax(Q K^T / sqrt(d_k) - F) V``, F given by the user and/or
    computed by the layer itself (the paper's selection).

    Args:
        d_model: model width; the inputs' last dim.
        n_heads: number of heads; must divide ``d_model`` (``d_k = d_model // n_heads``).
        dropout: dropout probability on the attention weights, in ``[0, 1)``; active in training only.
        selection: the paper's selective attention (causal self-attention): ``True`` is
            ``Selection()``, F computed from head 0's own logits and subtracted from every head, no new
            parameters. A :class:`~selective_attention.selection.Selection` picks who votes:
            ``head=h`` (does the choice matter?), ``per_head=True`` (every head its own F from its own
            logits: H penalties instead of one, still no new parameters) or ``projection=True`` (a
            dedicated query/key pair ``sel_q_proj``, ``sel_k_proj``, ``d_model -> d_k`` each,
            ``d_model -> H * d_k`` with ``per_head``, so that no attention head serves two roles; adds
            parameters).
        bias: whether the projections have a bias.
        backend: see :func:`selective_attention.functional.selective_attention`.
        n_kv_heads: key/value heads for grouped-query attention (``None``: ``n_heads``, multi-head);
            must divide ``n_heads``. ``k_proj``, ``v_proj`` then give ``n_kv_heads * d_k`` features and
            query head h reads key/value head ``h // (n_heads // n_kv_heads)`` (1: multi-query). With
            ``selection``, a voting head h votes with its own key head (the paper's head 0 with key
            head 0); a dedicated voting pair keeps ``d_model -> G * d_k``.
        selection_head, selection_per_head, selection_projection: deprecated aliases of the
            :class:`~selective_attention.selection.Selection` fields (with ``selection=True``).

    Attributes:
        q_proj, out_proj: ``nn.Linear(d_model, d_model)``; k_proj, v_proj: ``nn.Linear(d_model,
        n_kv_heads * d_k)`` (``d_model`` without grouped-query attention).

    Example::

        attn = SelectiveAttention(512, 8)
        x = torch.randn(2, 10, 512)
        y = attn(x, x, x, is_causal=True)        # [2, 10, 512]
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float = 0.1,
        *,
        selection: bool | Selection = False,
        bias: bool = True,
        backend: Backend = "auto",
        selection_head: int | None = None,
        selection_per_head: bool | None = None,
        selection_projection: bool | None = None,
        n_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        if not is_int(d_model) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}.")
        d_model = operator.index(d_model)  # a NumPy integer too, as nn.Linear takes
        if not is_int(n_heads) or n_heads <= 0:
            raise ValueError(f"n_heads must be a positive int, got {n_heads!r}.")
        n_heads = operator.index(n_heads)  # a NumPy integer too, as nn.Linear takes
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by n_heads ({n_heads}); "
                f"e.g. n_heads in {[h for h in range(1, min(d_model, 64) + 1) if d_model % h == 0]}."
            )
        if n_kv_heads is None:
            n_kv_heads = n_heads
        if not is_int(n_kv_heads) or n_kv_heads <= 0:
            raise ValueError(f"n_kv_heads must be a positive int dividing n_heads, or None; got {n_kv_heads!r}.")
        n_kv_heads = operator.index(n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(
                f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads}) (grouped-query attention: each key/value "
                f"head serves n_heads // n_kv_heads query heads); e.g. n_kv_heads in "
                f"{[h for h in range(1, n_heads + 1) if n_heads % h == 0]}."
            )
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
        sel = as_selection(selection, head=selection_head, per_head=selection_per_head, projection=selection_projection)
        if sel is not None:
            sel.validate(n_heads)
            if backend == "sdpa":  # every forward would be refused: say so now
                raise ValueError(
                    "backend='sdpa' is standard attention only and cannot run selection; use backend='auto' "
                    "(or 'chunked', 'triton', 'naive') with selection, or selection=False with 'sdpa'."
                )
        elif backend in ("chunked", "triton"):  # every forward would be refused
            raise ValueError(
                f"backend={backend!r} is the paper-mode path and needs selection=True; use backend='auto' or 'sdpa' "
                "for standard attention."
            )
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.d_k = d_model // n_heads
        self.dropout = dropout
        self.backend: Backend = backend
        self.selection: Selection | None = sel  # None: standard attention
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.d_k, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.d_k, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.sel_q_proj: nn.Linear | None = None
        self.sel_k_proj: nn.Linear | None = None
        if sel is not None and sel.projection:
            G = sel.n_groups(n_heads)
            self.sel_q_proj = nn.Linear(d_model, G * self.d_k, bias=bias)
            self.sel_k_proj = nn.Linear(d_model, G * self.d_k, bias=bias)

    def extra_repr(self) -> str:
        s = f"d_model={self.d_model}, n_heads={self.n_heads}, dropout={self.dropout}"
        if self.n_kv_heads != self.n_heads:
            s += f", n_kv_heads={self.n_kv_heads}"
        if self.selection is not None:
            who = "per_head" if self.selection.per_head else f"head={self.selection.head}"
            s += f", selection=True ({who}{', projection' if self.selection.projection else ''})"
        return s

    def _check_inputs(self, Q: Tensor, K: Tensor, V: Tensor) -> None:
        w = self.q_proj.weight
        # a replaced projection (dynamic quantization: weight() is a method) checks its own inputs' dtype and device
        wdt = w.dtype if isinstance(w, Tensor) else torch.get_default_dtype()
        for name, t in (("Q", Q), ("K", K), ("V", V)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
            if t.dim() != 3:
                if t.dim() == 2:
                    hint = f"; for a single sequence use {name}.unsqueeze(0)"
                elif t.dim() == 4:
                    hint = (
                        "; for queries/keys/values already split into heads [B, H, L, d_k] use "
                        "selective_attention.functional.selective_attention"
                    )
                else:
                    hint = ""
                raise ValueError(f"{name} must be 3-D [B, L, d_model], got {t.dim()}-D {tuple(t.shape)}{hint}.")
            if t.shape[-1] != self.d_model:
                raise ValueError(
                    f"{name} has {t.shape[-1]} features (last dim of {tuple(t.shape)}) but this module was built "
                    f"with d_model={self.d_model}; project the inputs to {self.d_model} features, or build "
                    f"SelectiveAttention({t.shape[-1]}, n_heads) for them."
                )
            if not t.dtype.is_floating_point:
                # integer ids, bool masks or complex values are not activations: no module dtype would help
                raise TypeError(
                    f"{name} is {t.dtype}, but attention inputs must be floating point (the module's weights are "
                    f"{wdt}); convert with {name}.to({wdt}) ({name}.float() for float32)."
                )
        if not (Q.shape[0] == K.shape[0] == V.shape[0]):
            sizes = {"Q": Q.shape[0], "K": K.shape[0], "V": V.shape[0]}
            ones = [n for n, b in sizes.items() if b == 1]
            hint = f"; expand a batch of one, e.g. {ones[0]}.expand({max(sizes.values())}, -1, -1)" if ones else ""
            raise ValueError(
                f"Q, K, V must share the batch size (no broadcasting); got {Q.shape[0]}, {K.shape[0]}, {V.shape[0]}"
                f"{hint}."
            )
        if K.shape[1] != V.shape[1]:
            raise ValueError(
                f"K and V must have the same length (one value per key); got K {tuple(K.shape)}, V {tuple(V.shape)}."
            )
        if not isinstance(w, Tensor):
            return
        try:  # inside torch.autocast the projections take any floating dtype, as nn.Linear does
            autocast = torch.is_autocast_enabled(w.device.type)
        except RuntimeError:  # a device type autocast does not know
            autocast = False
        for name, t in (("Q", Q), ("K", K), ("V", V)):
            if t.dtype != w.dtype and not (autocast and t.dtype != torch.float64):  # autocast leaves float64 alone
                raise TypeError(
                    f"{name} is {t.dtype} but the module's weights are {w.dtype}; "
                    f"use module.to({t.dtype}) or {name}.to({w.dtype})."
                )
            if t.device != w.device:
                raise ValueError(
                    f"{name} is on {t.device} but the module is on {w.device}; "
                    f"use module.to({name}.device) or {name}.to('{w.device}')."
                )

    def _heads(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        return x.view(B, L, C // self.d_k, self.d_k).transpose(1, 2)  # [B, H (or Hkv, or G), L, d_k]

    def _projected(self, Q: Tensor, K: Tensor) -> tuple[Tensor, Tensor] | None:
        """The dedicated voting pair ``[B, G, L, d_k]`` of ``Selection(projection=True)``, else None."""
        if self.sel_q_proj is None:
            return None
        return self._heads(self.sel_q_proj(Q)), self._heads(self.sel_k_proj(K))

    def selection_penalty(
        self, Q: Tensor, K: Tensor | None = None, *, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """The F this layer computes for the sequence ``Q`` (``K`` defaults to ``Q``): ``[B, G, L, L]``,
        G = 1, or H with ``Selection(per_head=True)`` (query head h against its key head under grouped-query
        attention). ``key_padding_mask`` (bool ``[B, L]``, True = padding) as in :meth:`forward`: padding
        neither votes nor is voted on, and each sequence's first real token is the protected one.
        Materialises F: for inspection and plots."""
        if self.selection is None:
            raise ValueError("selection_penalty needs a layer built with selection=True (or a Selection).")
        K = Q if K is None else K
        self._check_inputs(Q, K, K)
        q, k = self._heads(self.q_proj(Q)), self._heads(self.k_proj(K))
        qs, ks = self.selection.voters(q, k, self._projected(Q, K))
        return selection_penalty(qs, ks, scale=1.0 / self.d_k**0.5, key_padding_mask=key_padding_mask)

    def forward(
        self,
        Q: Tensor,
        K: Tensor,
        V: Tensor,
        selective_mask: Tensor | None = None,
        *,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from ``Q`` to ``K``/``V``.

        Args:
            Q: ``[B, Lq, d_model]``; K, V: ``[B, Lk, d_model]`` (``Lq != Lk`` is cross-attention).
            selective_mask: bool (True removes) or float F (subtracted; +-inf removes), 2-D
                ``(Lq, Lk)`` or 4-D ``(B|1, H|1, Lq, Lk)``.
            is_causal: remove future keys (``j > i + Lk - Lq``).
            key_padding_mask: bool ``(B, Lk)``, True = padding.
            need_weights: also return the attention weights ``[B, H, Lq, Lk]`` (before dropout).

        Returns:
            ``[B, Lq, d_model]``, or ``(output, weights)`` when ``need_weights``.
        """
        self._check_inputs(Q, K, V)
        if not isinstance(need_weights, bool):
            raise TypeError(f"need_weights must be True or False, got {need_weights!r}.")
        B, Lq, _ = Q.shape
        q = self._heads(self.q_proj(Q))  # [B, H, Lq, d_k]
        k = self._heads(self.k_proj(K))  # [B, Hkv, Lk, d_k]
        v = self._heads(self.v_proj(V))  # [B, Hkv, Lk, d_k]
        p = self.dropout if self.training else 0.0
        kw = dict(is_causal=is_causal, key_padding_mask=key_padding_mask, enable_gqa=self.n_kv_heads != self.n_heads)
        if self.selection is not None:
            kw["selection"], kw["selection_qk"] = self.selection, self._projected(Q, K)  # (not update: torch 2.5)
        out = selective_attention(q, k, v, selective_mask, dropout_p=p, backend=self.backend, **kw)  # [B, H, Lq, d_k]
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, self.d_model))  # [B, Lq, d_model]
        if not need_weights:
            return out
        weights = attention_weights(q, k, selective_mask, **kw)
        return out, weights
