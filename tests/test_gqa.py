"""Grouped-query attention (``enable_gqa``; ``n_kv_heads``; ``n_kv_head``) against the spec run on keys
and values repeated to every query head (``repeat_interleave(g, dim=1)``): outputs and gradients.

Tolerances: fp64 to 1e-10 (``helpers.TOL``), where any reordering of sums is invisible and a wrong kv
head, group or carry misses by O(1). fp32 to 1e-5 as well, the fast path against the spec in fp32
(not against fp64): both sum at most ~65 keys and votes of O(1) values, in another order, which
moves results by ~1e-6; 1e-5 keeps that margin and is still five orders under a wrong head.
The Triton kernels (interpreter) are held to 1e-4 as in tests/test_triton.py (fp32 dots in blocks).
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOL

from selective_attention import SelectiveAttention
from selective_attention.functional import attention_weights, selective_attention
from selective_attention.selection import Selection

# (H, Hkv): groups of 2, 4, one kv head (multi-query) and none (multi-head)
HEADS = [(6, 3), (8, 2), (4, 1), (4, 4)]
SELECTIONS = {
    "paper": Selection(),
    "last-head": "last",  # Selection(head=H - 1): kv head Hkv - 1
    "per-head": Selection(per_head=True),
    "projection": Selection(projection=True),
    "projection-per-head": Selection(projection=True, per_head=True),
}


def _selection(name, H):
    sel = SELECTIONS[name]
    return Selection(head=H - 1) if sel == "last" else sel


def _tensors(B, H, Hkv, L, D, dtype, *, selection=None, Ds=8, seed=0):
    """q ``[B, H, L, D]``, k, v ``[B, Hkv, L, D]`` and, for a projection, the voting pair ``[B, G, L, Ds]``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, H, L, D), (B, Hkv, L, D), (B, Hkv, L, D)]
    if selection is not None and selection.projection:
        G = selection.n_groups(H)
        shapes += [(B, G, L, Ds)] * 2
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _grads(fn, tensors, seed=1):
    """``[out, *d(out . cotangent)/d(tensors)]``, a fixed random cotangent."""
    xs = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*xs)
    out = out[0] if isinstance(out, tuple) else out
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return [out.detach(), *torch.autograd.grad(out, xs, dout, allow_unused=True, materialize_grads=True)]


def _call(backend, g, repeat=False, **kw):
    """``fn(q, k, v[, qs, ks])``: selective_attention on ``backend``, either with grouped k, v (``enable_gqa``)
    or, ``repeat``, with k, v repeated to H heads (the reference)."""

    def fn(q, k, v, *pair):
        if pair:
            kw["selection_qk"] = tuple(pair)
        if repeat:
            return selective_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), backend=backend, **kw)
        return selective_attention(q, k, v, enable_gqa=True, backend=backend, **kw)

    return fn


def _assert_all_close(fast, ref, dtype, names=("out", "dq", "dk", "dv", "dqs", "dks"), tol=None):
    tol = TOL[dtype] if tol is None else tol
    assert len(fast) == len(ref)
    for name, a, b in zip(names, fast, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


def _left_padding(B, L):
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, : min(3, L - 1)] = True  # sequence 0: left padding; the others none
    return kpm


def _user_mask(H, L, dtype, seed=2):
    """A float F ``(1, H, L, L)``: penalties in [0, 2) and ~15% of keys removed (+inf)."""
    gen = torch.Generator().manual_seed(seed)
    F = 2 * torch.rand(1, H, L, L, generator=gen, dtype=torch.float64)
    F = F.masked_fill(torch.rand(1, H, L, L, generator=gen) < 0.15, float("inf"))
    return F.to(dtype)


# --- standard attention: sdpa and the spec -----------------------------------------------------------
STANDARD = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool-mask": "bool",
    "float-mask-causal": "float",
    "left-padding": "pad",
    "dropout": dict(dropout_p=0.3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(STANDARD))
