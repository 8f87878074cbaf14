"""Selective attention inside Hugging Face ``transformers`` models (extra ``[hf]``).

Three pieces, each usable alone::

    import selective_attention.hf as sa_hf

    sa_hf.register()                                  # adds attn_implementation="selective"
    config = sa_hf.configure(LlamaConfig(...), memory_eps=0.1)   # who votes, which layers, memory loss
    model = AutoModelForCausalLM.from_config(config, attn_implementation="selective")
    loss = out.loss + sa_hf.memory_loss_term(model)    # or train with sa_hf.SelectiveTrainer
    out = model.generate(ids, cache=sa_hf.SelectiveCache(budget=64), max_new_tokens=100)

* :func:`register` puts :func:`attention_forward` into ``transformers.AttentionInterface`` and a
  mask function (:func:`padding_mask`) into ``AttentionMaskInterface`` under the same name. The mask
  function hands the attention function the raw 2-D padding mask, from which it builds key padding
  itself: selective attention needs to know which tokens are real (padding neither votes nor is
  voted on, and the protected "first token" is each sequence's first real one).
* The settings live in the model config, as a plain dict ``config.selective_attention`` (so
  ``save_pretrained`` keeps them): :func:`configure` writes it, :class:`HFSettings` reads it.
* :class:`SelectiveCache` is a ``transformers`` cache for ``generate``: each layer keeps a
  :class:`~selective_attention.kv_cache.LayerCache` (the keys/values that survive, their accumulated
  F) and evicts by the paper's rule, holding at most ``budget`` tokens per layer.

The attention function runs every call through :func:`selective_attention.functional.selective_attention`
(``backend="auto"``), grouped-query attention included (keys/values are never repeated). In selecting layers that
is the chunked kernel on CPU; on CUDA the Triton kernel serves only calls without padding, memory-loss rows or
dropout (inference, and training with ``memory_eps = 0``), while padded batches and memory-loss training
(``memory_eps > 0``, :class:`SelectiveTrainer`) run the chunked kernel on the GPU and attention dropout the naive
spec (it materialises ``[B, H, L, L]``). Layers that do not select run PyTorch's scaled_dot_product_attention.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import numbers
import sys
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor

from .functional import autocast_inputs, selective_attention
from .kv_cache import LayerCache, budget_value, check_policy, check_threshold_applies, prompt_scores
from .model import memory_loss as _memory_loss
from .selection import Selection, layer_indices

# transformers 5 needs a newer torch than this package does: under an older one its PyTorch parts fail to import, or
# it disables them
_TORCH_REFUSED = (
    f"with torch {torch.__version__} (transformers 5.24, the version tested, needs torch >= 2.6): upgrade torch, or "
    "check which torch your transformers needs."
)
try:
    import transformers
    from transformers import AttentionInterface, Trainer
    from transformers.cache_utils import Cache, DynamicLayer
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
    from transformers.utils import logging as _hf_logging
except ImportError as e:  # pragma: no cover - exercised only without transformers, or with a torch it refuses
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(
            "selective_attention.hf needs Hugging Face transformers: pip install 'selective-attention[hf]' "
            "(or pip install transformers)."
        ) from e
    raise ImportError(
        f"selective_attention.hf: transformers' PyTorch parts failed to import ({e}) {_TORCH_REFUSED}"
    ) from e
if not transformers.utils.is_torch_available():
    raise ImportError(
        f"selective_attention.hf: transformers {transformers.__version__} disabled its PyTorch support {_TORCH_REFUSED}"
    )

__all__ = [
    "NAME",
    "HFSettings",
    "configure",
    "register",
    "attention_forward",
    "padding_mask",
    "memory_loss",
    "memory_loss_term",
    "SelectiveTrainer",
    "SelectiveCache",
    "SelectiveLayer",
    "cache_keyword",
]

NAME = "selective"
CONFIG_KEY = "selective_attention"

logger = _hf_logging.get_logger(__name__)  # transformers' logger: warning_once, as its own attention functions


# --- settings, in the model config -------------------------------------------------------------------
_SELECTION_FIELDS = tuple(f.name for f in fields(Selection))  # (read here, not per call: it breaks a compiled graph)


def _real(x) -> float | None:
    """``x`` as a plain float if it is a real number (Python, numpy, or a 0-d real tensor; not a bool), else None."""
    if getattr(x, "ndim", None) == 0 and hasattr(x, "item"):  # a 0-d tensor or numpy array
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    return float(x)


@dataclass(frozen=True)
class HFSettings:
    """What ``config.selective_attention`` says (absent: the paper in every layer, no memory loss).

    Attributes:
        selection: who votes (:class:`~selective_attention.selection.Selection`; ``Selection()`` is the
            paper, head 0). ``projection=True`` is refused: it needs a voting q/k pair that a
            ``transformers`` model does not have.
        layers: the layers that select, or ``None`` for every layer; the others run standard causal
            attention (through the same function). Python, numpy or 0-d tensor integers, stored as plain ints
            (``config.json`` must serialise them).
        memory_eps, memory_tau: the paper's memory loss ``eps * L_mem`` (eps = 0: off), added by
            :func:`memory_loss_term` / :class:`SelectiveTrainer`. ``memory_eps > 0`` needs a selecting layer.
    """

    selection: Selection = field(default_factory=Selection)
    layers: tuple[int, ...] | None = None
    memory_eps: float = 0.0
    memory_tau: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.selection, Selection):
            raise TypeError(f"selection must be a Selection, got {type(self.selection).__name__}.")
        if self.selection.projection:
            raise ValueError(
                "Selection(projection=True) votes with a dedicated q/k projection, which a transformers model does "
                "not have (selective attention in HF models adds no parameters); use Selection(head=h) or "
                "Selection(per_head=True)."
            )
        if self.layers is not None:
            object.__setattr__(self, "layers", layer_indices(self.layers, "layers"))  # or None: every layer
        eps, tau = _real(self.memory_eps), _real(self.memory_tau)
        if eps is None or not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"memory_eps must be a finite number >= 0 (0 = no memory loss), got {self.memory_eps!r}.")
        if tau is None or not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"memory_tau must be a finite number > 0, got {self.memory_tau!r}.")
        object.__setattr__(self, "memory_eps", eps)  # a plain float: config.json must serialise it
        object.__setattr__(self, "memory_tau", tau)

    def check_memory_loss(self) -> None:
        """Refuse ``memory_eps > 0`` without a selecting layer (nothing to count). Checked by :func:`configure` and
        before the loss is computed, not when a stored config is read (inference ignores the memory loss)."""
        if self.layers == () and self.memory_eps > 0:
            raise ValueError(
                f"memory_eps={self.memory_eps} with layers=[]: no layer selects, so there are no masked tokens for "
                "the memory loss to count. Set memory_eps=0, or list the selecting layers (layers=[...], or None "
                "for every layer)."
            )

    def selection_for(self, layer: int) -> Selection | None:
        """The layer's selection, or ``None`` where it runs standard attention."""
        return self.selection if self.layers is None or layer in self.layers else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> HFSettings:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise TypeError(f"config.{CONFIG_KEY} must be a dict (written by configure()), got {type(d).__name__}.")
        unknown = set(d) - {"selection", "layers", "memory_eps", "memory_tau"}
        if unknown:
            raise ValueError(
                f"config.{CONFIG_KEY} has unknown keys {sorted(unknown)}; known: selection, layers, memory_eps, "
                "memory_tau. Was it written by a newer version?"
            )
        sel = d.get("selection") or {}
        known = _SELECTION_FIELDS
        if not isinstance(sel, dict) or set(sel) - set(known):
            raise ValueError(
                f"config.{CONFIG_KEY}['selection'] = {sel!r} is not a selection: a dict of {', '.join(known)} (as "
                "configure() writes it). Write the settings again with configure(config, selection=Selection(...))."
            )
        layers = d.get("layers")
        return cls(
            selection=Selection(**sel),
            layers=layers,
            memory_eps=d.get("memory_eps", 0.0),
            memory_tau=d.get("memory_tau", 1.0),
        )


