"""The paper's F (DESIGN §3): its definition, its properties, and the functional paper mode."""

import functools

import pytest
import torch
from helpers import TOL, assert_error_bounded, grads, qkv

from selective_attention.functional import attention_weights, selective_attention
from selective_attention.selection import Selection, exclusive_cumsum, selection_penalty


def penalty_by_loops(q0, k0, scale):
    """F written straight from the paper's definition, one scalar at a time."""
    L = q0.shape[0]
    F = torch.zeros(L, L, dtype=q0.dtype)
    for i in range(L):
        for j in range(L):
            for k in range(i):  # votes of earlier tokens only
                if 1 <= j < k:  # never BOS, never itself, only earlier tokens
                    F[i, j] += torch.relu(q0[k] @ k0[j] * scale)
    return F


@pytest.mark.parametrize("L", [1, 2, 3, 7])
def test_penalty_matches_definition(L):
    q0, k0 = torch.randn(2, L, 5, dtype=torch.float64), torch.randn(2, L, 5, dtype=torch.float64)
    F = selection_penalty(q0, k0)
    for b in range(2):
        torch.testing.assert_close(F[b], penalty_by_loops(q0[b], k0[b], 5**-0.5), **TOL[torch.float64])


def test_penalty_hand_checked():
    """L = 3, D = 1, unit scale: only token 2 may vote, and only on token 1."""
    q0 = torch.tensor([[1.0], [2.0], [3.0]])
    k0 = torch.tensor([[5.0], [0.5], [-1.0]])
    F = selection_penalty(q0, k0, scale=1.0)
    # S[2, 1] = relu(3 * 0.5) = 1.5 reaches queries i > 2: none exist for L = 3.
    assert torch.equal(F, torch.zeros(3, 3))
    q0 = torch.cat([q0, torch.tensor([[1.0]])])
    k0 = torch.cat([k0, torch.tensor([[7.0]])])
    F = selection_penalty(q0, k0, scale=1.0)
    expected = torch.zeros(4, 4)
    expected[3, 1] = 1.5  # token 2's vote on token 1 reaches query 3; relu(3 * -1) on nothing
    assert torch.equal(F, expected)


def test_penalty_properties():
    q0, k0 = torch.randn(3, 50, 8) * 3, torch.randn(3, 50, 8) * 3
    F = selection_penalty(q0, k0)
    assert (F >= 0).all()
    assert (F[..., 0] == 0).all()  # BOS never masked
    assert (torch.diagonal(F, dim1=-2, dim2=-1) == 0).all()  # no token masks itself
    assert (F.diff(dim=-2) >= 0).all()  # F[i, j] never decreases with i
    assert (F.triu(1) == 0).all()
    assert F.sum() > 0


def test_exclusive_cumsum():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert torch.equal(exclusive_cumsum(x, 0), torch.tensor([[0.0, 0.0], [1.0, 2.0], [4.0, 6.0]]))
    assert exclusive_cumsum(torch.zeros(0, 2), 0).shape == (0, 2)


def test_selection_is_paper_formula():
    """softmax(l_h - F) with F from head 0, causal, for every head, written out."""
    B, H, L, D = 2, 3, 9, 4
    q, k, v = qkv(B, H, L, L, D, dtype=torch.float64, requires_grad=False)
    F = selection_penalty(q[:, 0], k[:, 0])[:, None]  # [B, 1, L, L]
    logits = q @ k.transpose(-2, -1) / D**0.5 - F
    logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(logits, -1) @ v
    for backend in ("naive", "chunked"):
        out = selective_attention(q, k, v, selection=True, backend=backend)
        torch.testing.assert_close(out, ref, **TOL[torch.float64])


def _case(B, H, L, D, dtype, user_mask, padding, G=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, L, D, generator=gen, dtype=dtype) * 1.5).requires_grad_()
    k = (torch.randn(B, H, L, D, generator=gen, dtype=dtype) * 1.5).requires_grad_()
    v = torch.randn(B, H, L, D, generator=gen, dtype=dtype).requires_grad_()
    kw = {}
    if user_mask:
        F = torch.randn(1, H, L, L, generator=gen, dtype=dtype)
        F = F.masked_fill(torch.rand(B, 1, L, L, generator=gen) < 0.1, float("inf"))
        kw["selective_mask"] = F.expand(B, H, L, L)
    if padding:
        pad = torch.rand(B, L, generator=gen) < 0.2
        pad[:, 0] = False
        kw["key_padding_mask"] = pad
    return q, k, v, kw


