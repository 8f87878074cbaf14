"""Cached decoding: exact without pruning; pruning follows the eviction rule of DESIGN §4."""

import numpy as np
import pytest
import torch

from selective_attention import decoding
from selective_attention.decoding import Decoder
from selective_attention.model import GPT, GPTConfig
from selective_attention.selection import selection_penalty


def model(seed=0, strength=6.0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=40, context_len=64, n_layer=2, n_head=4, d_model=32)
    base.update(kw)
    m = GPT(GPTConfig(**base)).double().eval()
    for b in m.blocks:  # strong logits, so that F is large and pruning decisions are not ties
        b.attn.qkv.weight.data *= strength
        if b.attn.sel_qk is not None:
            b.attn.sel_qk.weight.data *= strength
    return m


def greedy_by_recompute(m, idx, n):
    out = idx
    for _ in range(n):
        out = torch.cat([out, m(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


VARIANTS = {
    "standard": dict(),
    "selective": dict(selection=True),
    "per-head": dict(selection=True, selection_per_head=True),
    "projection": dict(selection=True, selection_projection=True),
    "head-2": dict(selection=True, selection_head=2),
    "layer-1-only": dict(selection=True, selection_layers=[1]),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_greedy_equals_recompute(variant):
    m = model(**VARIANTS[variant])
    idx = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        ref = greedy_by_recompute(m, idx, 25)
    assert torch.equal(m.generate(idx, 25, temperature=0), ref)


@pytest.mark.parametrize("variant", ["standard", "selective"])
def test_cached_logits_equal_full_forward(variant):
    m = model(**VARIANTS[variant])
    idx = torch.randint(0, 40, (2, 30))
    dec = Decoder(m)
    logits = [dec.prefill(idx[:, :5], max_new_tokens=25)]
    for t in range(5, 29):
        logits.append(dec.step(idx[:, t]))
    with torch.no_grad():
        full = m(idx[:, :29])[:, 4:]
    torch.testing.assert_close(torch.stack(logits, 1), full, atol=1e-10, rtol=1e-10)


def test_budget_at_least_length_changes_nothing():
    m = model(selection=True)
    idx = torch.randint(0, 40, (2, 10))
    a = m.generate(idx, 20, temperature=0)
    assert torch.equal(m.generate(idx, 20, temperature=0, budget=30), a)
    assert torch.equal(m.generate(idx, 20, temperature=0, budget=[30, 40]), a)


# --- the eviction rule, written out naively ------------------------------------------------------
def reference_decode(m, idx, n_new, budget=None, threshold=None):
    """Greedy decoding of one sequence with per-layer Python lists of kept tokens. A budget b: at most
    b tokens stored and attended at any step, the newest included (DESIGN §4)."""
    T = idx.shape[1]
    scale = 1.0 / (m.config.d_model // m.config.n_head) ** 0.5
    n = m.config.n_layer
    budgets = budget if isinstance(budget, list) else [budget if budget is not None else 10**9] * n
    thr = threshold if threshold is not None else float("inf")

    def prune(entries, budget):
        for e in [e for e in entries if e["pos"] != 0 and e["f"].min() > thr]:
            entries.remove(e)
        while len(entries) > budget:
            victim = max((e for e in entries if e["pos"] != 0), key=lambda e: (e["f"].min().item(), -e["pos"]))
            entries.remove(victim)

    layers = []
    with torch.no_grad():
        x = m.tok_emb(idx)
        pos = torch.arange(T)
        for block, budget in zip(m.blocks, budgets):
            attn = block.attn
            q, k, v, sel = attn.project(block.norm1(x), pos)
            y, _ = attn.attend(q, k, v, sel)
            x = x + attn.merge(y)
            x = x + block.mlp(block.norm2(x))
            if attn.selects:  # F seen by the query after the prompt: all T rows' votes
                qs, ks = attn.selection.voters(q, k, sel)
                nxt_q = torch.zeros_like(qs[:, :, :1])
                F = selection_penalty(torch.cat([qs, nxt_q], 2), torch.cat([ks, nxt_q], 2), scale=scale)
                fcum = F[0, :, T, :T]  # [G, T]
            else:
                fcum = torch.zeros(1, T, dtype=x.dtype)
            entries = [dict(pos=j, k=k[0, :, j], v=v[0, :, j], f=fcum[:, j].clone()) for j in range(T)]
            prune(entries, budget)  # a long prompt is read exactly, then pruned to the budget
            layers.append(entries)
        logits = m.lm_head(m.norm(x[:, -1]))
        toks, occupancy = [], []
        for step in range(n_new):
            tok = logits.argmax(-1)
            toks.append(tok.item())
            if step == n_new - 1:
                break
            t = T + step
            x = m.tok_emb(tok[:, None])
            for block, entries, budget in zip(m.blocks, layers, budgets):
                attn = block.attn
                q, k, v, sel = attn.project(block.norm1(x), torch.tensor([t]))
                assert sel is None, "the reference covers head voters only"
                new = dict(pos=t, k=k[0, :, 0], v=v[0, :, 0], f=torch.zeros(entries[0]["f"].shape, dtype=x.dtype))
                prune(entries, budget - 1)  # room for the new token
                everyone = entries + [new]
                assert len(everyone) <= budget
                K = torch.stack([e["k"] for e in everyone], 1)  # [H, n, D]
                V = torch.stack([e["v"] for e in everyone], 1)
                Fv = torch.stack([e["f"] for e in everyone], -1)  # [G, n]
                logit = (q[0, :, 0, None, :] * K).sum(-1) * scale  # [H, n]
                w = torch.softmax(logit - Fv, dim=-1)
                y = (w[..., None] * V).sum(1)  # [H, D]
                if attn.selects:
                    h, per_head = attn.selection.head, attn.selection.per_head
                    vote = logit if per_head else logit[h : h + 1]  # [G, n]
                    for i, e in enumerate(entries):  # not the first token, not the new one
                        if e["pos"] != 0:
                            e["f"] = e["f"] + torch.relu(vote[:, i])
                entries.append(new)
                x = x + attn.merge(y[None, :, None, :])
                x = x + block.mlp(block.norm2(x))
            occupancy.append([len(e) for e in layers])
            logits = m.lm_head(m.norm(x[:, -1]))
    return toks, occupancy


@pytest.mark.parametrize("variant", ["standard", "selective", "per-head", "layer-1-only"])
@pytest.mark.parametrize("budget", [2, 3, 8, [5, 2]])
def test_pruned_decoding_matches_reference(variant, budget):
    m = model(**VARIANTS[variant])
    idx = torch.randint(0, 40, (1, 12))  # prompt longer than every budget: prefilled, then pruned
    ref, ref_occ = reference_decode(m, idx, 24, budget=budget)
    dec = Decoder(m, budget=budget)
    out = dec.generate(idx, 24, temperature=0)
    assert out[0, 12:].tolist() == ref
    assert dec.occupancy() == ref_occ[-1]


@pytest.mark.parametrize("threshold", [0.5, 3.0])
def test_threshold_pruning_matches_reference(threshold):
    m = model(selection=True)
    idx = torch.randint(0, 40, (1, 12))
    ref, ref_occ = reference_decode(m, idx, 24, threshold=threshold)
    dec = Decoder(m, threshold=threshold)
    out = dec.generate(idx, 24, temperature=0)
    assert out[0, 12:].tolist() == ref
    assert dec.occupancy() == ref_occ[-1]
    assert dec.occupancy()[0] < 12 + 24  # something was dropped


def test_threshold_and_budget_together_match_reference():
    m = model(selection=True)
    idx = torch.randint(0, 40, (1, 12))
    ref, ref_occ = reference_decode(m, idx, 24, budget=6, threshold=3.0)
    dec = Decoder(m, budget=6, threshold=3.0)
    assert dec.generate(idx, 24, temperature=0)[0, 12:].tolist() == ref
    assert dec.occupancy() == ref_occ[-1]


def test_cache_never_exceeds_budget_and_saves_bytes():
    m = model(selection=True)
    idx = torch.randint(0, 40, (2, 20))
    dec = Decoder(m, budget=[6, 4])
    logits = dec.prefill(idx, 30)
    assert dec.occupancy() == [6, 4]
    for _ in range(30):
        logits = dec.step(logits.argmax(-1))
        assert dec.occupancy() == [6, 4]  # the tokens this step attended to, the new one included
        assert all(c.capacity == b for c, b in zip(dec.caches, [6, 4]))  # b slots, no spare
    full = Decoder(m)
    full.prefill(idx, 30)
    per_token = 2 * 2 * 4 * 8 * 8  # k and v, B=2, H=4, D=8, float64
    assert full.kv_bytes() == [50 * per_token] * 2  # every allocated slot counts, free ones too
    assert dec.kv_bytes() == [6 * per_token, 4 * per_token]


def test_budget_bounds_the_keys_every_step_attends():
    """Spy on the softmax of each decode step: no row has more than `budget` finite logits."""
    m = model(selection=True)
    dec = Decoder(m, budget=[5, 3])
    logits = dec.prefill(torch.randint(0, 40, (2, 1)), 0)
    seen = []
    real_softmax = torch.softmax

    def spy(x, dim=-1, **kw):
        seen.append(int(torch.isfinite(x).sum(-1).max()))
        return real_softmax(x, dim=dim, **kw)

    torch.softmax = spy
    try:
        for _ in range(12):
            logits = dec.step(logits.argmax(-1))
    finally:
        torch.softmax = real_softmax
    assert seen and max(seen[0::2]) == 5 and max(seen[1::2]) == 3


def test_selection_projection_cache_counts_its_keys():
    m = model(selection=True, selection_projection=True)
    dec = Decoder(m, budget=4)
    dec.prefill(torch.randint(0, 40, (1, 6)), 2)
    per_slot = (4 * 8 + 4 * 8 + 1 * 8) * 8  # k, v (H=4) and the selector's key (G=1), D=8, float64
    assert dec.kv_bytes() == [4 * per_slot] * 2


def test_batched_pruning_equals_each_sequence_alone():
    m = model(selection=True)
    idx = torch.randint(0, 40, (3, 10))
    batched = m.generate(idx, 15, temperature=0, budget=4)
    for b in range(3):
        assert torch.equal(m.generate(idx[b : b + 1], 15, temperature=0, budget=4), batched[b : b + 1])


def test_decode_past_context_len_with_a_budget():
    m = model(selection=True, context_len=16)
    idx = torch.randint(0, 40, (1, 12))
    out = m.generate(idx, 30, temperature=0, budget=8)  # past context_len: allowed with budgets <= it
    assert out.shape == (1, 42)
    long = torch.randint(0, 40, (1, 20))  # a longer prompt: its first 16 tokens read exactly, the rest pruned
    assert m.generate(long, 3, budget=8).shape == (1, 23)
    with pytest.raises(ValueError, match="prompt length 20 exceeds context_len=16"):
        m.generate(long, 3)
    with pytest.raises(ValueError, match="budget 17 exceeds the model's context_len=16: .* use a budget <= 16"):
        m.generate(idx, 30, budget=[8, 17])
    with pytest.raises(ValueError, match="budget 1000 exceeds the model's context_len=16"):
        Decoder(m, budget=1000)  # was 1,000 slots a layer allocated, never usable


def test_sampling_controls():
    m = model(selection=True)
    idx = torch.randint(0, 40, (2, 5))
    greedy = m.generate(idx, 10, temperature=0)
    assert torch.equal(m.generate(idx, 10, temperature=1.0, top_k=1), greedy)
    a = m.generate(idx, 10, temperature=1.5, generator=torch.Generator().manual_seed(3))
    b = m.generate(idx, 10, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 15)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(budget=0), ValueError, "int >= 2"),
        (dict(budget=1), ValueError, "int >= 2"),
        (dict(budget=[4, True]), ValueError, "int >= 2"),
        (dict(budget=[4]), ValueError, "n_layer=2"),
        (dict(budget="4"), ValueError, "every budget must be an int >= 2 .*got '4'"),
        (dict(budget=torch.tensor([4])), ValueError, "budget has 1 entries but the model has n_layer=2"),
        (dict(threshold=-1.0), ValueError, "threshold must be None or a number >= 0"),
        (dict(threshold=True), ValueError, "threshold must be None or a number >= 0 .*got True"),
        (dict(threshold=float("nan")), ValueError, "threshold must be None or a number >= 0 .*got nan"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "finite number >= 0.*got nan"),  # failed inside multinomial
        (dict(temperature=float("inf")), ValueError, "finite number >= 0.*got inf"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=2.5), ValueError, "top_k must be an int >= 1 or None, got 2.5"),  # failed inside topk
        (dict(suppress_tokens=3), ValueError, r"suppress_tokens must be a sequence of token ids \(e.g. \[3\]\)"),
        (dict(generator=0), ValueError, "generator must be a torch.Generator or None, got 0"),  # ignored at temp. 0
    ],
)
def test_generate_errors(kw, exc, match):
    m = model()
    with pytest.raises(exc, match=match):
        m.generate(torch.zeros(1, 3, dtype=torch.long), 4, **kw)


def test_a_numpy_or_tensor_budget_is_one_int_as_in_a_list():
    m = model(selection=True)
    idx = torch.randint(0, 40, (2, 5))
    expect = m.generate(idx, 6, temperature=0, budget=4)
    for b in (np.int64(4), torch.tensor(4), np.array([4, 4]), torch.tensor([4, 4]), (np.int32(4), 4)):
        assert Decoder(m, budget=b).budgets == [4, 4]
        assert torch.equal(m.generate(idx, 6, temperature=0, budget=b), expect)


def test_step_past_capacity_raises():
    m = model(selection=True)
    idx = torch.randint(0, 40, (1, 4))
    dec = Decoder(m)
    logits = dec.prefill(idx, max_new_tokens=1)
    logits = dec.step(logits.argmax(-1))  # the one step it has room for
    with pytest.raises(ValueError, match=r"max_new_tokens=1.*full after 5 tokens"):
        dec.step(logits.argmax(-1))
    assert dec.caches[0].pos[0].tolist() == [0, 1, 2, 3, 4]  # nothing overwritten
    dec = Decoder(m, threshold=1e9)  # a threshold that never evicts sizes the caches the same way
    logits = dec.prefill(idx, max_new_tokens=1)
    dec.step(logits.argmax(-1))
    with pytest.raises(ValueError, match="larger max_new_tokens"):
        dec.step(logits.argmax(-1))


def test_threshold_that_keeps_everything_cannot_pass_context_len():
    m = model(selection=True, context_len=8)  # F never reaches this threshold: it never evicts
    dec = Decoder(m, threshold=1e9)
    logits = dec.prefill(torch.randint(0, 40, (1, 6)), max_new_tokens=10)
    logits = dec.step(logits.argmax(-1))
    logits = dec.step(logits.argmax(-1))  # 8 tokens attended: the context
    with pytest.raises(ValueError, match="attend to 9 tokens.*context_len=8"):
        dec.step(logits.argmax(-1))
    dec = Decoder(model(selection=True, context_len=8), threshold=0.01)  # one that evicts may go on
    logits = dec.prefill(torch.randint(0, 40, (1, 6)), max_new_tokens=10)
    for _ in range(6):
        logits = dec.step(logits.argmax(-1))
    assert dec._pos == 12 and max(dec.occupancy()) <= 8


def test_step_checks_the_token():
    m = model()
    dec = Decoder(m)
    dec.prefill(torch.randint(0, 40, (2, 3)), 5)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=40\); got range \[0, 40\]"):
        dec.step(torch.tensor([0, 40]))
    with pytest.raises(ValueError, match=r"shape \[B\] = \[2\]"):
        dec.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="integer tensor"):
        dec.step(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="integer tensor"):
        dec.step(torch.tensor([True, False]))  # was read as ids 1 and 0
    with pytest.raises(RuntimeError, match="prefill"):
        Decoder(m).step(torch.tensor([1]))
    # any integer dtype is a token id (uint8 bytes, say), read exactly as long
    a, b = Decoder(m), Decoder(m)
    idx = torch.randint(0, 40, (2, 3))
    torch.testing.assert_close(a.prefill(idx.to(torch.uint8), 2), b.prefill(idx, 2))
    torch.testing.assert_close(a.step(torch.tensor([7, 9], dtype=torch.int16)), b.step(torch.tensor([7, 9])))


