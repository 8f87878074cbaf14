"""Training throughput of the selective LM vs the same-size standard LM (tokens/s, fwd+bwd+AdamW).

Interleaved rounds of ``--steps`` optimizer steps each; the ratio is the median of per-round ratios. Each
mode compares like with like: ``eager`` both models as written, ``compiled`` both under ``torch.compile``
(inductor; the selective model's attention stays the chunked custom ops, run as in eager). Where the chunked
backend's compiled CPU passes run (Numba installed, extra ``[cpu]``), the same run also times the selective model
with its eager passes (``SELECTIVE_ATTENTION_NUMBA=0`` around its steps), so both ratios come from one run.

    python benchmarks/train_throughput.py [--contexts 256 512 1024] [--rounds 5] [--modes eager compiled]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import EAGER_PASSES, eager_passes, with_eager_passes, write

from selective_attention.model import GPT, GPTConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch = tokens / context)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    args = ap.parse_args()
    rows = []
    for T in args.contexts:
        B = max(1, args.tokens // T)
        for mode in args.modes:
            runs = {}
            for name in with_eager_passes(("standard", "selective")):
                torch.manual_seed(0)
                m = GPT(GPTConfig(context_len=T, n_layer=4, n_head=4, d_model=128, selection=name != "standard"))
                opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
                V = m.config.vocab_size
                x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
                run = torch.compile(m, dynamic=False) if mode == "compiled" else m
                eager = name == EAGER_PASSES

                def steps(run=run, opt=opt, x=x, y=y, eager=eager):
                    with eager_passes(eager):
                        for _ in range(args.steps):
                            loss, _ = run(x, y)
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()

                runs[name] = steps
            for f in runs.values():
                f()  # warm-up (and compilation)
            t = {n: [] for n in runs}
            for _ in range(args.rounds):
                for n, f in runs.items():
                    t0 = time.perf_counter()
                    f()
                    t[n].append(B * T * args.steps / (time.perf_counter() - t0))
            per_round = [a / b for a, b in zip(t["selective"], t["standard"])]
            ratio = statistics.median(per_round)
            row = {
                "context": T, "batch": B, "mode": mode,
                "standard tokens/s": f"{statistics.median(t['standard']):,.0f}",
                "selective tokens/s": f"{statistics.median(t['selective']):,.0f}",
                "selective / standard": f"{ratio:.2f}",
                # unrounded, so that a ratio printed at a goal's edge (0.85) can be told from 0.845
                "raw": {"ratio": ratio, "per_round": per_round},
            }  # fmt: skip
            if EAGER_PASSES in t:
                eager = [a / b for a, b in zip(t[EAGER_PASSES], t["standard"])]
                row["selective / standard, eager passes"] = f"{statistics.median(eager):.2f}"
                row["raw"]["eager_passes"] = {"ratio": statistics.median(eager), "per_round": eager}
            rows.append(row)
            print(rows[-1], flush=True)
    title = "LM training throughput, 4 layers d128 4 heads, fp32"
    print(write("train_throughput", rows, [c for c in rows[0] if c != "raw"], title, key=("context", "mode")))


if __name__ == "__main__":
    main()
