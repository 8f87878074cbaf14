"""The per-layer cache and its eviction policy, as plain tensors (no model)."""

import ast
import inspect

import pytest
import torch

from selective_attention import kv_cache
from selective_attention.kv_cache import LayerCache, evictions, fcum_after_prompt, keep_after_prefill
from selective_attention.selection import selection_penalty


def test_imports_nothing_from_the_model():
    tree = ast.parse(inspect.getsource(kv_cache))
    local = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert local <= {"selection"}


def test_evictions_take_the_largest_fcum_oldest_on_ties_never_the_first():
    pos = torch.tensor([[0, 1, 2, 3]])
    fcum = torch.tensor([[[9.0, 2.0, 5.0, 5.0]]])  # [B, G, cap]: position 0 has the largest, but is protected
    assert evictions(fcum, pos, budget=4, threshold=None).tolist() == [[False, False, True, False]]  # full: one
    assert not evictions(fcum, pos, budget=5, threshold=None).any()  # room left: none
    assert evictions(fcum, pos, budget=None, threshold=3.0).tolist() == [[False, False, True, True]]
    # over the threshold first, then the largest remaining if still full
    assert evictions(fcum, pos, budget=3, threshold=4.0).tolist() == [[False, False, True, True]]
    free = torch.tensor([[0, -1, 2, 3]])  # a free slot is never a victim and does not count
    assert not evictions(fcum, free, budget=4, threshold=None).any()


def test_per_head_fcum_counts_the_least_masking_head():
    pos = torch.tensor([[0, 1, 2]])
    fcum = torch.tensor([[[0.0, 9.0, 1.0], [0.0, 0.5, 2.0]]])  # [B, G=2, cap]: min over heads 0.5, 1.0
    assert evictions(fcum, pos, budget=3, threshold=None).tolist() == [[False, False, True]]


def evict_one_at_a_time(score, budget, threshold):
    kept = [j for j in range(len(score)) if j == 0 or threshold is None or score[j] <= threshold]
    while budget is not None and len(kept) > budget:
        kept.remove(max((j for j in kept if j), key=lambda j: (score[j], -j)))
    return kept


@pytest.mark.parametrize("budget, threshold", [(2, None), (5, None), (None, 1.0), (4, 1.5), (20, None)])
def test_keep_after_prefill_equals_evicting_one_at_a_time(budget, threshold):
    score = torch.tensor([[0.0, 3.0, 1.0, 1.0, 0.5, 2.0, 1.0, 0.0, 4.0, 1.0]])
    keep = keep_after_prefill(score, budget, threshold)
    assert keep[0].nonzero().squeeze(-1).tolist() == evict_one_at_a_time(score[0].tolist(), budget, threshold)


def test_fcum_after_prompt_is_the_penalty_of_the_next_query():
    qs, ks = torch.randn(2, 3, 11, 8, dtype=torch.float64), torch.randn(2, 3, 11, 8, dtype=torch.float64)
    pad = torch.zeros_like(qs[:, :, :1])
    F = selection_penalty(torch.cat([qs, pad], 2), torch.cat([ks, pad], 2))  # [B, G, T + 1, T + 1]
    torch.testing.assert_close(fcum_after_prompt(qs, ks, chunk=4), F[:, :, -1, :-1], rtol=1e-12, atol=1e-12)


