"""The compiled Triton kernels on a CUDA GPU against the naive spec: what the interpreter cannot check.

tests/test_triton.py runs the kernels on CPU through Triton's interpreter (numpy, small blocks) and,
on a GPU, compiled. This file adds what only a GPU shows, forward and backward (out, dq, dk, dv):
bf16 (the interpreter multiplies bf16 bit patterns in ``tl.dot``); the GPU block configurations
compiled at head dims 64 and 128 (register and shared-memory limits, the tensor-core paths); lengths
on both sides of every block size and far past them (odd ones included); every voting mode the kernel
serves (``Selection()``: head 0 votes, ``Selection(head=h)``, ``Selection(per_head=True)``) through the
kernel and through ``selective_attention(..., backend="triton")``; grouped-query attention (k, v with
``Hkv < H`` heads); head dims that are not powers of two and ``Dv != D``; a votes' scale other than the
logits'; large logits; tf32; bitwise determinism.
``benchmarks/gpu_check.sh`` runs it. Skipped as a whole (one skip, no collection cost) without a CUDA
GPU or under ``TRITON_INTERPRET=1``.

Tolerances follow the dtype:

* fp32 (``tl.dot`` in IEEE fp32, as under torch's default matmul precision): ``atol = rtol = 1e-4``
  against the naive path in fp32, test_triton.py's bound: the kernel sums F's votes and dS's column
  sums in another order than the spec (rounding ~1e-6 at |values| ~ 1), while a broken carry, suffix
  sum or tail misses by O(1).
* fp16, bf16, and fp32 with tf32 allowed: flash-attention's rule (``helpers.assert_error_bounded``):
  the error against an fp64 reference on the same rounded inputs is at most 3x the naive path's own
  error in that precision, plus 4 ulp of the largest reference value. It follows the dtype's rounding
  (bf16 has 8 bits of mantissa, fp16 11, tf32 products 11) instead of a fixed number, and a real bug
  still misses by O(|ref|).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the compiled Triton kernels; test_triton.py covers the interpreter)",
                allow_module_level=True)  # fmt: skip
if os.environ.get("TRITON_INTERPRET", "") == "1":
    pytest.skip("TRITON_INTERPRET=1: this file checks the compiled kernels", allow_module_level=True)
pytest.importorskip("triton", minversion="3.2", reason="the Triton backend needs `pip install triton` (>= 3.2)")

from helpers import assert_error_bounded  # noqa: E402

from selective_attention.functional import Selection, selective_attention  # noqa: E402
from selective_attention.ops.naive import naive_selective_attention  # noqa: E402
from selective_attention.ops.triton import op, triton_selective_attention  # noqa: E402

FP32_TOL = dict(atol=1e-4, rtol=1e-4)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = ("out", "dq", "dk", "dv")


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel fails to write fails the test."""
    monkeypatch.setattr(op, "debug_fill_nan", True)


def _heads(mode: str, H: int) -> slice:
    """head0: the paper; last: Selection(head=H-1) (another head than 0, and not 1, which Triton
    would compile as a constant); perhead: every head its own F."""
    return {"head0": slice(0, 1), "last": slice(H - 1, H), "perhead": slice(None)}[mode]


def _problem(B, H, L, D, Dv=None, *, seed=0, amp=1.0):
    """q, k, v ``[B, H, L, D|Dv]`` and the cotangent, fp32 on the GPU (each test rounds them once)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, H, L, D), (B, H, L, D), (B, H, L, Dv or D), (B, H, L, Dv or D)]
    return [torch.randn(s, device="cuda", generator=g) * (amp if i < 2 else 1.0) for i, s in enumerate(shapes)]


def _grads(fn, inputs, dout, dtype):
    """``fn`` on leaf copies of ``inputs`` in ``dtype``: ``[out, dq, dk, dv]``."""
    xs = [t.to(dtype).detach().requires_grad_() for t in inputs]
    out = fn(*xs)
    return [out.detach(), *torch.autograd.grad(out, xs, dout.to(dtype))]


def _kernel(heads, scale, sel_scale):
    return lambda q, k, v: triton_selective_attention(q, k, v, heads=heads, scale=scale, sel_scale=sel_scale)


def _spec(heads, scale, sel_scale):
    return lambda q, k, v: naive_selective_attention(
        q, k, v, q[:, heads], k[:, heads], scale=scale, sel_scale=sel_scale
    )[0]


def _check(fast_fn, spec_fn, inputs, dout, dtype, *, tf32=False):
    """Outputs and gradients of ``fast_fn`` against ``spec_fn`` by the dtype's rule (module docstring)."""
    inputs = [t.to(dtype) for t in inputs]  # every path sees the same rounded inputs
    dout = dout.to(dtype)
    fast = _grads(fast_fn, inputs, dout, dtype)
    low = _grads(spec_fn, inputs, dout, dtype)
    for name, a in zip(NAMES, fast):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"{name}: {a.dtype}, finite: {torch.isfinite(a).all()}"
    if dtype == torch.float32 and not tf32:
        for name, a, b in zip(NAMES, fast, low):
            torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m, name=name: f"{name}: {m}")
        return
    ref = _grads(spec_fn, inputs, dout, torch.float64)
    for name, a, b, c in zip(NAMES, fast, low, ref):
        # tf32: the tensor cores truncate fp32 inputs (no rounding instruction in Triton's code) where cuBLAS may
        # round: a bias that piles up in F, a sum of positive votes; the floor is tf32's unit roundoff
        assert_error_bounded(a, b, c, factor=3.0, name=name, eps=2**-10 if tf32 else None)


