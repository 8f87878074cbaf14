"""The chunked backend as ``torch.library`` custom ops: what ``torch.compile`` sees of it.

Inductor's own code for the chunked blocks and tiles was 1.6-1.9x slower than the eager kernels, and the
dispatcher broke a compiled model's graph at every attention call; now a compiled model keeps one graph
around the attention and calls the custom ops, whose fake implementations give every output's shape.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, grads

from selective_attention import SelectiveAttention
from selective_attention.functional import selective_attention
from selective_attention.ops import chunked


def _t(*shape, dtype=torch.float64, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def _fwd_args(case: str, dtype=torch.float64, grad=True):
    """chunked_fwd's arguments for one kind of call (B 2, H 4, L 11, D 8; chunks of 4 rows)."""
    B, H, L, D = 2, 4, 11, 8
    Hkv = 2 if case == "gqa" else H
    q, k, v = (
        _t(B, H, L, D, dtype=dtype, grad=grad),
        _t(B, Hkv, L, D, dtype=dtype, grad=grad, seed=1),
        _t(B, Hkv, L, D, dtype=dtype, grad=grad, seed=2),
    )
    qs = ks = removed = dead = pad = penalty = tau = None
    h0, h1 = (0, H) if case == "per_head" else (0, 1)
    if case == "masks":  # a dedicated voting pair, a user penalty, removed keys, key padding, memory rows
        qs, ks = _t(B, 1, L, D, dtype=dtype, grad=grad, seed=3), _t(B, 1, L, D, dtype=dtype, grad=grad, seed=4)
        h0 = h1 = 0
        penalty = _t(1, 1, L, L, dtype=dtype, grad=grad, seed=5)
        pad = torch.zeros(B, L, dtype=torch.bool)
        pad[1, :2] = True
        removed = pad[:, None, None, :].clone()
        removed[0, ..., 5] = True
        dead = ((~removed).cumsum(dim=-1) == 0).transpose(-2, -1)
        tau = 1.0
    return (q, k, v, qs, ks, h0, h1, removed, dead, pad, penalty, 0.35, 0.35, 4, tau)


@pytest.mark.parametrize("case", ["paper", "per_head", "gqa", "masks"])
def test_opcheck_forward(case):
    """Schema, fake implementation (static and dynamic shapes), autograd registration, AOT dispatch."""
    torch.library.opcheck(chunked.chunked_fwd, _fwd_args(case))


@pytest.mark.parametrize("case", ["paper", "masks"])
def test_opcheck_backward(case):
    args = _fwd_args(case, grad=False)
    q, k, v, qs, ks, h0, h1, removed, dead, pad, penalty, scale, sel_scale, chunk, tau = args
    out, mem, lse, carries = chunked.chunked_fwd(*args)
    dout = torch.randn_like(out)
    dmem = None if tau is None else torch.randn_like(mem)
    bwd_args = (dout, dmem, q, k, v, qs, ks, h0, h1, penalty, removed, dead, pad, out, lse, carries, scale, sel_scale)
    torch.library.opcheck(chunked.chunked_bwd, (*bwd_args, chunk, tau, penalty is not None))


def _paper(q, k, v):
    return selective_attention(q, k, v, selection=True, backend="chunked")