def configure(
    config,
    *,
    selection: bool | Selection = True,
    layers: Sequence[int] | None = None,
    memory_eps: float = 0.0,
    memory_tau: float = 1.0,
):
    """Write the selective-attention settings into a ``transformers`` config (returned, changed in
    place; for a composite model such as a vision-language one, into its text decoder's config, which its
    attention layers read); ``save_pretrained`` saves them in ``config.json``. ``selection=True`` is the paper
    (``Selection()``); see :class:`HFSettings`. Layer indices are checked against
    ``config.num_hidden_layers``, and a model family whose attention does not go through ``transformers``' attention
    interface is refused. Also calls :func:`register`."""
    if selection is True:
        selection = Selection()
    if selection is False:
        raise ValueError(
            "configure(selection=False) would make selective attention standard attention; use "
            "attn_implementation='sdpa' for that, or list the selecting layers with layers=[...]."
        )
    s = HFSettings(selection, layers, memory_eps, memory_tau)
    s.check_memory_loss()
    target = _text_config(config)  # a composite model's (e.g. a VLM's) decoder: what its attention layers read
    _check_uses_interface(type(target))  # as early as possible (the mask hook checks again at the first forward)
    _check_dense_layers(target)
    n_layers = getattr(target, "num_hidden_layers", None)
    if s.layers is not None and n_layers is not None and any(i >= n_layers for i in s.layers):
        raise ValueError(f"layers={list(s.layers)} names layers the model lacks (num_hidden_layers={n_layers}).")
    n_heads = getattr(target, "num_attention_heads", None)
    if n_heads is not None:
        s.selection.validate(n_heads)
    setattr(target, CONFIG_KEY, s.to_dict())
    register()  # so that attn_implementation="selective" is there for the model built next
    return config


def _text_config(config):
    """The config of the decoder whose attention layers read the settings: ``config`` itself, or for a composite
    model (a vision-language model: ``text_config``) its text decoder's."""
    get = getattr(config, "get_text_config", None)
    return config if get is None else get(decoder=True)


_PARSED: dict[int, tuple[dict | None, HFSettings]] = {}  # id(config) -> (the dict as parsed, its settings)


def settings(config) -> HFSettings:
    """The :class:`HFSettings` of a model config (defaults when it has none). Parsed once per config and
    per value of the dict (every attention call reads it). A composite model's config: its text decoder's."""
    if not hasattr(config, CONFIG_KEY):
        config = _text_config(config)
    d = getattr(config, CONFIG_KEY, None)
    hit = _PARSED.get(id(config))
    if hit is not None and hit[0] == d:
        return hit[1]
    s = HFSettings.from_dict(d)
    n_layers = getattr(config, "num_hidden_layers", None)
    if s.layers is not None and isinstance(n_layers, int) and any(i >= n_layers for i in s.layers):
        raise ValueError(
            f"config.{CONFIG_KEY} lists layers={list(s.layers)}, but the model has {n_layers} (num_hidden_layers): "
            "those would silently run standard attention. Write the settings again with configure(config, layers=...)."
        )
    _PARSED[id(config)] = (_copy(d), s)
    return s