SHAPES = [(1, 1, 1), (2, 8, 2), (2, 1, 63), (1, 8, 64), (2, 8, 65), (2, 1, 257), (1, 8, 257)]


@pytest.mark.parametrize("B, H, L", SHAPES, ids=lambda *a: None)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("masks", ["none", "user", "user+padding", "padding"])
def test_chunked_equals_naive(B, H, L, dtype, masks):
    q, k, v, kw = _case(B, H, L, 16, dtype, masks.startswith("user"), masks.endswith("padding"))
    run = functools.partial(selective_attention, selection=True, **kw)
    o_ref, g_ref = grads(functools.partial(run, backend="naive"), q, k, v)
    if dtype == torch.float32:  # the fp64 truth, to bound both fp32 paths' errors
        kw64 = {n: (m.double() if m.is_floating_point() else m) for n, m in kw.items()}
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        o64, g64 = grads(functools.partial(selective_attention, selection=True, backend="naive", **kw64), *leaves)
    for chunk in (None, 32, 64):  # boundaries inside, at and across L = 63, 64, 65
        o, g = grads(functools.partial(run, backend="chunked", chunk_size=chunk), q, k, v)
        if dtype == torch.float64:
            torch.testing.assert_close(o, o_ref, **TOL[dtype])
            for a, b in zip(g, g_ref):
                torch.testing.assert_close(a, b, **TOL[dtype])
        else:
            assert_error_bounded(o, o_ref, o64, factor=2.0, name="out")
            for a, b, c, n in zip(g, g_ref, g64, "qkv"):
                assert_error_bounded(a, b, c, factor=3.0, name=f"d{n}")


def test_chunked_row_broadcast_masks_across_chunks():
    """Masks with one row for every query ([B, 1, 1, L]: key padding, or a float penalty per key),
    with L spanning several chunks and left padding (the first queries see only removed keys):
    outputs and gradients, the penalty's included, equal the naive path."""
    B, H, L, D = 2, 3, 21, 8
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    pen = torch.rand(B, 1, 1, L, generator=gen, dtype=torch.float64).requires_grad_()
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, :3] = True  # left padding: rows 0-2 of sequence 0 have no key
    pad[1, 7] = True
    res = {}
    for backend, chunk in (("naive", None), ("chunked", 4), ("chunked", 5)):
        mask = pen.expand(B, 1, L, L)  # stride 0 over the rows: kept as one row internally
        out = selective_attention(
            q, k, v, mask, selection=True, key_padding_mask=pad, backend=backend, chunk_size=chunk
        )
        res[backend, chunk] = (out, torch.autograd.grad(out.pow(2).sum(), (q, k, v, pen)))
    o_ref, g_ref = res["naive", None]
    assert (o_ref[0, :, :3] == 0).all()
    for key in (("chunked", 4), ("chunked", 5)):
        torch.testing.assert_close(res[key][0], o_ref, **TOL[torch.float64])
        for a, b in zip(res[key][1], g_ref):
            torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_chunked_chunk_size_larger_than_sequence():
    """A chunk size far beyond L means one chunk; its in-chunk masks are sized by L, not by the
    chunk size (chunk_size=10**6 would otherwise allocate two 10**12-element masks)."""
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    out = selective_attention(q, k, v, selection=True, backend="chunked", chunk_size=10**6)
    torch.testing.assert_close(out, selective_attention(q, k, v, selection=True, backend="naive"), **TOL[torch.float64])


@pytest.mark.parametrize("H", [1, 8])
def test_chunked_equals_naive_long(H):
    q, k, v, kw = _case(2, H, 1000, 16, torch.float64, True, True, seed=3)
    run = functools.partial(selective_attention, selection=True, **kw)
    o_ref, g_ref = grads(functools.partial(run, backend="naive"), q, k, v)
    o, g = grads(functools.partial(run, backend="chunked", chunk_size=96), q, k, v)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float64])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_gradcheck_float64(backend):
    q, k, v, kw = _case(1, 2, 7, 3, torch.float64, True, False, seed=1)
    assert torch.autograd.gradcheck(
        lambda q, k, v: selective_attention(q, k, v, selection=True, backend=backend, chunk_size=3, **kw), (q, k, v)
    )


