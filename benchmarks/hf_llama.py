"""A Hugging Face Llama-style model with attn_implementation="selective" vs "sdpa": training and decoding.

The model is the hf-demo's size (4 layers, hidden 256, 8 query heads and 2 key/value heads of 32,
MLP 688, byte vocabulary; untrained: speed and memory do not depend on the weights), fp32 on CPU.

* **Training**: one AdamW step (forward, backward, optimizer) on a batch of ``--batch`` windows of
  ``--contexts`` tokens, "selective" (the paper's F in every layer, through the chunked backend) and
  "sdpa" (HF's standard attention) taking turns; tokens/s and the median per-round ratio. Then both again
  under ``torch.compile`` (``--train-modes``): the selective model's attention stays the chunked custom ops.
* **Decoding** at context ``--decode-context``: the prompt is read, then ``--steps`` tokens are decoded
  one at a time, timing each model call, for (a) "sdpa" with HF's default ``DynamicCache``,
  (b) "selective" with ``SelectiveCache()`` (no budget: exact), (c) "selective" with
  ``SelectiveCache(budget=64)``, and (d) "sdpa" from a 64-token prompt: the floor for any 64-token cache
  (what pruning cannot remove: projections, MLP, per-op cost). They take turns in bursts; per-token
  time is the median, and a time ratio the median over turns of the two decoders' per-turn medians. KV
  bytes count every key/value slot held right after the prompt (a budget b holds b slots per layer).

    python benchmarks/hf_llama.py [--contexts 256 1024] [--batch 4] [--decode-context 2048] [--steps 48]
                                  [--decode-batches 1 8]

Writes results/<cpu>/hf_llama.{json,md} (see common.cpu_results).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import EAGER_PASSES, eager_passes, interleaved, median_ratio, with_eager_passes, write

try:
    import transformers
except ImportError:
    sys.exit("this benchmark needs transformers: pip install -e '.[hf]'")

import selective_attention.hf as sa_hf


def build(impl: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=8192, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    sa_hf.configure(cfg)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)


def train_step_fn(model, ids, eager_passes_on: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with eager_passes(eager_passes_on):
            loss = model(ids, labels=ids).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def kv_bytes(cache) -> int:
    """Bytes of the key/value slots a cache holds: a budgeted SelectiveCache's allocated slots (the budget's); an
    unbudgeted one's stored tokens (its kv_bytes() also counts spare room, the prompt plus 64 slots, which would
    overstate the saving of a budget against it: 0.0303x instead of 0.0312x at context 2048); a DynamicCache's keys
    and values."""
    if isinstance(cache, sa_hf.SelectiveCache):
        if cache.budget is not None:
            return cache.kv_bytes()
        return sum(
            int(layer.cache.valid.sum(-1).max()) * layer.cache.kv_bytes() // layer.cache.capacity
            for layer in cache.layers
            if layer.cache is not None
        )
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


@torch.no_grad()
def decode_times(models: dict, caches: dict, prompts: dict, steps: int, burst: int = 4, warmup: int = 4):
    """Each (model, cache) reads its prompt, then they take turns, ``burst`` tokens at a time. Returns the
    per-token times, one list per turn (round) of each, and each cache's KV bytes right after its prompt."""
    nxt, kv = {}, {}
    for name, model in models.items():
        out = model(prompts[name], cache=caches[name], use_cache=True)
        kv[name] = kv_bytes(caches[name])
        nxt[name] = out.logits[:, -1:].argmax(-1)
        for _ in range(warmup):
            nxt[name] = model(nxt[name], cache=caches[name], use_cache=True).logits[:, -1:].argmax(-1)
    rounds = {name: [] for name in models}
    for _ in range(0, steps, burst):
        for name, model in models.items():
            rounds[name].append([])
            for n in range(burst):
                t0 = time.perf_counter()
                nxt[name] = model(nxt[name], cache=caches[name], use_cache=True).logits[:, -1:].argmax(-1)
                if n:  # the first token of a turn pays for the other model's data in the caches
                    rounds[name][-1].append(time.perf_counter() - t0)
    return rounds, kv


