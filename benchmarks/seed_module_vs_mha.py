"""Seed-API SelectiveAttention vs nn.MultiheadAttention, forward + backward, same causal mask.

The mask is the seed README's (a float -inf upper triangle expanded to (B, H, L, L)) for our module,
and the same mask as a bool (L, L) ``attn_mask`` for nn.MultiheadAttention. MHA is timed both as
people call it by default (``need_weights=True``, which materialises the weights) and with
``need_weights=False`` (its SDPA path), and as fast as it goes: ``need_weights=False, is_causal=True`` (the mask
as a causal hint, SDPA's causal kernel: the one our module picks when it finds the seed's mask causal). Our module
runs no selection here (the seed's mask only: standard causal attention), so the last column is like against like;
the first two are MHA as most people call it. Ratios < 1 mean we are faster. "projections alone" times the
four d x d linears (forward + backward) that both modules run: the floor neither can go under.

    python benchmarks/seed_module_vs_mha.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import interleaved, median_ratio, write
from torch import nn

from selective_attention import SelectiveAttention

SHAPES = [(32, 64, 512, 8), (4, 1024, 512, 8)]


def bench(B: int, L: int, d: int, H: int, repeats: int) -> dict:
    torch.manual_seed(0)
    ours = SelectiveAttention(d, H, dropout=0.0)
    mha = nn.MultiheadAttention(d, H, dropout=0.0, batch_first=True)
    Q, K, V = (torch.randn(B, L, d, requires_grad=True) for _ in range(3))
    seed_mask = torch.triu(torch.ones(L, L, dtype=torch.bool) * float("-inf"), diagonal=1)[None, None].expand(
        B, H, L, L
    )
    bool_mask = torch.ones(L, L, dtype=torch.bool).triu(1)
    g = torch.randn(B, L, d)

    def run_ours():
        ours(Q, K, V, selective_mask=seed_mask).backward(g)

    def run_mha_default():
        mha(Q, K, V, attn_mask=bool_mask)[0].backward(g)

    def run_mha_fast():
        mha(Q, K, V, attn_mask=bool_mask, need_weights=False)[0].backward(g)

    def run_mha_causal():
        mha(Q, K, V, attn_mask=bool_mask, need_weights=False, is_causal=True)[0].backward(g)

    X = torch.randn(B, L, d, requires_grad=True)

    def run_projections():  # the four d x d linears alone, fwd + bwd: the floor both modules share
        outs = [ours.q_proj(Q), ours.k_proj(K), ours.v_proj(V), ours.out_proj(X)]
        torch.autograd.backward(outs, [g] * 4)

    fns = {"ours": run_ours, "mha": run_mha_default, "mha_nw": run_mha_fast, "mha_c": run_mha_causal,
           "proj": run_projections}  # fmt: skip
    t = interleaved(fns, repeats=repeats)
    ms = {k: 1e3 * statistics.median(v) for k, v in t.items()}
    return {
        "shape": f"B{B} L{L} d{d} H{H}",
        "ours ms": f"{ms['ours']:.1f}",
        "MHA ms": f"{ms['mha']:.1f}",
        "MHA need_weights=False ms": f"{ms['mha_nw']:.1f}",
        "MHA is_causal ms": f"{ms['mha_c']:.1f}",
        "projections alone ms": f"{ms['proj']:.1f}",
        "ours / MHA": f"{median_ratio(t, 'ours', 'mha'):.2f}",
        "ours / MHA need_weights=False": f"{median_ratio(t, 'ours', 'mha_nw'):.2f}",
        "ours / MHA is_causal": f"{median_ratio(t, 'ours', 'mha_c'):.2f}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    rows = [bench(*s, repeats=args.repeats) for s in SHAPES]
    cols = list(rows[0])
    print(write("seed_module_vs_mha", rows, cols, "Seed-API module fwd+bwd vs nn.MultiheadAttention, causal mask"))


if __name__ == "__main__":
    main()
