"""Which autograd transforms a kernel with a hand-written backward can serve.

The ``chunked`` and ``triton`` kernels are ``torch.library`` custom ops with a registered backward only (eager calls
run the same functions as a plain ``autograd.Function``: :func:`eager_call`). Under
forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) such an op's tangent comes out
zero, with no error; under ``torch.func``'s reverse transforms (``grad``, ``vjp``, ``jacrev``) PyTorch refuses it
with a message about ``autograd.Function``. PyTorch's CPU flash attention has no forward-mode formula either. The
backends refuse these calls by name, so ``backend="auto"`` runs them on the naive spec, which supports all.
``vmap`` alone is served. Their first-order gradients refuse to be differentiated again, by name
(:func:`refuse_double_backward`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.forward_ad import unpack_dual

from ..masks import has_values

__all__ = [
    "eager_call",
    "eager_function",
    "refuse_batched_backward",
    "refuse_double_backward",
    "unserved_transform",
    "vmapped",
]


def _transforms() -> set:
    """The ``torch.func`` transforms active around this call (outermost to innermost)."""
    fn = torch._C._functorch
    if hasattr(fn, "get_interpreter_stack"):
        return {i.key() for i in fn.get_interpreter_stack() or ()}
    top = fn.peek_interpreter_stack()  # older torch: the innermost only
    return set() if top is None else {top.key()}


def reads_values(t: Tensor) -> bool:
    """Whether a call on ``t`` may read tensor values (``.any()``, ``float(...)``) for its checks and shortcuts: not
    under ``torch.compile`` (a graph break), nor on tensors without values (the meta device, fake tensors: shape
    inference, FLOP counting), where the same computation runs without them."""
    return not torch.compiler.is_compiling() and has_values(t)


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


def eager_call(*tensors: Tensor | None) -> bool:
    """Whether a kernel may run as a plain :class:`torch.autograd.Function` here instead of through its
    ``torch.library`` custom op: in eager mode, outside every ``torch.func`` transform and dual level, on plain tensors
    of a real device, with no ``torch.jit`` trace and no dispatch mode active. A custom op's first call imports
    ``torch._dynamo``, even in eager code: 1.1 s and ~150-200 MiB of resident memory (AMD EPYC, torch 2.13), more
    than a paper-mode fwd+bwd at L = 4096 uses. The op stays for the rest: ``torch.compile``, ``torch.export``,
    ``torch.jit.trace`` and ``make_fx`` record it as one node, ``vmap`` falls back to a loop over it, fake and meta
    tensors take its shape-only implementation, and a dispatch mode (selective activation checkpointing's policy, a
    FLOP counter) sees one call."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    # torch.jit.trace records the op (the Function's inner ops would trace Python branches on shapes and values), and
    # a dispatch mode (make_fx, FakeTensorMode with real inputs, selective activation checkpointing's policies) sees
    # the op as the one call it is
    if torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return False
    return all(t is None or (type(t) in _PLAIN and t.device.type != "meta") for t in tensors)


_PLAIN = (Tensor, torch.nn.Parameter)


def eager_function(name: str, forward, setup_context, backward) -> type[torch.autograd.Function]:
    """A plain :class:`torch.autograd.Function` made of a custom op's body (``forward``, without ``ctx``) and the
    ``setup_context`` and ``backward`` registered with it: what a kernel runs when :func:`eager_call` allows, with
    the op's results to the bit."""
    doc = f"The custom op's forward and registered autograd without the op around them, for eager calls ({name})."
    members = dict(forward=staticmethod(forward), setup_context=staticmethod(setup_context))
    return type(name, (torch.autograd.Function,), {**members, "backward": staticmethod(backward), "__doc__": doc})


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


_DOUBLE_BACKWARD = (
    "double backward is not implemented by backend='{backend}' (its backward is a hand-written first-order "
    "gradient); use backend='naive' for higher-order gradients (e.g. gradient penalties)."
)


class _NoDoubleBackward(torch.autograd.Function):
    """Passes first-order gradients through unchanged; differentiating them raises. Its inputs include
    the kernel's own inputs, so any path from the gradients back to q, k, v, ... meets it
    (``once_differentiable`` links only to the incoming gradient, and a second derivative that
    reaches q only through saved inputs would silently miss this term)."""

    @staticmethod
    def forward(ctx, backend: str, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.backend = backend
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(_DOUBLE_BACKWARD.format(backend=ctx.backend))


def refuse_batched_backward(dout: Tensor, backend: str) -> None:
    """Raise, naming the fix, when a hand-written backward is handed a batch of output gradients by
    ``torch.autograd.grad(..., is_grads_batched=True)`` or ``autograd.functional.jacobian(..., vectorize=True)``:
    they batch it with the legacy vmap, which has no rule for the kernels' ops (an internal 'Batching rule not
    implemented' error, naming none). The forward ran outside any transform, so the choice of backend was already
    made; the spec's backend serves these calls."""
    legacy = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    if legacy is not None and isinstance(dout, Tensor) and legacy(dout):
        raise RuntimeError(
            f"backend='{backend}' (a hand-written backward) cannot take a batch of output gradients "
            "(autograd.grad(..., is_grads_batched=True), or jacobian(..., vectorize=True)); run the forward with "
            "backend='naive', or take the gradients one at a time (vectorize=False)."
        )


def refuse_double_backward(grads: tuple, graph: tuple, backend: str) -> tuple:
    """``grads`` (Nones kept) rerouted through a function whose backward raises, naming ``backend``, linked to the
    tensors of ``graph`` that require grad. Call it in a custom op's backward when ``torch.is_grad_enabled()``
    (``create_graph=True``): without it PyTorch's message for the missing formula names no fix."""
    linked = [t for t in graph if isinstance(t, Tensor) and t.requires_grad]
    present = [g for g in grads if g is not None]
    if not linked or not present:
        return grads
    it = iter(_NoDoubleBackward.apply(backend, len(present), *present, *linked))
    return tuple(None if g is None else next(it) for g in grads)
