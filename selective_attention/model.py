"""A small decoder-only language model with standard or selective attention.

Pre-norm (RMSNorm) blocks, rotary positions, a GELU MLP, tied embeddings. ``selection=True`` gives
the paper's selective attention in every layer (or in ``selection_layers``). Read top to bottom:
config, rotary, attention, block, model, loss.

Decoding runs through the same modules: ``Attention.forward(x, rope, cache)`` fills a per-layer
:class:`~selective_attention.kv_cache.LayerCache` from a prompt (prefill) or appends one token to it
(a step), and :meth:`GPT.decode` passes the caches down. The loop above it (prefill, step, sample,
generate) is :class:`selective_attention.decoding.Decoder`, which only calls the model.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import selective_attention
from .kv_cache import LayerCache, prompt_scores
from .selection import Selection, layer_indices

__all__ = ["GPTConfig", "GPT", "memory_loss", "token_loss"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    """A finite int or float (NaN and +-inf slip through ``<``/``>`` checks: every comparison is False)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _as_ids(idx):
    """Token ids of any integer dtype (uint8 bytes, say) as nn.Embedding reads them: int64/int32 as they are,
    the others as long (exact); anything else unchanged, for :meth:`GPT.check_idx` to refuse."""
    if isinstance(idx, Tensor) and _is_integer(idx.dtype) and idx.dtype not in (torch.int64, torch.int32):
        return idx.long()
    return idx