@pytest.mark.parametrize("backend", ["sdpa", "naive"])
@pytest.mark.parametrize("H,Hkv,L,D", [(6, 3, 33, 8), (8, 2, 7, 24), (4, 1, 1, 8), (4, 4, 65, 24)])
def test_standard_attention_matches_repeated_spec(backend, case, dtype, H, Hkv, L, D):
    B, g = 2, H // Hkv
    kw = STANDARD[case]
    if kw == "bool":
        kw = dict(selective_mask=torch.rand(L, L, generator=torch.Generator().manual_seed(3)) < 0.3)
    elif kw == "float":
        kw = dict(selective_mask=_user_mask(H, L, dtype), is_causal=True)
    elif kw == "pad":
        kw = dict(key_padding_mask=_left_padding(B, L), is_causal=True)
    tensors = _tensors(B, H, Hkv, L, D, dtype)
    torch.manual_seed(0)  # dropout: both draw the same mask (the same [B, H, L, L] weights are dropped)
    fast = _grads(_call(backend, g, **kw), tensors)
    torch.manual_seed(0)
    ref = _grads(_call("naive", g, repeat=True, **kw), tensors)
    _assert_all_close(fast, ref, dtype)


def test_cross_attention_and_weights():
    """Lq != Lk, and attention_weights with grouped keys (the weights of the repeated keys)."""
    q = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 9, 8, dtype=torch.float64), torch.randn(2, 2, 9, 8, dtype=torch.float64)
    for backend in ("sdpa", "naive"):
        out = selective_attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
        ref = selective_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
        torch.testing.assert_close(out, ref, **TOL[torch.float64])
    w = attention_weights(q, k, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(w, attention_weights(q, k.repeat_interleave(3, 1), is_causal=True), rtol=0, atol=0)
    qs = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    w = attention_weights(qs, k, selection=Selection(per_head=True), enable_gqa=True)
    ref = attention_weights(qs, k.repeat_interleave(3, 1), selection=Selection(per_head=True))
    torch.testing.assert_close(w, ref, rtol=0, atol=0)


# --- paper mode: chunked (and the spec's own grouped path) -------------------------------------------
PAPER_SHAPES = [(2, 6, 3, 33, 8), (1, 8, 2, 65, 24), (2, 4, 1, 7, 8), (1, 4, 4, 65, 8), (2, 6, 3, 1, 24)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("sel", list(SELECTIONS))
@pytest.mark.parametrize(
    "B,H,Hkv,L,D", PAPER_SHAPES, ids=[f"B{b}-H{h}-Hkv{k}-L{l}-D{d}" for b, h, k, l, d in PAPER_SHAPES]
)
def test_paper_mode_chunked_matches_repeated_spec(B, H, Hkv, L, D, sel, dtype):
    selection = _selection(sel, H)
    tensors = _tensors(B, H, Hkv, L, D, dtype, selection=selection)
    # 16-row chunks: L = 65 spans several, so the carried column sums and their mirror in backward run
    kw = dict(selection=selection)
    fast = _grads(_call("chunked", H // Hkv, chunk_size=16, **kw), tensors)
    ref = _grads(_call("naive", H // Hkv, repeat=True, **kw), tensors)
    _assert_all_close(fast, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_chunked_on_a_cpu_kernel_that_ignores_the_groups(monkeypatch, dtype):
    """Older PyTorch's fused CPU kernel read kv head h for query head h, past the end of k and v (outputs of 1e36
    and NaN on torch 2.5.1 and 2.6.0): there the chunked path repeats the block's keys for it. That path, run here."""
    from selective_attention.ops import chunked

    monkeypatch.setattr(chunked, "_cpu_flash_reads_groups", lambda: False)
    H, Hkv = 8, 2
    tensors = _tensors(2, H, Hkv, 65, 8, dtype)
    fast = _grads(_call("chunked", H // Hkv, chunk_size=16, selection=Selection()), tensors)
    ref = _grads(_call("naive", H // Hkv, repeat=True, selection=Selection()), tensors)
    _assert_all_close(fast, ref, dtype)


def test_the_cpu_kernel_probe_matches_the_kernel():
    """The probe's answer holds for a real grouped call: where it says the fused CPU kernel reads grouped kv heads,
    the kernel given k, v of Hkv heads equals it given them repeated; where it says not, the two differ."""
    from selective_attention.ops import chunked

    if not chunked._has_cpu_flash():
        pytest.skip("this PyTorch has no fused CPU flash kernel: the chunked path never calls it")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 16, 8, generator=gen)
    # 2 kv heads, the front of 8-head buffers: a kernel that ignores the groups reads the others, within bounds
    k, v = (torch.randn(1, 8, 16, 8, generator=gen)[:, :2] for _ in range(2))
    bias = torch.zeros(1, 1, 16, 16)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    grouped = flash(q, k, v, 0.0, False, attn_mask=bias, scale=0.3)[0]
    repeated = flash(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), 0.0, False, attn_mask=bias, scale=0.3)
    assert torch.allclose(grouped, repeated[0], atol=1e-6) == chunked._cpu_flash_reads_groups()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("sel", list(SELECTIONS))
@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_paper_mode_with_padding_masks_and_memory_rows(backend, sel, dtype):
    """Left key padding, a user float mask (penalties and removed keys) and the memory-loss rows."""
    B, H, Hkv, L, D = 2, 6, 2, 37, 8
    selection = _selection(sel, H)
    tensors = _tensors(B, H, Hkv, L, D, dtype, selection=selection)
    kw = dict(selection=selection, key_padding_mask=_left_padding(B, L), selective_mask=_user_mask(H, L, dtype))
    extra = dict(chunk_size=8) if backend == "chunked" else {}
    fn, ref_fn = _call(backend, 3, memory_tau=0.7, **extra, **kw), _call("naive", 3, repeat=True, memory_tau=0.7, **kw)

    def both(fn):  # the output and the memory-loss rows, differentiated together (the loss trains through both)
        return lambda *t: torch.cat([x.flatten() for x in fn(*t)])

    _assert_all_close(_grads(both(fn), tensors), _grads(both(ref_fn), tensors), dtype)


def test_paper_mode_dropout_on_the_spec():
    """Paper mode with dropout runs on the spec ("auto" picks it): the same draws as with repeated k, v."""
    tensors = _tensors(2, 6, 3, 20, 8, torch.float64)
    torch.manual_seed(0)
    fast = _grads(_call("auto", 2, selection=True, dropout_p=0.2), tensors)
    torch.manual_seed(0)
    ref = _grads(_call("naive", 2, repeat=True, selection=True, dropout_p=0.2), tensors)
    _assert_all_close(fast, ref, torch.float64)


# --- Triton (the interpreter on CPU) ------------------------------------------------------------------
TRITON_CASES = [  # B, H, Hkv, L, D, selection: every kv-head mapping, tails, and one F per head
    (1, 6, 3, 33, 8, "paper"),
    (1, 6, 3, 33, 8, "per-head"),
    (2, 4, 1, 7, 24, "last-head"),
    (1, 8, 2, 65, 8, "last-head"),
    (2, 4, 2, 1, 8, "per-head"),
]


@pytest.mark.parametrize(
    "B,H,Hkv,L,D,sel", TRITON_CASES, ids=[f"B{b}-H{h}-Hkv{k}-L{l}-D{d}-{s}" for b, h, k, l, d, s in TRITON_CASES]
)
def test_triton_matches_repeated_spec(monkeypatch, B, H, Hkv, L, D, sel):
    pytest.importorskip("triton", minversion="3.2", reason="the Triton backend needs `pip install triton` (>= 3.2)")
    from selective_attention.ops.triton import op

    monkeypatch.setattr(op, "debug_fill_nan", True)  # an element a kernel does not write fails the test
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = [t.to(device) for t in _tensors(B, H, Hkv, L, D, torch.float32)]
    kw = dict(selection=_selection(sel, H))
    fast = _grads(_call("triton", H // Hkv, **kw), tensors)
    ref = _grads(_call("naive", H // Hkv, repeat=True, **kw), tensors)
    _assert_all_close(fast, ref, torch.float32, tol=dict(atol=1e-4, rtol=1e-4))


def test_triton_fake_kernels_give_grouped_shapes():
    """The custom ops' fake implementations (what torch.compile traces) give dk, dv the kv heads' shape."""
    pytest.importorskip("triton", minversion="3.2", reason="the Triton backend needs `pip install triton` (>= 3.2)")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from selective_attention.ops.triton import op

    with FakeTensorMode():
        q, k, v = torch.empty(2, 6, 9, 16), torch.empty(2, 3, 9, 16), torch.empty(2, 3, 9, 24)
        out, lse = op.paper_fwd(q, k, v, 0, 0.25, 0.25)
        dq, dk, dv = op.paper_bwd(torch.empty(2, 6, 9, 24), q, k, v, out, lse, 0, 0.25, 0.25)
    assert out.shape == (2, 6, 9, 24) and lse.shape == (2, 6, 9)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


# --- errors -------------------------------------------------------------------------------------------
def test_errors_name_the_fix():
    q, k, v = torch.randn(1, 6, 5, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        selective_attention(q, k, v)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        selective_attention(q, k, v, selection=True)
    with pytest.raises(ValueError, match=r"H=6.*Hkv=4"):
        selective_attention(q, torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8), enable_gqa=True)
    with pytest.raises(ValueError, match="same number of heads"):
        selective_attention(q, k, torch.randn(1, 2, 5, 8), enable_gqa=True)
    with pytest.raises(ValueError, match=r"selection_qk qs has shape \(1, 3, 5, 8\)"):  # the pair keeps G in (1, H)
        selective_attention(q, k, v, selection=Selection(projection=True, per_head=True), selection_qk=(k, k),
                            enable_gqa=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"n_kv_heads \(4\).*n_heads \(6\)"):
        SelectiveAttention(48, 6, n_kv_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        SelectiveAttention(48, 6, n_kv_heads=0)


# --- the module ---------------------------------------------------------------------------------------
def _repeat_rows(w, n_kv, g):
    """A ``[n_kv * d, ...]`` projection weight (or bias) with each head's rows repeated g times."""
    return w.unflatten(0, (n_kv, -1)).repeat_interleave(g, 0).flatten(0, 1)


@pytest.mark.parametrize("sel", [None, *SELECTIONS])
def test_module_equals_multi_head_with_repeated_kv_projections(sel):
    """SelectiveAttention(n_kv_heads=2) = the multi-head module whose k/v projections repeat each kv head's."""
    d_model, H, Hkv = 48, 6, 2
    selection = False if sel is None else _selection(sel, H)
    torch.manual_seed(0)
    gqa = SelectiveAttention(d_model, H, 0.0, selection=selection, n_kv_heads=Hkv).double()
    mha = SelectiveAttention(d_model, H, 0.0, selection=selection).double()
    state = dict(gqa.state_dict())
    for name in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
        state[name] = _repeat_rows(state[name], Hkv, H // Hkv)
    mha.load_state_dict(state)
    assert gqa.k_proj.out_features == Hkv * 8 and "n_kv_heads=2" in repr(gqa)
    x = torch.randn(2, 11, d_model, dtype=torch.float64, requires_grad=True)
    kpm = _left_padding(2, 11)
    kw = dict(is_causal=True, key_padding_mask=kpm, need_weights=True)
    out, w = gqa(x, x, x, **kw)
    ref, ref_w = mha(x, x, x, **kw)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(w, ref_w, **TOL[torch.float64])
    (dx,) = torch.autograd.grad(out.sum(), x)
    (ref_dx,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(dx, ref_dx, **TOL[torch.float64])
    if selection:
        torch.testing.assert_close(gqa.selection_penalty(x), mha.selection_penalty(x), **TOL[torch.float64])


# --- the language model and its KV cache ----------------------------------------------------------------
GPT_VARIANTS = {
    "standard": dict(),
    "paper": dict(selection=True),
    "last-head": dict(selection=True, selection_head=3),
    "per-head": dict(selection=True, selection_per_head=True),
    "projection": dict(selection=True, selection_projection=True),
}


def _gpt(n_kv_head, dtype=torch.float64, seed=0, **kw):
    from selective_attention.model import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=40, context_len=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=32, **kw)
    m = GPT(cfg).to(dtype).eval()
    for b in m.blocks:  # strong logits: F is large, so pruning and masking decisions are not ties
        b.attn.qkv.weight.data *= 6.0
    return m


def _as_multi_head(gqa):
    """The multi-head GPT equal to ``gqa``: each kv head's rows of the qkv projection repeated g times."""
    cfg = gqa.config
    H, Hkv, D = cfg.n_head, cfg.kv_heads, cfg.head_dim
    mha = type(gqa)(type(cfg)(**{**cfg.__dict__, "n_kv_head": None})).to(gqa.tok_emb.weight.dtype).eval()
    state = dict(gqa.state_dict())
    for name, w in list(state.items()):
        if name.endswith("attn.qkv.weight"):
            q, k, v = w.split([H * D, Hkv * D, Hkv * D])
            state[name] = torch.cat([q, _repeat_rows(k, Hkv, H // Hkv), _repeat_rows(v, Hkv, H // Hkv)])
    mha.load_state_dict(state)
    return mha


@pytest.mark.parametrize("variant", list(GPT_VARIANTS))
def test_gpt_equals_multi_head_with_repeated_kv(variant):
    m = _gpt(2, **GPT_VARIANTS[variant])
    assert m.blocks[0].attn.qkv.out_features == (4 + 2 * 2) * 8
    idx = torch.randint(0, 40, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(m(idx), _as_multi_head(m)(idx), **TOL[torch.float64])
    loss, _ = m.loss(idx, idx)  # trains: every parameter gets a gradient
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", list(GPT_VARIANTS))
@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_cached_decoding_equals_full_forward(n_kv_head, variant, dtype):
    from selective_attention.decoding import Decoder

    m = _gpt(n_kv_head, dtype, **GPT_VARIANTS[variant])
    idx = torch.randint(0, 40, (2, 30))
    dec = Decoder(m)
    logits = [dec.prefill(idx[:, :5], max_new_tokens=25)]
    for t in range(5, 29):
        logits.append(dec.step(idx[:, t]))
    assert dec.caches[0].k.shape == (2, n_kv_head, 30, 8)
    with torch.no_grad():
        full = m(idx[:, :29])[:, 4:]
    torch.testing.assert_close(torch.stack(logits, 1), full, **TOL[dtype])


def test_kv_bytes_shrink_and_budgets_hold():
    from selective_attention.decoding import Decoder

    idx = torch.randint(0, 40, (2, 9))
    mha, gqa = _gpt(None, selection=True), _gpt(1, selection=True)
    a, b = Decoder(mha), Decoder(gqa)
    a.prefill(idx, max_new_tokens=10)
    b.prefill(idx, max_new_tokens=10)
    assert sum(b.kv_bytes()) * 4 == sum(a.kv_bytes())  # Hkv / H = 1 / 4
    for budget in (4, [3, 6]):
        dec = Decoder(gqa, budget=budget)
        limits = budget if isinstance(budget, list) else [budget] * 2
        logits = dec.prefill(idx, max_new_tokens=20)
        for _ in range(20):
            assert all(o <= lim for o, lim in zip(dec.occupancy(), limits))
            logits = dec.step(logits.argmax(-1))
        assert [c.k.shape[2] for c in dec.caches] == limits and dec.occupancy() == limits
    # greedy generation through the cache equals recomputing the full forward every step
    out = gqa.generate(idx, 12, temperature=0)
    ref = idx
    with torch.no_grad():
        for _ in range(12):
            ref = torch.cat([ref, gqa(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_config_validates_n_kv_head():
    from selective_attention.model import GPTConfig

    assert GPTConfig(n_head=4).kv_heads == 4 and GPTConfig(n_head=4, n_kv_head=2).kv_heads == 2
    for bad in (3, 0, -2, 2.0, True):
        with pytest.raises(ValueError, match=r"n_kv_head must be an int dividing n_head=4.*\[1, 2, 4\]"):
            GPTConfig(n_head=4, n_kv_head=bad)
