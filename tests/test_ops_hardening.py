"""Hardening of the paper-mode backends: higher-order gradients, empty batches, Dv != D, chunk_size
validation, key padding kept O(B L) in the chunked path, and the first *real* token protected under
left padding. Each test compares against the naive spec."""

import functools

import pytest
import torch
from helpers import TOL, assert_error_bounded, grads

from selective_attention.functional import selective_attention
from selective_attention.ops import chunked


def _qkv(B, H, L, D, Dv=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = (torch.randn(B, H, L, D, generator=gen, dtype=dtype) * 1.5).requires_grad_()
    k = (torch.randn(B, H, L, D, generator=gen, dtype=dtype) * 1.5).requires_grad_()
    v = torch.randn(B, H, L, Dv, generator=gen, dtype=dtype).requires_grad_()
    return q, k, v


def _assert_same(o, g, o_ref, g_ref, dtype):
    torch.testing.assert_close(o, o_ref, **TOL[dtype])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


# --- 1. double backward -------------------------------------------------------------------------------
def test_chunked_double_backward_raises_naming_naive():
    q, k, v = _qkv(1, 2, 10, 4)
    o = selective_attention(q, k, v, selection=True, backend="chunked")
    (g,) = torch.autograd.grad(o.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward is not implemented by backend='chunked'.*backend='naive'"):
        torch.autograd.grad(g.sum(), k)


def test_chunked_double_backward_raises_when_only_saved_inputs_carry_the_graph():
    """The cotangent needs no grad here (o.sum()); the second derivative still goes through q, k, v."""
    q, k, v = _qkv(1, 2, 6, 4)
    o = selective_attention(q, k, v, selection=True, backend="chunked")
    (g,) = torch.autograd.grad(o.sum() + q.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='naive'"):
        torch.autograd.grad(g.sum(), k)


def test_chunked_create_graph_first_order_still_exact():
    """create_graph=True alone (no second derivative taken) keeps working and stays exact."""
    q, k, v = _qkv(1, 2, 9, 4)
    res = {}
    for backend in ("naive", "chunked"):
        o = selective_attention(q, k, v, selection=True, backend=backend, chunk_size=4)
        res[backend] = torch.autograd.grad(o.pow(2).sum(), (q, k, v), create_graph=True)
    for a, b in zip(res["chunked"], res["naive"]):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_gradgradcheck_naive_paper_mode():
    q, k, v = _qkv(1, 2, 5, 3)
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: selective_attention(q, k, v, selection=True, backend="naive"), (q, k, v)
    )


# --- 2. B = 0 and Dv != D -----------------------------------------------------------------------------
@pytest.mark.parametrize("per_head", [False, True])
def test_chunked_empty_batch(per_head):
    q, k, v = _qkv(0, 2, 7, 4)
    kw = dict(selection=True, selection_per_head=per_head)
    o_ref, g_ref = grads(functools.partial(selective_attention, backend="naive", **kw), q, k, v)
    o, g = grads(functools.partial(selective_attention, backend="chunked", chunk_size=3, **kw), q, k, v)
    assert o.shape == (0, 2, 7, 4)
    _assert_same(o, g, o_ref, g_ref, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("D, Dv", [(8, 3), (4, 16)])
@pytest.mark.parametrize("padding", [False, True])
def test_chunked_value_head_dim_may_differ(dtype, D, Dv, padding):
    q, k, v = _qkv(2, 3, 37, D, Dv, dtype=dtype, seed=2)
    kw = dict(selection=True)
    if padding:
        pad = torch.zeros(2, 37, dtype=torch.bool)
        pad[0, :5] = True
        kw["key_padding_mask"] = pad
    o_ref, g_ref = grads(functools.partial(selective_attention, backend="naive", **kw), q, k, v)
    for backend, chunk in (("auto", None), ("chunked", 8)):
        o, g = grads(functools.partial(selective_attention, backend=backend, chunk_size=chunk, **kw), q, k, v)
        assert o.shape == (2, 3, 37, Dv)
        if dtype == torch.float64:
            _assert_same(o, g, o_ref, g_ref, dtype)
        else:
            leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
            o64, g64 = grads(functools.partial(selective_attention, backend="naive", **kw), *leaves)
            assert_error_bounded(o, o_ref, o64, factor=2.0, name="out")
            for a, b, c, n in zip(g, g_ref, g64, "qkv"):
                assert_error_bounded(a, b, c, factor=3.0, name=f"d{n}")


# --- 3. chunk_size validation -------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_chunk_size_raises(bad):
    q, k, v = _qkv(1, 2, 6, 4)
    with pytest.raises(ValueError, match=rf"chunk_size.*{bad!r}.*>= 1.*None"):
        selective_attention(q, k, v, selection=True, chunk_size=bad)
    with pytest.raises(ValueError, match=rf"chunk_size.*{bad!r}.*>= 1.*None"):
        chunked.chunked_selective_attention(q, k, v, heads=slice(0, 1), scale=0.5, sel_scale=0.5, chunk_size=bad)
