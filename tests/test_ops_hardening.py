"""Hardening of the paper-mode backends: higher-order gradients, empty batches, Dv != D, chunk_size
validation, key padding kept O(B L) in the chunked path, and the first *real* token protected under
left padding. Each test compares against the naive spec."""

import functools

import pytest
import torch
from helpers import TOL, assert_error_bounded, grads

from selective_attention.functional import attention_weights, selective_attention
from selective_attention.ops import chunked
from selective_attention.selection import Selection, Voters, selection_penalty, votable_keys, vote_mask


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


def test_a_batch_of_output_gradients_is_refused_by_name_and_served_by_naive():
    """autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) batch the backward with the legacy vmap:
    through the chunked backward (auto's choice) that was an internal 'Batching rule not implemented' error."""
    q, k, v = _qkv(1, 2, 5, 3)
    o = selective_attention(q, k, v, selection=True)
    gos = torch.randn(3, *o.shape, dtype=o.dtype)
    with pytest.raises(RuntimeError, match=r"backend='chunked' .* cannot take a batch of output gradients"):
        torch.autograd.grad(o, q, gos, is_grads_batched=True)
    o = selective_attention(q, k, v, selection=True, backend="naive")
    (batched,) = torch.autograd.grad(o, q, gos, is_grads_batched=True, retain_graph=True)
    for i in range(3):  # the named fix gives each gradient of the batch
        torch.testing.assert_close(batched[i], torch.autograd.grad(o, q, gos[i], retain_graph=True)[0])


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
        chunked.chunked_selective_attention(q, k, v, Voters(scale=0.5, heads=slice(0, 1)), scale=0.5, chunk_size=bad)


def test_chunk_size_takes_a_numpy_integer():
    np = pytest.importorskip("numpy")
    q, k, v = _qkv(1, 2, 9, 4)
    torch.testing.assert_close(
        selective_attention(q, k, v, selection=True, chunk_size=np.int64(4)),
        selective_attention(q, k, v, selection=True, chunk_size=4),
        rtol=0,
        atol=0,
    )


# --- 4. key padding: O(B L) masks in the chunked path; the first real token is protected ----------------
def _spy_removed(monkeypatch):
    """Record the ``removed`` mask (and its shape) that each call hands the chunked custom op."""
    seen = []
    apply = chunked._apply

    def spy(q, k, v, qs, ks, heads, removed, *rest):
        seen.append(None if removed is None else tuple(removed.shape))
        return apply(q, k, v, qs, ks, heads, removed, *rest)

    monkeypatch.setattr(chunked, "_apply", spy)
    return seen


@pytest.mark.parametrize("is_causal", [False, True])
def test_left_padding_keeps_one_row_mask_in_chunked(monkeypatch, is_causal):
    B, H, L = 3, 2, 23
    q, k, v = _qkv(B, H, L, 4, seed=3)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, :4] = True  # left padding: rows 0-3 have no key at all
    pad[1, :1] = True
    kw = dict(selection=True, key_padding_mask=pad, is_causal=is_causal)
    o_ref, g_ref = grads(functools.partial(selective_attention, backend="naive", **kw), q, k, v)
    seen = _spy_removed(monkeypatch)
    o, g = grads(functools.partial(selective_attention, backend="chunked", chunk_size=5, **kw), q, k, v)
    assert seen == [(B, 1, 1, L)]  # never [B, 1, L, L]
    _assert_same(o, g, o_ref, g_ref, torch.float64)
    assert (o[0, :, :4] == 0).all()


def _left_pad(x, P, gen):
    """``x [1, H, L, D]`` with P random padding rows in front (their values must not matter)."""
    return torch.cat([torch.randn(1, x.shape[1], P, x.shape[3], generator=gen, dtype=x.dtype) * 3, x], dim=2)