def test_compiled_call_is_one_graph_with_the_custom_op():
    """fullgraph=True: no graph break in the call; the graph holds chunked_fwd, not the blocks and tiles."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    q, k, v = (t.float() for t in _fwd_args("paper")[:3])
    torch.compile(_paper, fullgraph=True, backend=record)(q, k, v)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert len(graphs) == 1
    assert any("chunked_fwd" in t for t in targets), targets
    assert not any("bmm" in t or "matmul" in t for t in targets), targets


@pytest.mark.parametrize("case", ["paper", "gqa"])
def test_compiled_equals_eager_outputs_and_grads(case):
    """Inductor around the custom ops: the same output and gradients as eager (the same kernels run)."""
    q, k, v = (t.detach().float().requires_grad_() for t in _fwd_args(case)[:3])
    gqa = k.shape[1] != q.shape[1]

    def fn(q, k, v):
        return selective_attention(q, k, v, selection=True, enable_gqa=gqa)

    o_ref, g_ref = grads(fn, q, k, v)
    o, g = grads(torch.compile(fn, fullgraph=True), q, k, v)
    torch.testing.assert_close(o, o_ref, atol=0, rtol=0)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_paper_layer_compiles_as_one_graph():
    """The seed-API layer in paper mode, fullgraph=True (the dispatcher once imported its backend module on
    every call, a graph break in each attention of a compiled model): the same output and input gradient."""
    torch.manual_seed(0)
    attn = SelectiveAttention(32, 4, dropout=0.0, selection=True)
    x = torch.randn(2, 40, 32, requires_grad=True)
    o_ref, (g_ref,) = grads(lambda x: attn(x, x, x), x)
    o, (g,) = grads(torch.compile(lambda x: attn(x, x, x), fullgraph=True), x)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float32])
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)  # the projections' sums, reordered by inductor


def _compiled_matches_eager(fn, *inputs):
    """``fn`` compiled with fullgraph=True (no graph break) against eager: outputs and gradients within fp32's
    tolerance. Returns the compiled ``(output, gradients)``."""
    torch._dynamo.reset()
    o_ref, g_ref = grads(fn, *inputs)
    o, g = grads(torch.compile(fn, fullgraph=True), *inputs)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float32])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    return o, g


def test_masks_compile_as_one_graph():
    """Key padding and a bool mask under fullgraph=True: the value-reading shortcuts (no padding, no key
    removed, a mask that is the causal rule) are skipped while compiling; the same result as eager."""
    q, k, v = (t.detach().float().requires_grad_() for t in _fwd_args("paper")[:3])
    B, _, L, _ = q.shape
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, :3] = True
    keep = torch.ones(L, L, dtype=torch.bool).tril()
    keep[6, 2] = False  # one more key removed for query 6
    for kw in (dict(key_padding_mask=pad), dict(selective_mask=keep), dict(key_padding_mask=torch.zeros_like(pad))):

        def fn(q, k, v, kw=kw):
            return selective_attention(q, k, v, selection=True, **kw)

        _compiled_matches_eager(fn, q, k, v)


@pytest.mark.parametrize("selection", [True, False])
def test_float_mask_compiles_as_one_graph(selection):
    """A float selective_mask (penalties and +inf removals, in another float dtype than the queries) under
    fullgraph=True, in paper mode and standard attention: its value checks raise through torch._assert_async
    instead of branching on values; the same result as eager, and a NaN in it still refuses the call."""
    q, k, v = (t.detach().float().requires_grad_() for t in _fwd_args("paper")[:3])
    L = q.shape[2]
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(1, 1, L, L, generator=g, dtype=torch.float64) * 2
    mask[..., 6, 2] = float("inf")

    def fn(q, k, v, mask):
        return selective_attention(q, k, v, mask, is_causal=True, selection=selection)

    torch._dynamo.reset()
    o_ref, g_ref = grads(lambda q, k, v: fn(q, k, v, mask), q, k, v)
    compiled = torch.compile(fn, fullgraph=True)
    o, g = grads(lambda q, k, v: compiled(q, k, v, mask), q, k, v)
    torch.testing.assert_close(o, o_ref, **TOL[torch.float32])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    bad = mask.clone()
    bad[..., 3, 1] = float("nan")
    with pytest.raises(RuntimeError, match="contains NaN"):
        compiled(q, k, v, bad)
    huge = mask.clone()
    huge[..., 4, 0] = 1e300  # finite in float64, inf in the queries' float32
    with pytest.raises(RuntimeError, match="beyond the queries' torch.float32 range"):
        compiled(q, k, v, huge)


@pytest.mark.parametrize("case", ["causal_rule", "all_false", "all_true", "dead_rows", "no_padding"])
def test_compiled_standard_attention_takes_masks_as_given_and_matches_eager(case):
    """Standard attention (no selection) read no mask value when compiled: a mask that is the causal rule, an
    all-False mask or key padding mask stay masks (eager drops them for the causal kernel), and rows with every key
    removed are handled unconditionally (zeros, zero gradient). One graph, and eager's outputs and gradients."""
    q, k, v = (t.detach().float().requires_grad_() for t in _fwd_args("paper")[:3])
    B, _, L, _ = q.shape
    kw = {}
    if case == "causal_rule":  # the seed's example: True = removed above the diagonal
        kw = dict(selective_mask=torch.ones(L, L, dtype=torch.bool).triu(1))
    elif case == "all_false":
        kw = dict(selective_mask=torch.zeros(L, L, dtype=torch.bool), is_causal=True)
    elif case == "all_true":  # every key removed: every row is dead
        kw = dict(selective_mask=torch.ones(L, L, dtype=torch.bool))
    elif case == "dead_rows":  # the first three queries lose every key they could see
        m = torch.zeros(L, L, dtype=torch.bool)
        m[:3, :3] = True
        kw = dict(selective_mask=m, is_causal=True)
    else:
        kw = dict(key_padding_mask=torch.zeros(B, L, dtype=torch.bool), is_causal=True)

    def fn(q, k, v):
        return selective_attention(q, k, v, **kw)

    o, g = _compiled_matches_eager(fn, q, k, v)
    if case == "all_true":
        assert not o.any() and not any(t.any() for t in g)