def test_layer_cache_write_make_room_vote():
    c = LayerCache.empty(1, 3, n_heads=2, n_groups=1, head_dim=4, budget=3, dtype=torch.float64)
    assert c.occupancy().tolist() == [0] and c.kv_bytes() == 2 * 1 * 2 * 3 * 4 * 8  # every slot counts
    k = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    c.fill(k, k, torch.tensor([[[0.0, 7.0, 1.0, 3.0, 0.0]]], dtype=torch.float64))  # keeps 0 and the 2 smallest
    assert c.pos.tolist() == [[0, 2, 4]] and c.fcum[0, 0].tolist() == [0.0, 1.0, 0.0]
    c.make_room()  # full: the largest Fcum goes
    assert c.pos.tolist() == [[0, -1, 4]] and c.fcum[0, 0, 1] == float("inf")
    slot = c.write(k[:, :, :1], k[:, :, :1], torch.tensor([5]))
    assert slot.tolist() == [1] and c.pos.tolist() == [[0, 5, 4]] and c.fcum[0, 0, 1] == 0
    c.add_votes(torch.tensor([[[[-1.0, 2.0, 3.0]]]], dtype=torch.float64), slot)  # not pos 0, not the new one
    assert c.fcum[0, 0].tolist() == [0.0, 0.0, 3.0]
    assert c.attended_next() == 3  # one evicted, the new one written
    with pytest.raises(ValueError, match="budget=3 has exactly that many slots"):
        LayerCache.empty(1, 4, n_heads=2, n_groups=1, head_dim=4, budget=3)


@pytest.mark.parametrize("budget, threshold", [(2, None), (4, None), (None, 1.0), (3, 1.5)])
@pytest.mark.parametrize("pad", [0, 3])
def test_keep_after_prefill_with_left_padding_is_the_unpadded_rule_shifted(budget, threshold, pad):
    """Padding is never kept; the protected token is the first real one."""
    real = [0.0, 3.0, 1.0, 1.0, 0.5, 2.0, 1.0]
    score = torch.tensor([[9.0] * pad + real])
    kpm = torch.tensor([[True] * pad + [False] * len(real)])
    keep = keep_after_prefill(score, budget, threshold, kpm)
    assert keep[0].nonzero().squeeze(-1).tolist() == [pad + j for j in evict_one_at_a_time(real, budget, threshold)]


def test_fcum_after_prompt_with_padding_equals_the_unpadded_prompt():
    g = torch.Generator().manual_seed(0)
    qs, ks = (torch.randn(1, 2, 9, 8, dtype=torch.float64, generator=g) for _ in range(2))
    pad = torch.randn(1, 2, 3, 8, dtype=torch.float64, generator=g)  # padding's values must not matter
    kpm = torch.tensor([[True] * 3 + [False] * 9])
    padded = fcum_after_prompt(torch.cat([pad, qs], 2), torch.cat([pad, ks], 2), scale=0.3, key_padding_mask=kpm)
    torch.testing.assert_close(padded[..., 3:], fcum_after_prompt(qs, ks, scale=0.3), rtol=1e-12, atol=1e-12)
    assert padded[..., :3].abs().sum() == 0 and padded[..., 3].abs().sum() == 0  # no votes for padding, or the first


