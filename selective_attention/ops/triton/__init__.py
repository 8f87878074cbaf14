"""Paper-mode selective attention as fused Triton kernels (GPU; CPU under ``TRITON_INTERPRET=1``).

Importing this package needs neither Triton nor a GPU; :func:`is_available` says whether it can run.
"""

from .op import attend, is_available, supports, triton_selective_attention

__all__ = ["triton_selective_attention", "is_available", "supports", "attend"]
