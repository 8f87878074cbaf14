"""The fast path (SDPA) against the naive spec, outputs and gradients; edge cases; bad input."""

import functools

import pytest
import torch
from helpers import TOL, grads, qkv
from hypothesis import given, settings
from hypothesis import strategies as st

from selective_attention.functional import selective_attention

INF = float("inf")


def make_mask(kind, B, H, Lq, Lk, dtype, gen=None):
    """A mask of each accepted kind; about 30% of keys removed and some rows fully removed."""
    if kind is None:
        return None
    shape = {"2d": (Lq, Lk), "4d": (B, H, Lq, Lk), "head": (1, H, Lq, Lk), "batch": (B, 1, Lq, Lk)}[kind[0]]
    removed = torch.rand(shape, generator=gen) < 0.3
    if Lq > 2:
        removed[..., 1, :] = True  # an all-removed query row
    if kind[1] == "bool":
        return removed
    F = torch.randn(shape, dtype=dtype, generator=gen) * 2
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, INF, -INF).to(dtype)
    return torch.where(removed, sign, F)


MASKS = [None, ("2d", "bool"), ("2d", "float"), ("4d", "bool"), ("4d", "float"), ("head", "float"), ("batch", "bool")]
SIZES = [(1, 1, 1, 1, 4), (2, 3, 63, 63, 16), (1, 2, 64, 65, 8), (2, 1, 5, 257, 32), (1, 2, 257, 7, 8)]


def _id(x):
    return "-".join(map(str, x)) if isinstance(x, tuple) else str(x)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "B{}-H{}-Lq{}-Lk{}-D{}".format(*s))
@pytest.mark.parametrize("mask_kind", MASKS, ids=_id)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_matches_naive(size, mask_kind, is_causal, dtype):
    B, H, Lq, Lk, D = size
    q, k, v = qkv(B, H, Lq, Lk, D, dtype=dtype)
    mask = make_mask(mask_kind, B, H, Lq, Lk, dtype)
    ref = functools.partial(selective_attention, selective_mask=mask, is_causal=is_causal, backend="naive")
    fast = functools.partial(selective_attention, selective_mask=mask, is_causal=is_causal, backend="sdpa")
    o_ref, g_ref = grads(ref, q, k, v)
    o_fast, g_fast = grads(fast, q, k, v)
    assert torch.isfinite(o_fast).all() and all(torch.isfinite(g).all() for g in g_fast)
    torch.testing.assert_close(o_fast, o_ref, **TOL[dtype])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_all_removed_rows_are_zero_with_finite_zero_grads(backend):
    q, k, v = qkv(2, 2, 4, 4, 8)
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[2] = True
    out, (gq, gk, gv) = grads(functools.partial(selective_attention, selective_mask=m, backend=backend), q, k, v)
    assert (out[:, :, 2] == 0).all() and torch.isfinite(out).all()
    assert (gq[:, :, 2] == 0).all()
    assert torch.isfinite(gk).all() and torch.isfinite(gv).all()


@pytest.mark.parametrize("backend", ["auto", "naive", "sdpa"])
@pytest.mark.parametrize("Lq, Lk", [(0, 0), (0, 3), (3, 0)])
def test_zero_lengths(backend, Lq, Lk):
    q, k, v = qkv(2, 2, Lq, Lk, 4)
    out = selective_attention(q, k, v, backend=backend)
    assert out.shape == (2, 2, Lq, 4)
    assert (out == 0).all()


def test_gradcheck_float64():
    q, k, v = qkv(1, 2, 4, 5, 3, dtype=torch.float64)
    F = make_mask(("4d", "float"), 1, 2, 4, 5, torch.float64)
    for backend in ("naive", "sdpa"):
        assert torch.autograd.gradcheck(
            lambda q, k, v, b=backend: selective_attention(q, k, v, F, backend=b), (q, k, v)
        )


def test_gradcheck_through_penalty():
    """F itself is differentiable (the paper computes it from the model): its gradient is exact."""
    q, k, v = qkv(1, 1, 4, 4, 3, dtype=torch.float64)
    F = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    for backend in ("naive", "sdpa"):
        assert torch.autograd.gradcheck(
            lambda F, b=backend: selective_attention(q, k, v, F, is_causal=True, backend=b), (F,)
        )


def test_value_head_dim_may_differ():
    q, k, v = qkv(2, 2, 5, 6, 8, Dv=3)
    o1 = selective_attention(q, k, v, is_causal=True, backend="naive")
    o2 = selective_attention(q, k, v, is_causal=True, backend="sdpa")
    assert o1.shape == (2, 2, 5, 3)
    torch.testing.assert_close(o1, o2, **TOL[torch.float32])


def test_custom_scale():
    q, k, v = qkv(1, 2, 5, 5, 8)
    ref = selective_attention(q * 0.5 * 8**0.5, k, v, backend="naive")
    torch.testing.assert_close(selective_attention(q, k, v, scale=0.5), ref, **TOL[torch.float32])


