"""selective-attention: the selective attention of Leviathan, Kalman & Matias (ICLR 2025) for PyTorch.

Public names:

* :class:`SelectiveAttention` - the multi-head module, ``[B, L, d_model]`` in and out;
* :func:`selective_attention` - the functional core on ``[B, H, L, D]`` tensors (also paper mode);
* :class:`Selection` - who votes for F (``Selection()`` is the paper: head 0; ``head=``, ``per_head=``,
  ``projection=`` variants), the value of every ``selection=`` argument;
* :func:`selection_penalty` - the paper's F from one head's queries and keys (for inspection);
* :mod:`selective_attention.model` (``GPTConfig``, ``GPT``), :mod:`selective_attention.decoding`
  (``Decoder``), :mod:`selective_attention.train`, :mod:`selective_attention.data`.
"""

from . import functional
from .attention import SelectiveAttention
from .functional import selection_penalty, selective_attention
from .selection import Selection

__version__ = "0.1.0"

__all__ = ["Selection", "SelectiveAttention", "functional", "selective_attention", "selection_penalty", "__version__"]