@dataclass
class GPTConfig:
    vocab_size: int = 256  # byte-level tokens by default
    context_len: int = 256  # longest sequence trained on; decoding past it needs a budget
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per layer
    n_kv_head: int | None = None  # key/value heads (grouped-query attention; must divide n_head); None = n_head
    d_model: int = 128  # residual stream width
    d_head: int | None = None  # per-head width; None = d_model // n_head (set it for "2x heads" baselines)
    dropout: float = 0.0  # residual and attention dropout (paper mode with dropout uses the naive path)
    selection: bool = False  # the paper's selective attention
    selection_layers: Sequence[int] | None = None  # layers that select (None = all, when selection)
    selection_head: int = 0  # the head whose logits vote
    selection_per_head: bool = False  # one F per head instead of one per layer
    selection_projection: bool = False  # vote with a dedicated q/k pair (adds parameters)
    mlp_ratio: float = 4.0  # MLP hidden width / d_model
    bias: bool = False  # biases in the linear layers
    rope_base: float = 10000.0  # rotary position base frequency
    memory_tau: float = 1.0  # the memory loss's tau (paper: 1)
    memory_eps: float = 0.0  # the memory loss's weight epsilon (paper: 0.1); 0 = off
    extra: dict = field(default_factory=dict, repr=False)  # free-form notes saved with checkpoints

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_len", "n_layer", "n_head", "d_model"):
            val = getattr(self, name)
            if not _is_int(val) or val <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {val!r}.")
        if self.n_kv_head is not None and (
            not _is_int(self.n_kv_head) or self.n_kv_head <= 0 or self.n_head % self.n_kv_head
        ):
            divisors = [h for h in range(1, self.n_head + 1) if self.n_head % h == 0]
            raise ValueError(
                f"GPTConfig.n_kv_head must be an int dividing n_head={self.n_head} (grouped-query attention: one of "
                f"{divisors}), or None for n_head; got {self.n_kv_head!r}."
            )
        if self.d_head is not None and (not _is_int(self.d_head) or self.d_head <= 0):
            raise ValueError(
                f"GPTConfig.d_head must be a positive even int or None (d_model // n_head), got {self.d_head!r}."
            )
        if self.d_head is None and self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}), or set d_head explicitly."
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"the head dim ({self.head_dim}) must be a positive even number (rotary).")
        if isinstance(self.dropout, Tensor) and self.dropout.dim() == 0 and self.dropout.dtype != torch.bool:
            self.dropout = self.dropout.item()
        if isinstance(self.dropout, numbers.Real) and not isinstance(self.dropout, bool):
            self.dropout = float(self.dropout)  # a NumPy float, a Fraction: as nn.Dropout takes them
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}.")
        if not _is_real(self.mlp_ratio) or self.mlp_ratio <= 0 or int(self.mlp_ratio * self.d_model) < 1:
            raise ValueError(
                f"mlp_ratio must be a finite number > 0 giving a hidden width int(mlp_ratio * d_model) >= 1, "
                f"got {self.mlp_ratio!r}."
            )
        if not _is_real(self.rope_base) or self.rope_base <= 0:
            raise ValueError(f"rope_base must be a finite number > 0 (usually 10000), got {self.rope_base!r}.")
        for name in ("selection", "selection_per_head", "selection_projection", "bias"):
            if not isinstance(getattr(self, name), bool):  # a string "false" would be truthy
                raise ValueError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if not _is_real(self.memory_tau) or self.memory_tau <= 0:
            raise ValueError(f"memory_tau must be a finite number > 0 (the paper: 1), got {self.memory_tau!r}.")
        if not _is_real(self.memory_eps) or self.memory_eps < 0:
            raise ValueError(
                f"memory_eps must be a finite number >= 0 (0 = off; the paper: 0.1), got {self.memory_eps!r}."
            )
        if self.selection_layers is not None:
            layers = layer_indices(self.selection_layers, "selection_layers", self.n_layer)
            if not layers:
                raise ValueError(
                    "selection_layers=() selects in no layer; pass None for every layer, or selection=False."
                )
            self.selection_layers = layers
        if not _is_int(self.selection_head) or not 0 <= self.selection_head < self.n_head:
            raise ValueError(
                f"selection_head must be an int in [0, n_head={self.n_head}), got {self.selection_head!r}."
            )
        if not self.selection:
            # Options of the paper's selection that a model without it would silently ignore.
            given = {
                "selection_layers": self.selection_layers,
                "selection_head": self.selection_head or None,
                "selection_per_head": self.selection_per_head or None,
                "selection_projection": self.selection_projection or None,
                "memory_eps": self.memory_eps or None,  # the memory loss counts the tokens that selection masks
            }
            given = {k: v for k, v in given.items() if v is not None}
            if given:
                opts = ", ".join(f"{k}={v!r}" for k, v in given.items())
                it = "it" if len(given) == 1 else "them"
                raise ValueError(
                    f"{opts}: {'an option' if len(given) == 1 else 'options'} of selective attention, which this "
                    f"model (selection=False) does not use; pass selection=True, or drop {it}."
                )
        if self.selection_per_head and self.selection_head != 0:
            raise ValueError(
                f"selection_per_head=True gives every head its own F, so selection_head={self.selection_head} "
                f"does not apply; drop one of them."
            )
        if self.selection_projection and self.selection_head != 0:
            raise ValueError(
                f"selection_projection=True votes with its own q/k pair, so selection_head={self.selection_head} "
                f"does not apply; drop one of them."
            )
        if self.selection:
            self._selection().validate(self.n_head)  # once; every selecting layer has this spec

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer: ``n_kv_head``, or ``n_head`` when it is None (multi-head attention)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    def layer_selects(self, i: int) -> bool:
        return self.selection and (self.selection_layers is None or i in self.selection_layers)

    def selection_for(self, layer: int) -> Selection | None:
        """Who votes in ``layer``: the one place that reads the flat ``selection*`` fields (kept as
        they are for checkpoints and the training CLI). ``None``: the layer does not select."""
        return self._selection() if self.layer_selects(layer) else None

    def _selection(self) -> Selection:
        return Selection(
            head=self.selection_head, per_head=self.selection_per_head, projection=self.selection_projection
        )


