"""Which autograd transforms a kernel with a hand-written backward can serve.

The ``chunked`` and ``triton`` kernels are ``torch.library`` custom ops with a registered backward only. Under
forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) such an op's tangent comes out
zero, with no error; under ``torch.func``'s reverse transforms (``grad``, ``vjp``, ``jacrev``) PyTorch refuses it
with a message about ``autograd.Function``. PyTorch's CPU flash attention has no forward-mode formula either. The
backends refuse these calls by name, so ``backend="auto"`` runs them on the naive spec, which supports all.
``vmap`` alone is served.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.forward_ad import unpack_dual

__all__ = ["unserved_transform", "vmapped"]


def _transforms() -> set:
    """The ``torch.func`` transforms active around this call (outermost to innermost)."""
    fn = torch._C._functorch
    if hasattr(fn, "get_interpreter_stack"):
        return {i.key() for i in fn.get_interpreter_stack() or ()}
    top = fn.peek_interpreter_stack()  # older torch: the innermost only
    return set() if top is None else {top.key()}


def unserved_transform(*tensors: Tensor | None, reverse: bool = True) -> str | None:
    """The transform around this call that a kernel without a forward-mode rule (and, with ``reverse``, without
    ``torch.func`` support for its backward) cannot serve, as words for an error, or None. Nothing is read under
    ``torch.compile``, which traces plain autograd."""
    if torch.compiler.is_compiling():
        return None
    if torch.autograd.forward_ad._current_level < 0 and torch._C._functorch.peek_interpreter_stack() is None:
        return None  # no dual level, no transform: the common case, in well under a microsecond
    kinds = _transforms()
    T = torch._C._functorch.TransformType
    if T.Jvp in kinds or any(t is not None and unpack_dual(t).tangent is not None for t in tensors):
        return "forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad)"
    if reverse and T.Grad in kinds:
        return "torch.func's gradient transforms (grad, vjp, jacrev)"
    return None


def vmapped(t: Tensor | None) -> bool:
    """Whether ``t`` is batched by an enclosing ``torch.vmap`` (at any level of ``torch.func`` wrappers). False under
    ``torch.compile``, which reads no mask value (and cannot trace this check)."""
    if torch.compiler.is_compiling():
        return False
    fn = torch._C._functorch
    while t is not None and fn.is_functorch_wrapped_tensor(t):
        if fn.is_batchedtensor(t):
            return True
        t = fn.get_unwrapped(t)
    return False
