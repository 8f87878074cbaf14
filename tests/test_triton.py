"""The Triton paper-mode kernels against the naive spec: outputs and gradients (dq, dk, dv).

Without a GPU the kernels run in Triton's interpreter (numpy, one program at a time): shapes stay
small, and the interpreter's blocks (``kernels.INTERPRET_CONFIG``: 16-32 rows, unequal between the
passes) make even L = 100 span several blocks in every pass, so every carry, suffix sum and tail is
exercised. The GPU block sizes are checked through the interpreter too. bf16 runs only on a GPU: the
interpreter multiplies bf16 bit patterns in ``tl.dot`` (triton-lang/triton#11584, not supported).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton", minversion="3.2", reason="the Triton backend needs Triton >= 3.2 (CPU: its interpreter)")

from helpers import assert_error_bounded  # noqa: E402

from selective_attention.ops.naive import naive_selective_attention  # noqa: E402
from selective_attention.ops.triton import op, triton_selective_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# F sums up to L votes and the gradient into the votes sums dZ down whole key columns, in another
# order than the naive path: observed fp32 differences are <= 1e-5 at L = 256 (|values| ~ 1). A
# wrong carry or suffix misses by O(1) (0.5 to 4 when either is broken on purpose), so 1e-4 keeps a
# 10x margin over rounding and a 1000x one under any real bug.
FP32_TOL = dict(atol=1e-4, rtol=1e-4)

HEADS = {"head0": slice(0, 1), "head1": slice(1, 2), "perhead": slice(None)}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel fails to write fails the test."""
    monkeypatch.setattr(op, "debug_fill_nan", True)


def _inputs(B, H, L, D, dtype, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, L, D), (B, H, L, D), (B, H, L, Dv or D)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _cotangent(B, H, L, Dv, dtype):
    return torch.randn(B, H, L, Dv, generator=torch.Generator().manual_seed(1)).to(dtype)


def _run(fn, inputs, dout, dtype):
    """``fn`` on copies of ``inputs`` in ``dtype`` on DEVICE: (out, dq, dk, dv) on CPU."""
    xs = [t.to(DEVICE, dtype).requires_grad_() for t in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, dout.to(DEVICE, dtype))
    return [t.detach().cpu() for t in (out, *grads)]


def _triton(heads, scale):
    return lambda q, k, v: triton_selective_attention(q, k, v, heads=heads, scale=scale, sel_scale=scale)


def _naive(heads, scale):
    return lambda q, k, v: naive_selective_attention(q, k, v, q[:, heads], k[:, heads], scale=scale, sel_scale=scale)[0]


CASES = [  # B, H, L, D, heads
    (1, 1, 1, 16, "head0"),
    (2, 3, 17, 16, "head0"),
    (1, 3, 64, 32, "perhead"),
    (2, 3, 100, 16, "head1"),
    (1, 2, 100, 32, "perhead"),
    (2, 1, 33, 16, "head0"),  # H = 1: the voter is the only head
    (1, 3, 256, 16, "head0"),
]


@pytest.mark.parametrize("B,H,L,D,heads", CASES, ids=[f"B{b}-H{h}-L{l}-D{d}-{s}" for b, h, l, d, s in CASES])
def test_fp32_matches_naive(B, H, L, D, heads):
    inputs, dout, scale = _inputs(B, H, L, D, torch.float32), _cotangent(B, H, L, D, torch.float32), D**-0.5
    fast = _run(_triton(HEADS[heads], scale), inputs, dout, torch.float32)
    ref = _run(_naive(HEADS[heads], scale), inputs, dout, torch.float32)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "B,H,L,D,Dv,heads",
    [(1, 2, 50, 24, 24, "head0"), (1, 2, 50, 16, 40, "perhead")],
    ids=["D24-head0", "D16-Dv40-perhead"],
)
def test_fp32_odd_head_dims(B, H, L, D, Dv, heads):
    """Head dims that are not powers of two are padded and masked; v may have its own head dim."""
    inputs, dout, scale = _inputs(B, H, L, D, torch.float32, Dv=Dv), _cotangent(B, H, L, Dv, torch.float32), D**-0.5
    fast = _run(_triton(HEADS[heads], scale), inputs, dout, torch.float32)
    ref = _run(_naive(HEADS[heads], scale), inputs, dout, torch.float32)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m, name=name: f"{name}: {m}")


