"""Decoding above the model: prefill, one-token steps, sampling, generation (gpt-fast's shape).

The model does the work: ``GPT.new_caches`` allocates one :class:`~selective_attention.kv_cache.LayerCache`
per layer and ``GPT.decode`` runs a prompt (prefill) or one token (a step) through them; every
attention layer reads and writes its own cache (``model.Attention.forward``), and the eviction policy
is in :mod:`selective_attention.kv_cache`. This file only calls the model, duck-typed (it never
imports ``model.py``, which imports this module for ``GPT.generate``): any module with ``config``
(``n_layer``, ``context_len``, ``vocab_size``), ``tokens``, ``new_caches`` and ``decode`` decodes.

Properties kept from the first implementation (DESIGN §4): cached decoding without pruning equals the
full forward pass; a budget b is at most b tokens stored and attended per step, the newest included
(b slots, room made before the write), whichever eviction policy chooses the token that goes
(``policy``: ``"selective"``, ``"window"``, ``"h2o"``); threshold eviction; :meth:`Decoder.kv_bytes` counts every slot a
cache holds (so a threshold alone, which frees slots but keeps the buffers, saves none there), and
:meth:`Decoder.occupancy` the tokens kept. The step (:func:`decode_one_token`) has static shapes, so
``torch.compile`` compiles it once; :meth:`Decoder.step` checks what it would otherwise do silently
wrong (a token out of the vocabulary, a step past the buffers' capacity, more tokens attended than the
model's ``context_len``) eagerly, outside the compiled function.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .callers import caller_level
from .kv_cache import LayerCache, budget_value, check_policy, check_threshold_applies, is_int

__all__ = ["Decoder", "decode_one_token", "sample"]


def budgets_fit(budget: int | Sequence[int | None] | None, context_len: int) -> bool:
    """Whether ``budget`` (one for every layer, or one per layer) bounds every layer to at most ``context_len``
    tokens: then decoding, and reading a prompt, may go past the context."""
    budgets = budget if isinstance(budget, Sequence) else [budget]
    return all(b is not None and b <= context_len for b in budgets)


class Decoder:
    """Incremental decoding for a :class:`~selective_attention.model.GPT`.

    Args:
        model: the model (its weights are used as they are; call ``model.eval()`` first). It holds
            no decoding state: the caches are this decoder's, so several decoders may share a model.
        budget: per layer, the most tokens stored and attended at any step, the newest included (an
            int for all layers, or a list, one per layer, of ints >= 2, the first token and the newest, or
            ``None``, that layer keeps everything); ``None`` keeps everything in every layer.
        threshold: evict any token whose Fcum exceeds this (before the next step attends); policy
            ``"selective"`` only.
        policy: which token a full layer evicts (never the first; :mod:`~selective_attention.kv_cache`):
            ``"selective"`` (the paper) the largest Fcum, the oldest on ties (layers without selection
            have Fcum = 0, so for them it is a sliding window); ``"window"`` the oldest (StreamingLLM-style:
            the first token and the most recent); ``"h2o"`` (H2O-style heavy hitters) the one with the
            least attention received so far, outside a recent window. Any policy works on any model.
        recent: ``"h2o"`` only: the recent window, in tokens, the newest included (default: half of each
            layer's budget; at most the smallest budget - 1).
        compile: run :meth:`step` through ``torch.compile`` (inductor; static shapes, so it compiles
            once, a few seconds, and again only for another model, batch size, cache size or
            threshold; past dynamo's recompile limit, 8 by default, it runs eager). It pays off
            with a pruned cache, where the step is small and eager op overhead dominates; with a
            full cache on CPU the compiled step can be slower than eager (benchmarks/README.md).

    Example::

        dec = Decoder(model, budget=64)
        logits = dec.prefill(prompt, max_new_tokens=100)      # [B, vocab]
        tok = logits.argmax(-1); logits = dec.step(tok)      # one token at a time
        dec.occupancy(), dec.kv_bytes()                      # per layer: tokens attended, bytes
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        budget: int | Sequence[int | None] | None = None,
        threshold: float | None = None,
        policy: str = "selective",
        recent: int | None = None,
        compile: bool = False,
    ) -> None:
        n = model.config.n_layer
        value = budget_value(budget)  # None, one int, or one per layer (numpy / tensor integers too)
        budgets: list[int | None] = value if isinstance(value, list) else [value] * n
        if len(budgets) != n:
            raise ValueError(f"budget has {len(budgets)} entries but the model has n_layer={n} layers.")
        ctx = model.config.context_len
        big = [b for b in budgets if b is not None and b > ctx]
        if big:  # never usable: a layer attends to at most context_len tokens (past it only with budgets within it)
            raise ValueError(
                f"budget {big[0]} exceeds the model's context_len={ctx}: a layer never needs more slots than that, and "
                f"a budget allocates its slots up front; use a budget <= {ctx}, or None to keep the whole context."
            )
        check_policy(policy, threshold, recent, budget=budgets)
        check_threshold_applies(threshold, any(block.attn.selects for block in model.blocks))
        self.model = model
        self.budgets = budgets
        self.threshold = threshold
        self.policy, self.recent = policy, recent
        self.caches: list[LayerCache] = []
        self.t: Tensor | None = None  # position of the next token, a 0-d long tensor
        self._pos = 0  # the same position as a Python int, for the checks in step()
        self._end = 0  # the position at which an unbudgeted layer's buffers are full (prompt + max_new_tokens)
        self._max_new = 0
        self._step = _compiled_decode_one_token() if compile else decode_one_token

    @property
    def prunes(self) -> bool:
        return self.threshold is not None or any(b is not None for b in self.budgets)

    @property
    def _bounded(self) -> bool:
        """Every layer attends to at most ``context_len`` tokens whatever happens (budgets within it)."""
        return budgets_fit(self.budgets, self.model.config.context_len)

    # --- prefill -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, idx: Tensor, max_new_tokens: int = 0) -> Tensor:
        """Run the prompt ``idx`` ``[B, T]`` exactly, fill the caches (pruned to budget), and return
        the next-token logits ``[B, vocab]``. Caches hold room for ``max_new_tokens`` more.

        A prompt longer than ``context_len`` needs a budget of at most ``context_len`` in every layer: its first
        ``context_len`` tokens are read exactly, the rest one at a time through the pruned caches, as generated
        tokens are. Without one, ``T + max_new_tokens`` must fit in ``context_len``, except with a threshold: then
        each step checks that no layer attends to more than ``context_len`` tokens (how much a threshold evicts
        depends on the text)."""
        model, cfg = self.model, self.model.config
        idx = model.tokens(idx)  # any integer dtype (uint8 bytes, say) is read as long; checked
        B, T = idx.shape
        ctx = cfg.context_len
        if T == 0:
            raise ValueError("the prompt must hold at least one token (e.g. a BOS token).")
        if B == 0:
            raise ValueError(f"the prompt batch is empty (shape {tuple(idx.shape)}): pass at least one sequence.")
        if not is_int(max_new_tokens) or int(max_new_tokens) < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
        max_new_tokens = int(max_new_tokens)  # numpy and 0-d tensor integers too
        if model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
            warnings.warn(
                "the model is in training mode, so its dropout is applied while decoding: call model.eval() first.",
                stacklevel=caller_level(),
            )
        if not self._bounded and (T > ctx or (self.threshold is None and T + max_new_tokens > ctx)):
            what = f"prompt length {T}" if T > ctx else f"prompt length {T} + max_new_tokens {max_new_tokens}"
            fewer = "a shorter prompt" if T > ctx else f"max_new_tokens <= {ctx - T} (--max_new_tokens)"
            raise ValueError(
                f"{what} exceeds context_len={ctx}; pass a budget of at most {ctx} for every layer (budget=...; "
                f"--budget on the command line) to read and decode past it through a pruned cache, or {fewer}."
            )
        cap = min(T, ctx) + max_new_tokens
        if self.threshold is not None and not self._bounded:
            # each step past context_len checks that no layer attends to more than it (_check_step): so an unbudgeted
            # layer never holds more, and buffers of the prompt plus max_new_tokens would be slots it cannot use
            cap = min(cap, ctx)
        kw = dict(threshold=self.threshold, policy=self.policy, recent=self.recent)
        self.t = None  # until this prefill finishes: one that fails partway leaves caches step() must not use
        # normal tensors even under torch.inference_mode: a step outside it then writes them in place (inference
        # tensors refused that with torch's raw "Inplace update to inference tensor outside InferenceMode")
        with torch.inference_mode(False):
            self.caches = model.new_caches(B, cap, budgets=self.budgets, **kw)
        logits = model.decode(idx[:, :ctx], self.caches)
        with torch.inference_mode(False):
            self.t = torch.tensor(min(T, ctx), device=idx.device)
        self._pos, self._end, self._max_new = min(T, ctx), cap, max_new_tokens
        for i in range(ctx, T):  # the rest of a long prompt, through the pruned caches (bounded budgets only)
            logits = self.step(idx[:, i])
        return logits

    # --- one token -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Feed ``token`` ``[B]`` at the current position; return the next logits ``[B, vocab]``."""
        if self.t is None:
            raise RuntimeError(
                "call prefill(prompt) before step() (again after a prefill or step that did not finish: the caches "
                "may hold part of it)."
            )
        self._check_step(token)
        try:
            logits = self._step(self.model, self.caches, token.long(), self.t)
        except BaseException:  # an error or an interrupt between layers: some caches hold this token, some not
            self.t = None
            raise
        self._pos += 1
        return logits

    def _check_step(self, token: Tensor) -> None:
        """Refuse what the static-shape step would do silently wrong (checked before it runs)."""
        B = self.caches[0].k.shape[0]
        if (
            not isinstance(token, Tensor)
            or token.shape != (B,)
            or token.is_floating_point()
            or token.is_complex()
            or token.dtype == torch.bool
        ):
            raise ValueError(
                f"token must be an integer tensor of shape [B] = [{B}], one id per sequence; got "
                f"{getattr(token, 'dtype', type(token).__name__)} {tuple(getattr(token, 'shape', ()))}."
            )
        vocab = self.model.config.vocab_size
        lo, hi = int(token.min()), int(token.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token ids must be in [0, vocab_size={vocab}); got range [{lo}, {hi}].")
        ctx = self.model.config.context_len
        if self._pos + 1 > ctx and not self._bounded:
            attended = max(c.attended_next() for c in self.caches)
            if attended > ctx:
                raise ValueError(
                    f"decoding position {self._pos} would attend to {attended} tokens in a layer, more than "
                    f"context_len={ctx}; pass a budget of at most {ctx} for every layer to decode past it."
                )
        unbudgeted = any(b is None for b in self.budgets)
        # a layer without a budget has one slot per token, up to _end; past it a further write would overwrite the
        # first token, unless a threshold evicted enough to leave a slot free (read on the device only then)
        if (
            unbudgeted
            and self._pos >= self._end
            and (
                self.threshold is None
                or any(b is None and c.attended_next() > c.capacity for c, b in zip(self.caches, self.budgets))
            )
        ):
            raise ValueError(
                f"the caches were sized by prefill(..., max_new_tokens={self._max_new}) and are full after "
                f"{self._pos} tokens; pass a larger max_new_tokens to prefill (or a budget for every layer)."
            )

    # --- reporting -----------------------------------------------------------------------------------
    def occupancy(self) -> list[int]:
        """Tokens stored per layer, the most any sequence of the batch stores: after a step, the
        tokens that step attended to (the newest included)."""
        return [int(c.occupancy().max().item()) for c in self.caches]

    def kv_bytes(self) -> list[int]:
        """Bytes of every stored key/value slot per layer (see :meth:`LayerCache.kv_bytes`)."""
        return [c.kv_bytes() for c in self.caches]

    # --- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        suppress_tokens: Sequence[int] = (),
    ) -> Tensor:
        """Prefill ``idx`` ``[B, T]`` and sample ``max_new_tokens``; returns ``[B, T + max_new_tokens]``.
        ``suppress_tokens``: ids never sampled (a BPE tokenizer's ``<bos>``, which starts a text and never follows
        one: the CLI passes it).

        The last token is sampled, not fed back: the caches hold ``T + max_new_tokens - 1`` tokens at most, and
        without a budget ``T + max_new_tokens - 1`` must fit in ``context_len``."""
        given = temperature
        if isinstance(temperature, Tensor) and temperature.dim() == 0 and not temperature.is_complex():
            temperature = temperature.item()  # a 0-d tensor, as max_new_tokens and top_k take them
        real = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
        if not real or not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {given!r}.")
        temperature = float(temperature)  # a NumPy scalar or a Fraction too
        if top_k is not None and (not is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}.")
        if not is_int(max_new_tokens) or int(max_new_tokens) < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
        max_new_tokens = int(max_new_tokens)
        vocab = self.model.config.vocab_size
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}.")
        if is_int(suppress_tokens) or not isinstance(suppress_tokens, Iterable):
            raise ValueError(f"suppress_tokens must be a sequence of token ids (e.g. [3]), got {suppress_tokens!r}.")
        suppress = list(suppress_tokens)
        if not all(is_int(i) and 0 <= int(i) < vocab for i in suppress) or len(set(map(int, suppress))) >= vocab:
            raise ValueError(f"suppress_tokens must be ids in [0, {vocab}), leaving one to sample; got {suppress!r}.")
        suppress = torch.tensor([int(i) for i in suppress], dtype=torch.long) if suppress else None
        ids = self.model.tokens(idx)
        T, ctx = ids.shape[-1], self.model.config.context_len
        if not self._bounded and self.threshold is None and T <= ctx and T + max_new_tokens - 1 > ctx:
            raise ValueError(
                f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds context_len={ctx} + 1 (the last token "
                f"is sampled, not attended); pass a budget of at most {ctx} for every layer (budget=...; --budget on "
                f"the command line) to decode past it through a pruned cache, or max_new_tokens <= {ctx - T + 1} "
                f"(--max_new_tokens)."
            )
        logits = self.prefill(idx, max(max_new_tokens - 1, 0))
        suppress = None if suppress is None else suppress.to(logits.device)
        out = [idx]
        for n in range(max_new_tokens):
            _check_finite(logits, n)
            if suppress is not None:
                logits = logits.index_fill(-1, suppress, float("-inf"))
            tok = sample(logits, temperature, top_k, generator)
            out.append(tok[:, None])
            if n + 1 < max_new_tokens:
                logits = self.step(tok)
        return torch.cat(out, dim=1)


def _check_finite(logits: Tensor, n: int) -> None:
    """Refuse NaN or inf logits before a token is drawn from them (one reduction a token): greedy decoding took
    NaN's index for a token, silently, and sampling failed inside torch.multinomial with no word of why."""
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            f"the model's logits for generated token {n} are not finite (NaN or inf): its forward overflows, as a "
            "diverged training run's model does. Use an earlier checkpoint, or retrain with a lower learning rate."
        )


def decode_one_token(model: nn.Module, caches: list[LayerCache], token: Tensor, input_pos: Tensor) -> Tensor:
    """Feed ``token`` ``[B]`` at position ``input_pos`` (a 0-d long tensor, advanced in place) through
    every layer's cache; return the next logits ``[B, vocab]``. Called under no_grad by
    :meth:`Decoder.step`, so a compiled version always sees the same grad mode."""
    logits = model.decode(token[:, None], caches, input_pos.view(1))
    input_pos += 1
    return logits


@functools.cache
def _compiled_decode_one_token():
    """:func:`decode_one_token` through torch.compile, built once per process (dynamo caches per model
    and shapes)."""
    return torch.compile(decode_one_token, dynamic=False)


def sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """``[B, vocab]`` -> ``[B]`` token ids; ``temperature == 0`` is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    # in at least float32, shifted first (a tiny temperature then sends the others to -inf rather than the largest to
    # inf: NaN), and by at least float32's smallest normal number (1e-300 is 0 there): the limit, the largest logit
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    t = max(temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(-1, keepdim=True)) / t
    if top_k is not None:  # exactly the k that topk returns: a threshold at the k-th value kept every tie with it
        top = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, top.indices, top.values)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
