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
