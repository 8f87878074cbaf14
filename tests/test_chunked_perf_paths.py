"""The chunked path's forward chunks span several chunk_size units (``_forward_blocks``); the backward
rebuilds each forward chunk's F and bias and walks its keys in tiles (``_key_tile``). Exact against the
naive spec (fp64) for chunk sizes that do and do not divide L or the forward chunk, for tiles of one
or several blocks of key columns, with a mask, padding, a float F and memory rows."""

import pytest
import torch
from helpers import TOL

from selective_attention.functional import selective_attention
from selective_attention.ops import chunked
from selective_attention.selection import Selection


def _qkv(B, H, L, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) * 1.5 for _ in range(3))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def _run(backend, q, k, v, **kw):
    out = selective_attention(q, k, v, backend=backend, **{"selection": True, **kw})
    o, m = out if isinstance(out, tuple) else (out, None)
    loss = o.pow(2).sum() + (0.0 if m is None else m.pow(2).sum())
    return (o, m, *torch.autograd.grad(loss, (q, k, v)))


def _assert_chunked_matches_naive(q, k, v, chunk_size, **kw):
    """Outputs, memory rows and gradients of ``chunked`` equal the naive spec's (fp64 tolerances)."""
    ref = _run("naive", q, k, v, **kw)
    got = _run("chunked", q, k, v, chunk_size=chunk_size, **kw)
    for a, b in zip(got, ref):
        if b is not None:
            torch.testing.assert_close(a, b, **TOL[torch.float64])


def _extra(extra, B, L, seed, pad):
    """Keyword arguments for one ``extra`` case: a bool mask (seed), key padding of sequence ``pad[0]``'s first
    ``pad[1]`` keys, a float F (seed + 1), memory rows, or every head voting."""
    kw = {}
    if extra == "mask":
        kw["selective_mask"] = torch.rand(B, 1, L, L, generator=torch.Generator().manual_seed(seed)) < 0.2
    elif extra == "padding":
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[pad[0], : pad[1]] = True
        kw["key_padding_mask"] = kpm
    elif extra == "float_F":
        gen = torch.Generator().manual_seed(seed + 1)
        kw["selective_mask"] = torch.rand(1, 1, L, L, generator=gen, dtype=torch.float64)
    elif extra == "memory":
        kw["memory_tau"] = 1.0
    elif extra == "every_head":
        kw["selection"] = Selection(per_head=True)
    return kw


def test_forward_chunks_span_several_backward_chunks():
    assert chunked._forward_blocks(8, 1, 64, 2, None, None) == 8  # H // G
    assert chunked._forward_blocks(8, 8, 64, 2, None, None) == 1  # every head votes: the bias has all H
    assert chunked._forward_blocks(8, 1, 64, 16, None, None) == 1  # at most L / 4 rows
    assert chunked._forward_blocks(8, 1, 64, 8, None, None) == 2
    assert chunked._forward_blocks(8, 1, 64, 2, None, None, max_rows=5) == 2  # at most max_rows rows
    assert chunked._block_rows(8, 4) == 256  # B H = 8, fp32: [8, 256, 512] tiles are 4 MiB


def test_every_size_rule_reads_the_one_tile_budget(monkeypatch):
    """The chunk size, the key tiles and the block rows all follow _TILE_BYTES: default_chunk_size wrote the same
    4 MiB as a literal, so a changed budget left it behind."""
    B, H, L = 1, 8, 2048  # [1, 8, 64, 2048] fp32 temporaries: exactly 4 MiB
    assert chunked.default_chunk_size(B, H, L) == 64 and chunked.default_chunk_size(B, H, 2 * L) == 32
    monkeypatch.setattr(chunked, "_TILE_BYTES", 8 * 2**20)
    assert chunked.default_chunk_size(B, H, 2 * L) == 64
    assert chunked._block_rows(8, 4) == 362 and chunked._key_tile(8, 64, 8192, 4) == 4096


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5])
@pytest.mark.parametrize("extra", ["none", "mask", "padding", "float_F", "memory"])
def test_sub_chunked_backward_matches_naive(chunk_size, extra):
    B, H, L, D = 2, 8, 48, 4
    q, k, v = _qkv(B, H, L, D)
    kw = _extra(extra, B, L, seed=1, pad=(1, 5))
    _assert_chunked_matches_naive(q, k, v, chunk_size=chunk_size, **kw)


