"""Kept for compatibility: ``from selective_attention.cache import Decoder`` (version 0.1's import path)
keeps working. The code moved:

* :mod:`selective_attention.kv_cache`: ``LayerCache`` (one layer's static buffers) and the eviction
  policy (``keep_after_prefill``, ``evictions``, ...), plain tensor functions;
* ``selective_attention.model.Attention.forward(x, rope, cache)``: prefill and one-token steps;
* :mod:`selective_attention.decoding`: ``Decoder`` (prefill / step / generate), ``decode_one_token``
  and ``sample``, which only call the model.

New code should import from those modules.
"""

from .decoding import Decoder, decode_one_token, sample
from .kv_cache import LayerCache

__all__ = ["Decoder", "LayerCache", "decode_one_token", "sample"]