def test_prompt_too_long_without_pruning():
    m = model(context_len=16)
    with pytest.raises(ValueError, match="prompt length 17 exceeds context_len=16"):
        m.generate(torch.zeros(1, 17, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"10 \+ max_new_tokens 8 exceeds context_len=16 \+ 1.*max_new_tokens <= 7"):
        m.generate(torch.zeros(1, 10, dtype=torch.long), 8)
    # the last token is sampled from a full context's logits, not attended: 10 + 7 tokens fit a context of 16
    dec = Decoder(m)
    out = dec.generate(torch.zeros(1, 10, dtype=torch.long), 7, temperature=0)
    assert out.shape == (1, 17) and out[0, 16] == m(out[:, :16])[0, -1].argmax()
    assert dec.caches[0].k.shape[2] == 16  # no slot for the token that is never fed back
    assert m.generate(torch.zeros(1, 16, dtype=torch.long), 1, temperature=0).shape == (1, 17)
    # a temperature as a 0-d tensor or a NumPy scalar, as max_new_tokens and top_k take integers
    import numpy as np

    for t in (torch.tensor(0.0), np.float32(0.0)):
        assert torch.equal(m.generate(torch.zeros(1, 10, dtype=torch.long), 3, temperature=t), out[:, :13])
    with pytest.raises(ValueError, match="token ids"):
        m.generate(torch.full((1, 3), 99), 2)


@pytest.mark.parametrize("policy", ["selective", "window", "h2o"])
def test_compiled_decoder_matches_eager(policy):
    """Decoder(compile=True) runs the step through inductor: the same kept tokens, the same logits,
    and one compilation for every step and decoder, for every eviction policy (each picks its victim's
    slot in the step: LayerCache.slot_for_next). Tolerance: the model is float64, but rotary
    angles are computed in float32 by design, and inductor's cos/sin may differ from eager's by an
    fp32 ulp (~6e-8 relative), which the strong test weights amplify ~10x."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    decoding._compiled_decode_one_token.cache_clear()
    m = model(selection=True)
    idx = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    eager, comp = Decoder(m, budget=6, policy=policy), Decoder(m, budget=6, policy=policy, compile=True)
    le, lc = eager.prefill(idx, 10), comp.prefill(idx, 10)
    for _ in range(10):
        tok = le.argmax(-1)
        le, lc = eager.step(tok), comp.step(tok)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        for ce, cc in zip(eager.caches, comp.caches):
            assert torch.equal(ce.pos, cc.pos)
    again = Decoder(m, budget=6, policy=policy, compile=True).generate(idx, 8, temperature=0)  # reuses the step
    assert torch.equal(again, m.generate(idx, 8, temperature=0, budget=6, policy=policy))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_a_call_that_fails_partway_leaves_the_decoder_refusing_steps(monkeypatch):
    """A prefill or step that stops between layers (out of memory, an interrupt) leaves some caches with the call's
    tokens and some without: the next step must refuse until a new prefill, not decode from mixed caches."""
    m = model()
    dec = Decoder(m)
    dec.prefill(torch.randint(0, 40, (1, 20)), 5)

    def boom(*a, **k):
        raise MemoryError("simulated: out of memory in layer 1")

    with monkeypatch.context() as mp:
        mp.setattr(m.blocks[1].attn, "prefill", boom)
        with pytest.raises(MemoryError):
            dec.prefill(torch.randint(0, 40, (1, 3)), 5)
    with pytest.raises(RuntimeError, match="did not finish"):
        dec.step(torch.tensor([7]))
    dec.prefill(torch.randint(0, 40, (1, 6)), 5)
    dec.step(torch.tensor([3]))
    with monkeypatch.context() as mp:
        mp.setattr(m.blocks[1].attn, "step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            dec.step(torch.tensor([4]))
    with pytest.raises(RuntimeError, match="did not finish"):
        dec.step(torch.tensor([4]))  # a retry would have written the token twice in layer 0
    logits = dec.prefill(torch.randint(0, 40, (1, 6)), 5)  # a new prefill serves again
    assert logits.shape == (1, 40)


def test_top_k_samples_among_exactly_k_tokens_when_logits_tie():
    """A threshold at the k-th logit kept every token tied with it: top_k=2 sampled 4 ids, top_k=1 was not greedy."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]]).expand(4000, 5)
    seen = set(decoding.sample(logits, 1.0, 2, gen).tolist())
    assert len(seen) == 2 and 0 in seen
    tied = torch.tensor([[1.0, 3.0, 3.0]]).expand(200, 3)
    assert decoding.sample(tied, 1.0, 1, gen).unique().numel() == 1