@pytest.mark.parametrize("C", [1, 5, 64, 100, 128, 200])
def test_exclusive_rows_gemm_matches_running_sum(C):
    gen = torch.Generator().manual_seed(C)
    x = -torch.rand(2, 1, C, 37, generator=gen, dtype=torch.float64)
    start = -torch.rand(2, 1, 1, 37, generator=gen, dtype=torch.float64)
    above = torch.ones(64, 64, dtype=torch.float64).tril_(-1)
    ref = chunked._exclusive_rows(None, x, start)
    torch.testing.assert_close(chunked._exclusive_rows(above[: min(64, C), : min(64, C)], x, start), ref)
    # into a workspace (the forward's bias buffer), NaN-filled so that an unwritten row fails
    out = torch.full_like(x, float("nan"))
    got = chunked._exclusive_rows(above[: min(64, C), : min(64, C)], x, start, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, ref)


def test_workspace_views_share_one_buffer():
    ws = chunked._Workspace(torch.empty(0), P=24)
    a, b = ws("P", 2, 3, 4), ws("P", 5, 2)
    assert a.is_contiguous() and b.is_contiguous() and a.data_ptr() == b.data_ptr()
    with pytest.raises(RuntimeError):
        ws("P", 5, 5)  # larger than the buffer was sized for


def test_nan_voter_reaches_only_later_rows_like_the_spec():
    """A NaN in one query of the voting head leaves every earlier row finite (no 0 * NaN in row sums)."""
    q, k, v = _qkv(1, 8, 48, 4)
    q = q.detach().clone()
    q[0, 0, 30] = float("nan")
    out = selective_attention(q, k.detach(), v.detach(), selection=True, backend="chunked", chunk_size=4)
    assert torch.isfinite(out[:, :, :30]).all()


# B*H = 8 rows of heads, blocks of C = 4 query rows (chunk_size 2, two per forward block), fp64: tiles
# of C keys, or of 3C = 12 (the last one narrower)
@pytest.mark.parametrize("tile_bytes", [1, 8 * 4 * 12 * 8])
@pytest.mark.parametrize("extra", ["none", "mask", "padding", "float_F", "memory", "every_head"])
def test_key_tiled_backward_matches_naive(monkeypatch, tile_bytes, extra):
    """Several key tiles per query block (the last one narrower), the diagonal one included."""
    monkeypatch.setattr(chunked, "_TILE_BYTES", tile_bytes)
    B, H, L, D = 1, 8, 45, 4
    assert chunked._key_tile(B * H, 4, L, 8) in (4, 12)  # really several tiles
    q, k, v = _qkv(B, H, L, D, seed=3)
    kw = _extra(extra, B, L, seed=4, pad=(0, 7))
    _assert_chunked_matches_naive(q, k, v, chunk_size=2, **kw)