def test_compiled_float_mask_refuses_penalties_beyond_half_precision():
    """fp16 queries and an fp32 mask with a finite penalty past fp16's range (7e4 > 65504): eager raises a ValueError,
    compiled a RuntimeError, and neither turns the penalty into a removed key (inductor fused a cast-then-isinf check
    with the cast and skipped its rounding: the row came out as zeros). Within range, compiled equals eager."""
    q, k, v = (t.detach().half() for t in _fwd_args("paper", dtype=torch.float32)[:3])
    L = q.shape[2]

    def fn(q, k, v, mask):
        return selective_attention(q, k, v, mask, is_causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    ok = torch.zeros(1, 1, L, L)
    ok[..., 6, :] = 65504.0  # a uniform shift of one row, at fp16's largest finite value: no change
    torch.testing.assert_close(compiled(q, k, v, ok), fn(q, k, v, ok), atol=2e-3, rtol=2e-3)
    bad = ok.clone()
    bad[..., 6, :] = 7e4
    with pytest.raises(ValueError, match="beyond the queries' torch.float16 range"):
        fn(q, k, v, bad)
    with pytest.raises(RuntimeError, match="beyond the queries' torch.float16 range"):
        compiled(q, k, v, bad)


def test_compiled_triton_call_keeps_dropping_an_all_false_padding_mask():
    """Keeping masks while compiling is for the chunked kernel only: the Triton kernel takes no mask, so an all-False
    key_padding_mask (a tokenizer's all-ones attention_mask) is still read and dropped for it (here through Triton's
    interpreter)."""
    pytest.importorskip("triton", minversion="3.2")
    q, k, v = (t.detach().float() for t in _fwd_args("paper")[:3])
    pad = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool)

    def fn(q, k, v):
        return selective_attention(q, k, v, selection=True, key_padding_mask=pad, backend="triton")

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, backend="aot_eager")(q, k, v), fn(q, k, v), atol=0, rtol=0)


def test_compiled_paper_mode_reads_masks_only_where_triton_could_serve(monkeypatch):
    """Where "auto" may pick Triton (CUDA; here the CPU, through the interpreter, stands in for it), an all-False
    padding mask is read and dropped so that Triton serves (a graph break); a call Triton could not serve anyway
    (backend="chunked", memory rows) keeps its masks and compiles as one graph."""
    pytest.importorskip("triton", minversion="3.2")
    from selective_attention.ops import registry

    monkeypatch.setitem(registry.PREFERENCE, "triton", ("triton", ("cuda", "cpu")))
    q, k, v = (t.detach().float() for t in _fwd_args("paper")[:3])
    pad = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool)
    pad[1, :2] = True
    served = []
    from selective_attention import functional

    def dispatch(backend, req):  # which kernel would serve; no kernel runs
        served.append(registry.choose(backend, req))
        return torch.zeros_like(req.q), None

    monkeypatch.setattr(functional, "dispatch", dispatch)
    for kw in (dict(backend="chunked"), dict(memory_tau=1.0)):
        torch._dynamo.reset()
        torch.compile(lambda q, k, v, kw=kw: selective_attention(q, k, v, selection=True, key_padding_mask=pad, **kw),
                      fullgraph=True, backend="eager")(q, k, v)  # fmt: skip
    assert served == ["chunked", "chunked"]
    torch._dynamo.reset()
    torch.compile(lambda q, k, v: selective_attention(q, k, v, selection=True, key_padding_mask=torch.zeros_like(pad)),
                  backend="eager")(q, k, v)  # fmt: skip
    assert served[-1] == "triton"