@pytest.mark.parametrize("backend, chunk", [("naive", None), ("chunked", None), ("chunked", 3)])
@pytest.mark.parametrize("P", [1, 4])
def test_left_padded_sequence_equals_unpadded(backend, chunk, P):
    """A sequence left-padded with P tokens (and its key_padding_mask) gives, at its real rows, the
    unpadded sequence's outputs and gradients: its first real token is the protected one, and the
    padding neither votes nor is voted on."""
    H, L, D = 2, 11, 4
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, H, L, D, generator=gen, dtype=torch.float64) * 1.5 for _ in range(3))
    w = torch.randn(1, H, L, D, generator=gen, dtype=torch.float64)
    run = functools.partial(selective_attention, selection=True, backend=backend, chunk_size=chunk)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = run(*leaves)
    g_ref = torch.autograd.grad((ref * w).sum(), leaves)

    real = [t.clone().requires_grad_() for t in (q, k, v)]
    padded = [_left_pad(t, P, gen) for t in real]
    pad = torch.zeros(1, P + L, dtype=torch.bool)
    pad[:, :P] = True
    out = run(*padded, key_padding_mask=pad)
    g = torch.autograd.grad((out[:, :, P:] * w).sum(), real)
    torch.testing.assert_close(out[:, :, P:], ref, **TOL[torch.float64])
    assert (out[:, :, :P] == 0).all()
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_padding_rule_in_weights_and_memory_rows():
    """attention_weights and the memory-loss rows follow the same rule (left-padded = unpadded)."""
    H, L, P, D = 2, 9, 3, 4
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, H, L, D, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    qp, kp, vp = (_left_pad(t, P, gen) for t in (q, k, v))
    pad = torch.zeros(1, P + L, dtype=torch.bool)
    pad[:, :P] = True
    w_ref = attention_weights(q, k, selection=True)
    w = attention_weights(qp, kp, selection=True, key_padding_mask=pad)
    torch.testing.assert_close(w[:, :, P:, P:], w_ref, **TOL[torch.float64])
    for backend in ("naive", "chunked"):
        _, m_ref = selective_attention(q, k, v, selection=True, memory_tau=1.0, backend=backend)
        _, m = selective_attention(qp, kp, vp, selection=True, memory_tau=1.0, key_padding_mask=pad, backend=backend)
        torch.testing.assert_close(m[:, :, P:], m_ref, **TOL[torch.float64])


def test_selection_penalty_with_padding_matches_unpadded():
    B, L, P, D = 2, 8, 3, 5
    gen = torch.Generator().manual_seed(9)
    q0, k0 = (torch.randn(B, L, D, generator=gen, dtype=torch.float64) for _ in range(2))
    qp, kp = (torch.cat([torch.randn(B, P, D, generator=gen, dtype=torch.float64), t], dim=1) for t in (q0, k0))
    pad = torch.zeros(B, P + L, dtype=torch.bool)
    pad[0, :P] = True  # sequence 0 left padded; sequence 1 starts with P real tokens
    F = selection_penalty(qp, kp, key_padding_mask=pad)
    torch.testing.assert_close(F[0, P:, P:], selection_penalty(q0[:1], k0[:1])[0], **TOL[torch.float64])
    assert (F[0, :, :P] == 0).all() and (F[0, :P] == 0).all()  # padding neither votes nor is voted on
    torch.testing.assert_close(F[1], selection_penalty(qp[1:], kp[1:])[0], **TOL[torch.float64])
    assert (F[..., P] != 0).any() and (F[0, :, P] == 0).all()  # key P: protected only where it is first


def test_right_padding_unchanged():
    """Right padding (key 0 real): the protected key stays key 0, the real rows see the unpadded result."""
    H, L, D = 2, 10, 4
    q, k, v = _qkv(2, H, L, D, seed=11)
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[1, 7:] = True
    for backend in ("naive", "chunked"):
        out = selective_attention(q, k, v, selection=True, key_padding_mask=pad, backend=backend, chunk_size=4)
        ref = selective_attention(q[1:, :, :7], k[1:, :, :7], v[1:, :, :7], selection=True, backend=backend)
        torch.testing.assert_close(out[1:, :, :7], ref, **TOL[torch.float64])
        torch.testing.assert_close(
            out[:1], selective_attention(q[:1], k[:1], v[:1], selection=True, backend=backend), **TOL[torch.float64]
        )