@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("causal", ["is_causal", "seed_mask"])
def test_causal_with_a_scale_at_most_zero_matches_the_spec(scale, causal):
    """PyTorch's CPU kernel with is_causal gives NaN rows for a scale <= 0; the sdpa backend (reached by
    is_causal and by the seed's causal mask alike) must not."""
    q, k, v = qkv(1, 2, 4, 4, 3)
    kw = {"is_causal": True} if causal == "is_causal" else {"selective_mask": torch.full((4, 4), INF).triu(1)}
    ref = selective_attention(q, k, v, scale=scale, backend="naive", **kw)
    got = selective_attention(q, k, v, scale=scale, backend="sdpa", **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


def test_dropout_statistics_and_determinism():
    """Dropout keeps the expectation: averaged over many draws it matches the no-dropout output."""
    q, k, v = qkv(1, 1, 8, 8, 4, requires_grad=False)
    exact = selective_attention(q, k, v, is_causal=True)
    for backend in ("naive", "sdpa"):
        draws = torch.stack(
            [selective_attention(q, k, v, is_causal=True, dropout_p=0.3, backend=backend) for _ in range(4000)]
        )
        assert not torch.equal(draws[0], draws[1])
        torch.testing.assert_close(draws.mean(0), exact, atol=0.06, rtol=0)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (((1, 1, 3, 4), (1, 1, 3, 4), (1, 1, 3, 4)), None, None),
        (((1, 3, 4), (1, 3, 4), (1, 3, 4)), ValueError, "4-D"),
        (((1, 1, 3, 4), (1, 1, 3, 5), (1, 1, 3, 4)), ValueError, "head dim"),
        (((1, 1, 3, 4), (2, 1, 3, 4), (2, 1, 3, 4)), ValueError, r"\[B, H\]"),
        (((1, 1, 3, 4), (1, 1, 3, 4), (1, 1, 2, 4)), ValueError, "same length"),
    ],
)
def test_bad_qkv_shapes(args, exc, match):
    q, k, v = (torch.randn(s) for s in args)
    if exc is None:
        selective_attention(q, k, v)
        return
    with pytest.raises(exc, match=match):
        selective_attention(q, k, v)


def test_bad_dtypes_and_args():
    q, k, v = qkv(1, 1, 3, 3, 4, requires_grad=False)
    with pytest.raises(TypeError, match="share a dtype"):
        selective_attention(q, k.double(), v)
    with pytest.raises(TypeError, match="floating"):
        selective_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)"):
        selective_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="backend"):
        selective_attention(q, k, v, backend="flash")
    for bad in ("false", 0.5, None, torch.tensor(True)):  # a truthy "false" once masked the future silently
        with pytest.raises(TypeError, match="is_causal must be True or False"):
            selective_attention(q, k, v, is_causal=bad)
    for tau in (float("inf"), float("nan"), 0.0, True, "1"):  # inf counted nothing: a memory loss of 0, no gradient
        with pytest.raises(ValueError, match="memory_tau must be a finite number > 0"):
            selective_attention(q, k, v, selection=True, memory_tau=tau)


# Property test: random shapes, mask kinds and causality; the fast path always equals the spec.
@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 4),
    Lq=st.integers(1, 40),
    Lk=st.integers(1, 40),
    D=st.sampled_from([1, 4, 16]),
    mask_kind=st.sampled_from(MASKS),
    is_causal=st.booleans(),
    pad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_fast_equals_naive(B, H, Lq, Lk, D, mask_kind, is_causal, pad, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, Lk, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, Lk, D, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = make_mask(mask_kind, B, H, Lq, Lk, torch.float64, gen)
    kpm = (torch.rand(B, Lk, generator=gen) < 0.3) if pad else None
    kw = dict(selective_mask=mask, is_causal=is_causal, key_padding_mask=kpm)
    o_ref, g_ref = grads(functools.partial(selective_attention, backend="naive", **kw), q, k, v)
    o_fast, g_fast = grads(functools.partial(selective_attention, backend="sdpa", **kw), q, k, v)
    torch.testing.assert_close(o_fast, o_ref, **TOL[torch.float64])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("backend", ["naive", "sdpa", "chunked"])
def test_autocast_casts_the_inputs_as_for_sdpa(backend):
    """Inside torch.autocast, q, k, v of mixed dtypes (a float32 q, k beside a bfloat16 v, as a rotary embedding
    leaves them) run in autocast's dtype: the result of casting them first, bit for bit. float64 is left alone,
    and outside autocast mixed dtypes are still refused."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    sel = dict(is_causal=True) if backend == "sdpa" else dict(selection=True)
    want = selective_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend=backend, **sel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = selective_attention(q, k, v.bfloat16(), backend=backend, **sel)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        q64, k64, v64 = q.double(), k.double(), v.double()
        assert selective_attention(q64, k64, v64, backend=backend, **sel).dtype == torch.float64
    with pytest.raises(TypeError, match="must share a dtype"):
        selective_attention(q, k, v.bfloat16(), backend=backend, **sel)
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(
            TypeError,
            match=r"got torch.float64, torch.bfloat16, torch.bfloat16 \(passed as torch.float64, torch.float32, ",
        ),
    ):  # the dtypes the caller passed, not only the cast ones
        selective_attention(q.double(), k, v, backend=backend, **sel)


def test_autocast_reaches_a_dedicated_voting_pair_and_attention_weights():
    """Under autocast a projection's (qs, ks), given as a tuple or a list, and attention_weights' q, k are cast too."""
    from selective_attention.functional import attention_weights
    from selective_attention.selection import Selection

    g = torch.Generator().manual_seed(1)
    q, k, v, qs, ks = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(5))
    sel = Selection(projection=True, per_head=True)
    want = selective_attention(
        *(t.bfloat16() for t in (q, k, v)), selection=sel, selection_qk=(qs.bfloat16(), ks.bfloat16())
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for pair in ((qs, ks), [qs, ks]):
            got = selective_attention(q, k, v.bfloat16(), selection=sel, selection_qk=pair)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        w = attention_weights(q, k.bfloat16(), selection=True)
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w, attention_weights(q.bfloat16(), k.bfloat16(), selection=True), rtol=0, atol=0)