def test_gradcheck_through_user_penalty_chunked():
    q, k, v, _ = _case(1, 2, 6, 3, torch.float64, False, False, seed=2)
    F = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda F: selective_attention(q, k, v, F, selection=True, backend="chunked", chunk_size=4), (F,)
    )


def test_gradients_flow_through_both_roles_of_head_0():
    """No stop-gradient: head 0's q/k get gradient from attending and from voting."""
    q, k, v, _ = _case(1, 2, 12, 4, torch.float64, False, False, seed=4)
    _, (gq_sel, gk_sel, _) = grads(functools.partial(selective_attention, selection=True), q, k, v)
    _, (gq_std, gk_std, _) = grads(functools.partial(selective_attention, is_causal=True), q, k, v)
    assert not torch.allclose(gq_sel[:, 0], gq_std[:, 0])  # the voting role adds gradient
    assert (gq_sel[:, 0].abs().sum() > 0) and (gk_sel[:, 0].abs().sum() > 0)


def test_user_mask_combines_with_selection():
    """Penalties add (F_user + F_paper) and removals stay removed."""
    B, H, L, D = 2, 2, 10, 4
    q, k, v = qkv(B, H, L, L, D, dtype=torch.float64, requires_grad=False)
    F_user = torch.rand(L, L, dtype=torch.float64)
    F_user[5, 2] = float("inf")
    F_paper = selection_penalty(q[:, 0], k[:, 0])[:, None]
    ref = selective_attention(q, k, v, (F_user + F_paper).masked_fill(F_user.isinf(), float("inf")), is_causal=True)
    for backend in ("naive", "chunked"):
        torch.testing.assert_close(selective_attention(q, k, v, F_user, selection=True, backend=backend), ref)
    w = attention_weights(q, k, F_user, selection=True)
    assert (w[:, :, 5, 2] == 0).all()


def test_all_removed_rows_with_selection_are_zero():
    q, k, v = qkv(1, 2, 8, 8, 4, dtype=torch.float64)
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[4, :5] = True  # query 4's keys 0..4 (all it may see) removed
    for backend in ("naive", "chunked"):
        out, g = grads(
            functools.partial(selective_attention, selective_mask=m, selection=True, backend=backend), q, k, v
        )
        assert (out[:, :, 4] == 0).all()
        assert all(torch.isfinite(t).all() for t in g)


@pytest.mark.parametrize("G", [1, 2])
def test_selection_qk_other_head_and_per_head(G):
    B, H, L, D = 2, 2, 20, 4
    q, k, v = qkv(B, H, L, L, D, dtype=torch.float64, requires_grad=False)
    qs, ks = (q[:, 1:2], k[:, 1:2]) if G == 1 else (q, k)
    F = selection_penalty(qs, ks)  # [B, G, L, L]
    ref = selective_attention(q, k, v, F.expand(B, H, L, L).contiguous(), is_causal=True)
    for backend in ("naive", "chunked"):
        out = selective_attention(q, k, v, selection=True, selection_qk=(qs, ks), backend=backend, chunk_size=8)
        torch.testing.assert_close(out, ref, **TOL[torch.float64])
    assert not torch.allclose(ref, selective_attention(q, k, v, selection=True))


def test_dedicated_selector_uses_its_own_scale():
    B, H, L, D, Ds = 1, 2, 12, 4, 9
    q, k, v = qkv(B, H, L, L, D, dtype=torch.float64, requires_grad=False)
    qs, ks = torch.randn(B, 1, L, Ds, dtype=torch.float64), torch.randn(B, 1, L, Ds, dtype=torch.float64)
    F = selection_penalty(qs, ks, scale=Ds**-0.5)
    ref = selective_attention(q, k, v, F, is_causal=True)
    for backend in ("naive", "chunked"):
        out = selective_attention(q, k, v, selection=True, selection_qk=(qs, ks), backend=backend)
        torch.testing.assert_close(out, ref, **TOL[torch.float64])


def test_dropout_in_paper_mode_uses_naive_and_keeps_expectation():
    q, k, v = qkv(1, 1, 6, 6, 4, requires_grad=False)
    exact = selective_attention(q, k, v, selection=True)
    draws = torch.stack([selective_attention(q, k, v, selection=True, dropout_p=0.3) for _ in range(3000)])
    torch.testing.assert_close(draws.mean(0), exact, atol=0.06, rtol=0)


