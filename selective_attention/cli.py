"""The ``selective-attention`` command (also ``python -m selective_attention``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .attention import SelectiveAttention

__all__ = ["main", "demo"]


def _grid(weights: torch.Tensor, labels: Sequence[str]) -> str:
    """Render a ``(Lq, Lk)`` weight matrix as text: a row per query, a column per key, 'x' = removed."""
    w = weights.detach().float().cpu()
    width = max(len(s) for s in labels)
    lines = [" " * (width + 3) + " ".join(f"{s:>4}" for s in labels) + "   <- keys"]
    for i, row in enumerate(w):
        cells = ["   x" if val == 0.0 else f"{val:4.2f}" for val in row.tolist()]
        lines.append(f"{labels[i]:>{width}} | " + " ".join(cells))
    return "\n".join(lines)


def demo(seed: int = 0) -> None:
    """Run the seed README's usage example, then show which keys each query attends to."""
    torch.manual_seed(seed)
    d_model, n_heads, batch_size, seq_len = 512, 8, 32, 64
    Q = torch.randn(batch_size, seq_len, d_model)
    K = torch.randn(batch_size, seq_len, d_model)
    V = torch.randn(batch_size, seq_len, d_model)
    # The seed's mask, verbatim: -inf above the diagonal. Under our rule any infinite entry removes
    # the key, so this is a causal mask.
    selective_mask = (
        torch.triu(torch.ones((seq_len, seq_len), dtype=torch.bool) * float("-inf"), diagonal=1)
        .unsqueeze(0)
        .unsqueeze(1)
        .expand(batch_size, n_heads, seq_len, seq_len)
    )
    attn = SelectiveAttention(d_model, n_heads).eval()
    with torch.no_grad():
        out = attn(Q, K, V, selective_mask=selective_mask)
    print("== The seed's usage example ==")
    print(f"output shape {tuple(out.shape)}  (batch_size, seq_len, d_model)")

    # A small sentence, self-attention, causal plus a selective penalty F on one token.
    words = "the cat sat on the mat".split()
    L = len(words)
    x = torch.randn(1, L, d_model)
    small = SelectiveAttention(d_model, n_heads, dropout=0.0).eval()
    F_mask = torch.zeros(L, L).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("inf"))
    F_mask[3:, 1] = 4.0  # 'cat' penalised by 4 nats for every query from 'on' on
    with torch.no_grad():
        _, w_causal = small(x, x, x, is_causal=True, need_weights=True)
        _, w_sel = small(x, x, x, selective_mask=F_mask, need_weights=True)
    print("\n== Which keys each query attends to (head 0 weights; x = removed, weight exactly 0) ==")
    print("causal only:")
    print(_grid(w_causal[0, 0], words))
    print("\ncausal + F = 4 on 'cat' for queries 'on' onwards (its weight drops by e^-4):")
    print(_grid(w_sel[0, 0], words))
    ratio = (w_sel[0, :, 3:, 1] / w_causal[0, :, 3:, 1]).mean()
    print(f"\nmean weight ratio on 'cat' after F: {ratio.item():.4f} (before renormalisation e^-4 = 0.0183)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selective-attention", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run the seed's example and show which keys each query attends to")
    p_demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
