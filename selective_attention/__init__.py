"""selective-attention: the selective attention of Leviathan, Kalman & Matias (ICLR 2025) for PyTorch.

Public names:

* :class:`SelectiveAttention` - the multi-head module, ``[B, L, d_model]`` in and out;
* :func:`selective_attention` - the functional core on ``[B, H, L, D]`` tensors.
"""

from . import functional
from .attention import SelectiveAttention
from .functional import selective_attention

__version__ = "0.1.0"

__all__ = ["SelectiveAttention", "functional", "selective_attention", "__version__"]
