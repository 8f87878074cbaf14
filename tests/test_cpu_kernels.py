"""The chunked backend's compiled CPU passes (``ops/cpu_kernels.py``, Numba, extra ``[cpu]``): the paper's
configuration runs them, every other one the eager passes, and both are exact against the naive spec (fp64) and
within the spec's own error (fp32), outputs and gradients, over several query blocks and key tiles, grouped-query
heads, another voting head, key padding (dead rows too), the memory loss's rows, and lengths that divide nothing.
Skipped where Numba is not installed (the CI's oldest-versions step); the main CI step installs it."""

import os

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
    """``(out, [memory-loss rows,] dq, dk, dv)`` under fixed random cotangents (the rows' too, when asked for)."""
    outs = selective_attention(q, k, v, is_causal=True, backend=backend, **{"selection": True, **kw})
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(9)
    cots = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    return (*(o.detach() for o in outs), *torch.autograd.grad(outs, (q, k, v), cots))


CASES = {
    "plain": dict(B=2, H=4, Hkv=4, L=45, D=8, kw={}),
    "gqa": dict(B=2, H=4, Hkv=2, L=37, D=4, kw={"enable_gqa": True}),
    "head_2": dict(B=1, H=4, Hkv=4, L=40, D=4, kw={"selection": Selection(head=2)}),
    "odd": dict(B=3, H=2, Hkv=1, L=33, D=3, kw={"enable_gqa": True}),
    "gqa_head_3": dict(B=2, H=6, Hkv=3, L=29, D=4, kw={"enable_gqa": True, "selection": Selection(head=3)}),
    # key padding (removed keys for every query, a fully padded row at the start of sequence 1: dead rows) and the
    # memory loss's rows (their gradient through F's gate)
    "key_padding": dict(B=2, H=2, Hkv=2, L=33, D=4, kw={"padding": True}),
    "right_padding": dict(B=2, H=2, Hkv=2, L=33, D=4, kw={"padding": "right"}),  # keys removed, no row dead
    "middle_padding": dict(B=2, H=2, Hkv=2, L=33, D=4, kw={"padding": "middle", "memory_tau": 2.0}),
    "memory_loss": dict(B=2, H=4, Hkv=4, L=31, D=4, kw={"memory_tau": 1.0}),
    "padding_and_memory": dict(B=2, H=4, Hkv=2, L=27, D=4, kw={"padding": True, "memory_tau": 0.5, "enable_gqa": True}),
}