@pytest.mark.parametrize("extra", ["none", "padding", "float_F", "memory", "every_head", "gqa", "pair"])
def test_tiled_backward_matches_naive_with_grouped_heads_and_a_voting_pair(monkeypatch, extra):
    """Blocks and key tiles that do not divide L, with grouped-query heads (the group's rows stacked in one GEMM
    operand) and a dedicated voting pair (its vote GEMMs, not folded into dq, dk)."""
    monkeypatch.setattr(chunked, "_TILE_BYTES", 8 * 4 * 10 * 8)  # blocks of 10 rows, tiles of 10 keys
    B, H, L, D = 2, 4, 37, 4
    q, k, v = _qkv(B, H, L, D, seed=5)
    kw = _extra(extra, B, L, seed=6, pad=(1, 9))
    if extra == "gqa":
        k, v = (t[:, :2].detach().clone().requires_grad_() for t in (k, v))
        kw["enable_gqa"] = True
    elif extra == "pair":  # a dedicated voting pair: its gradients come from the vote GEMMs, not folded into dq, dk
        gen = torch.Generator().manual_seed(7)
        pair = [torch.randn(B, 1, L, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        sel = Selection(head=0, per_head=False, projection=True)
        results = []
        for backend, extra_kw in (("naive", {}), ("chunked", {"chunk_size": 5})):
            o = selective_attention(q, k, v, selection=sel, selection_qk=tuple(pair), backend=backend, **extra_kw)
            results.append((o, *torch.autograd.grad(o.pow(2).sum(), (q, k, v, *pair))))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
        return
    _assert_chunked_matches_naive(q, k, v, chunk_size=5, **kw)


@pytest.mark.parametrize("finite", [True, False])
def test_a_tiles_votes_bias_and_F_are_those_columns_of_the_whole_rows(finite):
    """Backward rebuilds the votes, F and bias of one key tile at a time (a block's whole rows were 8 MiB of the peak
    at B1 H8 L4096): each tile's equal the same columns of the rows' (fp64, with removed keys, a dead row, key
    padding, a penalty; finite voters, and a NaN voter's masked path), up to the GEMMs' rounding (MKL's dgemm gave
    products 1 ulp apart for 8 and 32 columns here; a wrong carry or mask misses by O(1)). A tile that would cut the
    diagonal block is refused."""
    gen = torch.Generator().manual_seed(11)
    B, L, D, C, i0 = 2, 40, 4, 8, 24
    qs, ks = (torch.randn(B, 1, L, D, generator=gen, dtype=torch.float64) for _ in range(2))
    if not finite:
        qs[1, 0, 3, 0] = float("nan")
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, :5] = True
    removed = pad[:, None, None, :].clone()
    removed[0, ..., 7] = True
    dead = ((~removed).cumsum(dim=-1) == 0).transpose(-2, -1)
    penalty = torch.rand(1, 1, L, L, generator=gen, dtype=torch.float64)
    vt = chunked._VoteOperands(qs, ks, 0.5, C, pad)
    ncol = -torch.rand(B, 1, L, generator=gen, dtype=torch.float64)
    i1 = i0 + C
    for pen in (None, penalty):
        whole = chunked._chunk_bias(vt, ncol, removed, dead, pen, i0, i1, keep_F=True)
        for j0, j1 in ((0, 8), (8, 24), (16, i1), (0, i1)):
            tile = chunked._chunk_bias(vt, ncol, removed, dead, pen, i0, i1, keep_F=True, j0=j0, j1=j1)
            for a, b in zip(tile, whole):
                torch.testing.assert_close(a, b[..., j0:j1], atol=1e-13, rtol=1e-13, equal_nan=True)
    with pytest.raises(ValueError, match="cuts the diagonal block"):
        chunked._chunk_bias(vt, ncol, removed, dead, None, i0, i1, j0=16, j1=28)


@pytest.mark.parametrize(
    "mask",
    [
        "penalty [1,1,1,1]",
        "penalty [1,1,L,1]",
        "removed [1,1,1,L]",
        "removed [1,1,L,1]",
        "penalty [B,1,1,L]",
        "removed [B,1,1,1]",
    ],
)
def test_masks_that_broadcast_over_keys_or_rows_across_several_tiles(monkeypatch, mask):
    """chunked_selective_attention takes masks that broadcast to [B, H, L, L]: one with a single key column sliced to
    nothing in every key tile after the first (a crash), once the backward rebuilt its bias per tile. Against the
    naive spec with the mask expanded; the penalty's gradient too, summed over where it broadcasts."""
    from selective_attention.ops.naive import naive_selective_attention

    monkeypatch.setattr(chunked, "_TILE_BYTES", 2048)  # several key tiles per block
    B, H, L, D = 2, 2, 32, 4
    q, k, v = _qkv(B, H, L, D, seed=8)
    gen = torch.Generator().manual_seed(9)
    kind, shape = mask.split(" ")
    dims = [{"B": B, "L": L}.get(x, 1) if not x.isdigit() else int(x) for x in shape.strip("[]").split(",")]
    m = torch.rand(*dims, generator=gen, dtype=torch.float64) if kind == "penalty" else torch.zeros(*dims) > 0
    if kind == "removed":  # key 5 removed (or, one column: nothing removed) and row 9 losing every key but key 0
        if dims[-1] == L:
            m[..., 5] = True
        elif dims[2] == L:
            m[..., 9, :] = True
        else:  # one row and one column: sequence 1 loses every key (every row dead; this raised)
            m[1] = True
    if kind == "penalty":
        m.requires_grad_()
    scale = D**-0.5
    voters = Selection().bind(q, k, scale=scale)
    out, _ = chunked.chunked_selective_attention(q, k, v, voters, scale=scale, chunk_size=4, **{kind: m})
    full = m.expand(B, H, L, L)
    rm = full if kind == "removed" else None
    want, _, _ = naive_selective_attention(
        q, k, v, q[:, :1], k[:, :1], scale=scale, sel_scale=scale, removed=rm, penalty=None if rm is not None else full
    )
    if rm is not None:  # rows with every key removed: zeros in both
        want = want.masked_fill((rm | torch.ones(L, L, dtype=torch.bool).triu(1)).all(-1, keepdim=True), 0.0)
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    inputs = (q, k, v) + ((m,) if kind == "penalty" else ())
    w = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, w), torch.autograd.grad(want, inputs, w)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("C", [1, 5, 64, 100, 128, 200])
