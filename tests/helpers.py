"""Shared test helpers: random problems and tolerances that follow the dtype."""

from __future__ import annotations

import torch

# fp32 attention sums D products and a softmax; 1e-5 is ~100 ulp of 1.0, far below any real bug
# (a wrong mask moves weights by O(1/L)). fp64 is held to 1e-10.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


def qkv(B, H, Lq, Lk, D, dtype=torch.float32, Dv=None, requires_grad=True):
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Lq, D, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, H, Lk, D, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, H, Lk, Dv, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def grads(fn, *inputs):
    """Run ``fn(*inputs)``, backprop a fixed random cotangent, return (output, input grads)."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    return out.detach(), [t.grad.clone() for t in inputs]


def assert_error_bounded(fast, naive, ref64, factor=3.0, name="", eps=None):
    """flash-attention's rule: a low-precision path's error against an fp64 reference may be at most
    ``factor`` x the error of the naive path in the same precision (plus a few ulp of the scale).

    A wrong result misses by O(|ref|); reordered sums in fp32 by ~1e-7 |ref|; so this follows the
    dtype instead of a magic number. ``eps``: the unit roundoff of the products when it is not the dtype's
    (fp32 tensors multiplied in tf32: 2**-10)."""
    ref64 = ref64.double()
    err_fast = (fast.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    err_naive = (naive.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    eps = torch.finfo(fast.dtype).eps if eps is None else eps  # tf32 products: 2**-10, not fp32's eps
    floor = 4 * eps * max(ref64.abs().max().item() if ref64.numel() else 0.0, 1.0)
    assert err_fast <= factor * err_naive + floor, f"{name}: error {err_fast:.3g} vs naive {err_naive:.3g}"