def _low_precision(B, H, L, D, heads, dtype):
    """flash-attention's rule (helpers.assert_error_bounded): error vs an fp64 reference on the same
    (rounded) inputs at most 3x the naive path's error in the same dtype."""
    inputs = [t.to(dtype) for t in _inputs(B, H, L, D, torch.float32)]
    dout, scale = _cotangent(B, H, L, D, dtype), D**-0.5
    fast = _run(_triton(HEADS[heads], scale), inputs, dout, dtype)
    low = _run(_naive(HEADS[heads], scale), inputs, dout, dtype)
    ref = _run(_naive(HEADS[heads], scale), inputs, dout, torch.float64)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), fast, low, ref):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert_error_bounded(a, b, c, factor=3.0, name=name)


LOW_CASES = [(2, 3, 100, 16, "head0"), (1, 3, 64, 32, "perhead"), (1, 2, 37, 16, "head1")]


@pytest.mark.parametrize("B,H,L,D,heads", LOW_CASES, ids=[f"B{b}-H{h}-L{l}-D{d}-{s}" for b, h, l, d, s in LOW_CASES])
def test_fp16_error_bounded(B, H, L, D, heads):
    _low_precision(B, H, L, D, heads, torch.float16)


@gpu_only
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads", ["head0", "perhead"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_low_precision(D, heads, dtype):
    _low_precision(2, 4, 1000, D, heads, dtype)