def test_exclusive_rows_below_gemm_matches_suffix_sum(C):
    gen = torch.Generator().manual_seed(C)
    x = -torch.rand(2, 1, C, 37, generator=gen, dtype=torch.float64)
    start = -torch.rand(2, 1, 1, 37, generator=gen, dtype=torch.float64)
    ref = x.flip(2).cumsum(2).flip(2) - x + start  # sum over the rows below, exclusive
    above = torch.ones(64, 64, dtype=torch.float64).tril_(-1)
    torch.testing.assert_close(chunked._exclusive_rows_below(None, x, start), ref)
    torch.testing.assert_close(chunked._exclusive_rows_below(above[: min(64, C), : min(64, C)], x, start), ref)


def _bf16_grads(inputs, w, dtype, backend):
    """Gradients (float64) of ``sum(out * w)`` for q, k, v (and a voting pair qs, ks if given) in ``dtype``."""
    x = [t.to(dtype).requires_grad_() for t in inputs]
    kw = {"selection_qk": (x[3], x[4])} if len(x) == 5 else {}
    o = selective_attention(*x[:3], backend=backend, selection=True, **kw)
    return [g.double() for g in torch.autograd.grad((o * w.to(dtype)).sum(), x)]


@pytest.mark.parametrize("voters", ["head", "pair"])
def test_bf16_vote_gates_keep_their_sign(voters):
    """In bfloat16 the votes' scale is applied after their matmul: rounding q * scale first moved near-zero votes by
    a rounding of |q| |k| and flipped their relu gates, and the voting head's gradients were 40-60% off (seeds 0,
    1). The chunked path's error against float64 stays within a few times the naive spec's own in bfloat16."""
    B, H, L, D = 1, 4, 200, 32
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        inputs = [torch.randn(B, H, L, D, generator=gen).bfloat16().double() for _ in range(3)]
        if voters == "pair":
            inputs += [torch.randn(B, 1, L, 16, generator=gen).bfloat16().double() for _ in range(2)]
        w = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64)
        ref = _bf16_grads(inputs, w, torch.float64, "naive")

        def rel(grads):
            return max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref))  # noqa: B023

        naive = rel(_bf16_grads(inputs, w, torch.bfloat16, "naive"))
        chunked = rel(_bf16_grads(inputs, w, torch.bfloat16, "chunked"))
        assert chunked <= 3 * naive + 1e-3, (seed, chunked, naive)