def rope_angles(pos: Tensor, dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` ``[T, dim]`` of the rotary angles ``pos * base^(-2i/dim)`` for positions ``pos`` ``[T]`` (a
    tensor, so a compiled decode step does not specialise on it), as :func:`rotary` reads them: channel ``i`` and
    ``i + dim/2`` share angle i, and ``sin`` carries its sign (``-sin`` in the first half, ``+sin`` in the second).
    Compute once per forward or decode step; every layer reuses them. Computed in at least float32, in float64 for a
    float64 model: float32 angles gave a float64 model float32-level noise, enough that a compiled decode step (whose
    cos and sin differ from eager's by an ulp) evicted another token than eager where two tokens' F nearly tied
    (3e-8 apart)."""
    wide = torch.promote_types(dtype, torch.float32)
    inv_freq = base ** (-torch.arange(0, dim, 2, device=pos.device, dtype=wide) / dim)  # [dim/2]
    ang = pos.to(wide)[:, None] * inv_freq  # [T, dim/2]
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def rotary(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate pairs of channels ``(i, i + D/2)`` of ``x`` ``[B, H, T, D]`` by the angles of ``rope``
    (:func:`rope_angles`; ``[B, T, H, D]`` with the angles viewed ``[T, 1, D]``): ``(x1 cos - x2 sin, x2 cos +
    x1 sin)``, as ``x cos + swap(x) sin`` (the halves swapped; the sign is in ``sin``): 6 ops, not 9 (a decoding step
    pays per op), and the same numbers to the bit (``a + (-b)`` is ``a - b``, and a sum of two terms does not depend on
    their order)."""
    cos, sin = rope[0].to(x.dtype), rope[1].to(x.dtype)  # under autocast x (a Linear's output) is bf16, rope not
    D = x.shape[-1]
    return x * cos + torch.cat([x[..., D // 2 :], x[..., : D // 2]], dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention, standard or selective (``selection``: who votes, or ``None``), with
    rotary positions. One forward serves training, a prompt read into a KV cache, and one-token
    decoding steps from it (:meth:`forward`).

    Grouped-query attention when ``cfg.n_kv_head < cfg.n_head``: ``n_kv_head`` key/value heads, query
    head h reading kv head ``h // (n_head // n_kv_head)``; the voting head votes with its own kv head,
    and the KV cache holds ``n_kv_head`` heads. ``qkv`` projects ``d_model`` to ``(H + 2 Hkv) * D``:
    the queries, then the keys, then the values."""

    def __init__(self, cfg: GPTConfig, selection: Selection | None) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.d_head = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.selection = selection
        self.rope_base = cfg.rope_base
        self.dropout = cfg.dropout
        width = cfg.n_head * self.d_head
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * self.n_kv_head) * self.d_head, bias=cfg.bias)
        self.proj = nn.Linear(width, cfg.d_model, bias=cfg.bias)
        self.sel_qk: nn.Linear | None = None
        if selection is not None and selection.projection:
            self.sel_qk = nn.Linear(cfg.d_model, 2 * self.n_groups * self.d_head, bias=cfg.bias)

    @property
    def selects(self) -> bool:
        return self.selection is not None

    @property
    def gqa(self) -> bool:
        """Fewer key/value heads than query heads (grouped-query attention)."""
        return self.n_kv_head != self.n_head

    @property
    def n_groups(self) -> int:
        """Number of penalties F this layer computes (1, or H with per-head selection)."""
        return self.selection.n_groups(self.n_head) if self.selection is not None else 1

    def _split(self, t: Tensor) -> Tensor:
        B, T, C = t.shape
        return t.view(B, T, C // self.d_head, self.d_head).transpose(1, 2)  # [B, heads, T, d_head]

    def project(
        self, x: Tensor, pos: Tensor | tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """``x`` ``[B, T, C]`` at positions ``pos`` ``[T]`` (or their precomputed :func:`rope_angles`)
        -> q ``[B, H, T, D]``, k, v ``[B, Hkv, T, D]`` (q, k rotated) and, with a dedicated selector, its
        rotated ``(qs, ks)`` ``[B, G, T, D]``."""
        rope = rope_angles(pos, self.d_head, self.rope_base, x.dtype) if isinstance(pos, Tensor) else pos
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.d_head
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, D)  # the query heads, then the key heads, then the value heads
        # q and k rotated together, one rotary over their H + Hkv heads ([B, T, heads, D]: the angles [T, 1, D]):
        # the same numbers as two calls (each element's product and sum are unchanged), half the ops, which a
        # decoding step pays for
        qk = rotary(qkv[:, :, : H + Hkv], (rope[0][:, None], rope[1][:, None])).transpose(1, 2)  # [B, H+Hkv, T, D]
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, :, H + Hkv :].transpose(1, 2)
        sel = None
        if self.sel_qk is not None:
            qs, ks = self.sel_qk(x).chunk(2, dim=-1)
            sel = (rotary(self._split(qs), rope), rotary(self._split(ks), rope))
        return q, k, v, sel

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, sel: tuple[Tensor, Tensor] | None, memory_tau: float | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Causal attention of q ``[B, H, T, D]``, k/v ``[B, Hkv, T, D]`` -> ``([B, H, T, D], masked counts
        [B, G, T] or None)``."""
        p = self.dropout if self.training else 0.0
        if self.selection is None:
            return selective_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=self.gqa), None
        y = selective_attention(
            q, k, v, selection=self.selection, selection_qk=sel, dropout_p=p, memory_tau=memory_tau, enable_gqa=self.gqa
        )
        return y if memory_tau is not None else (y, None)

    def merge(self, y: Tensor) -> Tensor:
        """``[B, H, T, D]`` -> output projection ``[B, T, C]``."""
        B, H, T, D = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))

    def forward(
        self,
        x: Tensor,
        rope,
        cache: LayerCache | None = None,
        *,
        memory_tau: float | None = None,
        input_pos: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``x`` ``[B, T, C]`` at ``rope`` (positions ``[T]`` or their angles) -> ``([B, T, C], masked
        counts [B, G, T] or None)``. Three uses:

        * no ``cache``: causal attention over ``x`` (training, evaluation); with ``memory_tau`` (a
          selective layer) also the masked counts for the memory loss;
        * a ``cache`` and no ``input_pos``: prefill. ``x`` is a prompt from position 0, attended
          exactly; the cache (from :meth:`new_cache`) then keeps what its budget and threshold allow;
        * a ``cache`` and ``input_pos`` ``[1]``: one decoding step. ``x`` ``[B, 1, C]`` is the token at
          that position; it attends to the cache (:meth:`step`). Static shapes: compiles once.
        """
        q, k, v, sel = self.project(x, rope)
        if cache is None:
            y, masked = self.attend(q, k, v, sel, memory_tau)
        elif input_pos is None:
            y, masked = self.prefill(q, k, v, sel, cache), None
        else:
            y, masked = self.step(q, k, v, sel, cache, input_pos), None
        return self.merge(y), masked

    # --- decoding with a KV cache ----------------------------------------------------------------------
    def new_cache(
        self,
        batch_size: int,
        capacity: int,
        *,
        budget: int | None = None,
        threshold: float | None = None,
        policy: str = "selective",
        recent: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LayerCache:
        """Empty buffers of ``capacity`` slots for this layer's keys, values (``n_kv_head`` heads) and
        selector keys, evicting by ``policy`` (:mod:`~selective_attention.kv_cache`)."""
        return LayerCache.empty(
            batch_size, capacity, n_heads=self.n_kv_head, n_groups=self.n_groups, head_dim=self.d_head,
            selector_keys=self.sel_qk is not None, budget=budget, threshold=threshold, policy=policy, recent=recent,
            dtype=dtype, device=device,
        )  # fmt: skip

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, sel: tuple[Tensor, Tensor] | None, cache: LayerCache) -> Tensor:
        """The prompt's exact causal attention ``[B, H, T, D]``; fills ``cache`` with its keys, values
        (``[B, Hkv, T, D]``), the ``Fcum`` that the query after the prompt sees and, for an H2O cache, the
        attention each token received (then pruned by the cache's policy)."""
        y, _ = self.attend(q, k, v, sel)
        fcum, acc = prompt_scores(q, k, self.selection, sel, received=cache.tracks_attention)  # [B, G, T], [B, T]
        cache.fill(k, v, fcum, ks=None if sel is None else sel[1], acc=acc)
        return y

    def step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        sel: tuple[Tensor, Tensor] | None,
        cache: LayerCache,
        input_pos: Tensor,
    ) -> Tensor:
        """One token (``q`` ``[B, H, 1, D]``, ``k, v`` ``[B, Hkv, 1, D]`` at ``input_pos``) through the cache
        -> ``[B, H, 1, D]``: :meth:`LayerCache.step <selective_attention.kv_cache.LayerCache.step>` (make room,
        write, attend with ``-Fcum``, vote). Static shapes: compiles once."""
        return cache.step(q, k, v, input_pos, self.selection, sel)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, selection: Selection | None) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, selection)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        rope,
        cache: LayerCache | None = None,
        *,
        memory_tau: float | None = None,
        input_pos: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``x`` ``[B, T, C]`` at ``rope`` (positions or their angles); the rest as in
        :meth:`Attention.forward`."""
        a, masked = self.attn(self.norm1(x), rope, cache, memory_tau=memory_tau, input_pos=input_pos)
        x = x + self.drop(a)
        return x + self.mlp(self.norm2(x)), masked


class GPT(nn.Module):
    """Decoder-only LM. ``GPT(cfg)(idx [B, T])`` -> logits ``[B, T, vocab]``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, config.selection_for(i)) for i in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def rope(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Rotary angles for positions ``pos`` ``[T]``, shared by all layers."""
        return rope_angles(pos, self.config.head_dim, self.config.rope_base, dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_idx(self, idx: Tensor) -> None:
        """Refuse what is not a batch of token ids ``[B, T]`` the embedding can read (int64 or int32)."""
        if not isinstance(idx, Tensor):
            raise ValueError(f"idx must be a tensor of token ids [B, T], got {type(idx).__name__}.")
        if idx.dim() != 2:
            hint = "; for one sequence use idx[None]" if idx.dim() == 1 else ""
            raise ValueError(f"idx must be 2-D [B, T], got {idx.dim()}-D shape {tuple(idx.shape)}{hint}.")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"idx is {idx.dtype}; token ids must be an integer tensor, torch.int64 (long) or torch.int32: "
                f"convert with idx.long()."
            )
        V = self.config.vocab_size
        if torch.compiler.is_compiling() and idx.device.type == "cpu":
            # compiled on CPU: no value read (a graph break at every forward); torch._assert_async raises a RuntimeError
            # (on CUDA that would be a device-side assert, which ends the process's CUDA context: read there)
            torch._assert_async(((idx >= 0) & (idx < V)).all(), f"token ids must be in [0, vocab_size={V}).")
        elif idx.numel() and (idx.min() < 0 or idx.max() >= V):
            raise ValueError(
                f"token ids must be in [0, vocab_size={V}); got range [{idx.min().item()}, {idx.max().item()}]."
            )

    def tokens(self, idx) -> Tensor:
        """``idx`` ``[B, T]`` as the embedding reads it: any integer dtype (uint8 bytes, say) as long, checked by
        :meth:`check_idx`."""
        idx = _as_ids(idx)
        self.check_idx(idx)
        return idx

    def hidden(
        self,
        idx: Tensor,
        memory_tau: float | None = None,
        *,
        caches: Sequence[LayerCache] | None = None,
        input_pos: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Final hidden states ``[B, T, C]`` and, with ``memory_tau``, each selective layer's masked
        counts ``[B, G, T]``. ``idx`` may be any integer dtype (uint8 bytes, say): it is read as long.
        With ``caches`` (one per layer), decoding: see :meth:`decode`."""
        if input_pos is None:  # a sequence from position 0, checked here
            idx = self.tokens(idx)
            T = idx.shape[1]
            if T > self.config.context_len:
                raise ValueError(f"sequence length {T} exceeds context_len={self.config.context_len}.")
            positions = torch.arange(T, device=idx.device)
        else:  # one decoding step: no host reads here (it runs compiled); the caller checked the token
            positions = input_pos
        x = self.drop(self.tok_emb(idx))
        rope = self.rope(positions, x.dtype)  # once for all layers
        caches = [None] * len(self.blocks) if caches is None else caches
        masked = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, m = block(x, rope, cache, memory_tau=memory_tau if block.attn.selects else None, input_pos=input_pos)
            if m is not None:
                masked.append(m)
        return self.norm(x), masked

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        """``idx`` ``[B, T]`` -> logits ``[B, T, vocab]``; with ``targets`` ``[B, T]``, :meth:`loss`
        instead (so data-parallel wrappers see the whole training computation in one forward)."""
        if targets is not None:
            return self.loss(idx, targets)
        return self.lm_head(self.hidden(idx)[0])

    # --- decoding with KV caches -----------------------------------------------------------------------
    def new_caches(
        self,
        batch_size: int,
        max_len: int,
        *,
        budgets: Sequence[int | None] | None = None,
        threshold: float | None = None,
        policy: str = "selective",
        recent: int | None = None,
    ) -> list[LayerCache]:
        """Empty per-layer caches for :meth:`decode`: layer l has ``budgets[l]`` slots, or ``max_len``
        (prompt + tokens to generate) when it has no budget; ``threshold`` evicts in every layer; ``policy``
        (``"selective"``, ``"window"``, ``"h2o"``) and ``recent`` choose what goes when a layer is full
        (:mod:`~selective_attention.kv_cache`)."""
        budgets = [None] * len(self.blocks) if budgets is None else list(budgets)
        if len(budgets) != len(self.blocks):
            raise ValueError(f"budgets has {len(budgets)} entries but the model has n_layer={len(self.blocks)} layers.")
        w = self.tok_emb.weight
        kw = dict(threshold=threshold, policy=policy, recent=recent, dtype=w.dtype, device=w.device)
        return [
            block.attn.new_cache(batch_size, max_len if b is None else b, budget=b, **kw)
            for block, b in zip(self.blocks, budgets, strict=True)
        ]

    def decode(self, idx: Tensor, caches: Sequence[LayerCache], input_pos: Tensor | None = None) -> Tensor:
        """Next-token logits ``[B, vocab]`` through the KV ``caches`` (from :meth:`new_caches`).

        Without ``input_pos``, ``idx`` ``[B, T]`` is a prompt at positions ``0 .. T-1`` (prefill: read
        exactly, then each layer keeps what its budget and threshold allow). With ``input_pos``
        ``[1]`` (a long tensor), ``idx`` ``[B, 1]`` is one token at that position (a step): static
        shapes and no host reads (in eager calls, an unbudgeted layer that may be full reads whether it is: a full
        one is refused), so ``torch.compile`` compiles it once; its input checks are the
        caller's (:meth:`~selective_attention.decoding.Decoder.step` runs them eagerly)."""
        h, _ = self.hidden(idx, caches=caches, input_pos=input_pos)
        return self.lm_head(h[:, -1])

    def loss(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Cross-entropy of ``idx`` ``[B, T]`` against ``targets`` ``[B, T]`` (token ids; -100 = ignored) plus, when
        ``memory_eps > 0``, the paper's memory loss.

        Returns ``(loss, {"ce": ..., "memory": ...})``: the loss, and its parts for logging as detached 0-d tensors
        (read them with ``float()``: no host sync here, so a compiled step has no graph break). Targets that are all
        -100 give NaN, a mean over no tokens, as ``F.cross_entropy`` does (telling would need a host sync); the
        training loop stops on it as on any non-finite loss."""
        if not isinstance(targets, Tensor) or not _is_integer(targets.dtype):
            raise ValueError(
                f"targets must be an integer tensor of token ids [B, T] (-100 = ignored), got "
                f"{getattr(targets, 'dtype', type(targets).__name__)}."
            )
        if isinstance(idx, Tensor) and targets.shape != idx.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must have the shape of idx {tuple(idx.shape)}.")
        if isinstance(idx, Tensor) and idx.numel() == 0:
            raise ValueError(
                f"loss of an empty batch: idx has shape {tuple(idx.shape)}; it needs at least one sequence of at "
                f"least one token (a mean over no tokens is NaN)."
            )
        cfg = self.config
        use_mem = cfg.memory_eps > 0 and cfg.selection
        h, masked = self.hidden(idx, cfg.memory_tau if use_mem else None)
        logits = self.lm_head(h)
        ce = token_loss(logits, targets)
        stats = {"ce": ce.detach()}
        if not use_mem:
            return ce, stats
        mem = memory_loss(masked)
        stats["memory"] = mem.detach()
        return ce + cfg.memory_eps * mem, stats

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        budget: int | Sequence[int | None] | None = None,
        threshold: float | None = None,
        policy: str = "selective",
        recent: int | None = None,
        generator: torch.Generator | None = None,
        compile: bool = False,
        suppress_tokens: Sequence[int] = (),
    ) -> Tensor:
        """Continue ``idx`` ``[B, T]`` by ``max_new_tokens``; returns ``[B, T + max_new_tokens]``.

        Decodes with a KV cache (exact: equal to re-running the full forward each step). ``budget`` (an int for
        all layers, or one per layer: an int, or ``None`` for a layer that keeps everything) keeps at most that many
        tokens per layer, evicting by ``policy`` (never the first token): ``"selective"`` the token with the largest
        accumulated penalty, ``"window"`` the oldest, ``"h2o"`` the one outside a recent window of ``recent`` tokens
        that received the least attention; ``threshold`` (``"selective"`` only) evicts any token whose
        penalty exceeds it. ``temperature=0`` is greedy. ``compile=True`` compiles the decoding step
        (worth it with a budget; see :class:`~selective_attention.decoding.Decoder`). ``suppress_tokens``: ids never
        sampled (a BPE tokenizer's ``bos_id``).
        """
        from .decoding import Decoder

        dec = Decoder(self, budget=budget, threshold=threshold, policy=policy, recent=recent, compile=compile)
        return dec.generate(_as_ids(idx), max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                            suppress_tokens=suppress_tokens)  # fmt: skip


def token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (nats/token) of ``logits`` ``[B, T, vocab]`` for ``targets`` ``[B, T]``; targets of
    -100 are ignored (e.g. everything but the answer of a variable-assignment example)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long())


def memory_loss(masked: Sequence[Tensor]) -> Tensor:
    """The paper's memory loss from each selective layer's masked counts ``[B, G, T]``.

    ``M_l[i] = (i + 1) - sum_{j<=i} min(F_l[i, j], tau) / tau`` is the soft number of tokens that
    position i (1-based: i + 1 tokens so far) still needs; the loss is
    ``sum_l max_i M_l[i] / (n_layers * T)``, averaged over the batch and the G penalties.
    """
    if not masked:
        raise ValueError("memory_loss needs at least one selective layer's masked counts.")
    if masked[0].numel() == 0:
        # no position, or no sequence: there is no token to count, so no loss (a max over none is undefined)
        raise ValueError(f"memory_loss of an empty batch: masked counts have shape {tuple(masked[0].shape)} [B, G, T].")
    T = masked[0].shape[-1]
    # tokens seen at i, in at least float32: in bfloat16 a count near 1024 is rounded to a multiple of 8
    acc = torch.promote_types(masked[0].dtype, torch.float32)
    count = torch.arange(1, T + 1, device=masked[0].device, dtype=acc)
    per_layer = [(count - m.to(acc)).amax(dim=-1).mean() for m in masked]  # max over i; mean over B, G
    return torch.stack(per_layer).sum() / (len(masked) * T)