def test_a_large_paper_mode_call_sent_to_the_spec_says_why(monkeypatch):
    """The seed module's default dropout=0.1 in training mode sends paper mode to the naive spec, which builds
    [B, H, L, L]: 1 GiB per tensor at B2 H8 L4096 fp32, silently. Past NAIVE_WARN_BYTES "auto" warns, with the
    memory-lean backend's reason and fix; below it, and with dropout 0, nothing."""
    import warnings

    from selective_attention import SelectiveAttention
    from selective_attention.ops import registry

    monkeypatch.setattr(registry, "NAIVE_WARN_BYTES", 2 * 4 * 32 * 32 * 4)  # B2 H4 L32 fp32 weights: 32 KiB
    x = torch.randn(2, 32, 16)
    layer = SelectiveAttention(16, 4, selection=True)  # dropout=0.1, training mode
    with pytest.warns(
        UserWarning, match=r"naive spec.*\[B, H, Lq, Lk\].*chunked: .*has no attention dropout.*=0\.0"
    ) as w:
        layer(x, x, x)
    assert w[0].filename == __file__  # the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x[:, :31], x[:, :31], x[:, :31])  # below the size
        layer.eval()(x, x, x)  # no dropout: chunked
        selective_attention(*(t.unsqueeze(0) for t in (x, x, x)), backend="naive")  # named, not chosen


def test_zero_length_paper_mode():
    q, k, v = qkv(2, 2, 0, 0, 4)
    assert selective_attention(q, k, v, selection=True).shape == (2, 2, 0, 4)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(selection=True, backend="sdpa"), ValueError, "cannot compute the paper's F"),
        (dict(backend="chunked"), ValueError, "paper-mode path"),
        (dict(selection=True, backend="chunked", dropout_p=0.1), ValueError, "no attention dropout"),
        (dict(selection_qk="x"), ValueError, "pass selection=True"),
        (dict(selection=True, selection_head=2), ValueError, r"Selection.head=2 is not a head .* n_heads=2"),
        (dict(selection=Selection(head=2)), ValueError, r"Selection.head=2 is not a head .* n_heads=2"),
        (dict(selection=Selection(projection=True)), ValueError, r"pass selection_qk=\(qs, ks\)"),
        (dict(selection=Selection(), selection_qk=(torch.zeros(2, 1, 5, 4),) * 2), ValueError, "projection=True"),
        (dict(selection=Selection(), selection_head=1), ValueError, "already says who votes"),
        (dict(selection=1), TypeError, "True, False or a Selection"),
        (dict(selection=False, selection_head=0), ValueError, "refine the paper's selection"),  # 0 passed as falsy
        (dict(selection=False, selection_per_head=False), ValueError, "refine the paper's selection"),
        (dict(selection=True, selection_per_head=True, selection_head=1), ValueError, "does not apply"),
        (dict(selection=True, selection_qk=(1, 2, 3)), TypeError, "pair"),
        (dict(selection=True, selection_qk=(torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 5, 4))), ValueError, "G in"),
        (
            dict(selection=True, selection_qk=(torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 5, 3))),
            ValueError,
            "one shape",
        ),
    ],
)
def test_bad_selection_args(kwargs, exc, match):
    q, k, v = qkv(2, 2, 5, 5, 4)
    with pytest.raises(exc, match=match):
        selective_attention(q, k, v, **kwargs)


def test_selection_needs_self_attention():
    q, k, v = qkv(1, 2, 4, 6, 4)
    with pytest.raises(ValueError, match="Lq == Lk"):
        selective_attention(q, k, v, selection=True)


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_memory_rows_chunked_equals_naive_with_gradients(G, tau):
    B, H, L, D = 2, 2, 37, 4
    q, k, v, _ = _case(B, H, L, D, torch.float64, False, False, seed=5)
    kw = dict(selection=True, memory_tau=tau, selection_per_head=G == 2)
    gen = torch.Generator().manual_seed(0)
    w_out, w_mem = (
        torch.randn(B, H, L, D, generator=gen, dtype=torch.float64),
        torch.randn(B, G, L, generator=gen, dtype=torch.float64),
    )

    def loss(backend):
        out, masked = selective_attention(q, k, v, backend=backend, chunk_size=8, **kw)
        return out, masked, (out * w_out).sum() + (masked * w_mem).sum()

    o1, m1, l1 = loss("naive")
    g1 = torch.autograd.grad(l1, (q, k, v))
    o2, m2, l2 = loss("chunked")
    g2 = torch.autograd.grad(l2, (q, k, v))
    assert m1.shape == (B, G, L)
    torch.testing.assert_close(m2, m1, **TOL[torch.float64])
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    F = selection_penalty(q[:, :1] if G == 1 else q, k[:, :1] if G == 1 else k)
    torch.testing.assert_close(m1, F.clamp(max=tau).sum(-1) / tau)