@pytest.mark.parametrize("spread", [1.0, 3.0])
def test_backward_gemms_never_read_subnormal_numbers(monkeypatch, spread):
    """Subnormal operands cost Intel CPUs a microcode assist per operation (a trained demo model's training step ran
    1.7x slower): the backward flushes P below 2^-78 (fp32), which keeps dZ normal too. Every GEMM operand is checked
    (random votes already send P into [2^-126, 2^-78]), and the gradients stay within fp32's error of the fp64 spec."""
    from helpers import assert_error_bounded, grads

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 256, 16, generator=gen) * spread for _ in range(2))
    v = torch.randn(1, 2, 256, 16, generator=gen)
    found, bmm = [], torch.bmm

    def spy(a, b, *args, **kw):
        found.extend(int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum()) for t in (a, b))
        return bmm(a, b, *args, **kw)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    monkeypatch.setattr(torch, "bmm", spy)
    o, g = grads(lambda q, k, v: selective_attention(q, k, v, selection=True, backend="chunked"), *leaves)
    monkeypatch.setattr(torch, "bmm", bmm)
    assert found and sum(found) == 0, f"{sum(found)} subnormal GEMM operands"
    fn = lambda q, k, v: selective_attention(q, k, v, selection=True, backend="naive")  # noqa: E731
    o_ref, g_ref = grads(fn, *[t.clone().requires_grad_() for t in (q, k, v)])
    o64, g64 = grads(fn, *[t.double().requires_grad_() for t in (q, k, v)])
    assert_error_bounded(o, o_ref, o64, name="out")
    for a, b, c, n in zip(g, g_ref, g64, "qkv"):
        assert_error_bounded(a, b, c, name=f"d{n}")