def _copy(x):
    """A deep copy of a JSON-like value (dicts, lists, tuples, sets, scalars), plain enough for torch.compile to
    trace: the first call of a compiled model parses its settings inside the graph (``json`` there broke it per
    layer)."""
    if isinstance(x, dict):
        return {key: _copy(value) for key, value in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return type(x)(_copy(value) for value in x)
    return x


@functools.cache
def cache_keyword() -> str:
    """The keyword by which this ``transformers`` takes a cache, in ``model(...)`` and ``model.generate(...)``:
    ``"cache"`` in recent releases (5.24), ``"past_key_values"`` in older ones (5.20 and before; 5.24 still takes it,
    with a warning). Code for both passes ``**{selective_attention.hf.cache_keyword(): cache}``."""
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


# --- registration --------------------------------------------------------------------------------------
def register(name: str = NAME) -> None:
    """Make ``attn_implementation=name`` (default ``"selective"``) available to every ``transformers``
    model built afterwards: ``from_config``, ``from_pretrained`` and ``set_attn_implementation``.
    Idempotent. ``save_pretrained`` of a model running it then records the name in config.json (every
    ``PretrainedConfig.to_dict`` does, once, :func:`_to_dict_with_record`), so ``from_pretrained`` picks it again; a
    process that loads such a model must call this first (``transformers`` refuses an unregistered name, loudly)."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
    config_class = transformers.PretrainedConfig
    if not getattr(config_class.to_dict, "_selective_record", False):  # once per process
        config_class.to_dict = _to_dict_with_record(config_class.to_dict)


def _runs_selective(name: object) -> bool:
    """Whether ``name`` is an attention implementation registered with this package's mask hook (``"selective"``,
    or another name :func:`register` was given)."""
    return isinstance(name, str) and AttentionMaskInterface._global_mapping.get(name) is padding_mask


def _to_dict_with_record(to_dict):
    """``PretrainedConfig.to_dict`` recording a selective model's implementation: ``attn_implementation`` = the
    config's current one when it is this package's (``save_pretrained`` writes it to config.json and
    ``from_pretrained`` reads it back as the model's implementation), and no stale record of it when the model now runs
    another. ``transformers`` itself serialises no implementation: a saved selective model came back from
    ``from_pretrained(path)`` running sdpa, silently (0.003 off in the logits of a tiny untrained Llama), and a
    record written at the first forward was lost by a load and save without one (a dtype conversion, a push). An
    explicit ``from_pretrained(..., attn_implementation=...)`` still wins."""

    @functools.wraps(to_dict)
    def recorded(self):
        out = to_dict(self)
        now = getattr(self, "_attn_implementation", None)
        if _runs_selective(now):
            out["attn_implementation"] = now
        elif isinstance(now, str) and _runs_selective(out.get("attn_implementation")):  # switched away: runs `now`
            del out["attn_implementation"]  # (a config of no model, `now` None, keeps a record set by hand)
        return out

    recorded._selective_record = True
    return recorded


def padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """The mask function registered with :func:`register`: hands :func:`attention_forward` the 2-D
    padding mask as it is (bool ``[B, kv_length]``, True = a real token, or ``None`` = no padding);
    causality and selection are built there. Refuses every mask other than plain causal (packed
    sequences, bidirectional or custom masks, a sliding window shorter than the sequence): selective
    attention would otherwise silently ignore it. A mask function other than transformers' causal one
    (a sliding window layer's, say) is evaluated on this call's positions and passes where it is causal
    there (a window at least as long as the sequence), or is not used by any layer (``config.layer_types`` all
    ``"full_attention"``). Also refuses a cache whose key slots run past the last query (a ``StaticCache``), and a
    model whose attention modules do not call ``transformers``' attention interface (they would run their own
    attention with this function's mask)."""
    config = kwargs.get("config")
    if config is not None:
        if not torch.compiler.is_compiling():
            _check_uses_interface(type(config))
            _check_dense_layers(config)
    # keys past the last query: a cache that allocates its slots ahead (transformers 5.24's static layers, the only
    # ones that give q_offset as a tensor), or a padding mask longer than the input
    if isinstance(q_offset, Tensor) or kv_offset + kv_length > q_offset + q_length:
        ends = "a position given as a tensor" if isinstance(q_offset, Tensor) else f"position {q_offset + q_length}"
        raise NotImplementedError(
            f"attn_implementation='{NAME}' got {kv_offset + kv_length} key slots for queries ending at {ends}: a "
            "cache that allocates its slots ahead (StaticCache, cache_implementation='static') is not supported, nor "
            "an attention_mask longer than the tokens given. Use selective_attention.hf.SelectiveCache (budget=None "
            "decodes exactly; a layer that selects cannot decode from a plain cache, which holds no votes), and a "
            "mask of the input's length."
        )
    local = kwargs.get("local_size")
    layer_types = getattr(config, "layer_types", None)
    # a window mask no layer reads (transformers 5.24 builds Qwen2-MoE's, sliding_window = 0, beside layer types all
    # full_attention): not checked. Every other mask is, the full-attention one with its overlays included.
    unused = local is not None and layer_types is not None and all(t == "full_attention" for t in layer_types)
    if mask_function is not causal_mask_function and not unused:
        span = q_offset + q_length - kv_offset  # the most keys a query of this call may see
        if local is not None and span > local:
            raise NotImplementedError(
                f"this model has layers that attend to a local span of {local} tokens (a sliding window, or chunked "
                f"attention) and this sequence has {span}; attn_implementation='{NAME}' attends to every earlier "
                "token, which would change the model. Set config.sliding_window (or attention_chunk_size) to None or "
                "larger than your sequences, or use attn_implementation='sdpa'."
            )
        device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
        if not _is_causal_here(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask,
                               device):  # fmt: skip
            raise NotImplementedError(
                f"attn_implementation='{NAME}' supports plain causal self-attention with an optional padding mask; "
                f"this model asked for another mask ({getattr(mask_function, '__name__', mask_function)!r}) under "
                "which some query attends to a later key or misses an earlier one: packed sequences (pass an "
                "attention_mask instead of packing them), a sliding window, a custom mask, or a decoder that attends "
                "both ways over a prefix (image tokens in Gemma 3 or PaliGemma, a prefix-LM: selective attention is "
                "causal, so such a model cannot run it in its decoder with those inputs). Use attn_implementation="
                "'sdpa' for this model."
            )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2-D padding mask [B, kv_length], got shape {tuple(attention_mask.shape)}.")
    return attention_mask[:, kv_offset : kv_offset + kv_length].bool()


@functools.cache
def _check_uses_interface(config_type: type) -> None:
    """Refuse a model family whose attention modules do not call ``transformers``' attention interface
    (``transformers`` 5.24 accepts a registered name for any model): judged as ``transformers`` judges it for
    ``set_attn_implementation`` (``PreTrainedModel._can_set_attn_implementation``), on the base model class of
    ``config_type``. Families it does not know (remote code) pass."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES.get(getattr(config_type, "model_type", None))
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    check = getattr(cls, "_can_set_attn_implementation", None)
    if check is None:
        return
    try:  # transformers' heuristic reads the model's source: without one (a .pyc-only install) it cannot judge
        inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return
    if not check():
        raise NotImplementedError(
            f"{cls.__name__} runs its own attention code instead of transformers' attention interface, so "
            f"attn_implementation='{NAME}' would not reach its layers (they would run standard attention with a "
            "mask they do not expect). Use a model family that goes through the interface (Llama, Qwen2/3, Mistral, "
            "Gemma, Phi-3, GPT-2, OPT, ...), or this one with its own attention (attn_implementation='eager')."
        )


def _check_dense_layers(config) -> None:
    """Refuse a model whose layers attend only to the keys an indexer picks (sparse attention: DeepSeek-V3.2's and
    GLM-MoE-DSA's ``"indexed_attention"`` layers, MiniMax-M3's ``"minimax_m3_sparse"`` ones): selective attention
    attends to every key, so such a model would silently change (MiniMax-M3 hands its picks to any other
    implementation as ``block_indices``) or fail inside ``transformers`` (the DSA families read a 4-D mask)."""
    sparse = sorted({t for t in getattr(config, "layer_types", None) or () if _is_sparse_layer(t)})
    if sparse:
        raise NotImplementedError(
            f"attn_implementation='{NAME}' attends to every key, and this model's layers of type {sparse} "
            f"({getattr(config, 'model_type', type(config).__name__)}) attend only to the keys an indexer picks "
            "(sparse attention): the model would change. Use attn_implementation='eager' or 'sdpa'."
        )


def _is_sparse_layer(layer_type: object) -> bool:
    return isinstance(layer_type, str) and (layer_type == "indexed_attention" or "sparse" in layer_type)


def _is_causal_here(mask_function, B: int, q_length: int, kv_length: int, q_offset: int, kv_offset: int,
                    attention_mask: Tensor | None, device, rows: int = 256) -> bool:  # fmt: skip
    """Whether ``mask_function(b, h, q, kv)`` (transformers' index-based mask functions) is ``kv <= q`` at every
    position of this call whose key is a real token (``attention_mask``, bool-like ``[B, >= kv_offset + kv_length]``,
    or None: all), evaluated ``rows`` queries at a time (never a ``[B, q, kv]`` tensor at once). A function that
    cannot take index tensors (a custom one written for scalars) counts as not causal."""
    b = torch.arange(B, device=device)[:, None, None, None]
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    kv = torch.arange(kv_offset, kv_offset + kv_length, device=device)[None, None, None, :]
    padding = None
    # (a mask shorter than the keys, a cache fed the whole sequence again: every key checked, and the attention
    # function then names the misuse; slicing it broke the broadcast below with a bare RuntimeError)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] >= kv_offset + kv_length:
        padding = ~attention_mask[:, kv_offset : kv_offset + kv_length].bool().to(device)[:, None, None, :]
    for q0 in range(0, q_length, rows):
        q = torch.arange(q_offset + q0, q_offset + min(q0 + rows, q_length), device=device)[None, None, :, None]
        try:
            got = torch.as_tensor(mask_function(b, h, q, kv), device=device)
        except Exception:  # e.g. data-dependent Python control flow on a scalar index
            return False
        same = got == (kv <= q)
        if not bool((same if padding is None else same | padding).all()):  # padding keys are removed anyway
            return False
    return True


# --- the attention function ------------------------------------------------------------------------------
# attention-function keyword arguments that change the attention itself (transformers models pass them through)
_CHANGES_ATTENTION = {
    "s_aux": "attention sinks, e.g. gpt-oss",
    "sinks": "attention sinks",
    "position_bias": "a learned position bias",
    "attention_bias": "a learned bias",
    "block_indices": "the key blocks a sparse layer attends to, e.g. MiniMax-M3",
    "indices": "the keys a sparse layer attends to, e.g. DeepSeek-V3.2",
}


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The function behind ``attn_implementation="selective"``.

    Args:
        module: the model's attention module (reads ``module.config``, ``module.layer_idx``).
        query: ``[B, H, Lq, D]``; key, value: ``[B, Hkv, Lk, D]`` (``H % Hkv == 0``).
        attention_mask: the 2-D padding mask from :func:`padding_mask` (bool ``[B, Lk]``, True = real),
            or ``None``.
        dropout: dropout on the attention weights (``transformers`` passes 0 in eval mode).
        scaling: the logit scale (default ``1 / sqrt(D)``).

    Returns:
        ``([B, Lq, H, D], None)``: no attention weights are returned (``output_attentions=True`` logs a warning
        once, naming :func:`selective_attention.functional.attention_weights`).

    Without a cache (training, evaluation, a prompt) this is one exact forward: the paper's F from the
    voting head in selecting layers, standard causal attention elsewhere. With a
    :class:`SelectiveCache`, the cache layer does the work (exact prefill, then one token at a time). A call
    the function refuses leaves that cache as it was before the call (or, when other layers already hold the
    call's tokens, marked unusable, naming the error).
    """
    # Claim first: the cache layer's update() already counted these tokens, and a refusal must undo that.
    cached = _claim(key)
    args = (module, query, key, value, attention_mask, cached, dropout, scaling, sliding_window, softcap, kwargs)
    if cached is None:
        _refuse_a_second_call(key)
        return _forward(*args)
    try:
        return _forward(*args)
    except BaseException as e:  # an interrupt too: in the last layer's write every layer's count already agrees
        cached.refused(key.shape[2], e)
        raise


_KV_SHARED = (
    f"attn_implementation='{NAME}' cannot serve a model whose later layers reuse an earlier layer's keys and values "
    "(config.num_kv_shared_layers={n}: Gemma 3n, Gemma 4) while decoding with a cache: the shared keys bypass the "
    "cache's selection (SelectiveCache decoded such a model wrongly, silently). Generate with use_cache=False "
    "(selecting only in the layers that own their keys), or use the model's own attention."
)


def _forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    cached: SelectiveLayer | None,
    dropout: float,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
    kwargs: dict,
) -> tuple[Tensor, None]:
    """:func:`attention_forward` once ``cached`` (the :class:`SelectiveLayer` whose ``update`` returned ``key``, or
    None) is claimed."""
    if kwargs.get("output_attentions"):
        logger.warning_once(
            f"attn_implementation='{NAME}' does not return attention weights (output_attentions=True gives none). "
            "Compute them from a layer's q/k with selective_attention.functional.attention_weights(q, k, "
            "selection=...), or use attn_implementation='eager' for the standard model's."
        )
    if softcap:
        raise NotImplementedError(
            f"attn_implementation='{NAME}' does not apply logit soft-capping (softcap={softcap}); this model (e.g. "
            "Gemma 2) would silently change. Use the model's own attention (attn_implementation='eager': Gemma 2 "
            "refuses 'sdpa' with soft-capping), or set config.attn_logit_softcapping=None (another model)."
        )
    changes = {k: kwargs[k] for k in _CHANGES_ATTENTION if kwargs.get(k) is not None}
    if changes:
        raise NotImplementedError(
            f"attn_implementation='{NAME}' does not apply "
            f"{'; '.join(f'{k} ({_CHANGES_ATTENTION[k]})' for k in sorted(changes))}: this model would silently "
            "change. Use attn_implementation='eager' or 'sdpa'."
        )
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise NotImplementedError(
            f"attn_implementation='{NAME}' is causal self-attention; {type(module).__name__} is not causal. In a "
            "composite model (a vision-language model) give the text decoder alone selective attention: "
            f"attn_implementation={{'text_config': '{NAME}', '': 'sdpa'}} (one entry per sub-config; '' the rest)."
        )
    if cached is None and isinstance(kwargs.get("cache"), SelectiveCache):  # passed on by an older model's **kwargs
        raise TypeError(
            f"this transformers ({transformers.__version__}) takes the cache as past_key_values=, not cache=: pass "
            "past_key_values=SelectiveCache(...) (or **{selective_attention.hf.cache_keyword(): cache}); with cache= "
            "the model ran without it."
        )
    config = getattr(module, "config", None)
    layer_idx = getattr(module, "layer_idx", None)
    if config is None or layer_idx is None:
        raise NotImplementedError(
            f"attn_implementation='{NAME}' reads module.config and module.layer_idx, which {type(module).__name__} "
            "does not have."
        )
    s = settings(config)
    sel = s.selection_for(layer_idx)
    B, H, Lq, D = query.shape
    if sel is not None:
        sel.validate(H)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"attn_implementation='{NAME}' takes a 2-D padding mask [B, L] (True or 1 = a real token) and builds the "
            f"causal and selection masks itself; got a {attention_mask.dim()}-D mask {tuple(attention_mask.shape)} "
            "(a custom 4-D mask). Pass the 2-D padding mask, or use attn_implementation='sdpa' for custom masks."
        )
    real = attention_mask
    if real is None and Lq > 1:  # with any cache or none: packed rows would attend across their sequences
        _check_not_packed(kwargs.get("position_ids"))
    seen = key.shape[2] if cached is None else cached.seen
    if sliding_window is not None and seen > sliding_window:
        raise NotImplementedError(
            f"layer {layer_idx} has a sliding window of {sliding_window} tokens and this sequence has {seen}; "
            f"attn_implementation='{NAME}' attends to every earlier token, which would change the model. Set "
            "config.sliding_window=None (or larger than your sequences), or use attn_implementation='sdpa'."
        )
    if cached is not None:
        # under torch.autocast, q and k may come out of the rotary embedding in float32 beside a bfloat16 v: one
        # dtype, autocast's, as selective_attention takes them on the other paths (the cache then stores that dtype)
        query, key, value = autocast_inputs(query, key, value)
        if cached.owner is not None:
            cached.owner.check_layers(getattr(config, "num_hidden_layers", None))
            check_threshold_applies(cached.owner.threshold, s.layers != ())  # layers=[]: no layer selects
        if getattr(config, "num_kv_shared_layers", 0):
            raise NotImplementedError(_KV_SHARED.format(n=config.num_kv_shared_layers))
        if dropout:
            raise ValueError(
                f"decoding through a SelectiveCache with attention dropout {dropout}: put the model in eval mode."
            )
        # generate(use_cache=False) re-feeds the whole sequence every step, which the cache would take for new tokens
        # (silently wrong on an unpadded batch). use_cache=False here is the user's, or a decoder layer's own default
        # where the model passes none down (Olmo 3, CWM, NanoChat: every call says False, and refusing it refused
        # these models' every generate), so it is not refused alone: a first call (the prompt) and calls of one token
        # are what generate with the cache gives. A later call of several tokens is refused when its positions start
        # again instead of following the tokens the cache has seen (also where use_cache does not reach here: Gemma
        # 2, 3), or, with no positions to read (or compiled, reading no value), when use_cache says False
        pos = kwargs.get("position_ids")
        use_cache_off = kwargs.get("use_cache") is False
        refed = False
        if (
            Lq > 1
            and cached.cache is not None
            and cached.first is not None
            and (
                real is None or real.shape[-1] == cached.seen  # else attend() names the misuse (a new prompt)
            )
        ):
            if torch.compiler.is_compiling():
                refed = use_cache_off
            elif real is None or bool(real[:, -Lq:].all()):  # new padding: attend() names that instead
                refed = not _positions_follow(pos, cached, real) if isinstance(pos, Tensor) else use_cache_off
        if refed and use_cache_off:
            raise ValueError(
                "a SelectiveCache was passed with use_cache=False: the model then reads the whole sequence again at "
                "every step, which the cache would store as new tokens. Drop use_cache=False (the cache decodes "
                "exactly), or pass no cache."
            )
        if refed:
            raise ValueError(
                f"these {Lq} tokens' positions end at {pos[..., -1].flatten().tolist()}, but the SelectiveCache has "
                f"already seen {cached.seen - Lq} tokens before them: they start again instead of following those. "
                "Either generate(use_cache=False) is feeding the whole sequence again at every step (drop "
                "use_cache=False: the cache decodes exactly), or this is a new prompt (pass a new SelectiveCache() "
                "or call cache.reset())."
            )
        out = cached.attend(query, key, value, real, sel, scaling)
        module._selective_masked = None
        # the positions the next call of several tokens must go past (compiled: not read, as the check above)
        cached.last_pos = pos[..., -1].detach().clone() if isinstance(pos, Tensor) and pos.dim() and not (
            torch.compiler.is_compiling()) else None  # fmt: skip
        return out.transpose(1, 2).contiguous(), None
    Lk = key.shape[2]
    if Lq != Lk:
        if sel is not None:
            n_shared = getattr(config, "num_kv_shared_layers", 0)
            if n_shared and getattr(module, "is_kv_shared_layer", False):  # Gemma 4 under logits_to_keep: only
                raise NotImplementedError(  # the kept tokens' queries from its first sharing layer on
                    f"layer {layer_idx} selects, and got {Lq} queries for {Lk} keys: it reuses an earlier layer's "
                    f"keys (config.num_kv_shared_layers={n_shared}), and this model passes the later layers only the "
                    "tokens whose logits are kept (generate keeps the last). Select only in the layers that own their "
                    f"keys: configure(..., layers=range({getattr(config, 'num_hidden_layers', '?')} - {n_shared})), "
                    "and generate with use_cache=False; or call the model with logits_to_keep=0 (every token)."
                )
            fix = (
                "Pass use_cache=False (this model's shared keys keep SelectiveCache out)."
                if n_shared
                else "Decode with generate(..., cache=selective_attention.hf.SelectiveCache()), or use_cache=False."
            )
            raise ValueError(
                f"layer {layer_idx} selects, and got {Lq} queries for {Lk} cached keys: the votes of the earlier "
                f"tokens are not in a plain cache. {fix}"
            )
        kpm = None if real is None else ~real[:, -Lk:]
        out = _attend(query, key, value, is_causal=True, key_padding_mask=kpm, dropout_p=dropout, scale=scaling)
        module._selective_masked = None
        return out.transpose(1, 2).contiguous(), None
    kpm = None if real is None else ~real[:, -Lk:]
    want_rows = sel is not None and s.memory_eps > 0 and module.training and torch.is_grad_enabled()
    if want_rows and getattr(module, "_is_replica", False):  # a torch.nn.DataParallel replica
        raise ValueError(f"the memory loss cannot be computed under torch.nn.DataParallel: {_DATA_PARALLEL}")
    if sel is None:
        out = _attend(query, key, value, is_causal=True, key_padding_mask=kpm, dropout_p=dropout, scale=scaling)
        rows = None
    elif want_rows:
        out, rows = _attend(
            query, key, value, selection=sel, key_padding_mask=kpm, dropout_p=dropout, scale=scaling,
            memory_tau=s.memory_tau,
        )  # fmt: skip
    else:
        out = _attend(query, key, value, selection=sel, key_padding_mask=kpm, dropout_p=dropout, scale=scaling)
        rows = None
    # the memory loss reads the last training forward's masked counts [B, G, L] (and which tokens are real)
    module._selective_masked = (
        None
        if rows is None
        else _Masked(rows, None if real is None else real[:, -Lk:], getattr(config, "_attn_implementation", None))
    )
    return out.transpose(1, 2).contiguous(), None


def _positions_follow(pos: Tensor, cached: SelectiveLayer, real: Tensor | None) -> bool:
    """Whether the last of a call's ``position_ids`` ``[B|1, Lq]`` follows the tokens ``cached`` has seen (this call's
    included): at least the smallest of the ways transformers counts positions, over every token (a model's default,
    the cache position: padding counted), from each sequence's first real token, or over real tokens only (positions
    built from the padding mask: gaps of padding inside the sequence not counted). Larger is a text's later window
    (positions that start at an offset), which follows too; a whole sequence fed again ends below all of them. When
    the earlier calls gave position ids, the call's first must be past the last of them (the same window fed again,
    at any offset, is not)."""
    if cached.last_pos is not None:  # the positions the cached tokens ended at: the call must start past them
        return bool((pos[..., 0].to(cached.last_pos.device) > cached.last_pos).all())
    last = pos[..., -1].to(cached.first.device)
    least = cached.seen - 1 - cached.first  # [B]: from each sequence's first real token (<= over every token)
    if real is not None:
        least = torch.minimum(least, real.sum(-1).to(last.device) - 1)  # real tokens only
    return bool((last >= least).all())


_CONSECUTIVE = threading.local()  # the position_ids last found consecutive: every layer gets the same tensor


def _check_not_packed(position_ids: Tensor | None) -> None:
    """Refuse packed sequences that reach the attention function unmasked: ``position_ids`` ``[B, L]`` that do not
    count up by one along a row. transformers builds the packed mask (which :func:`padding_mask` refuses) only
    without a cache, and models build one by default (``use_cache``), so the positions are what tells. Checked once
    per tensor (not per layer: a check reads the values, a device sync); not under ``torch.compile``, where the
    branch on values would break the graph (transformers does not detect packing there either)."""
    if not isinstance(position_ids, Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] < 2:
        return
    if torch.compiler.is_compiling():
        return
    version = None if position_ids.is_inference() else position_ids._version  # inference tensors have none
    last = getattr(_CONSECUTIVE, "last", None)
    if version is not None and last is not None and last[0]() is position_ids and last[1] == version:
        return  # checked, and unchanged since (an inference tensor can change unseen: checked every time)
    restart = torch.diff(position_ids, dim=-1) != 1  # [B, L - 1]
    if bool(restart.any()):
        row = int(restart.any(-1).nonzero()[0, 0])
        shown = position_ids[row, :16].tolist()
        raise NotImplementedError(
            f"attn_implementation='{NAME}' got packed sequences: position_ids that restart within a row (row {row}: "
            f"{shown}{' ...' if position_ids.shape[-1] > 16 else ''}) and no attention_mask. Selective attention "
            "would let each token attend to, and vote on, the other sequences of its row. Pass an attention_mask "
            "instead of packing sequences (one sequence per row, padded), or use attn_implementation='sdpa' with "
            "use_cache=False (transformers masks packed sequences only without a cache)."
        )
    _CONSECUTIVE.last = (weakref.ref(position_ids), version)


class _Masked:
    """One layer's masked counts from the last training forward (``rows`` ``[B, G, L]``, part of the autograd graph,
    and ``real``, bool ``[B, L]`` or None), read by :func:`memory_loss`, and the attention implementation's name the
    layer had then (``impl``: a layer switched to another one since keeps stale counts). A copy of the model
    (``copy.deepcopy``, as for an EMA or teacher model, or pickling) starts without them: graph tensors cannot be
    deep-copied."""

    __slots__ = ("rows", "real", "impl")

    def __init__(self, rows: Tensor, real: Tensor | None, impl: str | None = None) -> None:
        self.rows, self.real, self.impl = rows, real, impl

    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return (type(None), ())


def _attend(q: Tensor, k: Tensor, v: Tensor, **kw):
    """``selective_attention`` with grouped-query keys/values ``[B, Hkv, L, D]`` (nothing repeated)."""
    return selective_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1], **kw)


