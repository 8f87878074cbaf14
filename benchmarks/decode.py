"""Decoding with a pruned cache (budget 64) vs the full cache: time per token and KV bytes.

A selective GPT (4 layers, d_model 256, 8 heads, fp32; untrained: pruning cost and memory do not
depend on the weights) is prefilled with a prompt of ``ctx`` tokens and then decodes ``--steps``
tokens one at a time, each kind of decoder eager and compiled (``Decoder(compile=True)``). The
decoders take turns of a few steps (full, full compiled, pruned, pruned compiled, full, ...) after
untimed warm-up steps (which also absorb compilation), so that load on a shared machine hits all.
The per-token time is the median over steps; a ratio is the median over rounds of the per-round
ratio: "eager" compares the eager decoders, "best/best" the faster of each kind. KV bytes are every
allocated key/value slot of all layers right after the prompt (``Decoder.kv_bytes``): a budget b is
b slots, the newest token included.

    python benchmarks/decode.py [--contexts 128 256 512 1024 2048 4096] [--batch 8] [--plot]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from common import cpu_results, side_path, write

from selective_attention.decoding import Decoder
from selective_attention.model import GPT, GPTConfig


def paired_step_times(
    decoders: list[Decoder], prompt: torch.Tensor, steps: int, burst: int = 4, warmup: int = 8
) -> list[list[float]]:
    """Prefill every decoder and take ``warmup`` untimed steps with each, then let them take turns,
    ``burst`` steps each, so that a burst of load on this shared machine lands on both, not on one.
    The first step of each turn is not timed (it pays for the other decoder's data in the CPU
    caches). Returns each decoder's timed step times."""
    turns = -(-steps // burst)  # whole turns: burst * turns >= steps steps are taken
    logits = [dec.prefill(prompt, warmup + turns * burst) for dec in decoders]
    for i, dec in enumerate(decoders):  # untimed: the first steps after a prefill pay for allocations
        for _ in range(warmup):
            logits[i] = dec.step(logits[i].argmax(-1))
    times: list[list[float]] = [[] for _ in decoders]
    for _ in range(turns):
        for i, dec in enumerate(decoders):
            for n in range(burst):
                tok = logits[i].argmax(-1)
                t0 = time.perf_counter()
                logits[i] = dec.step(tok)
                if n:
                    times[i].append(time.perf_counter() - t0)
    return times


def kv_after_prefill(dec: Decoder, prompt: torch.Tensor) -> int:
    dec.prefill(prompt)  # max_new_tokens=0: the full cache holds the prompt, no spare slot
    return sum(dec.kv_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32, help="timed steps per decoder and round (>= 1)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}.")

    # one compiled step graph per cache shape: the full cache has a new shape at every context
    torch._dynamo.config.recompile_limit = 4 * len(args.contexts) + 8
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=256,
        context_len=max(args.contexts) + 8 + -(-args.steps // 4) * 4,  # paired_step_times' warm-up and whole turns
        n_layer=4,
        n_head=8,
        d_model=256,
        selection=True,
    )
    model = GPT(cfg).eval()
    rows, raw = [], []
    b = args.budget
    kinds = {  # name -> (budget, compile)
        "full": (None, False),
        "full compiled": (None, True),
        f"budget {b}": (b, False),
        f"budget {b} compiled": (b, True),
    }
    for ctx in args.contexts:
        prompt = torch.randint(0, 256, (args.batch, ctx), generator=torch.Generator().manual_seed(ctx))
        times = {k: [] for k in kinds}
        ratios, best_ratios = [], []
        for _ in range(args.rounds):
            decs = [Decoder(model, budget=kb, compile=kc) for kb, kc in kinds.values()]
            per_round = dict(zip(kinds, map(statistics.median, paired_step_times(decs, prompt, args.steps))))
            for k, v in per_round.items():
                times[k].append(v)
            ratios.append(per_round[f"budget {b}"] / per_round["full"])
            best_full = min(per_round["full"], per_round["full compiled"])
            best_ratios.append(min(per_round[f"budget {b}"], per_round[f"budget {b} compiled"]) / best_full)
        # KV bytes at the context itself: right after the prompt, before any decoded token
        full_bytes, pruned_bytes = (kv_after_prefill(Decoder(model, budget=kb), prompt) for kb in (None, b))
        r = {"context": ctx, **{f"{k} ms/token": statistics.median(v) * 1e3 for k, v in times.items()}}
        r |= {
            "eager ratio": statistics.median(ratios),
            "eager ratio range": f"{min(ratios):.2f}-{max(ratios):.2f}",
            "best/best ratio": statistics.median(best_ratios),
            "full KV MiB": full_bytes / 2**20,
            f"budget {b} KV MiB": pruned_bytes / 2**20,
        }
        raw.append(r)
        rows.append({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()})
        print(rows[-1], flush=True)
    title = (
        f"Decode per token, full cache vs budget {args.budget}, B{args.batch}, "
        f"4 layers d256 H8 fp32 (KV = every allocated key/value slot, all layers; budget b = b slots)"
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
    lines = (
        ("full", "k-o", "full cache"),
        ("full compiled", "k--x", "full cache, compiled"),
        (f"budget {budget}", "C0-o", f"budget {budget}"),
        (f"budget {budget} compiled", "C0--x", f"budget {budget}, compiled"),
    )
    for key, style, label in lines:
        if f"{key} ms/token" in raw[0]:
            a1.plot(ctxs, [float(r[f"{key} ms/token"]) for r in raw], style, label=label)
        if f"{key} KV MiB" in raw[0]:
            a2.plot(ctxs, [float(r[f"{key} KV MiB"]) for r in raw], style[:-2] + "-o", label=label)
    a1.set(yscale="log", ylabel="ms per token", title="decode time per token")
    a2.set(yscale="log", ylabel="KV MiB (all layers)", title="KV memory")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(ctxs, [str(c) for c in ctxs])
        a.minorticks_off()
        a.set_xlabel("context length")
        a.grid(True, alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(side_path("decode", ".png"), dpi=120)


if __name__ == "__main__":
    if "--replot" in sys.argv:  # redraw from this CPU's last results/<cpu>/decode.json
        plot(json.loads((cpu_results() / "decode.json").read_text())["rows"], 64)
    else:
        main()