def _kwargs(kw, B, L):
    """A case's keyword arguments; ``"padding"`` is key padding: sequence 1's first 7 keys (its first 7 rows dead),
    with ``"right"`` its last 5 (no row dead), with ``"middle"`` keys inside both sequences."""
    kw = dict(kw)
    padding = kw.pop("padding", False)
    if padding == "right":  # sequence 1's last 5 keys
        kw["key_padding_mask"] = torch.arange(L).expand(B, L) >= torch.tensor([[L], [L - 5]])
    elif padding == "middle":  # keys 10-19 of sequence 0, 3-5 of sequence 1
        i = torch.arange(L).expand(B, L)
        kw["key_padding_mask"] = (i >= torch.tensor([[10], [3]])) & (i < torch.tensor([[20], [6]]))
    elif padding:
        kw["key_padding_mask"] = torch.arange(L).expand(B, L) < torch.tensor([[0], [7]])
    return kw


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tile_bytes", [None, 8 * 4 * 10 * 8])
def test_compiled_passes_match_the_spec(monkeypatch, calls, dtype, case, tile_bytes):
    """Outputs, dq, dk, dv of the compiled passes against the naive spec: fp64 to 1e-10, fp32 within 3x the spec's
    own fp32 error (against fp64); with small tiles, several query blocks and key tiles (the last narrower); the
    columns split into bands of 16 (several per row of a tile, one task each)."""
    monkeypatch.delenv("SELECTIVE_ATTENTION_NUMBA", raising=False)
    monkeypatch.setattr(cpu_kernels, "_TASKS_PER_THREAD", 64)  # bands of the least width, 16 columns
    if tile_bytes is not None:
        monkeypatch.setattr(chunked, "_TILE_BYTES", tile_bytes)
    c = CASES[case]
    q, k, v = _problem(c["B"], c["H"], c["Hkv"], c["L"], c["D"], dtype)
    kw = _kwargs(c["kw"], c["B"], c["L"])
    got = _run(q, k, v, "chunked", chunk_size=5, **kw)
    assert calls["votes_to_bias"] > 0 and calls["vote_gradients"] > 0  # the compiled passes ran
    ref = _run(q, k, v, "naive", **kw)
    if dtype == torch.float64:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
        return
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref64 = _run(q64, k64, v64, "naive", **kw)
    names = ("out", "rows", "dq", "dk", "dv") if len(got) == 5 else ("out", "dq", "dk", "dv")
    for name, a, b, r in zip(names, got, ref, ref64):
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
    monkeypatch.setattr(cpu_kernels, "_passes", lambda: None)  # as without the extra
    assert not cpu_kernels.available() and cpu_kernels.version() is None
    before = dict(calls)
    without = _run(q, k, v, "chunked", chunk_size=8, enable_gqa=True)
    assert calls == before
    for a, b in zip(without, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the eager passes, as with the switch off


@pytest.mark.parametrize(
    "other",
    ["every_head_votes", "float_F", "bool_mask", "bfloat16", "non_finite_voter"],
)
def test_other_configurations_run_the_eager_passes(monkeypatch, calls, other):
    """The compiled passes serve the paper's configuration (fp32 / fp64, one voting head of q, finite voters, no
    penalty, removed keys only as key padding, with or without memory-loss rows); every other runs the eager passes
    (whose exactness the other test files check): a removed-key mask per query, a float F, every head voting,
    bfloat16, a NaN voter."""
    monkeypatch.delenv("SELECTIVE_ATTENTION_NUMBA", raising=False)
    assert cpu_kernels.available()  # else zero calls would prove nothing
    B, H, L, D = 1, 4, 30, 4
    dtype = torch.bfloat16 if other == "bfloat16" else torch.float64
    q, k, v = _problem(B, H, H, L, D, dtype, seed=2)
    kw = {
        "every_head_votes": {"selection": Selection(per_head=True)},
        "float_F": {"selective_mask": torch.rand(1, 1, L, L, generator=torch.Generator().manual_seed(3))},
        "bool_mask": {"selective_mask": torch.rand(L, L, generator=torch.Generator().manual_seed(3)) < 0.2},
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


def test_the_passes_follow_torchs_thread_count(monkeypatch, calls):
    """Numba's threads are set to PyTorch's intra-op threads at each call (a user's ``torch.set_num_threads(1)`` must
    not leave Numba's pool on every core), and the result does not depend on them (fp64)."""
    import numba

    monkeypatch.delenv("SELECTIVE_ATTENTION_NUMBA", raising=False)
    before = torch.get_num_threads()
    q, k, v = _problem(2, 2, 2, 50, 4, torch.float64, seed=4)
    try:
        torch.set_num_threads(1)
        one = _run(q, k, v, "chunked", chunk_size=4)
        assert numba.get_num_threads() == 1 and calls["vote_gradients"] > 0
    finally:
        torch.set_num_threads(before)
    try:
        torch.set_num_threads(2)
        many = _run(q, k, v, "chunked", chunk_size=4)
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_a_forked_child_runs_the_eager_passes(monkeypatch):
    """Numba's OpenMP pool aborts a process forked from one that used it: such a child takes the eager passes."""
    monkeypatch.delenv("SELECTIVE_ATTENTION_NUMBA", raising=False)
    assert cpu_kernels.warm_up() and cpu_kernels._PID == [os.getpid()]  # a pass records the process that ran it
    monkeypatch.setattr(cpu_kernels, "_PID", [-1])  # the passes ran in another process, this one's parent
    assert not cpu_kernels.available()


def test_compiled_model_runs_the_passes(monkeypatch, calls):
    """Under ``torch.compile`` the chunked custom ops run the compiled passes too (the ops' bodies are opaque to the
    compiler), with the eager call's results (fp64)."""
    monkeypatch.delenv("SELECTIVE_ATTENTION_NUMBA", raising=False)
    q, k, v = _problem(1, 2, 2, 40, 4, torch.float64, seed=5)
    eager = _run(q, k, v, "chunked", chunk_size=8)
    before = dict(calls)

    def f(q, k, v):
        return selective_attention(q, k, v, is_causal=True, selection=True, backend="chunked", chunk_size=8)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    got = (out.detach(), *torch.autograd.grad(out, (q, k, v), cot))
    assert calls["votes_to_bias"] > before["votes_to_bias"] and calls["vote_gradients"] > before["vote_gradients"]
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_votes_only_padding_runs_the_passes_like_the_eager_ones(monkeypatch, calls, dtype):
    """``chunked_selective_attention(key_padding_mask=...)`` without ``removed`` keeps padding out of the votes only
    (its rows zeroed in the votes' operands, which the compiled passes read as any other votes): the same results as
    the eager passes, outputs and gradients."""
    monkeypatch.setattr(chunked, "_TILE_BYTES", 8 * 4 * 10 * 8)
    B, H, L, D = 2, 4, 31, 4
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, :6] = True
    results = []
    for switch in ("0", "1"):
        monkeypatch.setenv("SELECTIVE_ATTENTION_NUMBA", switch)
        q, k, v = _problem(B, H, H, L, D, dtype, seed=6)
        voters = Selection().bind(q, k, scale=D**-0.5)
        out, _ = chunked.chunked_selective_attention(q, k, v, voters, scale=D**-0.5, chunk_size=5, key_padding_mask=kpm)
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
        results.append((out.detach(), *torch.autograd.grad(out, (q, k, v), cot)))
    assert calls["vote_gradients"] > 0
    tol = TOL[torch.float64] if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


def test_the_passes_refuse_operands_of_the_wrong_shape():
    """The kernels do not check bounds: the wrappers check their operands' shapes (a wrong one read or wrote past a
    buffer: a removed-key mask without its dead-row mask read garbage, found by the chunked tests); some here."""
    Sn, carry, out = torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 1, 3, 4)
    with pytest.raises(ValueError, match="removed has shape"):
        cpu_kernels.votes_to_bias(Sn, carry, 0, out, removed=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="nlse has shape"):
        cpu_kernels.votes_to_bias(Sn, carry, 0, torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 4))
    dZ = torch.zeros(2, 2, 3, 4)
    with pytest.raises(ValueError, match="delta has shape"):
        cpu_kernels.vote_gradients(dZ, dZ.clone(), torch.zeros(2, 2, 4), Sn, carry, 0, 1.0)
    with pytest.raises(ValueError, match="dead has shape"):
        rm = torch.zeros(2, 4, dtype=torch.bool)
        cpu_kernels.votes_to_bias(Sn, carry, 0, out, removed=rm, dead=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="carry has shape"):
        cpu_kernels.votes_to_bias(Sn, torch.zeros(2, 5), 0, out)
    with pytest.raises(ValueError, match="ndcol has shape"):
        cpu_kernels.vote_gradients(dZ, dZ.clone(), torch.zeros(2, 2, 3), Sn, torch.zeros(1, 4), 0, 1.0)
    with pytest.raises(ValueError, match="voting head 2"):
        cpu_kernels.vote_gradients(dZ, dZ.clone(), torch.zeros(2, 2, 3), Sn, carry, 2, 1.0)