# --- the memory loss -------------------------------------------------------------------------------------
_DATA_PARALLEL = (
    "its forward runs on per-GPU replicas of the model, which keep the masked counts the memory loss reads, and the "
    "wrapped model's own layers never see them. Use DistributedDataParallel (launch with torchrun; Trainer then "
    "uses it), or train on one GPU (CUDA_VISIBLE_DEVICES=0), or set memory_eps=0."
)


def memory_loss(model: torch.nn.Module) -> Tensor:
    """The paper's memory loss ``L_mem`` of the model's last training forward (DESIGN §4): per
    selecting layer, the soft count of tokens still unmasked, ``M_l[i] = (real tokens up to i) -
    sum_j min(F_l[i, j], tau) / tau``; ``L_mem = sum_l max_i M_l[i] / (n_layers * n_tokens)``,
    per sequence over its real tokens, averaged over the batch. Differentiable.

    Needs ``memory_eps > 0`` in the config (:func:`configure`) so that the forward computes the counts,
    the model in training mode and gradients enabled; raises otherwise, naming what is missing. Refuses a
    ``torch.nn.DataParallel`` model (its replicas keep the counts; use DistributedDataParallel)."""
    if isinstance(model, torch.nn.DataParallel):
        raise ValueError(f"memory_loss got a torch.nn.DataParallel model: {_DATA_PARALLEL}")
    found, now = [], set()
    for m in model.modules():
        if hasattr(m, "_selective_masked"):
            # counts left by an earlier forward of a layer whose attention has since been switched away
            # (set_attn_implementation("sdpa")) are stale: its last forward did not run this function
            masked, impl = m._selective_masked, getattr(getattr(m, "config", None), "_attn_implementation", None)
            if masked is not None and masked.impl is not None and impl is not None and impl != masked.impl:
                now.add(impl)
                continue
            found.append(masked)
    if not found:
        raise ValueError(
            "memory_loss found no selective attention layer output: run a forward of a model built with "
            f"attn_implementation='{NAME}' first"
            + (
                f" (its attention is now {', '.join(map(repr, sorted(now)))}; switch back with "
                f"model.set_attn_implementation('{NAME}'))."
                if now
                else "."
            )
        )
    masked = [f for f in found if f is not None]
    if not masked:
        raise ValueError(
            "memory_loss: the last forward computed no masked counts. They are computed in training mode "
            "(model.train()), with gradients enabled, without a cache, when the config has memory_eps > 0 "
            "(selective_attention.hf.configure(config, memory_eps=0.1)). With activation checkpointing, use its "
            "non-reentrant mode (transformers' default; use_reentrant=False): the reentrant one runs the forward "
            "without gradients."
        )
    real = masked[0].real
    rows = [m.rows for m in masked]
    if real is None:
        return _memory_loss(rows)
    # per sequence over its real tokens: the same value as the unpadded sequence alone
    per_seq = []
    for b in range(real.shape[0]):
        idx = real[b].nonzero().squeeze(-1)
        if idx.numel():
            per_seq.append(_memory_loss([r[b : b + 1, :, idx] for r in rows]))
    if not per_seq:  # a batch of padding only: no token to keep or mask
        return rows[0].new_zeros(())
    return torch.stack(per_seq).mean()


