"""Decoding with a pruned cache (budget 64) vs the full cache: time per token and KV bytes.

A selective GPT (4 layers, d_model 256, 8 heads, fp32; untrained: pruning cost and memory do not
depend on the weights) is prefilled with a prompt of ``ctx`` tokens and then decodes ``--steps``
tokens one at a time. The per-token time is the median over steps; ratios are medians over
interleaved rounds (full, pruned, full, pruned, ...). KV bytes are the kept keys and values of all
layers after decoding.

    python benchmarks/decode.py [--contexts 128 256 512 1024 2048 4096] [--batch 8] [--plot]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from common import RESULTS, write

from selective_attention.cache import Decoder
from selective_attention.model import GPT, GPTConfig


def per_token_times(dec: Decoder, prompt: torch.Tensor, steps: int) -> list[float]:
    logits = dec.prefill(prompt, steps)
    times = []
    for _ in range(steps):
        tok = logits.argmax(-1)
        t0 = time.perf_counter()
        logits = dec.step(tok)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=256, context_len=max(args.contexts) + args.steps, n_layer=4, n_head=8, d_model=256, selection=True
    )
    model = GPT(cfg).eval()
    rows, raw = [], []
    for ctx in args.contexts:
        prompt = torch.randint(0, 256, (args.batch, ctx), generator=torch.Generator().manual_seed(ctx))
        full_t, pruned_t, ratios = [], [], []
        for _ in range(args.rounds):
            full = statistics.median(per_token_times(Decoder(model), prompt, args.steps))
            pruned_dec = Decoder(model, budget=args.budget)
            pruned = statistics.median(per_token_times(pruned_dec, prompt, args.steps))
            full_t.append(full)
            pruned_t.append(pruned)
            ratios.append(pruned / full)
        full_dec = Decoder(model)
        full_dec.prefill(prompt, args.steps)
        full_bytes, pruned_bytes = sum(full_dec.kv_bytes()), sum(pruned_dec.kv_bytes())
        r = {
            "context": ctx,
            "full ms/token": statistics.median(full_t) * 1e3,
            f"budget {args.budget} ms/token": statistics.median(pruned_t) * 1e3,
            "time ratio": statistics.median(ratios),
            "full KV MiB": full_bytes / 2**20,
            f"budget {args.budget} KV MiB": pruned_bytes / 2**20,
        }
        raw.append(r)
        rows.append({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()})
        print(rows[-1], flush=True)
    title = (
        f"Decode per token, full cache vs budget {args.budget}, B{args.batch}, "
        f"4 layers d256 H8 fp32 (KV = keys + values kept, all layers)"
    )
    print(write("decode", rows, list(rows[0]), title))
    if args.plot:
        plot(raw, args.budget)


def plot(raw: list[dict], budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ctxs = [int(r["context"]) for r in raw]
    for key, style, label in (("full", "k-o", "full cache"), (f"budget {budget}", "C0-o", f"budget {budget}")):
        a1.plot(ctxs, [float(r[f"{key} ms/token"]) for r in raw], style, label=label)
        a2.plot(ctxs, [float(r[f"{key} KV MiB"]) for r in raw], style, label=label)
    a1.set(ylabel="ms per token", title="decode time per token")
    a2.set(yscale="log", ylabel="KV MiB (all layers)", title="KV memory")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(ctxs, [str(c) for c in ctxs])
        a.minorticks_off()
        a.set_xlabel("context length")
        a.grid(True, alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "decode.png", dpi=120)


if __name__ == "__main__":
    if "--replot" in sys.argv:  # redraw from the last results/decode.json
        plot(json.loads((RESULTS / "decode.json").read_text())["rows"], 64)
    else:
        main()