def test_memory_tau_needs_selection():
    q, k, v = qkv(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"memory_tau=1.0 counts the keys masked.*selection is off: pass selection"):
        selective_attention(q, k, v, memory_tau=1.0)
    with pytest.raises(ValueError, match="> 0"):
        selective_attention(q, k, v, selection=True, memory_tau=0.0)


def test_selection_spec_voters_and_validation():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    qs, ks = Selection().voters(q, k)
    assert torch.equal(qs, q[:, :1]) and torch.equal(ks, k[:, :1])  # the paper: head 0
    assert torch.equal(Selection(head=2).voters(q, k)[1], k[:, 2:3])
    assert Selection(per_head=True).voters(q, k)[0] is q and Selection(per_head=True).n_groups(4) == 4
    pair = (torch.randn(2, 1, 5, 6), torch.randn(2, 1, 5, 6))
    assert Selection(projection=True).voters(q, k, pair) is pair
    with pytest.raises(ValueError, match="head does not apply"):
        Selection(head=2, per_head=True)
    with pytest.raises(ValueError, match="n_heads=4"):
        Selection(head=4).validate(4)
    with pytest.raises(ValueError, match="int >= 0"):
        Selection(head=-1)
    with pytest.raises(ValueError, match="projected"):
        Selection(projection=True).voters(q, k)


@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_selection_value_equals_deprecated_aliases(backend):
    """selection=Selection(...) is the API; selection_head / selection_per_head / selection=True with
    selection_qk still work, as deprecated aliases giving the same result."""
    import selective_attention as package

    assert package.Selection is Selection
    q, k, v = qkv(2, 3, 11, 11, 4, dtype=torch.float64, requires_grad=False)
    pair = (torch.randn(2, 1, 11, 5, dtype=torch.float64), torch.randn(2, 1, 11, 5, dtype=torch.float64))
    pairs = (torch.randn(2, 3, 11, 5, dtype=torch.float64), torch.randn(2, 3, 11, 5, dtype=torch.float64))
    run = functools.partial(selective_attention, q, k, v, backend=backend, chunk_size=4)
    cases = [
        (dict(selection=Selection(head=2)), dict(selection=True, selection_head=2)),
        (dict(selection=Selection(per_head=True)), dict(selection=True, selection_per_head=True)),
        (dict(selection=Selection(projection=True), selection_qk=pair), dict(selection=True, selection_qk=pair)),
        (
            dict(selection=Selection(projection=True, per_head=True), selection_qk=pairs),
            dict(selection=True, selection_qk=pairs),
        ),
    ]
    for new, old in cases:
        with pytest.warns(DeprecationWarning, match="deprecated; pass selection=Selection"):
            ref = run(**old)
        torch.testing.assert_close(run(**new), ref, rtol=0, atol=0)
    torch.testing.assert_close(run(selection=Selection()), run(selection=True), rtol=0, atol=0)
    qs, ks = Selection(head=2).voters(q, k)
    F = selection_penalty(qs, ks)
    ref = selective_attention(q, k, v, F, is_causal=True)
    torch.testing.assert_close(run(selection=Selection(head=2)), ref, **TOL[torch.float64])


def test_head_range_is_slice_indices_written_out():
    """``head_range`` (traceable by torch.compile in PyTorch 2.5 and 2.6) selects what ``slice.indices`` does."""
    from selective_attention.selection import head_range

    for n in (1, 4, 7):
        for s in (slice(None), slice(0, 1), slice(n - 1, n), slice(-1, None), slice(-2, -1), slice(2, None),
                  slice(None, -1), slice(10, 20), slice(-10, 2), slice(None, None, 2)):  # fmt: skip
            assert head_range(s, n) == range(*s.indices(n)), (s, n)