def test_triton_refuses_key_padding():
    q, k, v = _qkv(1, 2, 6, 4)
    pad = torch.zeros(1, 6, dtype=torch.bool)
    pad[0, :2] = True
    with pytest.raises(NotImplementedError, match="key_padding_mask"):
        selective_attention(q, k, v, selection=True, key_padding_mask=pad, backend="triton")


def test_votable_keys_and_vote_mask_with_padding():
    pad = torch.tensor([[True, True, False, False, False], [False, False, False, True, True]])
    assert votable_keys(pad).tolist() == [[False, False, False, True, True], [False, True, True, False, False]]
    assert torch.equal(votable_keys(torch.zeros(1, 4, dtype=torch.bool))[0], torch.arange(4) >= 1)  # j >= 1
    m = vote_mask(5, 5, key_padding_mask=pad)
    assert m.shape == (2, 5, 5) and not m[0, :2].any() and not m[1, 3:].any()  # padding does not vote
    torch.testing.assert_close(
        vote_mask(5, 5, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), vote_mask(5, 5)[None].expand(2, 5, 5)
    )
    with pytest.raises(TypeError, match="torch.bool"):
        vote_mask(5, 5, key_padding_mask=pad.float())
    with pytest.raises(ValueError, match=r"\(B, Lk\)"):
        vote_mask(5, 4, key_padding_mask=pad)