@pytest.mark.parametrize("selection", [False, True])
def test_the_language_model_compiles_as_one_graph(selection):
    """GPT's forward and loss, fullgraph=True: the token-id range check read values (three graph breaks per forward,
    the training --compile path's too); compiled on CPU it asserts asynchronously instead, and still refuses ids out
    of range."""
    from selective_attention.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_len=32, n_layer=2, n_head=4, d_model=32, selection=selection))
    idx, tgt = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    torch._dynamo.reset()
    loss_ref = model(idx, tgt)[0]
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(idx, tgt)[0], loss_ref, **TOL[torch.float32])
    ours = r"token ids must be in \[0, vocab_size=50\)"
    # torch 2.5 runs no torch._assert_async in compiled code (README, "Versions"): there its embedding's bound check
    old = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 6)
    with pytest.raises(RuntimeError, match=ours + ("|index out of bounds" if old else "")):
        compiled(idx.masked_fill(idx == idx[0, 3], 50), tgt)


def test_standard_attention_compiles_with_dynamic_shapes():
    """The functional standard path with every dim dynamic passed SDPA a SymBool enable_gqa: a graph break, and an
    error under fullgraph=True."""
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: selective_attention(q, k, v, is_causal=True), dynamic=True, fullgraph=True)
    for shape in ((2, 2, 7, 8), (1, 3, 5, 8)):
        q = k = v = torch.randn(*shape)
        torch.testing.assert_close(fn(q, k, v), selective_attention(q, k, v, is_causal=True), **TOL[torch.float32])


