"""KV-compression baselines under the same budget definition: the sliding window + first token
(StreamingLLM-style) and heavy hitters + a recent window (H2O-style) beside the paper's selective
eviction. Each rule is checked against a plain-Python reference of that rule, on a prefilled prompt and
over many decoding steps; the budget bounds what every step attends; H2O's accumulated attention is the
column sums of the naive attention weights; a budget >= the sequence changes nothing."""

import json
import math

import pytest
import torch

from selective_attention import decoding
from selective_attention.budget_search import pruned_logits, pruned_loss, search_budgets
from selective_attention.cli import main
from selective_attention.decoding import Decoder
from selective_attention.kv_cache import (
    LayerCache,
    attention_received,
    h2o_evictions,
    h2o_keep_after_prefill,
    window_evictions,
    window_keep_after_prefill,
)
from selective_attention.model import GPT, Attention, GPTConfig
from selective_attention.selection import Selection, selection_penalty
from selective_attention.train import main as train_main
from selective_attention.train import parse_overrides

POLICIES = ["selective", "window", "h2o"]


# --- the rules, written out one token at a time ----------------------------------------------------
def victim(policy, entries, newest, recent):
    """The token a full layer drops: ``entries`` are dicts (pos, f = Fcum, a = attention received);
    ``newest`` the newest position that will be stored (the token about to be written, or the last
    prompt token at prefill). Never the first token."""
    cand = [e for e in entries if e["pos"] != 0]
    if policy == "selective":  # the largest Fcum, the oldest on ties
        return max(cand, key=lambda e: (e["f"], -e["pos"]))
    if policy == "window":  # the oldest
        return min(cand, key=lambda e: e["pos"])
    # h2o: outside the recent window newest - recent + 1 .. newest, the least attention, the oldest on ties
    cand = [e for e in cand if e["pos"] <= newest - recent]
    return min(cand, key=lambda e: (e["a"], e["pos"]))


def reference_run(policy, budget, recent, k, v, f0, a0, qs, ks, vs, votes, scale):
    """One sequence through a layer with plain Python lists: prefill ``k, v`` ``[Hkv, T, D]`` (Fcum ``f0``
    and attention received ``a0``, lists of T), evict one at a time down to the budget, then one step per
    ``qs[s]`` ``[H, D]`` (``ks[s], vs[s]`` ``[Hkv, D]``): make room, attend, accumulate, vote (head 0).
    Returns the positions kept after the prefill and each step, the outputs ``[H, D]`` and the entries."""
    T = k.shape[1]
    entries = [dict(pos=j, k=k[:, j], v=v[:, j], f=f0[j], a=a0[j]) for j in range(T)]
    while len(entries) > budget:
        entries.remove(victim(policy, entries, T - 1, recent))
    kept, outs = [sorted(e["pos"] for e in entries)], []
    H, Hkv = qs[0].shape[0], k.shape[0]
    for s in range(len(qs)):
        t = T + s
        if len(entries) >= budget:
            entries.remove(victim(policy, entries, t, recent))
        new = dict(pos=t, k=ks[s], v=vs[s], f=0.0, a=0.0)
        entries.append(new)
        y, raw = [], []
        for h in range(H):
            g = h // (H // Hkv)
            logit = [float(qs[s][h] @ e["k"][g]) * scale for e in entries]
            w = [math.exp(lg - e["f"]) for lg, e in zip(logit, entries)]
            w = [x / sum(w) for x in w]
            y.append(sum(wi * e["v"][g] for wi, e in zip(w, entries)))
            for wi, e in zip(w, entries):
                e["a"] += wi
            raw.append(logit)
        if votes:  # head 0's logits vote, for every token but the first and the new one
            for lg, e in zip(raw[0], entries):
                if e["pos"] != 0 and e is not new:
                    e["f"] += max(lg, 0.0)
        outs.append(torch.stack(y))
        kept.append(sorted(e["pos"] for e in entries))
    return kept, outs, entries