# --- edges found in review: ties, bad arguments, the module's F under padding --------------------------
def test_memory_rows_gradient_at_a_tie_f_equals_tau_is_the_specs():
    """sum_j min(F, tau) has a kink at F = tau: the chunked backward takes the naive spec's subgradient there
    (1, written out: clamp's changed in torch 2.14). All ones: every vote is 1, so F hits tau = 1 exactly."""
    q, k = (torch.ones(1, 1, 6, 1, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.zeros(1, 1, 6, 1, dtype=torch.float64)
    got = {}
    for backend in ("chunked", "naive"):
        _, rows = selective_attention(q, k, v, selection=True, scale=1.0, memory_tau=1.0, backend=backend)
        got[backend] = torch.autograd.grad(rows.sum(), (q, k))
    assert got["naive"][0].abs().sum() > 0  # the tie is reached: the test could fail
    for a, b in zip(got["chunked"], got["naive"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_memory_rows_take_a_tau_beyond_float16s_range():
    """A tau larger than float16's largest value (65504) clamps nothing a finite F holds: the chunked rows and their
    gradients are the naive spec's (error against fp64 bounded by naive float16's), where chunked's in-place clamp
    used to refuse the tau with an overflow error."""
    tau = 70000.0
    q64, k64, v64 = _qkv(1, 2, 12, 4)
    got = {}
    for backend, dtype in (("chunked", torch.float16), ("naive", torch.float16), ("naive", torch.float64)):
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
        o, rows = selective_attention(q, k, v, selection=True, memory_tau=tau, backend=backend)
        # rows * tau: the masked counts' sum of F, which the gradient checks at a scale float16 holds
        got[backend, dtype] = (o, rows, *torch.autograd.grad(o.double().sum() + rows.double().sum() * 1e-2, (q, k, v)))
    assert got["naive", torch.float64][1].abs().sum() > 0  # tokens are masked: the rows could differ
    for name, a, b, c in zip(("out", "rows", "dq", "dk", "dv"), *got.values()):
        assert_error_bounded(a, b, c, name=name)


def test_bad_arguments_are_clear_errors():
    from selective_attention import SelectiveAttention

    q, k, v = _qkv(1, 2, 4, 3)
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\), got '0.1'"):
        selective_attention(q, k, v, dropout_p="0.1")
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got '0.1'"):
        SelectiveAttention(8, 2, dropout="0.1")
    with pytest.raises(ValueError, match="d_model must be a positive int, got True"):
        SelectiveAttention(True, 1)
    with pytest.raises(ValueError, match="backend='sdpa' is standard attention only.*backend='auto'"):
        SelectiveAttention(8, 2, selection=True, backend="sdpa")
    for backend in ("chunked", "triton"):  # settings whose every (training) forward would be refused, refused at once
        with pytest.raises(ValueError, match=rf"backend='{backend}' is the paper-mode path and needs selection=True"):
            SelectiveAttention(8, 2, dropout=0.0, backend=backend)
    # the seed's default dropout = 0.1 with the chunked kernel: eval mode serves it, training mode names the fix
    m = SelectiveAttention(8, 2, selection=True, backend="chunked")
    x = torch.randn(1, 5, 8)
    m.eval()(x, x, x)
    with pytest.raises(
        ValueError, match=r"no attention dropout; use dropout_p=0.0 \(SelectiveAttention\(\.\.\., dropout=0.0\)"
    ):
        m.train()(x, x, x)
    e0 = torch.zeros(1, 2, 5, 0, dtype=q.dtype)  # D = 0: chunked returned an output where the spec raised
    for backend in ("naive", "chunked", "auto"):
        with pytest.raises(ValueError, match="D = 0 features"):
            selective_attention(e0, e0, torch.zeros(1, 2, 5, 3, dtype=q.dtype), selection=True, backend=backend)
    empty = torch.zeros(1, 5, 0)
    with pytest.raises(ValueError, match="Ds >= 1"):
        selection_penalty(empty, empty)
    with pytest.raises(ValueError, match=r"floating \[..., L, Ds\]"):
        selection_penalty(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="share a dtype"):
        selection_penalty(torch.randn(1, 5, 3), torch.randn(1, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Ds = 0"):
        e4 = torch.zeros(1, 1, 4, 0, dtype=q.dtype)
        selective_attention(q, k, v, selection=Selection(projection=True), selection_qk=(e4, e4))


def test_module_selection_penalty_takes_the_forwards_padding():
    """SelectiveAttention.selection_penalty(key_padding_mask=...) is the F its forward uses under padding:
    with a left-padded sequence, its F on the real tokens equals the unpadded sequence's."""
    from selective_attention import SelectiveAttention

    torch.manual_seed(0)
    m = SelectiveAttention(8, 2, dropout=0.0, selection=True).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    xp = torch.cat([torch.randn(1, 2, 8, dtype=torch.float64), x], dim=1)
    pad = torch.tensor([[True, True, False, False, False, False, False]])
    F = m.selection_penalty(xp, key_padding_mask=pad)
    torch.testing.assert_close(F[..., 2:, 2:], m.selection_penalty(x), **TOL[torch.float64])
    assert (F[..., :2] == 0).all() and (F[..., :2, :] == 0).all()


# --- torch.func and forward-mode AD: served by the spec, refused by name by the kernels --------------------------
@pytest.mark.parametrize("selection", [True, False])
def test_forward_mode_ad_and_func_transforms_are_exact_through_auto(selection):
    """The chunked kernel's tangent came out zero under forward-mode AD (jvp, jacfwd, forward_ad), silently, and
    torch.func.grad failed inside PyTorch: "auto" now runs these calls on the naive spec; a named kernel refuses them
    by name. Standard attention (sdpa: no jvp formula on CPU) likewise. vmap alone is still served."""
    import torch.autograd.forward_ad as fwAD
    import torch.func as tf

    from selective_attention.ops.registry import BackendRefused

    q, k, v = (t.detach() for t in _qkv(1, 2, 9, 4))
    kw = dict(selection=True) if selection else dict(is_causal=True, selective_mask=torch.rand(9, 9, dtype=q.dtype))
    fast, kernel = (lambda *a: selective_attention(*a, **kw)), "chunked" if selection else "sdpa"
    spec = lambda *a: selective_attention(*a, backend="naive", **kw)  # noqa: E731
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    out, jvp = tf.jvp(fast, (q, k, v), tangents)
    out_ref, jvp_ref = tf.jvp(spec, (q, k, v), tangents)
    assert jvp_ref.abs().max() > 0.1  # a zero tangent would fail
    torch.testing.assert_close((out, jvp), (out_ref, jvp_ref), **TOL[torch.float64])
    torch.testing.assert_close(tf.jacfwd(fast)(q, k, v), tf.jacrev(spec)(q, k, v), **TOL[torch.float64])
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(fast(fwAD.make_dual(q, tangents[0]), k, v)).tangent
    torch.testing.assert_close(dual, tf.jvp(lambda q: spec(q, k, v), (q,), tangents[:1])[1], **TOL[torch.float64])
    loss = lambda f: lambda q, k, v: f(q, k, v).pow(2).sum()  # noqa: E731
    got, want = tf.grad(loss(fast), argnums=(0, 1, 2))(q, k, v), tf.grad(loss(spec), argnums=(0, 1, 2))(q, k, v)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    named = lambda *a: selective_attention(*a, backend=kernel, **kw)  # noqa: E731
    with pytest.raises(BackendRefused, match=rf"backend='{kernel}'.*cannot serve forward-mode AD.*backend='naive'"):
        tf.jvp(named, (q, k, v), tangents)
    if selection:  # sdpa's backward is PyTorch's own: torch.func.grad serves it
        with pytest.raises(BackendRefused, match="cannot serve torch.func's gradient transforms"):
            tf.grad(loss(named))(q, k, v)
    qb, kb, vb = (torch.stack([t, 2 * t, -t]) for t in (q, k, v))  # an extra leading dim, mapped over
    torch.testing.assert_close(tf.vmap(named)(qb, kb, vb), tf.vmap(spec)(qb, kb, vb), **TOL[torch.float64])


@pytest.mark.parametrize("selection", [True, False])
def test_forward_mode_ad_with_the_tangent_on_the_mask_only(selection):
    """Only q, k, v (and the voting pair) were looked at for tangents: a float mask carrying the only tangent got
    None through the chunked kernel (silently) and crashed inside sdpa. "auto" now runs it on the spec."""
    import torch.autograd.forward_ad as fwAD

    from selective_attention.ops.registry import BackendRefused

    q, k, v = (t.detach() for t in _qkv(1, 2, 6, 4))
    mask, tangent = torch.randn(6, 6, dtype=q.dtype), torch.randn(6, 6, dtype=q.dtype)
    kw = dict(selection=True) if selection else dict(is_causal=True)
    spec = lambda m: selective_attention(q, k, v, m, backend="naive", **kw)  # noqa: E731
    eps = 1e-6
    fd = (spec(mask + eps * tangent) - spec(mask - eps * tangent)) / (2 * eps)  # finite differences
    assert fd.abs().max() > 0.01
    with fwAD.dual_level():
        got = fwAD.unpack_dual(selective_attention(q, k, v, fwAD.make_dual(mask, tangent), **kw)).tangent
        kernel = "chunked" if selection else "sdpa"
        with pytest.raises(BackendRefused, match="cannot serve forward-mode AD"):
            selective_attention(q, k, v, fwAD.make_dual(mask, tangent), backend=kernel, **kw)
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["auto", "naive"])
def test_forward_mode_ad_through_an_all_zero_float_mask(backend):
    """An all-zero float mask is dropped as no penalty unless it requires grad; a dual tensor (forward_ad) or a
    torch.func.jvp input reports requires_grad=False, so its tangent came out None or zero, silently, at F = 0, the
    usual start of a learned penalty. Against finite differences, like F = 1e-30, which was always served."""
    import torch.autograd.forward_ad as fwAD
    import torch.func as tf

    q, k, v = (t.detach() for t in _qkv(1, 1, 4, 3))
    zero, tangent = torch.zeros(4, 4, dtype=q.dtype), torch.randn(4, 4, dtype=q.dtype)
    run = lambda m: selective_attention(q, k, v, m, backend=backend)  # noqa: E731
    eps = 1e-6
    fd = (run(eps * tangent) - run(-eps * tangent)) / (2 * eps)
    assert fd.abs().max() > 0.01
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(run(fwAD.make_dual(zero, tangent))).tangent
    assert dual is not None
    torch.testing.assert_close(dual, fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(tf.jvp(run, (zero,), (tangent,))[1], fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("pad", [0, 2])
def test_a_non_finite_voter_spoils_only_its_own_row_as_in_the_spec(pad):
    """A NaN or inf in the voting query of the first row that votes: the zeroed key rows (the protected token,
    padding) gave 0 * NaN = NaN votes, which the chunked path summed into F of every later row; the spec masks
    those votes, so only that row is non-finite."""
    q, k, v = (t.detach() for t in _qkv(1, 2, 6, 4))
    kpm = torch.arange(6)[None] < pad if pad else None
    for bad in (float("nan"), float("inf")):
        qb = q.clone()
        qb[0, 0, pad + 1, 0] = bad
        rows = {
            be: (~torch.isfinite(selective_attention(qb, k, v, selection=True, key_padding_mask=kpm, backend=be)))
            .any(-1)[0, :, pad:]  # the real rows
            .any(0)
            .tolist()
            for be in ("naive", "chunked")
        }
        assert rows["naive"] == rows["chunked"] == [i == 1 for i in range(6 - pad)], rows


def test_a_finite_voter_that_overflows_once_scaled_spoils_only_what_the_spec_spoils():
    """A finite query (3e38) that the logit scale (1e3) takes past float32's range: the chunked path checked the
    voters before scaling, found them finite and took the fast running sums, where the scaled query's inf times the
    zeroed first key gave a NaN vote that spread to every later row (1120 NaN outputs where the spec has 8). The
    check now reads the scaled operands."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 8) for _ in range(3))
    q[0, 0, 5, 0] = 3e38
    kw = dict(is_causal=True, selection=True, scale=1e3)
    out = {be: selective_attention(q, k, v, backend=be, **kw) for be in ("naive", "chunked")}
    spoiled = {be: (~torch.isfinite(o)).sum().item() for be, o in out.items()}
    assert spoiled["chunked"] == spoiled["naive"] < 70, spoiled
    finite = torch.isfinite(out["naive"])
    torch.testing.assert_close(out["chunked"][finite], out["naive"][finite], **TOL[torch.float32])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("hkv", [2, 1])
def test_a_non_finite_key_stays_out_of_the_rows_that_never_read_it(bad, hkv):
    """A NaN or inf key at a real token t (and, in batch 1, in padding) spoiled the chunked path's earlier rows of
    t's block, which never read it: the fused kernel's -inf bias gives NaN + (-inf) = NaN. The spec removes a key
    by assignment; the chunked path now redoes such a block that way. Rows the spec keeps finite are equal to it."""
    torch.manual_seed(0)
    B, H, L = 2, 2, 150
    q, k, v = (torch.randn(B, h, L, 8) for h in (H, hkv, hkv))
    k[0, :, 70, 3] = bad  # a real token inside the second 64-row block
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 140:] = True
    k[1, :, 140:] = bad  # garbage in padding
    kw = dict(is_causal=True, selection=True, key_padding_mask=pad, enable_gqa=hkv != H)
    out = {be: selective_attention(q, k, v, backend=be, **kw) for be in ("naive", "chunked")}
    spoiled = {be: ~torch.isfinite(o).all(-1) for be, o in out.items()}
    assert not spoiled["naive"][0, :, :70].any() and not spoiled["naive"][1].any()
    if bad != bad:  # NaN: the same rows
        assert torch.equal(spoiled["chunked"], spoiled["naive"])
    else:  # an inf logit's row is NaN in the spec; once F (inf) removes the key for later rows, the spec's
        # inf - inf spoils them too, where the chunked path keeps them: it spoils no row that the spec keeps
        assert not (spoiled["chunked"] & ~spoiled["naive"]).any() and spoiled["chunked"][0, :, 70:80].any()
    keep = ~spoiled["naive"]
    torch.testing.assert_close(out["chunked"][keep], out["naive"][keep], **TOL[torch.float32])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("removal", ["key_padding_mask", "bool_mask"])
def test_sdpa_keeps_a_removed_non_finite_key_out_of_every_row(bad, removal):
    """Standard attention through backend='sdpa': a NaN or inf key that every row removes (padding, or a bool mask's
    column) gave PyTorch's kernel NaN + (-inf) = NaN in the rows, where the spec, which removes a key by assignment,
    keeps them finite (found by a review helper). The call is redone on the spec's kernel: outputs and gradients
    equal the spec's."""
    torch.manual_seed(0)
    B, H, L = 2, 2, 12
    q, k, v = (torch.randn(B, H, L, 8, dtype=torch.float64) for _ in range(3))
    k[:, :, 0, 3] = bad
    kw = {"is_causal": True}
    if removal == "key_padding_mask":
        kw["key_padding_mask"] = torch.zeros(B, L, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True)
    else:
        kw["selective_mask"] = torch.zeros(L, L, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True)
    out = {be: selective_attention(q, k, v, backend=be, **kw) for be in ("naive", "sdpa", "auto")}
    assert torch.isfinite(out["naive"]).all()
    for be in ("sdpa", "auto"):
        torch.testing.assert_close(out[be], out["naive"], **TOL[torch.float64])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    _, want = grads(lambda *t: selective_attention(*t, backend="naive", **kw), q, k, v)
    _, got = grads(lambda *t: selective_attention(*t, backend="sdpa", **kw), q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), **TOL[torch.float64])
        assert torch.equal(a.isnan(), b.isnan())


def test_vmap_over_a_mask_is_refused_by_name_and_a_shared_mask_is_served():
    """A mask batched by torch.vmap cannot be read in Python (its values are checked and folded there): refused with
    the two ways that work, instead of PyTorch's data-dependent control-flow error. A mask shared by every mapped
    example is served, equal to a loop."""
    import torch.func as tf

    N, B, H, L, D = 3, 1, 2, 8, 4
    q, k, v = (torch.randn(N, B, H, L, D, dtype=torch.float64) for _ in range(3))
    masks = torch.rand(N, L, L) < 0.3
    pads = torch.zeros(N, B, L, dtype=torch.bool)
    for backend in ("naive", "sdpa", "auto"):
        with pytest.raises(ValueError, match="torch.vmap over selective_mask is not supported.*batch dimension"):
            tf.vmap(lambda a, b, c, m, be=backend: selective_attention(a, b, c, m, backend=be))(q, k, v, masks)
        with pytest.raises(ValueError, match=r"torch.vmap over key_padding_mask.*\[B, Lk\]"):
            tf.vmap(lambda a, b, c, p, be=backend: selective_attention(a, b, c, key_padding_mask=p, backend=be))(
                q, k, v, pads
            )
    shared = masks[0]
    got = tf.vmap(lambda a, b, c: selective_attention(a, b, c, shared))(q, k, v)
    want = torch.stack([selective_attention(q[i], k[i], v[i], shared) for i in range(N)])
    torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_scale_takes_any_real_number_and_names_a_tensor():
    import numpy as np

    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    out = selective_attention(q, q, q, scale=np.float32(0.5))
    torch.testing.assert_close(out, selective_attention(q, q, q, scale=0.5))
    with pytest.raises(ValueError, match=r"scale must be a finite number \(a Python or NumPy.*pass float\(scale\)"):
        selective_attention(q, q, q, scale=torch.tensor(0.5))