# --- every dtype x every voting mode, at an odd length, both GPU configurations ----------------------
SHAPES = [(2, 4, 777, 64), (1, 3, 333, 128)]  # B, H, L, D; L not a multiple of any block


@pytest.mark.parametrize("mode", ["head0", "last", "perhead"])
@pytest.mark.parametrize("B,H,L,D", SHAPES, ids=[f"B{b}-H{h}-L{n}-D{d}" for b, h, n, d in SHAPES])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_dtypes_and_voting_modes(dtype, B, H, L, D, mode):
    q, k, v, dout = _problem(B, H, L, D, seed=L + D)
    heads, s = _heads(mode, H), D**-0.5
    _check(_kernel(heads, s, s), _spec(heads, s, s), [q, k, v], dout, dtype)


# --- lengths around the blocks (16-128 rows) and far past them, bf16 --------------------------------
LENGTHS = [1, 2, 17, 64, 127, 129, 257, 2049]  # 1 row; no vote yet; < a block; = a block; either side...


@pytest.mark.parametrize("mode", ["head0", "perhead"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("L", LENGTHS)
def test_lengths_bf16(L, D, mode):
    q, k, v, dout = _problem(2, 3, L, D, seed=L)
    heads, s = _heads(mode, 3), D**-0.5
    _check(_kernel(heads, s, s), _spec(heads, s, s), [q, k, v], dout, torch.bfloat16)


# --- long sequences: many blocks in every pass, F summing thousands of votes --------------------------
LONG = [("bf16", 8, 64, "head0"), ("fp16", 4, 128, "head0"), ("fp32", 4, 64, "perhead"), ("bf16", 4, 128, "perhead")]


@pytest.mark.parametrize("dtype,H,D,mode", LONG, ids=[f"{t}-H{h}-D{d}-{m}" for t, h, d, m in LONG])
def test_long_sequence(dtype, H, D, mode):
    q, k, v, dout = _problem(1, H, 4096, D, seed=D)
    heads, s = _heads(mode, H), D**-0.5
    _check(_kernel(heads, s, s), _spec(heads, s, s), [q, k, v], dout, DTYPES[dtype])


# --- head dims: padded to powers of two, v with its own; the config follows D -------------------------
DIMS = [(80, 80, "head0"), (96, 96, "perhead"), (48, 112, "head0"), (128, 64, "last"), (32, 128, "perhead")]


@pytest.mark.parametrize("D,Dv,mode", DIMS, ids=[f"D{d}-Dv{dv}-{m}" for d, dv, m in DIMS])
def test_head_dims_bf16(D, Dv, mode):
    q, k, v, dout = _problem(2, 3, 300, D, Dv, seed=D + Dv)
    heads, s = _heads(mode, 3), D**-0.5
    _check(_kernel(heads, s, s), _spec(heads, s, s), [q, k, v], dout, torch.bfloat16)


# --- the votes' own scale; large logits (F in the thousands, most weights underflow) ------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("amp", [1.0, 3.0], ids=["amp1", "amp3"])
def test_sel_scale_and_large_logits(dtype, amp):
    B, H, L, D = 2, 4, 500, 64
    q, k, v, dout = _problem(B, H, L, D, seed=7, amp=amp)
    heads, s = slice(0, 1), D**-0.5
    _check(_kernel(heads, s, 0.37 * s), _spec(heads, s, 0.37 * s), [q, k, v], dout, dtype)


# --- fp32 with tf32 allowed: the kernel's dots follow torch's matmul precision -----------------------
@pytest.mark.parametrize("D,mode", [(64, "head0"), (128, "head0"), (128, "perhead")])
def test_fp32_tf32(D, mode):
    q, k, v, dout = _problem(1, 4, 600, D, seed=D)
    heads, s = _heads(mode, 4), D**-0.5
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # tf32 in the kernel and in the spec's matmuls
    try:
        _check(_kernel(heads, s, s), _spec(heads, s, s), [q, k, v], dout, torch.float32, tf32=True)
    finally:
        torch.set_float32_matmul_precision(before)


# --- grouped-query attention: k, v with Hkv heads, query head h reads kv head h // (H // Hkv) ---------
GQA = [  # B, H, Hkv, L, D, mode, dtype: the voting head's kv head 0 or not, Hkv = 1, both configs
    (2, 8, 2, 1000, 64, "head0", "bf16"),
    (1, 6, 3, 333, 128, "last", "bf16"),
    (1, 8, 1, 777, 64, "perhead", "fp16"),
    (2, 4, 2, 300, 128, "last", "fp32"),
]


@pytest.mark.parametrize(
    "B,H,Hkv,L,D,mode,dtype", GQA, ids=[f"H{h}-Hkv{g}-L{n}-D{d}-{m}-{t}" for _, h, g, n, d, m, t in GQA]
)
def test_grouped_query(B, H, Hkv, L, D, mode, dtype):
    q, _, _, dout = _problem(B, H, L, D, seed=H * Hkv + L)
    k, v = _problem(B, Hkv, L, D, seed=L)[1:3]
    heads, s, g = _heads(mode, H), D**-0.5, H // Hkv

    def spec(q, k, v):  # the spec on k, v repeated to H heads; autograd sums dk, dv over each group
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return naive_selective_attention(q, k, v, q[:, heads], k[:, heads], scale=s, sel_scale=s)[0]

    _check(_kernel(heads, s, s), spec, [q, k, v], dout, DTYPES[dtype])


def test_grouped_query_public_api():
    q, _, _, dout = _problem(2, 8, 500, 64, seed=5)
    k, v = _problem(2, 2, 500, 64, seed=6)[1:3]

    def run(backend):
        return lambda q, k, v: selective_attention(q, k, v, selection=True, enable_gqa=True, backend=backend)

    _check(run("triton"), run("naive"), [q, k, v], dout, torch.bfloat16)


# --- the public API on CUDA: "triton" serves each Selection the kernel supports; "auto" picks it -----
@pytest.mark.parametrize(
    "selection", [True, Selection(head=2), Selection(per_head=True)], ids=["paper", "head2", "per_head"]
)
def test_public_api(selection):
    q, k, v, dout = _problem(2, 4, 700, 64, seed=3)

    def run(backend):
        return lambda q, k, v: selective_attention(q, k, v, selection=selection, backend=backend)

    _check(run("triton"), run("naive"), [q, k, v], dout, torch.bfloat16)
    xs = [t.to(torch.bfloat16) for t in (q, k, v)]
    for a, b in zip(_grads(run("auto"), xs, dout, torch.bfloat16), _grads(run("triton"), xs, dout, torch.bfloat16)):
        assert torch.equal(a, b), "backend='auto' on CUDA should be the Triton kernel"


# --- strided [B, L, H, D] views and bitwise reproducibility (no atomics anywhere) --------------------
@pytest.mark.parametrize("mode", ["head0", "perhead"])
def test_strided_and_deterministic(mode):
    B, H, L, D = 2, 4, 1000, 64
    g = torch.Generator(device="cuda").manual_seed(11)
    raw = [torch.randn(B, L, H, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)]
    views = [t.transpose(1, 2) for t in raw]  # [B, H, L, D], not contiguous: as projections give them
    fn = _kernel(_heads(mode, H), D**-0.5, D**-0.5)
    first = _grads(fn, views[:3], views[3], torch.bfloat16)
    second = _grads(fn, views[:3], views[3], torch.bfloat16)
    contiguous = _grads(fn, [t.contiguous() for t in views[:3]], views[3].contiguous(), torch.bfloat16)
    for name, a, b, c in zip(NAMES, first, second, contiguous):
        assert torch.equal(a, b), f"{name}: two runs differ"
        assert torch.equal(a, c), f"{name}: strided and contiguous inputs differ"