def test_fill_with_padding_counts_positions_from_the_first_real_token_and_grown_keeps_everything():
    c = LayerCache.empty(2, 6, n_heads=1, n_groups=1, head_dim=2, dtype=torch.float64)
    k = torch.arange(2 * 5 * 2, dtype=torch.float64).view(2, 1, 5, 2)
    kpm = torch.tensor([[True, True, False, False, False], [False] * 5])
    c.fill(k, k, torch.zeros(2, 1, 5, dtype=torch.float64), key_padding_mask=kpm)
    assert c.pos.tolist() == [[0, 1, 2, -1, -1, -1], [0, 1, 2, 3, 4, -1]]  # padding is not stored
    torch.testing.assert_close(c.k[0, 0, :3], k[0, 0, 2:])
    big = c.grown(9)
    assert big.capacity == 9 and big.pos[:, :6].tolist() == c.pos.tolist() and (big.pos[:, 6:] == -1).all()
    torch.testing.assert_close(big.k[:, :, :6], c.k)
    assert (big.fcum[:, :, 6:] == float("inf")).all()
    big.write(k[:, :, :1], k[:, :, :1], torch.tensor([3, 5]))  # one position per sequence
    assert big.pos[:, :6].tolist() == [[0, 1, 2, 3, -1, -1], [0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="unbudgeted"):
        LayerCache.empty(1, 3, n_heads=1, n_groups=1, head_dim=2, budget=3).grown(6)


def test_bf16_caches_keep_their_running_sums_in_fp32():
    # one step's vote added to a bf16 Fcum of ~128 rounds away: Fcum stopped growing, the eviction order changed
    c = LayerCache.empty(1, 2, n_heads=1, n_groups=1, head_dim=2, dtype=torch.bfloat16)
    assert c.k.dtype == torch.bfloat16 and c.fcum.dtype == torch.float32
    c.pos[:] = torch.tensor([[0, 1]])
    c.fcum[:] = 0
    for _ in range(1000):
        c.add_votes(torch.full((1, 1, 1, 2), 0.5, dtype=torch.bfloat16), torch.tensor([0]))
    assert c.fcum[0, 0, 1].item() == 500.0  # bf16 stopped at 128
    # the prompt's F too: 300 rows each voting 0.5 on key 1 sum to 149.5, not a bf16 value near 128
    qs = torch.zeros(1, 1, 300, 2, dtype=torch.bfloat16)
    qs[..., 0] = 1.0
    ks = torch.zeros(1, 1, 300, 2, dtype=torch.bfloat16)
    ks[0, 0, 1, 0] = 0.5 * 2**0.5  # logit q.k / sqrt(2) = 0.5 for every row after key 1
    f = fcum_after_prompt(qs, ks)
    assert f.dtype == torch.float32 and f[0, 0, 1].item() == 0.5 * 298


def test_a_cache_built_directly_checks_its_budget():
    # budget 1 leaves no slot but the first token's: the first step evicted the protected token
    with pytest.raises(ValueError, match="every budget must be an int >= 2"):
        LayerCache.empty(1, 1, n_heads=1, n_groups=1, head_dim=2, budget=1)


def test_step_multiplies_no_subnormal_weights(monkeypatch):
    """A trained model's F sends some attention weights into subnormal numbers (below 1.2e-38 in float32), which cost
    Intel CPUs a microcode assist per operation: the step flushes weights below 2^-100 before they multiply v. Here
    Fcum puts weights of ~1e-40 on half the keys; every matmul operand is checked, and the output is the weights'
    (those weights contribute ~1e-40 of a row that sums to 1)."""
    B, H, T, D = 2, 2, 16, 8
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(2))
    q = torch.zeros(B, H, 1, D)  # every logit 0: the weights are exp(-Fcum) / sum
    fcum = torch.zeros(B, 1, T)
    fcum[..., 1::2] = 92.0  # exp(-92) = 1.1e-40: subnormal in float32
    cache = LayerCache.empty(B, T + 1, n_heads=H, n_groups=1, head_dim=D)
    cache.fill(k, v, fcum)
    found, products = [], {name: getattr(torch, name) for name in ("matmul", "bmm", "baddbmm")}

    def spy(name):
        def call(*args, **kw):
            operands = args[1:3] if name == "baddbmm" else args[:2]
            found.extend(int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum()) for t in operands)
            return products[name](*args, **kw)

        return call

    k_new, v_new = torch.randn(B, H, 1, D, generator=gen), torch.randn(B, H, 1, D, generator=gen)
    for name in products:
        monkeypatch.setattr(torch, name, spy(name))
    y = cache.step(q, k_new, v_new, torch.tensor([T]))
    for name, f in products.items():
        monkeypatch.setattr(torch, name, f)
    assert found and sum(found) == 0, f"{sum(found)} subnormal matmul operands"
    kept = torch.cat([v[:, :, 0::2], v_new], dim=2)  # Fcum 0: keys 0, 2, ..., 14 and the new one, equal weights
    torch.testing.assert_close(y, kept.mean(dim=2, keepdim=True))


