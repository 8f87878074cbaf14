"""The chunked backend's compiled CPU passes (``ops/cpu_kernels.py``, Numba, extra ``[cpu]``): the paper's
configuration runs them, every other one the eager passes, and both are exact against the naive spec (fp64) and
within the spec's own error (fp32), outputs and gradients, over several query blocks and key tiles, grouped-query
heads, another voting head and lengths that divide nothing. Skipped where Numba is not installed (the
CI's oldest-versions step); the main CI step installs it."""

import pytest
import torch
from helpers import TOL, assert_error_bounded

from selective_attention.functional import selective_attention
from selective_attention.ops import chunked, cpu_kernels
from selective_attention.selection import Selection

pytest.importorskip("numba")


@pytest.fixture
def calls(monkeypatch):
    """Counts of the compiled passes' calls, by name."""
    seen = {"votes_to_bias": 0, "vote_gradients": 0}
    for name in seen:
        real = getattr(cpu_kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu_kernels, name, spy)
    return seen


def _problem(B, H, Hkv, L, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) * 1.5
    k, v = (torch.randn(B, Hkv, L, D, generator=gen, dtype=torch.float64) * 1.5 for _ in range(2))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _run(q, k, v, backend, **kw):
    out = selective_attention(q, k, v, is_causal=True, backend=backend, **{"selection": True, **kw})
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), cot))


CASES = {
    "plain": dict(B=2, H=4, Hkv=4, L=45, D=8, kw={}),
    "gqa": dict(B=2, H=4, Hkv=2, L=37, D=4, kw={"enable_gqa": True}),
    "head_2": dict(B=1, H=4, Hkv=4, L=40, D=4, kw={"selection": Selection(head=2)}),
    "odd": dict(B=3, H=2, Hkv=1, L=33, D=3, kw={"enable_gqa": True}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tile_bytes", [None, 8 * 4 * 10 * 8])
def test_compiled_passes_match_the_spec(monkeypatch, calls, dtype, case, tile_bytes):
    """Outputs, dq, dk, dv of the compiled passes against the naive spec: fp64 to 1e-10, fp32 within 3x the spec's
    own fp32 error (against fp64); with small tiles, several query blocks and key tiles (the last narrower)."""
    monkeypatch.delenv("SELECTIVE_ATTENTION_NUMBA", raising=False)
    if tile_bytes is not None:
        monkeypatch.setattr(chunked, "_TILE_BYTES", tile_bytes)
    c = CASES[case]
    q, k, v = _problem(c["B"], c["H"], c["Hkv"], c["L"], c["D"], dtype)
    kw = c["kw"]
    got = _run(q, k, v, "chunked", chunk_size=5, **kw)
    assert calls["votes_to_bias"] > 0 and calls["vote_gradients"] > 0  # the compiled passes ran
    ref = _run(q, k, v, "naive", **kw)
    if dtype == torch.float64:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
        return
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref64 = _run(q64, k64, v64, "naive", **kw)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), got, ref, ref64):
        assert_error_bounded(a, b, r, name=name)


def test_compiled_and_eager_passes_agree(monkeypatch, calls):
    """The same call with the compiled passes and with ``SELECTIVE_ATTENTION_NUMBA=0`` (the eager passes): equal up to
    their summation orders (fp64), and the switch really switches."""
    q, k, v = _problem(2, 4, 2, 70, 8, torch.float64, seed=1)
    monkeypatch.setenv("SELECTIVE_ATTENTION_NUMBA", "0")
    assert not cpu_kernels.available()
    eager = _run(q, k, v, "chunked", chunk_size=8, enable_gqa=True)
    assert calls == {"votes_to_bias": 0, "vote_gradients": 0}
    monkeypatch.delenv("SELECTIVE_ATTENTION_NUMBA")
    assert cpu_kernels.available()
    fused = _run(q, k, v, "chunked", chunk_size=8, enable_gqa=True)
    assert calls["vote_gradients"] > 0
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    monkeypatch.setattr(cpu_kernels, "numba", None)  # as without the extra
    assert not cpu_kernels.available()
    before = dict(calls)
    without = _run(q, k, v, "chunked", chunk_size=8, enable_gqa=True)
    assert calls == before
    for a, b in zip(without, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the eager passes, as with the switch off


@pytest.mark.parametrize(
    "other",
    ["memory_loss", "every_head_votes", "float_F", "key_padding", "bfloat16", "non_finite_voter"],
)
def test_other_configurations_run_the_eager_passes(monkeypatch, calls, other):
    """The compiled passes serve one case, the paper's (fp32 / fp64, one voting head of q, no removed keys (key
    padding removes keys), penalty or memory loss, finite voters); every other runs the eager passes (whose
    exactness the other test files check)."""
    monkeypatch.delenv("SELECTIVE_ATTENTION_NUMBA", raising=False)
    B, H, L, D = 1, 4, 30, 4
    dtype = torch.bfloat16 if other == "bfloat16" else torch.float64
    q, k, v = _problem(B, H, H, L, D, dtype, seed=2)
    kw = {
        "memory_loss": {"memory_tau": 1.0},
        "every_head_votes": {"selection": Selection(per_head=True)},
        "float_F": {"selective_mask": torch.rand(1, 1, L, L, generator=torch.Generator().manual_seed(3))},
        "key_padding": {"key_padding_mask": torch.arange(L).expand(B, L) < 3},
        "bfloat16": {},
        "non_finite_voter": {},
    }[other]
    if other == "non_finite_voter":
        with torch.no_grad():
            q[0, 0, 5, 1] = float("nan")
    kw = {"selection": True, **kw}
    out = selective_attention(q, k, v, is_causal=True, backend="chunked", chunk_size=4, **kw)
    out = out[0] if isinstance(out, tuple) else out
    out.float().nan_to_num().sum().backward()
    assert calls == {"votes_to_bias": 0, "vote_gradients": 0}


def test_the_passes_follow_torchs_thread_count():
    """Numba's threads are set to PyTorch's intra-op threads at each call (a user's ``torch.set_num_threads(1)`` must
    not leave Numba's pool on every core), and the result does not depend on them (fp64)."""
    import numba

    before = torch.get_num_threads()
    q, k, v = _problem(2, 2, 2, 50, 4, torch.float64, seed=4)
    try:
        torch.set_num_threads(1)
        one = _run(q, k, v, "chunked", chunk_size=4)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    many = _run(q, k, v, "chunked", chunk_size=4)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