# --- eager calls skip the custom op ------------------------------------------------------------------------------
def test_an_eager_paper_mode_call_does_not_import_dynamo():
    """Every first call of a ``torch.library`` custom op imports ``torch._dynamo``, eager or not: a user's first
    paper-mode call took 1.1 s more and ~150-200 MiB more resident memory (AMD EPYC, torch 2.13) than the kernel's
    own. Eager calls now run the same functions as a plain autograd.Function. Checked in a fresh interpreter: the
    module layer, the functional call with masks and memory rows, both backward passes."""
    import subprocess
    import sys

    code = """
import sys, torch
from selective_attention import SelectiveAttention
from selective_attention.functional import selective_attention
torch.manual_seed(0)
x = torch.randn(2, 12, 16, requires_grad=True)
SelectiveAttention(16, 4, dropout=0.0, selection=True)(x, x, x).sum().backward()
q, k, v = (torch.randn(2, 4, 12, 8, requires_grad=True) for _ in range(3))
pad = torch.zeros(2, 12, dtype=torch.bool); pad[1, :3] = True
out, rows = selective_attention(q, k, v, selection=True, key_padding_mask=pad, memory_tau=1.0)
(out.sum() + rows.sum()).backward()
assert q.grad is not None and x.grad is not None
print("torch._dynamo" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout


@pytest.mark.parametrize("case", ["paper", "per_head", "gqa", "masks"])
def test_eager_function_equals_the_custom_op_bit_for_bit(case, monkeypatch):
    """The plain autograd.Function (eager calls) and the custom op run the same forward and backward: equal outputs,
    memory rows and gradients, to the bit; and an eager call does not go through the op."""
    args = _fwd_args(case)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run():
        out, mem, _, _ = chunked._EagerChunked.apply(*args) if eager else chunked.chunked_fwd(*args)
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum() + mem.sum()
        return (out, mem, *torch.autograd.grad(loss, inputs))

    eager = False
    via_op = run()
    eager = True
    for a, b in zip(run(), via_op):
        assert torch.equal(a, b)
    calls = []
    monkeypatch.setattr(chunked, "chunked_fwd", lambda *a: calls.append(a))
    monkeypatch.setattr(chunked, "chunked_bwd", lambda *a: calls.append(a))
    out = selective_attention(*args[:3], selection=True, enable_gqa=case == "gqa")
    out.sum().backward()
    assert calls == []


def test_eager_function_equals_the_op_under_autocast(monkeypatch):
    """Under CPU autocast (bf16) the Function's inner ops see the same autocast state as the op's: equal outputs and
    gradients, to the bit."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 70, 16, generator=gen, requires_grad=True) for _ in range(3))
    results = []
    for eager in (True, False):
        monkeypatch.setattr(chunked, "eager_call", lambda *a, eager=eager: eager)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = selective_attention(q, k, v, selection=True)
        results.append((out, *torch.autograd.grad(out.float().pow(2).sum(), (q, k, v))))
    assert results[0][0].dtype == torch.bfloat16
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_eager_call_takes_the_op_where_it_must():
    """The custom op stays for what a plain Function cannot serve as it: meta and fake tensors (its shape-only
    implementation), torch.func transforms (vmap's fallback), dual levels; plain CPU tensors skip it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from selective_attention.ops.transforms import eager_call

    x = torch.randn(2, 3)
    assert eager_call(x, None, torch.nn.Parameter(x))
    assert not eager_call(x, torch.empty(2, device="meta"))
    with FakeTensorMode() as mode:
        assert not eager_call(mode.from_tensor(x))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert not eager_call(x)
    seen = []
    torch.func.vmap(lambda t: seen.append(eager_call(t)) or t)(x)
    torch.jit.trace(lambda t: seen.append(eager_call(t)) or t * 2, (x,), check_trace=False)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        seen.append(eager_call(x))
    assert seen == [False, False, False]
    # and a meta call still has its shape through the op's fake implementation
    q = torch.empty(1, 2, 9, 4, device="meta")
    assert selective_attention(q, q, q, selection=True, backend="chunked").shape == (1, 2, 9, 4)


def test_traced_and_checkpointed_calls_see_the_op():
    """torch.jit.trace and selective activation checkpointing (a dispatch mode) record the op as one call, as before
    eager calls skipped it: the Function's inner ops broke the trace (a shape branch, a value read) and the
    checkpoint (its buffers written in place), and a policy that saves the op's output never saw it."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    q, k, v = (t.detach().float() for t in _fwd_args("paper")[:3])
    traced = torch.jit.trace(_paper, (q, k, v))
    assert "chunked_fwd" in str(traced.graph)
    q2 = torch.randn_like(q)
    torch.testing.assert_close(traced(q2, k, v), _paper(q2, k, v), **TOL[torch.float32])

    seen, calls = [], []
    forward = chunked._forward

    def counting(*a, **kw):
        calls.append(1)
        return forward(*a, **kw)

    def policy(ctx, func, *args, **kwargs):
        seen.append(func)
        saved = func == torch.ops.selective_attention.chunked_fwd.default
        return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE

    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    mp = pytest.MonkeyPatch()
    mp.setattr(chunked, "_forward", counting)
    try:
        context = functools.partial(create_selective_checkpoint_contexts, policy)
        out = checkpoint(_paper, qg, kg, vg, use_reentrant=False, context_fn=context)
        got = torch.autograd.grad(out.pow(2).sum(), (qg, kg, vg))
    finally:
        mp.undo()
    assert torch.ops.selective_attention.chunked_fwd.default in seen
    assert len(calls) == 1  # saved, not run again in backward
    plain = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(_paper(*plain).pow(2).sum(), plain)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_the_diagonal_mask_cache_serves_plain_calls_only():
    """The chunked path keeps its diagonal block's constant masks per (size, dtype, device); a fake-tensor (or
    other dispatch) mode gets tensors of its own, never the cached real ones, and leaves none behind."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from selective_attention.ops import chunked

    chunked._MASKS.clear()
    real = chunked._diagonal_masks(7, torch.float32, torch.device("cpu"))
    assert all(type(t) is torch.Tensor for t in real.values())
    assert chunked._diagonal_masks(7, torch.float32, torch.device("cpu")) is real  # a plain call hits the cache
    with FakeTensorMode():
        fake = chunked._diagonal_masks(7, torch.float32, torch.device("cpu"))
        fresh = chunked._diagonal_masks(5, torch.float32, torch.device("cpu"))
    assert all(isinstance(t, FakeTensor) for t in (*fake.values(), *fresh.values()))
    assert list(chunked._MASKS) == [(7, torch.float32, torch.device("cpu"))]
    assert chunked._MASKS[(7, torch.float32, torch.device("cpu"))] is real
    assert chunked._diagonal_masks(3, torch.float32, torch.device("meta"))["future"].is_meta  # a meta call: not kept
    assert len(chunked._MASKS) == 1