def memory_loss_term(model: torch.nn.Module) -> Tensor:
    """``memory_eps * memory_loss(model)`` with the config's ``memory_eps``: add it to the task loss
    after a training forward. Zero (a tensor) when ``memory_eps`` is 0. Refuses a ``torch.nn.DataParallel``
    model otherwise (:func:`memory_loss`)."""
    s = settings(model.module.config if isinstance(model, torch.nn.DataParallel) else model.config)
    if s.memory_eps == 0:
        return torch.zeros(())
    s.check_memory_loss()
    return s.memory_eps * memory_loss(model)


class SelectiveTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the model's loss plus ``memory_eps * L_mem`` (the paper's
    memory loss, :func:`memory_loss`), with ``memory_eps`` from the model config. With ``memory_eps > 0`` it refuses
    ``torch.nn.DataParallel`` (what ``Trainer`` uses on several GPUs of one process): launch with ``torchrun`` for
    DistributedDataParallel."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's micro-batches of one optimizer step; also notes how many sequences each holds (for the
        memory loss's weights under gradient accumulation, :meth:`compute_loss`)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_sequences = [_sequences(b) for b in batches]
        return batches, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if isinstance(model, torch.nn.DataParallel) and model.training and settings(model.module.config).memory_eps:
            raise ValueError(f"SelectiveTrainer with memory_eps > 0 and torch.nn.DataParallel: {_DATA_PARALLEL}")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        inner = getattr(model, "module", model)  # unwrap DDP/accelerate wrappers
        if model.training and settings(inner.config).memory_eps > 0:
            term = memory_loss_term(inner).to(loss.device)
            # The term is a mean over this micro-batch's sequences; over an optimizer step it should be the mean
            # over the step's sequences: weight n_micro / n_step (1 / micro-batches when the sizes are not known;
            # with uneven micro-batches, 2 + 2 + 1, that gave the last sequence 1/3 of the term instead of 1/5).
            # The Trainer then divides the loss by the number of micro-batches, unless the model already normalised
            # it over the whole accumulated batch (its own rule, repeated here): that division is undone first.
            ga = getattr(self, "current_gradient_accumulation_steps", 1)
            sizes = getattr(self, "_step_sequences", None) or []
            n = _sequences(inputs)
            weight = n / sum(sizes) if n and all(sizes) and len(sizes) == ga and n in sizes else 1 / ga
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                    self.compute_loss_func is not None
                )
            loss = loss + term * (weight if scaled else weight * ga)
        return (loss, outputs) if return_outputs else loss