def test_step_is_differentiable():
    """A step run with gradients (a Hugging Face training forward through a SelectiveCache does this): the flush of
    tiny weights is out of place, so softmax's backward still has its output; gradients equal plain attention's
    over the kept keys."""
    B, H, T, D = 1, 2, 6, 4
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(2))
    cache = LayerCache.empty(B, T + 1, n_heads=H, n_groups=1, head_dim=D)
    cache.fill(k, v, torch.zeros(B, 1, T))
    q = torch.randn(B, H, 1, D, generator=gen, requires_grad=True)
    k_new, v_new = torch.randn(B, H, 1, D, generator=gen), torch.randn(B, H, 1, D, generator=gen)
    y = cache.step(q, k_new, v_new, torch.tensor([T]))
    (g,) = torch.autograd.grad(y.sum(), q)
    q2 = q.detach().requires_grad_()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q2, torch.cat([k, k_new], dim=2), torch.cat([v, v_new], dim=2)
    )
    (g_ref,) = torch.autograd.grad(ref.sum(), q2)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(g, g_ref)


def test_a_step_refused_for_its_query_leaves_the_cache_unchanged():
    B, H, T, D = 2, 2, 5, 4
    gen = torch.Generator().manual_seed(2)
    k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(2))
    cache = LayerCache.empty(B, T + 1, n_heads=H, n_groups=1, head_dim=D)  # one free slot for the step
    cache.fill(k, v, torch.zeros(B, 1, T))
    before = {n: getattr(cache, n).clone() for n in ("k", "v", "fcum", "pos")}
    k_new, v_new = torch.randn(B, H, 1, D, generator=gen), torch.randn(B, H, 1, D, generator=gen)
    bad = [(B, H, 1, D + 1), (B, H, 2, D), (B + 1, H, 1, D), (B, 3, 1, D)]
    for q in (torch.randn(*shape) for shape in bad):
        with pytest.raises(ValueError, match=r"q must be \[B=2, H, 1, D=4\] .* the cache is unchanged"):
            cache.step(q, k_new, v_new, torch.tensor([T]))
        for n, x in before.items():  # the token was written before the bad q raised
            assert torch.equal(getattr(cache, n), x), n


@pytest.mark.parametrize("policy", ["selective", "window", "h2o"])
def test_slot_for_next_leaves_the_state_of_make_room_then_the_first_free_slot(policy):
    """A step's fast room-making (at most one victim, whose slot the new token takes) against the general one
    (mark every dropped slot free, then take the first free slot): the same slots and the same buffers, over many
    random states with tied scores, shuffled slots, free slots and full rows."""
    g = torch.Generator().manual_seed(0)
    cap = B = 6
    for trial in range(60):
        fast = LayerCache.empty(
            B, cap, n_heads=1, n_groups=2, head_dim=2, budget=cap, policy=policy, dtype=torch.float64,
            selector_keys=True,
        )  # fmt: skip
        for b in range(B):
            n = int(torch.randint(1, cap + 1, (1,), generator=g)) if b else cap  # row 0 full, the others at random
            slots = torch.randperm(cap, generator=g)[:n]
            ages = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(3 * cap, generator=g)[: n - 1]])
            fast.pos[b, slots] = ages
            fast.fcum[b, :, slots] = torch.randint(0, 3, (2, n), generator=g).double()  # few values: ties
            if fast.acc is not None:
                fast.acc[b, slots] = torch.randint(0, 3, (n,), generator=g).double()
        ref = LayerCache(**{f: (t.clone() if isinstance(t, torch.Tensor) else t) for f, t in vars(fast).items()})
        ref.make_room()
        want = ref.pos.argmin(dim=-1)
        got = fast.slot_for_next()
        assert torch.equal(got, want), trial
        # the slot the token takes is the victim's or a free one; writing it makes the two states equal
        for c, slot in ((fast, got), (ref, want)):
            c.write(torch.ones(B, 1, 1, 2, dtype=torch.float64), torch.ones(B, 1, 1, 2, dtype=torch.float64),
                    torch.full((B,), 99), ks=torch.ones(B, 2, 1, 2, dtype=torch.float64), slot=slot)  # fmt: skip
        for name in ("pos", "fcum", "k", "v", "ks", "acc"):
            a, b = getattr(fast, name), getattr(ref, name)
            assert (a is None and b is None) or torch.equal(a, b), (trial, name)