def stored(cache, b):
    return sorted(p for p in cache.pos[b].tolist() if p >= 0)


@pytest.mark.parametrize("votes", [False, True], ids=["standard", "selective"])
@pytest.mark.parametrize("budget", range(2, 9))
@pytest.mark.parametrize("policy", POLICIES)
def test_each_rule_equals_its_reference_on_prefill_and_over_many_steps(policy, budget, votes):
    """LayerCache (batch 3, grouped-query heads, random tensors) against the rule written out per sequence:
    the same tokens kept after the prompt (7 tokens: longer than budgets < 7, not than 7, 8) and after
    each of 30 steps, the same outputs, the same Fcum and accumulated attention."""
    g = torch.Generator().manual_seed(budget * 10 + votes)
    B, H, Hkv, D, T, n = 3, 4, 2, 8, 7, 30
    dt = torch.float64
    k, v = (torch.randn(B, Hkv, T, D, dtype=dt, generator=g) * 2 for _ in range(2))
    f0 = torch.rand(B, 1, T, dtype=dt, generator=g) * 3
    f0[:, :, 0] = 0  # the first token is never voted on
    a0 = torch.rand(B, T, dtype=dt, generator=g) * 4
    qs = torch.randn(n, B, H, 1, D, dtype=dt, generator=g) * 2
    ks, vs = (torch.randn(n, B, Hkv, 1, D, dtype=dt, generator=g) * 2 for _ in range(2))
    c = LayerCache.empty(B, budget, n_heads=Hkv, n_groups=1, head_dim=D, budget=budget, policy=policy, dtype=dt)
    c.fill(k, v, f0, acc=a0 if policy == "h2o" else None)
    kept, outs = [[stored(c, b) for b in range(B)]], []
    for s in range(n):
        outs.append(c.step(qs[s], ks[s], vs[s], torch.tensor([T + s]), Selection() if votes else None))
        kept.append([stored(c, b) for b in range(B)])
    recent = c.recent
    assert recent == (max(1, budget // 2) if policy == "h2o" else None)
    for b in range(B):
        rk, ro, entries = reference_run(
            policy, budget, recent, k[b], v[b], f0[b, 0].tolist(), a0[b].tolist(),
            [q[b, :, 0] for q in qs], [x[b, :, 0] for x in ks], [x[b, :, 0] for x in vs], votes, D**-0.5,
        )  # fmt: skip
        assert [kk[b] for kk in kept] == rk
        torch.testing.assert_close(torch.stack([o[b, :, 0] for o in outs]), torch.stack(ro), rtol=1e-10, atol=1e-10)
        by_pos = {p: j for j, p in enumerate(c.pos[b].tolist()) if p >= 0}
        for e in entries:
            assert c.fcum[b, 0, by_pos[e["pos"]]].item() == pytest.approx(e["f"], rel=1e-10, abs=1e-10)
            if policy == "h2o":
                assert c.acc[b, by_pos[e["pos"]]].item() == pytest.approx(e["a"], rel=1e-10, abs=1e-10)


def test_window_and_h2o_rules_by_hand():
    pos = torch.tensor([[0, 5, 2, 3, 4], [0, 1, -1, 3, 4]])
    assert window_evictions(pos, 5).tolist() == [[False, False, True, False, False], [False] * 5]  # row 2 not full
    assert not window_evictions(pos, None).any()
    acc = torch.tensor([[9.0, 1.0, 1.0, 1.0, 0.5], [0.0, 2.0, 0.0, 1.0, 1.0]])
    # recent 2: position 5 (newest stored) stays with the token to come; of 2, 3, 4 the least attention: 4
    assert h2o_evictions(acc, pos, 5, 2).tolist() == [[False, False, False, False, True], [False] * 5]
    # recent 3: 4 and 5 stay; 2 and 3 tie at 1.0: the oldest, 2, goes
    assert h2o_evictions(acc, pos, 5, 3).tolist() == [[False, False, True, False, False], [False] * 5]
    # prefill: the first, the `recent` newest, then the largest acc (the newer on ties); padding never
    acc = torch.tensor([[5.0, 3.0, 1.0, 3.0, 0.1, 0.2]])
    assert h2o_keep_after_prefill(acc, 4, 2).tolist() == [[True, False, False, True, True, True]]
    kpm = torch.tensor([[True, False, False, False, False, False]])
    assert h2o_keep_after_prefill(acc, 4, 1, kpm).tolist() == [[False, True, True, True, False, True]]
    assert window_keep_after_prefill((1, 6), 3).tolist() == [[True, False, False, False, True, True]]
    assert window_keep_after_prefill((1, 6), 3, kpm).tolist() == [[False, True, False, False, True, True]]


# --- on the model -------------------------------------------------------------------------------------
def model(selection=False, seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=40, context_len=64, n_layer=2, n_head=4, d_model=32, selection=selection)
    m = GPT(GPTConfig(**{**base, **kw})).double().eval()
    for b in m.blocks:  # strong logits: F and the attention weights matter
        b.attn.qkv.weight.data *= 6
    return m


MODELS = {
    "standard": dict(),
    "selective": dict(selection=True),
    "selective-gqa": dict(selection=True, n_kv_head=2),
    "per-head": dict(selection=True, selection_per_head=True),
    "projection": dict(selection=True, selection_projection=True),
}


@pytest.mark.parametrize("variant", MODELS)
@pytest.mark.parametrize("policy", POLICIES)
def test_a_budget_at_least_the_sequence_is_the_full_forward(policy, variant):
    m = model(**MODELS[variant])
    x = torch.randint(0, 40, (2, 24))
    with torch.no_grad():
        full = m(x)
    logits, occ = pruned_logits(m, x, budget=24, policy=policy)  # read one token at a time
    torch.testing.assert_close(logits, full, rtol=1e-10, atol=1e-10)
    assert occ == [24, 24]
    dec = Decoder(m, budget=[30, 24], policy=policy)  # a prompt of 9, then steps
    rows = [dec.prefill(x[:, :9], 15)] + [dec.step(x[:, t]) for t in range(9, 24)]
    torch.testing.assert_close(torch.stack(rows, 1), full[:, 8:], rtol=1e-10, atol=1e-10)


def test_h2o_without_a_budget_tracks_no_attention_and_is_exact():
    """An unbudgeted H2O layer never evicts: it keeps no accumulator and computes no prompt attention, and decodes
    exactly (a budgeted layer beside it keeps its own)."""
    m = model(**MODELS["selective"])
    x = torch.randint(0, 40, (2, 24))
    with torch.no_grad():
        full = m(x)
    logits, occ = pruned_logits(m, x, policy="h2o")
    torch.testing.assert_close(logits, full, rtol=1e-10, atol=1e-10)
    dec = Decoder(m, budget=[None, 6], policy="h2o")
    dec.prefill(x[:, :9], 4)
    assert dec.caches[0].acc is None and not dec.caches[0].tracks_attention
    assert dec.caches[1].acc is not None and dec.occupancy() == [9, 6]


@pytest.mark.parametrize("variant", ["standard", "selective"])
@pytest.mark.parametrize("policy", POLICIES)
def test_no_step_attends_to_more_than_the_budget(policy, variant, monkeypatch):
    """Spy on each step's softmax: no row has more than its layer's budget of finite logits."""
    m = model(**MODELS[variant])
    dec = Decoder(m, budget=[5, 3], policy=policy)
    logits = dec.prefill(torch.randint(0, 40, (3, 7)), 0)
    assert dec.occupancy() == [5, 3]
    seen, real_softmax = [], torch.softmax

    def spy(x, dim=-1, **kw):
        seen.append(int(torch.isfinite(x).sum(-1).max()))
        return real_softmax(x, dim=dim, **kw)

    monkeypatch.setattr(torch, "softmax", spy)
    for _ in range(20):
        logits = dec.step(logits.argmax(-1))
        assert dec.occupancy() == [5, 3] and [c.capacity for c in dec.caches] == [5, 3]
    monkeypatch.undo()
    assert len(seen) == 40 and max(seen[0::2]) == 5 and max(seen[1::2]) == 3


def test_window_is_the_selective_rule_on_a_standard_model_and_h2o_with_the_widest_recent_window():
    """On a standard model Fcum = 0, so the selective rule drops the oldest: the sliding window. H2O whose
    recent window fills the budget (recent = budget - 1) is the sliding window too, on any model."""
    x = torch.randint(0, 40, (2, 30))
    std = model()
    win, _ = pruned_logits(std, x, budget=6, policy="window")
    torch.testing.assert_close(pruned_logits(std, x, budget=6)[0], win, rtol=0, atol=0)
    sel = model(selection=True)
    win, _ = pruned_logits(sel, x, budget=6, policy="window")
    torch.testing.assert_close(pruned_logits(sel, x, budget=6, policy="h2o", recent=5)[0], win, rtol=0, atol=0)
    assert not torch.allclose(pruned_logits(sel, x, budget=6)[0], win)  # selective pruning is another rule


def naive_weights(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, T]`` causal (selective) attention weights of ``attn`` on ``x``, materialised."""
    q, k, v, sel = attn.project(x, torch.arange(x.shape[1]))
    g = attn.n_head // attn.n_kv_head
    logits = q @ k.repeat_interleave(g, dim=1).transpose(-2, -1) * attn.d_head**-0.5
    if attn.selection is not None:
        qs, ks = attn.selection.voters(q, k, sel)
        logits = logits - selection_penalty(qs, ks)  # [B, G, T, T], G = 1 or H
    T = x.shape[1]
    return torch.softmax(logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf), dim=-1)


@pytest.mark.parametrize("variant", MODELS)
def test_h2o_accumulated_attention_is_the_column_sums_of_the_naive_weights(variant):
    """After a prompt (chunked: 11 rows in chunks of 4 here, 64 in the model) and after each step, acc[j]
    = the attention token j received, summed over heads and every query so far (fp64)."""
    cfg = GPTConfig(vocab_size=40, context_len=32, n_head=4, d_model=32, **MODELS[variant])
    attn = Attention(cfg, cfg.selection_for(0)).double().eval()
    for lin in (attn.qkv, attn.sel_qk):
        if lin is not None:
            lin.weight.data *= 6
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    with torch.no_grad():
        W = naive_weights(attn, x)  # [B, H, 20, 20]
        q, k, _, sel = attn.project(x[:, :11], torch.arange(11))
        voters = None if attn.selection is None else attn.selection.voters(q, k, sel)
        torch.testing.assert_close(attention_received(q, k, voters, chunk=4), W[:, :, :11, :11].sum(dim=(1, 2)))
        c = attn.new_cache(2, 20, budget=20, policy="h2o", dtype=torch.float64)  # room for all 20: no eviction
        attn(x[:, :11], torch.arange(11), c)
        torch.testing.assert_close(c.acc[:, :11], W[:, :, :11, :11].sum(dim=(1, 2)), rtol=1e-10, atol=1e-10)
        for t in range(11, 20):
            attn(x[:, t : t + 1], torch.tensor([t]), c, input_pos=torch.tensor([t]))
            received = W[:, :, : t + 1, : t + 1].sum(dim=(1, 2))
            torch.testing.assert_close(c.acc[:, : t + 1], received, rtol=1e-10, atol=1e-10)
    assert c.acc[:, 0].sum() > c.acc[:, 19].sum()  # the first token received the most


@pytest.mark.parametrize("policy", POLICIES)
def test_the_decoding_step_compiles_once_with_each_policy(policy):
    from torch._dynamo.testing import CompileCounter

    m = model(selection=True)
    dec = Decoder(m, budget=5, policy=policy)
    logits = dec.prefill(torch.randint(0, 40, (2, 8)), 20)
    counter = CompileCounter()
    step = torch.compile(decoding.decode_one_token, backend=counter)
    with torch.no_grad():
        for _ in range(12):
            logits = step(m, dec.caches, logits.argmax(-1), dec.t)
    assert counter.frame_count == 1
    assert dec.occupancy() == [5, 5]


def test_policy_errors_are_clear():
    m = model()
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="policy must be one of 'selective', 'window', 'h2o'; got 'lru'"):
        Decoder(m, budget=4, policy="lru")
    with pytest.raises(ValueError, match="threshold applies to policy='selective' only"):
        m.generate(idx, 2, budget=4, threshold=1.0, policy="window")
    with pytest.raises(ValueError, match="recent .* applies to policy='h2o' only"):
        Decoder(m, budget=4, recent=2)
    with pytest.raises(ValueError, match="recent=4 does not fit budget=4"):
        Decoder(m, budget=[8, 4], policy="h2o", recent=4)
    with pytest.raises(ValueError, match="recent must be an int >= 1"):
        Decoder(m, budget=4, policy="h2o", recent=0)
    # a policy chooses what a full layer evicts: with no budget in any layer it would be ignored (it was, silently)
    for call in (lambda: m.generate(idx, 2, policy="window"), lambda: Decoder(m, policy="h2o"),
                 lambda: Decoder(m, budget=[None, None], policy="window")):  # fmt: skip
        with pytest.raises(ValueError, match="no layer has a budget, so none is ever full: pass a budget"):
            call()
    Decoder(m, budget=[None, 4], policy="window")  # one budgeted layer is enough
    with pytest.raises(ValueError, match="pass the prompt's acc"):
        LayerCache.empty(1, 4, n_heads=1, n_groups=1, head_dim=2, budget=4, policy="h2o").fill(
            torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3)
        )


def test_search_and_loss_take_the_policy():
    m = model(selection=True, context_len=32)
    x = torch.randint(0, 40, (2, 24))
    y = torch.roll(x, -1, 1)
    res = search_budgets(m, x, y, tolerance=0.05, policy="h2o")
    assert res.policy == "h2o" and res.loss <= res.full_loss + 0.05 + 1e-12
    assert pruned_loss(m, x, y, budget=res.budgets, policy="h2o")[0] == res.loss
    res = search_budgets(m, x, y, tolerance=0.05, policy="h2o", recent=3)
    assert min(res.budgets) >= 4  # room for the recent window and the first token


# --- the command line ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("baselines") / "run"
    args = ["--data=pydoc", f"--out_dir={run}", "--n_layer=2", "--n_head=2", "--d_model=32", "--context_len=32",
            "--batch_size=4", "--max_steps=2", "--eval_interval=2", "--eval_batches=1", "--progress=false"]  # fmt: skip
    train_main(parse_overrides(args))
    return str(run)


@pytest.mark.parametrize("policy", POLICIES)
def test_cli_eval_with_a_policy(tiny_run, policy, capsys):
    argv = ["eval", "--ckpt", tiny_run, "--json", "--batches", "1", "--budget", "8", "--policy", policy]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == policy and out["kv_tokens_per_layer"] == [8, 8] and out["val_loss"] > 0
    assert out.get("recent") == ([4, 4] if policy == "h2o" else None)  # each layer's window: budget // 2


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--policy", "lru"], "argument --policy: must be one of selective, window, h2o; got 'lru'"),
        (["--policy", "window", "--threshold", "1"], "threshold applies to policy='selective' only"),
        (["--policy", "window", "--recent", "2"], "applies to policy='h2o' only"),
        (["--policy", "h2o", "--recent", "8"], "recent=8 does not fit budget=8"),
        (["--policy", "h2o", "--recent", "0"], "argument --recent: must be an int >= 1"),
    ],
)
def test_cli_policy_errors(tiny_run, extra, match, capsys):
    assert main(["eval", "--ckpt", tiny_run, "--budget", "8", "--batches", "1", *extra]) == 2
    assert match in capsys.readouterr().err
    assert main(["eval", "--ckpt", tiny_run, "--policy", "window"]) == 2
    assert "no layer has a budget, so none is ever full: pass a budget as well (budget=..., --budget" in (
        capsys.readouterr().err
    )


def test_kv_curves_experiment_on_tiny_checkpoints(tiny_run, tmp_path, capsys):
    """experiments/kv_curves.py end to end: every method at every budget and the searched one, on windows that
    exclude the search windows; JSON, table and plot written."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("kv_curves", root / "experiments" / "kv_curves.py")
    kv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kv)
    sel = tmp_path / "sel"
    args = ["--data=pydoc", f"--out_dir={sel}", "--n_layer=2", "--n_head=2", "--d_model=32", "--context_len=32",
            "--batch_size=4", "--max_steps=2", "--eval_interval=2", "--eval_batches=1", "--progress=false",
            "--selection=true"]  # fmt: skip
    train_main(parse_overrides(args))
    out = tmp_path / "res" / "kv"
    r = kv.main(["--standard", tiny_run, "--selective", str(sel), "--windows", "3", "--budgets", "4", "8",
                 "--searched", "4,6", "--search_batch", "2", "--out", str(out)])  # fmt: skip
    assert list(r["curves"]) == list(kv.METHODS)
    for curve in r["curves"].values():
        assert [p["kv_tokens_per_layer"] for p in curve] == [4, 8, 32] and curve[-1]["full"]
    assert set(r["at_searched_budgets"]) == set(kv.METHODS) and r["windows"]["n"] == 3
    assert 0 not in r["windows"]["indices"]  # window 0 is always the first search window
    assert r["curves"]["standard + window"][-1]["loss"] == r["full_loss"]["standard"]
    text = (tmp_path / "res" / "kv.md").read_text()
    assert "| 4, 6 (searched) |" in text and "3 windows of 32 tokens" in text
    assert r["cpu"] and f"thread of an {r['cpu']}, torch {torch.__version__};" in text  # the timing names its CPU
    assert json.loads((tmp_path / "res" / "kv.json").read_text())["targets"] == 3 * 32
    assert (tmp_path / "res" / "kv.png").stat().st_size > 1000
    assert "CPU time" in capsys.readouterr().out
    assert "commit" in r and r["cpu"]  # the code and machine measured with (commit None outside a git checkout)
    for bad in (["--windows", "0"], ["--budgets", "1", "8"], ["--threads", "0"]):  # --windows 0 was a ZeroDivisionError
        with pytest.raises(SystemExit):
            kv.main(["--standard", tiny_run, "--selective", str(sel), "--out", str(out), *bad])
    assert "must be >= 1, >= 1 and >= 2" in capsys.readouterr().err


def test_attention_received_scores_votes_at_the_attention_scale_like_the_spec():
    """With a non-default ``scale`` the weights are the spec's, whose votes use that scale too (heads of q, k)."""
    from selective_attention.functional import selective_attention

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    for scale in (None, 1.0, 0.2):
        # the spec's weights, column sums: the gradient of sum(out . 1) w.r.t. v is sum_i W[i, j] per head
        vv = v.detach().clone().requires_grad_()
        out = selective_attention(q, k, vv, is_causal=True, selection=True, scale=scale, backend="naive")
        (grad,) = torch.autograd.grad(out.sum(), vv)  # [B, H, T, D]: each entry sum_i W_h[i, j]
        voters = (q[:, :1], k[:, :1])  # head 0 votes (the paper)
        got = attention_received(q, k, voters, chunk=4, scale=scale)
        torch.testing.assert_close(got, grad[..., 0].sum(dim=1))