def test_the_memory_loss_gate_at_tau_in_float32(monkeypatch, calls):
    """F exactly at tau in float32 (tau = 0.1, not a float32 number): the gate ``F <= tau`` compares with tau rounded
    to float32, as the eager passes and the spec do (compared with the Python float, it closed: dk 0.0153 against
    2.9857)."""
    monkeypatch.delenv("SELECTIVE_ATTENTION_NUMBA", raising=False)
    q, k, v = (torch.zeros(1, 1, 4, 1) for _ in range(3))
    q[0, 0, 2, 0], k[0, 0, 1, 0] = 1.0, 0.1
    v = torch.arange(4.0).view(1, 1, 4, 1)
    got, ref = (_run(*(t.clone().requires_grad_() for t in (q, k, v)), b, memory_tau=0.1) for b in ("chunked", "naive"))
    assert calls["vote_gradients"] > 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("removed", ["batched", "broadcast", "one key column"])
def test_removed_keys_given_directly(monkeypatch, calls, removed):
    """``chunked_selective_attention(removed=..., key_padding_mask=...)``: a key-padding-shaped ``removed``,
    per sequence or broadcast over the batch, or with a single key column (``[B, 1, 1, 1]``, every key or none: it
    raised in the eager passes once a sequence had every key removed), runs the compiled passes with the eager ones'
    results (fp64)."""
    monkeypatch.setattr(chunked, "_TILE_BYTES", 8 * 4 * 10 * 8)
    B, H, L, D = 3, 2, 23, 4
    rm = {
        "batched": torch.arange(L).expand(B, L) < torch.tensor([[0], [4], [9]]),
        "broadcast": (torch.arange(L) % 7 == 3).expand(1, L),
        "one key column": torch.tensor([False, True, False]).view(B, 1),
    }[removed][:, None, None, :]
    kpm = rm[:, 0, 0].expand(B, L) if removed != "one key column" else None
    results = []
    for switch in ("0", "1"):
        monkeypatch.setenv("SELECTIVE_ATTENTION_NUMBA", switch)
        q, k, v = _problem(B, H, H, L, D, torch.float64, seed=7)
        voters = Selection().bind(q, k, scale=D**-0.5)
        out, rows = chunked.chunked_selective_attention(
            q, k, v, voters, scale=D**-0.5, chunk_size=5, removed=rm, key_padding_mask=kpm, tau=1.5
        )
        loss = out.pow(2).sum() + rows.pow(2).sum()
        results.append((out.detach(), rows.detach(), *torch.autograd.grad(loss, (q, k, v))))
    assert calls["vote_gradients"] > 0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
