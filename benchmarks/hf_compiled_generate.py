"""Hugging Face generate with a budgeted SelectiveCache and the model's forward under torch.compile: graphs compiled
per generate step (0 = the prompt), whether the tokens equal eager greedy ones, and ms per token compiled vs eager
(median of the last 50 steps of a second run of each; a quick look, not an interleaved benchmark).

    B=8 T=256 N=60 TIMING=1 OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/hf_compiled_generate.py

env: B (batch), T (prompt), N (new tokens), MODE (forward | inplace | model), LIMIT (dynamo's recompile limit),
NOAUTO=1 (automatic dynamic shapes off), BUDGET (16), PAD=1 (left-pad row 0), TIMING=1 (the timed second runs).
"""

import collections
import os
import statistics
import sys
import time

import torch
import torch._dynamo
import torch._inductor.compile_fx
import transformers
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

import selective_attention.hf as sh

torch.manual_seed(0)
cfg = transformers.LlamaConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
sh.configure(cfg)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="selective").eval()
B = int(os.environ.get("B", 1))
T = int(os.environ.get("T", 32))
N = int(os.environ.get("N", 12))
BUDGET = int(os.environ.get("BUDGET", 16))
if "LIMIT" in os.environ:
    torch._dynamo.config.recompile_limit = int(os.environ["LIMIT"])
if os.environ.get("NOAUTO"):
    torch._dynamo.config.automatic_dynamic_shapes = False
ids = torch.randint(0, 64, (B, T))
mask = torch.ones(B, T, dtype=torch.long)
if os.environ.get("PAD"):  # left-pad row 0 by 5
    mask[0, :5] = 0

step = [0]
stamps = []


class Tick(LogitsProcessor):
    def __call__(self, input_ids, scores):
        stamps.append(time.perf_counter())
        step[0] += 1
        return scores


def gen():
    step[0] = 0
    stamps.clear()
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask,
            cache=sh.SelectiveCache(budget=BUDGET),
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=False,
            logits_processor=LogitsProcessorList([Tick()]),
            pad_token_id=0,
        )


def ms_per_token():
    d = [b - a for a, b in zip(stamps, stamps[1:])][-50:]
    return 1000 * statistics.median(d)


ref = gen()
eager_ms = None
if os.environ.get("TIMING"):
    ref2 = gen()
    assert torch.equal(ref, ref2)
    eager_ms = ms_per_token()

compiles = collections.Counter()


def backend(gm, example_inputs):
    compiles[step[0]] += 1
    return torch._inductor.compile_fx.compile_fx(gm, example_inputs)


if os.environ.get("MODE", "forward") == "forward":
    model.forward = torch.compile(model.forward, backend=backend)
elif os.environ.get("MODE") == "inplace":
    model.compile(backend=backend)
else:
    model = torch.compile(model, backend=backend)
t0 = time.perf_counter()
try:
    out = gen()
except Exception as e:
    print("FAILED:", type(e).__name__, str(e)[:1500])
    sys.exit(1)
t1 = time.perf_counter()
print(f"B={B} T={T} N={N} first compiled generate {t1 - t0:.1f}s")
print("graphs compiled, by step (0 = prefill):", dict(sorted(compiles.items())))
print("equal tokens to eager:", torch.equal(out, ref))
if os.environ.get("TIMING"):
    before = sum(compiles.values())
    out2 = gen()
    print("second run: new graphs", sum(compiles.values()) - before, "equal", torch.equal(out2, ref))
    print(f"ms/token eager {eager_ms:.3f}  compiled {ms_per_token():.3f}")