def round_ratio(rounds: dict, name: str, baseline: str) -> float:
    """Median over rounds of the ratio of the two decoders' median per-token times in that round (the rounds run
    back to back, so a change in the machine's load hits both)."""
    return statistics.median(
        statistics.median(a) / statistics.median(b) for a, b in zip(rounds[name], rounds[baseline])
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-context", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--train-modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    args = ap.parse_args()
    sa_hf.register()
    rows = []
    # where the chunked backend's compiled CPU passes run (Numba, extra [cpu]), the same rounds also time the selective
    # model with its eager passes (SELECTIVE_ATTENTION_NUMBA=0 around its steps): both ratios from one run
    impls = with_eager_passes(("selective", "sdpa"))
    for mode in args.train_modes:
        models = {impl: build("selective" if impl == EAGER_PASSES else impl).train() for impl in impls}
        if mode == "compiled":  # both under torch.compile (static shapes: one graph per context), like with like
            models = {impl: torch.compile(m, dynamic=False) for impl, m in models.items()}
        for L in args.contexts:
            ids = torch.randint(0, 256, (args.batch, L), generator=torch.Generator().manual_seed(L))
            steps = {impl: train_step_fn(m, ids, impl == EAGER_PASSES) for impl, m in models.items()}
            t = interleaved(steps, args.repeats, 1)
            tok = args.batch * L
            ratio = 1 / median_ratio(t, "selective", "sdpa")
            row = {
                "measure": f"training step, ctx {L}, batch {args.batch}" + (", compiled" if mode == "compiled" else ""),
                "sdpa": f"{tok / statistics.median(t['sdpa']):,.0f} tok/s",
                "selective": f"{tok / statistics.median(t['selective']):,.0f} tok/s",
                "ratio": f"{ratio:.2f}x throughput",
                "raw": {"throughput_ratio": ratio},  # unrounded (a goal's edge)
            }  # fmt: skip
            if EAGER_PASSES in t:
                eager = 1 / median_ratio(t, EAGER_PASSES, "sdpa")
                row["ratio"] += f" (eager CPU passes: {eager:.2f}x)"
                row["raw"]["eager_passes_throughput_ratio"] = eager
            rows.append(row)
            print(rows[-1], flush=True)
    L = args.decode_context
    std = build("sdpa").eval()
    models = {"sdpa": std, "full": build("selective").eval(), "pruned": build("selective").eval(), "floor": std}
    for B in args.decode_batches:
        prompt = torch.randint(0, 256, (B, L), generator=torch.Generator().manual_seed(0))
        caches = {
            "sdpa": transformers.DynamicCache(config=models["sdpa"].config),
            "full": sa_hf.SelectiveCache(),
            "pruned": sa_hf.SelectiveCache(budget=args.budget),
            # the floor for any cache of `budget` tokens: sdpa itself with that few keys (its cache grows from
            # `budget` by the warmup and measured tokens, to ~116 with the defaults: at this size attention is
            # a small part of a step, so the floor is overestimated only slightly)
            "floor": transformers.DynamicCache(config=std.config),
        }
        prompts = {name: prompt[:, : args.budget] if name == "floor" else prompt for name in models}
        rounds, kv = decode_times(models, caches, prompts, args.steps)
        ms = {k: 1e3 * statistics.median(t for r in v for t in r) for k, v in rounds.items()}
        for name, label in [("sdpa", "sdpa + DynamicCache"), ("full", "selective + SelectiveCache()")]:
            rows.append({
                "measure": f"decode, ctx {L}, batch {B}: SelectiveCache(budget={args.budget}) vs {label}",
                "sdpa": f"{ms[name]:.2f} ms/token, KV {kv[name] / 2**20:.2f} MiB",
                "selective": f"{ms['pruned']:.2f} ms/token, KV {kv['pruned'] / 2**20:.3f} MiB",
                "ratio": f"{round_ratio(rounds, 'pruned', name):.2f}x time, {kv['pruned'] / kv[name]:.4f}x KV",
                "raw": {"time_ratio": round_ratio(rounds, "pruned", name), "kv_ratio": kv["pruned"] / kv[name]},
            })  # fmt: skip
            print(rows[-1], flush=True)
        rows.append({
            "measure": f"decode, batch {B}: sdpa + DynamicCache from a {args.budget}-token prompt (the floor for any "
                       f"{args.budget}-token cache) vs the same at ctx {L}",
            "sdpa": f"{ms['sdpa']:.2f} ms/token",
            "selective": f"{ms['floor']:.2f} ms/token (sdpa)",
            "ratio": f"{round_ratio(rounds, 'floor', 'sdpa'):.2f}x time",
            "raw": {"time_ratio": round_ratio(rounds, "floor", "sdpa")},
        })  # fmt: skip
        print(rows[-1], flush=True)
    md = write(
        "hf_llama",
        rows,
        ["measure", "sdpa", "selective", "ratio"],
        "HF Llama-style model (4 layers, hidden 256, 8 q / 2 kv heads), selective vs baseline, fp32 CPU",
    )
    print(md)


if __name__ == "__main__":
    main()