def _sequences(batch) -> int | None:
    """The number of sequences in a Trainer batch (a mapping with ``input_ids`` or ``inputs_embeds``), or None."""
    x = batch.get("input_ids", batch.get("inputs_embeds")) if isinstance(batch, Mapping) else None
    return int(x.shape[0]) if isinstance(x, Tensor) and x.dim() >= 2 else None


# --- pruned generation ---------------------------------------------------------------------------------
_PENDING = threading.local()  # the layer whose update() ran last, until its attention call claims it


def _claim(key: Tensor) -> SelectiveLayer | None:
    """The cache layer that returned exactly this ``key`` tensor from ``update``, if any (by identity)."""
    layer = getattr(_PENDING, "layer", None)
    if layer is None or layer._pending is None or layer._pending[0] is not key:
        return None
    _PENDING.layer = None
    # weak references: a prompt's keys, and a finished cache's layer with its buffers, are not kept alive by this
    _PENDING.claimed = (weakref.ref(key), weakref.ref(layer))
    return layer


def _refuse_a_second_call(key: Tensor) -> None:
    """Refuse an attention call given the keys a cache layer's attention call already claimed: a model that attends
    twice per cache update (DiffLlama's differential attention) took the second call for one without a cache, which
    at a decoding step sees only the new token's keys (silently another model: greedy tokens apart from the second)."""
    claimed = getattr(_PENDING, "claimed", None)
    if claimed is None or claimed[0]() is not key:
        return
    msg = (
        "this model calls its attention function twice with the keys of one cache update (as DiffLlama's "
        "differential attention does); SelectiveCache serves one attention call per layer and update, and the second "
        "would see only the new tokens' keys. Generate with use_cache=False, or use attn_implementation='sdpa' with "
        "its own cache."
    )
    layer = claimed[1]()
    if layer is not None and layer.owner is not None:
        layer.owner.broken = msg  # the first call stored these tokens
    raise NotImplementedError(msg)