@pytest.mark.parametrize("policy", ["selective", "window", "h2o"])
def test_a_step_writes_to_the_first_free_slot_before_evicting_any_kept_token(policy):
    """The fast slot choice takes the largest of each rule's candidates and the free slots, so every rule must score a
    free slot above any kept token, the extremes included: a kept token at Fcum = +inf (an overflowed sum), at the
    largest finite Fcum, at the smallest acc (0, tied with a free slot's), or the oldest after the first."""
    c = LayerCache.empty(2, 5, n_heads=1, n_groups=1, head_dim=2, budget=5, policy=policy, dtype=torch.float64)
    c.pos[:] = torch.tensor([[0, 1, -1, 2, -1], [0, 3, 1, -1, 2]])
    c.fcum[:, 0] = torch.tensor([[0.0, float("inf"), float("inf"), torch.finfo(torch.float64).max, float("inf")],
                                 [0.0, 0.0, torch.finfo(torch.float64).max, float("inf"), float("inf")]])  # fmt: skip
    if c.acc is not None:
        c.acc[:] = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 0.0]])
    assert c.slot_for_next().tolist() == [2, 3]  # each row's first free slot; nothing evicted
    assert c.pos.tolist() == [[0, 1, -1, 2, -1], [0, 3, 1, -1, 2]]


@pytest.mark.parametrize("policy", ["selective", "h2o"])
def test_a_nan_score_does_not_send_a_step_onto_the_first_token(policy):
    """A model that already produces NaN gives a NaN Fcum (or acc): the step still takes the slot make_room's path
    takes (the first free one, not slot 0, the first token's), in a row with free slots and in a full one."""
    nan = float("nan")
    recent = 1 if policy == "h2o" else None
    c = LayerCache.empty(2, 4, n_heads=1, n_groups=1, head_dim=2, budget=4, policy=policy, recent=recent)
    c.pos[:] = torch.tensor([[0, 1, -1, -1], [0, 1, 2, 3]])
    c.fcum[:, 0] = torch.tensor([[0.0, nan, float("inf"), float("inf")], [0.0, nan, 1.0, 0.0]])
    if c.acc is not None:
        c.acc[:] = torch.tensor([[1.0, nan, 0.0, 0.0], [1.0, nan, 0.0, 0.0]])
    ref = LayerCache(**{f: (t.clone() if isinstance(t, torch.Tensor) else t) for f, t in vars(c).items()})
    ref.make_room()
    assert c.slot_for_next().tolist() == ref.pos.argmin(dim=-1).tolist()
    assert c.slot_for_next()[0].item() == 2


def test_slot_for_next_with_spare_slots_evicts_like_make_room():
    """A cache built directly with more slots than its budget (empty() refuses that; the dataclass does not) takes
    the general path: a row at its budget evicts before writing, even with free slots left."""
    c = LayerCache.empty(1, 4, n_heads=1, n_groups=1, head_dim=2, budget=4, dtype=torch.float64)
    c = LayerCache(**{**vars(c), "budget": 3})
    c.pos[0, :3] = torch.tensor([0, 1, 2])
    c.fcum[0, 0, :3] = torch.tensor([0.0, 5.0, 1.0])
    slot = c.slot_for_next()
    assert c.pos[0].tolist() == [0, -1, 2, -1] and slot.tolist() == [1]  # position 1 (the largest F) went


def test_is_int_takes_integers_of_every_kind_but_no_bool():
    import numpy as np

    from selective_attention.kv_cache import is_int

    assert all(is_int(x) for x in (3, np.int64(3), torch.tensor(3)))
    assert not any(is_int(x) for x in (True, torch.tensor(True), 3.0, torch.tensor(3.0), "3"))  # True indexes as 1
