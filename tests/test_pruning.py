"""Loss with a pruned cache and the per-layer budget search."""

import torch
import torch.nn.functional as F

from selective_attention.model import GPT, GPTConfig
from selective_attention.pruning import pruned_loss, search_budgets


def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=40, context_len=32, n_layer=2, n_head=2, d_model=16, selection=True)).double()
    for b in m.blocks:
        b.attn.qkv.weight.data *= 6
    return m.eval()


def test_unpruned_loss_equals_full_forward():
    m = model()
    x, y = torch.randint(0, 40, (3, 24)), torch.randint(0, 40, (3, 24))
    loss, occ = pruned_loss(m, x, y)
    with torch.no_grad():
        ref = F.cross_entropy(m(x).reshape(-1, 40), y.reshape(-1)).item()
    assert abs(loss - ref) < 1e-10
    assert occ == [24, 24]


def test_search_stays_within_tolerance_and_shrinks_budgets():
    m = model()
    x = torch.randint(0, 40, (2, 24))
    y = torch.roll(x, -1, 1)
    res = search_budgets(m, x, y, tolerance=0.05)
    assert len(res.budgets) == 2 and all(1 <= b <= 24 for b in res.budgets)
    assert res.loss <= res.full_loss + 0.05 + 1e-12
    assert res.memory_ratio == 24 * 2 / sum(res.budgets)
    # every accepted trial met the tolerance; a smaller budget for layer 0 alone did not
    loss_tighter, _ = pruned_loss(m, x, y, budget=[res.budgets[0] - 1, 24]) if res.budgets[0] > 1 else (1e9, None)
    assert loss_tighter > res.full_loss + 0.05 or res.budgets[0] == 1
    assert res.evaluations