@pytest.mark.parametrize("table", ["_GPU", "_GPU_FP32"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_block_sizes(monkeypatch, D, table):
    """The GPU configurations' block sizes (not their compilation) through whatever runs here."""
    from selective_attention.ops.triton import kernels

    monkeypatch.setattr(kernels, "config_for", lambda d, device, dtype=None: getattr(kernels, table)[D])
    _fp32_matches_the_spec(1, 2, 300, D, FP32_TOL)


def _fp32_matches_the_spec(B, H, L, D, tol):
    """Out, dq, dk, dv of the Triton kernels (with whatever config ``config_for`` gives) against the naive spec, fp32
    inputs, voting head 0 and per-head F."""
    inputs, dout, scale = _inputs(B, H, L, D, torch.float32), _cotangent(B, H, L, D, torch.float32), D**-0.5
    for heads in (slice(0, 1), slice(None)):
        fast = _run(_triton(heads, scale), inputs, dout, torch.float32)
        ref = _run(_naive(heads, scale), inputs, dout, torch.float32)
        for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref):
            torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_strided_inputs_and_determinism():
    """[B, L, H, D] views (as projections give them) work; two backward passes agree bit for bit."""
    B, L, H, D = 1, 40, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, generator=g).to(DEVICE).transpose(1, 2).requires_grad_() for _ in range(3))
    fn = _triton(slice(0, 1), 0.25)
    out = fn(q, k, v)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout)
    second = torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    ref = _naive(slice(0, 1), 0.25)(q, k, v)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_sequence():
    q, k, v = (torch.randn(2, 3, 0, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = triton_selective_attention(q, k, v, heads=slice(0, 1), scale=0.25, sel_scale=0.25)
    assert out.shape == (2, 3, 0, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_torch_compile_traces_custom_op():
    """torch.compile (fullgraph) traces through the custom op with its fake implementation."""
    torch._dynamo.reset()
    inputs, dout = _inputs(1, 2, 40, 16, torch.float32), _cotangent(1, 2, 40, 16, torch.float32)
    fn = _triton(slice(0, 1), 0.25)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(_run(compiled, inputs, dout, torch.float32), _run(fn, inputs, dout, torch.float32)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("vote_head", [0, -1], ids=["head0", "perhead"])
def test_opcheck(vote_head):
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops."""
    q, k, v = (t.to(DEVICE).requires_grad_() for t in _inputs(1, 2, 20, 16, torch.float32))
    torch.library.opcheck(op.paper_fwd, (q, k, v, vote_head, 0.25, 0.25))
    out, lse = op.paper_fwd(q.detach(), k.detach(), v.detach(), vote_head, 0.25, 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(op.paper_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, vote_head, 0.25, 0.25))


@pytest.mark.parametrize("vote_head", [0, -1], ids=["head0", "perhead"])
def test_eager_function_equals_the_custom_op_bit_for_bit(vote_head, monkeypatch):
    """Eager calls run the kernels as a plain autograd.Function (the op's first call imports torch._dynamo): the same
    output and gradients as through the op, to the bit, and triton_selective_attention in eager skips the op."""
    inputs, dout = _inputs(1, 2, 40, 16, torch.float32), _cotangent(1, 2, 40, 16, torch.float32)
    via = {
        name: _run(lambda q, k, v, f=f: f(q, k, v, vote_head, 0.25, 0.25)[0], inputs, dout, torch.float32)
        for name, f in (("op", op.paper_fwd), ("eager", op._EagerPaper.apply))
    }
    for a, b in zip(via["eager"], via["op"]):
        assert torch.equal(a, b)
    calls = []
    monkeypatch.setattr(op, "paper_fwd", lambda *a: calls.append(a))
    monkeypatch.setattr(op, "paper_bwd", lambda *a: calls.append(a))
    heads = slice(0, 1) if vote_head == 0 else slice(None)
    for a, b in zip(_run(_triton(heads, 0.25), inputs, dout, torch.float32), via["op"]):
        assert torch.equal(a, b)
    assert calls == []


def test_unsupported_inputs_raise():
    q, k, v = (torch.randn(1, 3, 8, 16, device=DEVICE) for _ in range(3))
    kw = dict(heads=slice(0, 1), scale=0.25, sel_scale=0.25)
    mask = torch.zeros(8, 8, dtype=torch.bool, device=DEVICE)
    mask[5, 2] = True
    # user masks and memory rows are refused by the backend's supports(), before the kernel
    from selective_attention.functional import selective_attention

    paper = dict(selection=True, backend="triton")
    with pytest.raises(NotImplementedError, match="user masks"):
        selective_attention(q, k, v, mask, **paper)
    with pytest.raises(NotImplementedError, match="user masks"):
        selective_attention(q, k, v, mask.float(), **paper)  # finite penalties
    with pytest.raises(NotImplementedError, match="memory-loss"):
        selective_attention(q, k, v, memory_tau=1.0, **paper)
    with pytest.raises(ValueError, match="no attention dropout"):
        selective_attention(q, k, v, dropout_p=0.1, **paper)
    with pytest.raises(ValueError, match="paper-mode path"):
        selective_attention(q, k, v, backend="triton")
    with pytest.raises(
        ValueError, match=r"head dims up to 128.*backend='triton'|backend='triton'.*head dims up to 128"
    ):
        selective_attention(*(torch.randn(1, 2, 4, 160, device=DEVICE) for _ in range(3)), **paper)
    with pytest.raises(ValueError, match="one voting head"):
        triton_selective_attention(q, k, v, heads=slice(0, 2), scale=0.25, sel_scale=0.25)
    with pytest.raises(TypeError, match="dtype"):
        triton_selective_attention(q.double(), k.double(), v.double(), **kw)
    with pytest.raises(ValueError, match="self-attention"):
        triton_selective_attention(q, k[:, :, :5], v, **kw)


def test_functional_dispatches_to_triton():
    """selective_attention(..., backend="triton") is the kernel, equal to the spec; unsupported
    requests get clear errors."""
    from selective_attention.functional import selective_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    ref = selective_attention(q, k, v, selection=True, backend="naive")
    out = selective_attention(q, k, v, selection=True, backend="triton")
    torch.testing.assert_close(out, ref, **FP32_TOL)
    with pytest.raises(NotImplementedError, match="selection_qk"):
        selective_attention(q, k, v, selection=True, selection_qk=(q[:, :1], k[:, :1]), backend="triton")
    with pytest.raises(NotImplementedError, match="memory-loss"):
        selective_attention(q, k, v, selection=True, memory_tau=1.0, backend="triton")


def test_fp32_takes_its_own_gpu_block_sizes():
    """fp32 tiles are twice the bytes: with tf32 dots the 16-bit configuration's forward needs more shared memory
    than an H100/H200 block may have (measured by compiling for sm_90), so fp32 inputs get smaller blocks."""
    from selective_attention.ops.triton import kernels

    cuda = torch.device("cuda")
    for D, key in ((48, 64), (64, 64), (128, 128)):
        assert kernels.config_for(D, cuda, torch.float32) is kernels._GPU_FP32[key]
        for dt in (torch.bfloat16, torch.float16):
            assert kernels.config_for(D, cuda, dt) is kernels._GPU[key]
    assert kernels.config_for(64, torch.device("cpu"), torch.float32) is kernels.INTERPRET_CONFIG


def test_block_sizes_are_powers_of_two_from_16():
    """A block under 16 rows (tl.dot's smallest) or not a power of two is refused when the config is made: the size
    refusal counts the vote carries' rows as L / 16 at most, which a smaller block would exceed unchecked."""
    from selective_attention.ops.triton import kernels

    good = dict(fwd_m=32, fwd_n=16, bwd_kv_m=16, bwd_kv_n=32, bwd_q_m=32, bwd_q_n=16, carry_n=16)
    assert kernels.Config(**good).fwd_m == 32
    for field, size in (("bwd_kv_m", 8), ("carry_n", 48), ("fwd_n", 0)):
        with pytest.raises(ValueError, match=f"powers of two >= 16.*'{field}': {size}"):
            kernels.Config(**{**good, field: size})


def test_row_scans_by_dot_for_16_bit_inputs_only(monkeypatch):
    """The tiles' row scans run as products with a triangle for 16-bit inputs (bf16 operands when compiled; one fp32
    product under the interpreter, which cannot multiply bf16) and as ``tl.cumsum`` for fp32, unless the config
    says. The form follows how the kernels were built, not the tensors' device (the sm_90 test compiles on meta
    tensors) nor the environment at call time."""
    import triton.language as tl

    from selective_attention.ops.triton import kernels

    cfg = kernels.INTERPRET_CONFIG
    assert kernels.INTERPRETED == (DEVICE == "cpu")  # the tests interpret exactly where no GPU is
    for interpreting, product in ((True, tl.float32), (False, tl.bfloat16)):
        monkeypatch.setattr(kernels, "INTERPRETED", interpreting)
        assert cfg.scan_dtype(torch.float32) is None
        for dt in (torch.bfloat16, torch.float16):
            assert cfg.scan_dtype(dt) == product
        assert dataclasses.replace(cfg, dot_scans=True).scan_dtype(torch.float32) == product
        assert dataclasses.replace(cfg, dot_scans=False).scan_dtype(torch.bfloat16) is None


def test_forced_dot_scans_match_the_spec_in_fp32(monkeypatch):
    """``Config(dot_scans=True)`` on fp32 inputs gives the spec's outputs and gradients: the triangle's direction and
    exclusiveness, both passes. In the interpreter (an exact fp32 product) to fp32 rounding; on a GPU, where the
    product splits each term in two bf16 parts (error <= 2^-17 of it), to 1e-3: dropping the low part errs ~1e-2."""
    from selective_attention.ops.triton import kernels

    forced = dataclasses.replace(kernels.INTERPRET_CONFIG, dot_scans=True)
    monkeypatch.setattr(kernels, "config_for", lambda d, device, dtype=None: forced)
    _fp32_matches_the_spec(1, 3, 100, 16, FP32_TOL if DEVICE == "cpu" else dict(atol=1e-3, rtol=1e-3))


def test_the_interpreter_refuses_bf16_instead_of_returning_garbage():
    """Triton's interpreter multiplies bf16 as raw 16-bit patterns (outputs ~1e8 off): refused by name there."""
    if DEVICE != "cpu":
        pytest.skip("compiled on a GPU, bf16 runs (test_gpu_low_precision)")
    q = torch.randn(1, 2, 16, 16).to(torch.bfloat16)
    with pytest.raises(TypeError, match="interpreter.*cannot run bf16"):
        triton_selective_attention(q, q, q, heads=slice(0, 1), scale=0.25, sel_scale=0.25)
    from selective_attention.functional import selective_attention
    from selective_attention.ops.registry import BackendRefused

    with pytest.raises(BackendRefused, match="cannot run bf16"):
        selective_attention(q, q, q, selection=True, backend="triton")
    auto = selective_attention(q, q, q, selection=True)  # auto: the chunked path serves it
    assert auto.dtype == torch.bfloat16 and torch.isfinite(auto).all()


def test_the_raw_op_checks_its_arguments_and_its_lse_is_not_differentiable():
    """``paper_fwd`` (exported) read out of bounds for a voting head past H (NaN, or another tensor's memory) or
    kv heads that do not divide H; its lse carried a grad_fn whose gradient was dropped (a loss on it got 0)."""
    q, k, v = (t.to(DEVICE).requires_grad_() for t in _inputs(1, 2, 20, 16, torch.float32))
    for head in (2, 5, -2):
        with pytest.raises(ValueError, match=f"vote_head={head} must be a head of q"):
            op.paper_fwd(q, k, v, head, 0.25, 0.25)
    k3 = torch.randn(1, 3, 20, 16, device=DEVICE)
    with pytest.raises(ValueError, match="H % Hkv == 0"):
        op.paper_fwd(q, k3, k3, 0, 0.25, 0.25)
    with pytest.raises(ValueError, match="H % Hkv == 0"):
        op.paper_fwd(q, k[:, :, :12], v[:, :, :12], 0, 0.25, 0.25)  # fewer keys than queries
    out, lse = op.paper_fwd(q, k, v, 0, 0.25, 0.25)
    assert out.requires_grad and not lse.requires_grad


def test_double_backward_names_the_fix():
    q, k, v = (t.to(DEVICE).requires_grad_() for t in _inputs(1, 2, 20, 16, torch.float32))
    out = triton_selective_attention(q, k, v, heads=slice(0, 1), scale=0.25, sel_scale=0.25)
    (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward is not implemented by backend='triton'.*backend='naive'"):
        g.sum().backward()


def test_a_nan_key_stays_out_of_the_rows_before_it():
    """A NaN key at t (a real token) spoils rows t.. in the spec, never the rows before it, which do not read it: the
    kernel must skip future keys, not add a -inf bias to them (NaN + (-inf) = NaN)."""
    q, k, v = _inputs(1, 2, 40, 16, torch.float32)
    k[0, :, 25, 3] = float("nan")
    out = triton_selective_attention(*(t.to(DEVICE) for t in (q, k, v)), heads=slice(0, 1), scale=0.25, sel_scale=0.25)
    ref = naive_selective_attention(q, k, v, q[:, :1], k[:, :1], scale=0.25, sel_scale=0.25)[0]
    spoiled = ~torch.isfinite(ref).all(-1)
    assert not spoiled[..., :25].any() and torch.equal(~torch.isfinite(out.cpu()).all(-1), spoiled)
    torch.testing.assert_close(out.cpu()[..., :25, :], ref[..., :25, :], **FP32_TOL)


def test_sizes_the_kernels_cannot_launch_are_refused_by_name():
    """B * H beyond CUDA's grid axis, or 2^31 elements (int32 offsets): refused before any launch (expanded
    inputs: no memory)."""
    from selective_attention.functional import selective_attention

    wide = torch.zeros(1, 1, 2, 16, device=DEVICE).expand(70_000, 1, 2, 16)  # B * H = 70,000 > 65,535
    with pytest.raises((ValueError, NotImplementedError), match=r"grid axis of at most 65535; got B \* H = 70000"):
        selective_attention(wide, wide, wide, selection=True, backend="triton")
    long = torch.zeros(1, 1, 1, 16, device=DEVICE).expand(1, 1, 200_000, 16)  # its vote carries: 2.5e9 elements
    assert "32-bit offsets" in op._launch_limit(long, long, long)
    assert op._launch_limit(*(torch.zeros(2, 4, 64, 16, device=DEVICE),) * 3) is None
    big = torch.zeros(1, 1, 1, 128, device=DEVICE).expand(16, 32, 8192, 128)  # 2^31 elements in all, slices of 2^20
    assert op._launch_limit(big, big, big) is None  # the slices' bases are int64: only a slice's size counts