class SelectiveLayer(DynamicLayer):
    """One layer of a :class:`SelectiveCache`.

    ``update(k, v)`` only records the new keys/values and counts them as seen; the attention function
    then claims them (:func:`attention_forward`) and calls :meth:`attend`, which reads the prompt
    exactly, or decodes one token at a time through a :class:`~selective_attention.kv_cache.LayerCache`
    (evict, write, attend with ``-Fcum``, vote). Positions kept in the cache are counted from each
    sequence's first real token, so the protected token has position 0 and padding is never stored.
    """

    is_croppable = False

    def __init__(
        self,
        budget: int | None = None,
        threshold: float | None = None,
        policy: str = "selective",
        recent: int | None = None,
    ) -> None:
        super().__init__()
        self.budget, self.threshold, self.policy, self.recent = budget, threshold, policy, recent
        self.cache: LayerCache | None = None
        self.seen = 0  # tokens seen, padding included: HF's positions and mask sizes count these
        self.first: Tensor | None = None  # [B] each sequence's first real token (absolute index)
        self.last_pos: Tensor | None = None  # [B|1] the position id of the last token attended (None: not given)
        self._pending: tuple[Tensor, Tensor] | None = None
        self._writing = False  # attend() is changing the stored state (a failure then cannot be undone)
        self.owner: SelectiveCache | None = None  # the SelectiveCache holding this layer

    # --- what transformers calls ------------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        last = getattr(_PENDING, "layer", None)
        if last is not None and last._pending is not None and last.owner is not self.owner:
            last._pending = None  # left by another cache (a failed or bypassed run): not this cache's business
        elif last is not None and last._pending is not None:
            last._pending = None  # raise once, not on every later call
            msg = (
                "SelectiveCache: a layer's keys were cached but never attended through "
                f"attn_implementation='{NAME}'. Build the model with attn_implementation='{NAME}' (every layer), "
                "or use a plain cache (DynamicCache). A model that transforms its keys after caching them "
                "(multi-head latent attention: DeepSeek-V2/V3) cannot prune through SelectiveCache: generate with "
                "use_cache=False there."
            )
            if self.owner is not None:
                self.owner.broken = msg  # that layer counted tokens it never stored
            raise RuntimeError(msg)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        self.seen += key_states.shape[-2]
        _PENDING.layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.cache, self.first, self._pending, self.seen, self._writing = None, None, None, 0, False
        self.last_pos = None
        self.is_initialized = False

    def refused(self, n_new: int, error: BaseException) -> None:
        """Undo :meth:`update` of ``n_new`` tokens after the attention function refused (or failed) the call that
        claimed them. The cache stays usable when this layer was the call's first (every layer has then seen as
        many tokens); otherwise earlier layers already hold the call's tokens, or the failure came while the state
        was being written, and the :class:`SelectiveCache` is marked unusable, naming ``error``."""
        writing, self._writing, self._pending = self._writing, False, None
        self.seen -= n_new
        if self.owner is not None and (writing or any(layer.seen != self.seen for layer in self.owner.layers)):
            self.owner.broken = f"{type(error).__name__}: {error}"

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError(
            "SelectiveCache does not support beam search (num_beams > 1): beams would share evicted tokens. "
            "Use greedy or sampling with SelectiveCache, or beam search with use_cache=False (a selecting layer cannot "
            "read its votes back from a plain cache)."
        )

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "SelectiveCache cannot crop (assisted or speculative decoding): evicted tokens and added votes cannot be "
            "undone, and a plain cache holds no votes for a layer that selects, so assisted and speculative decoding "
            "cannot serve a model with selecting layers. Generate without assistant_model / prompt_lookup_num_tokens "
            "(greedy or sampling with SelectiveCache)."
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.cache is not None:
            raise NotImplementedError("SelectiveCache cannot repeat a filled cache (contrastive search).")

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.cache is not None:
            raise NotImplementedError("SelectiveCache cannot select batch rows of a filled cache.")

    # --- what the attention function calls --------------------------------------------------------------
    def occupancy(self) -> int:
        return 0 if self.cache is None else int(self.cache.occupancy().max())

    def kv_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.kv_bytes()

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None, sel: Selection | None, scale: float | None
    ) -> Tensor:
        """``q`` ``[B, H, Lq, D]`` and the ``k, v`` ``[B, Hkv, Lq, D]`` given to ``update`` -> ``[B, H, Lq, D]``.

        ``real``: bool ``[B, seen]`` (True = real token) or ``None``."""
        self._pending = None
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        Lq = q.shape[2]
        start = self.seen - Lq
        if real is not None and real.shape[-1] != self.seen:
            raise ValueError(
                f"SelectiveCache: the padding mask covers {real.shape[-1]} tokens but the cache has seen {self.seen} "
                f"(it held {start} before this call): the mask must cover every token the cache has seen, and these "
                "new ones. A new prompt needs a new SelectiveCache() or cache.reset(); a continuation passes the "
                "whole sequence so far with its mask (generate does); generate(..., use_cache=False) feeds the whole "
                "sequence each step with the cache, so drop use_cache=False or pass no cache."
            )
        if self.cache is None:
            if start != 0:
                raise RuntimeError("SelectiveCache: the first call of a layer must start at position 0.")
            return self._prefill(q, k, v, real, sel, scale)
        padded_continuation = (
            "SelectiveCache: padding after the prompt (a padded continuation) is not supported; pad prompts on the "
            "left and generate."
        )
        if real is not None and torch.compiler.is_compiling():
            # compiled: checked on the device, no branch on the mask's values (a graph break each step); the step
            # would otherwise store and attend the padding as real tokens
            torch._assert_async(real[:, start:].all(), padded_continuation)
        elif real is not None and not self._continuation_checked(real, start):
            if not bool(real[:, start:].all()):
                raise NotImplementedError(padded_continuation)
            if self.owner is not None and not real.is_inference():  # inference tensors have no version: no memo
                self.owner._checked = (weakref.ref(real), real._version, start)
        self._writing = True
        if Lq == 1:  # a generated token
            out = self._step(q, k, v, start, sel, scale)
        else:
            out = torch.cat([self._step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], start + t, sel,
                                        scale) for t in range(Lq)], dim=2)  # fmt: skip
        self._writing = False
        return out

    def _continuation_checked(self, real: Tensor, start: int) -> bool:
        """Whether another layer of this call already found ``real[:, start:]`` all real: every layer gets the same
        padding mask tensor, and the check reads its values (a device sync), once per call is enough."""
        checked = None if self.owner is None or real.is_inference() else self.owner._checked
        return checked is not None and checked[0]() is real and checked[1:] == (real._version, start)

    def _prefill(
        self, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None, sel: Selection | None, scale: float
    ) -> Tensor:
        """The prompt, exactly; then keep what the budget and threshold allow (padding is never kept)."""
        B, H, T, D = q.shape
        kpm = None if real is None else ~real[:, :T]
        if kpm is not None and not bool((~kpm).any(-1).all()):
            raise ValueError(
                "SelectiveCache: a row of the first call's tokens is all padding (a prompt of padding only, or "
                "generate(prefill_chunk_size=...) smaller than a row's left padding: drop prefill_chunk_size)."
            )
        if sel is None:
            y = _attend(q, k, v, is_causal=True, key_padding_mask=kpm, scale=scale)
        else:
            y = _attend(q, k, v, selection=sel, key_padding_mask=kpm, scale=scale)
        self._writing = True
        self.first = torch.zeros(B, dtype=torch.long, device=q.device) if kpm is None else (~kpm).long().argmax(-1)
        capacity = self.budget if self.budget is not None else T + 64
        self.cache = LayerCache.empty(
            B, capacity, n_heads=k.shape[1], n_groups=1 if sel is None else sel.n_groups(H), head_dim=D,
            budget=self.budget, threshold=self.threshold, policy=self.policy, recent=self.recent, dtype=k.dtype,
            device=k.device,
        )  # fmt: skip
        fcum, acc = prompt_scores(q, k, sel, scale=scale, key_padding_mask=kpm, received=self.cache.tracks_attention)
        self.cache.fill(k, v, fcum, key_padding_mask=kpm, acc=acc)
        self._writing = False
        return y

    def _step(self, q: Tensor, k: Tensor, v: Tensor, position: int, sel: Selection | None, scale: float) -> Tensor:
        """One token (``q`` ``[B, H, 1, D]``, ``k, v`` ``[B, Hkv, 1, D]``) at absolute ``position``."""
        c = self.cache
        # unbudgeted and a row is full (rows with more padding still have free slots): double the slots (read on the
        # device only once the host count says a row may be full)
        # (compiled, the count is not kept: read it there every step, as before the count)
        if (
            c.budget is None
            and (torch.compiler.is_compiling() or c.upper >= c.capacity)
            and bool((c.pos >= 0).all(dim=-1).any())
        ):
            self.cache = c = c.grown(2 * c.capacity)
        return c.step(q, k, v, position - self.first, sel, scale=scale)