@pytest.mark.parametrize("fused", [True, False])  # PyTorch's CPU flash kernel, or the plain one (other devices)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_each_within_the_specs_error(dtype, fused, monkeypatch):
    """Each gradient on its own (a bound on the largest of them hid dv), at logits of ~20. The forward kept the
    kernel's float32 lse in the inputs' dtype (ulp 1/32 in float16 and 1/4 in bfloat16 at 50: rebuilt rows of P
    summed to 1.03) and the backward rounded P's logits to it: dv's error was 10x the spec's (float16), 7x (bf16).
    Now every gradient's is below the spec's in the same dtype (within 1.5x of it, plus a few ulp, here)."""
    from helpers import assert_error_bounded

    if not fused:
        monkeypatch.setattr(chunked, "_has_cpu_flash", lambda: False)
    gen = torch.Generator().manual_seed(0)
    q, k = (4 * torch.randn(2, 4, 256, 32, generator=gen) for _ in range(2))
    v, cotangent = (torch.randn(2, 4, 256, 32, generator=gen).to(dtype) for _ in range(2))
    results = {}
    runs = (("ref", torch.float64, "naive"), ("naive", dtype, "naive"), ("chunked", dtype, "chunked"))
    for name, dt, backend in runs:
        leaves = [t.to(dtype).to(dt).clone().requires_grad_() for t in (q, k, v)]  # the same numbers in every precision
        out = selective_attention(*leaves, selection=True, backend=backend)
        out.backward(cotangent.to(dt))
        results[name] = [out.detach()] + [t.grad for t in leaves]
    for n, fast, naive, ref in zip(("out", "dq", "dk", "dv"), results["chunked"], results["naive"], results["ref"]):
        assert_error_bounded(fast, naive, ref, factor=1.5, name=n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_key_gradients_do_not_degrade_with_the_number_of_blocks(dtype):
    """dk and dv sum every query block's contribution: summed in the inputs' dtype, their error grew with the number
    of blocks (L / chunk: 2.6x the spec's at L = 1024, 6x at 8192 with the default chunks; 9-14x with chunk_size=7
    at 4096; 2.9-6.8x here). Summed in float32 (dk from dZ before its rounding) and rounded once, they stay within
    2x the spec's own here (1.0-1.2x with torch 2.13, 1.6x in bfloat16 with torch 2.5's GEMMs; no allowance of a few
    ulp: in bfloat16 that would hide a 3x error)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v, cot = (torch.randn(1, 2, 1024, 16, generator=gen).to(dtype) for _ in range(4))
    results = {}
    runs = (("ref", torch.float64, "naive", None), ("naive", dtype, "naive", None), ("chunked", dtype, "chunked", 4))
    for name, dt, backend, chunk in runs:
        leaves = [t.to(dt).clone().requires_grad_() for t in (q, k, v)]
        kw = {} if chunk is None else {"chunk_size": chunk}
        out = selective_attention(*leaves, selection=True, backend=backend, **kw)
        out.backward(cot.to(dt))
        results[name] = [t.grad for t in leaves]
    for n, fast, naive, ref in zip(("dq", "dk", "dv"), results["chunked"], results["naive"], results["ref"]):
        err_fast, err_naive = ((t.double() - ref).abs().max().item() for t in (fast, naive))
        assert 0 < err_fast <= 2 * err_naive, f"{n}: error {err_fast:.3g} vs the spec's {err_naive:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_backward_with_the_memory_loss_rows(dtype):
    """The memory-loss rows are float32 for half inputs; their gradient enters F's in the votes' dtype. (A change
    that subtracted it out of place promoted F's gradient to float32, and the running sums' GEMM with the half
    triangle raised "expected scalar type Float": every half-precision training step with memory_eps > 0.)"""
    from helpers import assert_error_bounded

    gen = torch.Generator().manual_seed(1)
    q, k, v, cot = (torch.randn(2, 2, 200, 16, generator=gen).to(dtype) for _ in range(4))
    results = {}
    runs = (("ref", torch.float64, "naive"), ("naive", dtype, "naive"), ("chunked", dtype, "chunked"))
    for name, dt, backend in runs:
        leaves = [t.to(dt).clone().requires_grad_() for t in (q, k, v)]
        out, rows = selective_attention(*leaves, selection=True, memory_tau=1.0, backend=backend)
        ((out * cot.to(dt)).sum() + rows.sum() / 64).backward()
        results[name] = [out.detach()] + [t.grad for t in leaves]
    for n, fast, naive, ref in zip(("out", "dq", "dk", "dv"), results["chunked"], results["naive"], results["ref"]):
        assert_error_bounded(fast, naive, ref, factor=1.5, name=n)


def test_a_backward_that_overflows_from_finite_inputs_is_refused_not_returned():
    """At float32 logits beyond ~1e9 the backward's base-2 rebuild of the weights overflows (it rounds apart from the
    forward's kernel by ~1e-7 of a logit): the gradients came back NaN and inf, silently, where the spec's are finite.
    Refused now, naming the cause and backend='naive'; a NaN input still spreads as in every backend."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    big = [(t * 1e5).requires_grad_() for t in (q, k)] + [v.clone().requires_grad_()]
    with pytest.raises(FloatingPointError, match="overflowed.*backend='naive'"):
        selective_attention(*big, selection=True, backend="chunked").sum().backward()
    spec = [t.detach().clone().requires_grad_() for t in big]
    selective_attention(*spec, selection=True, backend="naive").sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in spec)
    nan_v = v.clone()
    nan_v[0, 0, 5, 0] = float("nan")
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_(), nan_v.requires_grad_()]
    selective_attention(*leaves, selection=True, backend="chunked").sum().backward()  # not refused
    assert not torch.isfinite(leaves[2].grad).all() or not torch.isfinite(leaves[0].grad).all()