class SelectiveCache(Cache):
    """A ``transformers`` cache for ``generate`` that prunes by the paper's rule.

    Args:
        budget: ``None`` (keep everything: exact, greedy decoding equals full recomputation), an int
            for every layer, or one per layer (an int, or ``None``: that layer keeps everything): at most
            that many tokens per layer are stored and attended at any step, the newest included (>= 2: the
            first real token and the newest). A layer that does not select (left out of
            ``configure(layers=[...])``) has F = 0, so a budget there evicts the oldest tokens (a sliding
            window, the first real token kept); ``None`` in its place keeps all of them. A budget's slots are
            allocated when the prompt is read, so keep it within what a sequence will reach.
        threshold: evict any token whose accumulated penalty F exceeds it.
        policy: which token a full layer evicts: ``"selective"`` (the paper: the largest accumulated F),
            ``"window"`` (StreamingLLM-style: the oldest, the first real token kept) or ``"h2o"`` (H2O-style
            heavy hitters: the least attention received so far, summed over heads, outside a recent window), the
            baselines at the same memory (:mod:`selective_attention.kv_cache`).
        recent: ``"h2o"`` only: the recent window in tokens, the newest included (default: half of each budget).

    The first call of each layer (the prompt) is read exactly, then pruned; tokens given in later calls, one or
    several at a time (a continuation, or ``generate(prefill_chunk_size=...)``'s later chunks), go through one at a
    time under the budget, as generated tokens do: with a budget, chunked prefill is not the same as one prefill.

    Pass it as ``model.generate(..., cache=SelectiveCache(...))`` with a model built with
    ``attn_implementation="selective"``. Greedy decoding and sampling work; beam search, assisted
    decoding and contrastive search raise (they need to reorder or crop what was evicted). A call that
    fails part-way (some layers hold its tokens, others not) leaves the cache unusable: every later use
    raises, naming the first error, until :meth:`reset`.
    """

    def __init__(
        self,
        budget: int | Sequence[int | None] | None = None,
        threshold: float | None = None,
        policy: str = "selective",
        recent: int | None = None,
    ) -> None:
        budget = budget_value(budget)  # a list may hold None: that layer unbudgeted
        check_policy(policy, threshold, recent, budget=budget)
        self.budget, self.threshold, self.policy, self.recent = budget, threshold, policy, recent
        self.broken: str | None = None  # the error that left the layers disagreeing on the tokens seen
        self._checked: tuple | None = None  # the padding mask a layer last found all real after the prompt
        super().__init__(layers=[])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_checked"] = None  # a weak reference (to a padding mask): not picklable, and a call's memo only
        return state

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise RuntimeError(
                f"this SelectiveCache was left part-way through a call by an earlier error ({self.broken}); its layers "
                "no longer hold the same tokens. Pass a new SelectiveCache(), or call cache.reset() to empty it."
            )

    def reset(self) -> None:
        """Empty every layer (a cache left unusable by an error included)."""
        self.broken = None
        super().reset()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        self._check_usable()
        return super().get_seq_length(layer_idx)

    def check_layers(self, n_layers: int | None) -> None:
        """Refuse a per-layer budget list of another length than the model's ``n_layers`` (None: unknown)."""
        if isinstance(self.budget, list) and n_layers is not None and len(self.budget) != n_layers:
            raise ValueError(
                f"SelectiveCache(budget=...) lists {len(self.budget)} budgets and the model has {n_layers} layers; "
                f"give one int for every layer, or {n_layers} entries (an int, or None for a layer that keeps "
                "everything)."
            )

    def _budget_for(self, layer_idx: int) -> int | None:
        if self.budget is None or isinstance(self.budget, int):
            return self.budget
        if layer_idx >= len(self.budget):
            raise ValueError(f"budget lists {len(self.budget)} layers; the model has more (layer {layer_idx}).")
        return self.budget[layer_idx]

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        self._check_usable()
        held = next((layer.first.shape[0] for layer in self.layers if layer.first is not None), None)
        if held is not None and key_states.shape[0] != held:  # refused before any layer counts the call's tokens
            raise ValueError(
                f"this SelectiveCache holds {held} sequences and the call has {key_states.shape[0]}: a cache serves "
                "the batch of its first call. For a new batch pass a new SelectiveCache(), or call cache.reset()."
            )
        n_new = key_states.shape[-2]
        # every layer must have seen the same tokens: a call that stopped between layers (an error outside the
        # attention function, an interrupt) leaves them apart, and that state must never be decoded from
        before = self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0
        want = (self.layers[0].seen if self.layers else 0) - (n_new if layer_idx > 0 else 0)
        if before != want or (layer_idx == 0 and any(layer.seen != want for layer in self.layers)):
            self.broken = (
                f"its layers hold different numbers of tokens ({[layer.seen for layer in self.layers]}): an earlier "
                "call stopped part-way between layers"
            )
            self._check_usable()
        while len(self.layers) <= layer_idx:
            self.layers.append(
                SelectiveLayer(self._budget_for(len(self.layers)), self.threshold, self.policy, self.recent)
            )
            self.layers[-1].owner = self
        return self.layers[layer_idx].update(key_states, value_states)

    def _no_recurrent_state(self, *args, **kwargs):
        raise NotImplementedError(
            "SelectiveCache holds attention layers only, and this model has layers that keep a recurrent state "
            "(linear-attention or state-space layer: a hybrid model such as Qwen3-Next or Jamba). Generate such a "
            "model without a SelectiveCache and with use_cache=False (each step recomputed: exact, slower), or with "
            "attn_implementation='sdpa' and its default cache."
        )

    get_conv_state = update_conv_state = get_recurrent_state = update_recurrent_state = _no_recurrent_state

    def occupancy(self) -> list[int]:
        """Kept tokens per layer (the most over the batch)."""
        return [layer.occupancy() for layer in self.layers]

    def kv_bytes(self) -> int:
        """Bytes of every key/value slot allocated, over all layers and the batch. With a budget that is the budget's
        slots; without one, the stored tokens plus spare room (the prompt and 64 more slots, doubled when full): to
        compare a budget with the full cache, count the full cache's stored tokens, not this."""
        return sum(layer.kv_bytes() for layer in self.layers)
