"""Does this code still train the demo's models to the bit as the committed demo run did, on this CPU?

The demo's printed numbers (README, ``results/demo_report.json``) are one seed's run on one CPU and one torch, and one
seed's run follows the last bits of every product: commit 3ce0081, which rounds the backward's P differently, moved the
Xeon demo's selective loss from 1.5928 to 1.6040, and the README showed the old numbers for a day. This script trains
the demo's standard and selective models (4 layers, d_model 128, 4 heads, context 512, batch 4, bytes) for 3 AdamW
steps on seeded random bytes and hashes their parameters (a few seconds). A hash that differs from the one recorded
for this CPU, torch and thread count means the demo's numbers have moved: rerun ``selective-attention demo`` from a
fresh clone, update the README and the report, then ``--record``. An equal hash means the kernels round as they did
(the demo's data then takes the same path, barring a data-dependent branch).

    python benchmarks/demo_fingerprint.py            # print this machine's hashes and compare with the record
    python benchmarks/demo_fingerprint.py --record --demo-run "COMMIT, DATE"   # after a fresh-clone demo run here

Records: ``results/demo_fingerprints.json``, keyed by CPU model, family/model/stepping, torch version and threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from selective_attention.machine import commit, cpu_model, cpu_signature
from selective_attention.model import GPT, GPTConfig
from selective_attention.ops import cpu_kernels

RECORDS = Path(__file__).resolve().parents[1] / "results" / "demo_fingerprints.json"
STEPS = 3


def cpu_key() -> str:
    """The CPU (model name and family/model/stepping), the torch build and the thread count."""
    return f"{cpu_model()} ({cpu_signature()}) | torch {torch.__version__} | {torch.get_num_threads()} threads"


def fingerprint(selection: bool) -> str:
    """sha256 (16 hex digits) of the demo-shape model's parameters after ``STEPS`` AdamW steps on seeded bytes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, context_len=512, n_layer=4, n_head=4, d_model=128, selection=selection))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = (torch.randint(0, 256, (4, 512), generator=g) for _ in range(2))
        loss, _ = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="store this machine's hashes in " + RECORDS.name)
    ap.add_argument("--demo-run", help="with --record: which demo run the hashes stand for (commit, date, report)")
    args = ap.parse_args()
    key = cpu_key()
    # the passes the demo runs: the eager ones unless SELECTIVE_ATTENTION_NUMBA is set (run_demo)
    with cpu_kernels.eager_passes(force=False):
        if cpu_kernels.available():
            sys.exit(
                "SELECTIVE_ATTENTION_NUMBA is set and the compiled CPU passes run: the demo's committed numbers are "
                "the eager passes' (the demo's default); unset it."
            )
        now = {"standard": fingerprint(False), "selective": fingerprint(True)}
    print(f"{key}\n  standard {now['standard']}  selective {now['selective']}")
    records = json.loads(RECORDS.read_text()) if RECORDS.exists() else {}
    if args.record:
        records[key] = {**now, "commit": commit(), **({"demo_run": args.demo_run} if args.demo_run else {})}
        RECORDS.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        print(f"recorded in {RECORDS}")
        return 0
    old = records.get(key)
    if old is None:
        same_cpu = sorted(k for k in records if k.rsplit(" | ", 1)[0] == key.rsplit(" | ", 1)[0])
        hint = f"; this CPU has records at: {', '.join(k.rsplit(' | ', 1)[1] for k in same_cpu)}" if same_cpu else ""
        print(
            f"no record for this machine in {RECORDS} (records: {len(records)}{hint}): nothing to compare with "
            "(the thread count changes the GEMMs' summation order, so it is part of the key)."
        )
        return 0
    moved = [name for name in now if now[name] != old[name]]
    if not moved:
        print(f"both equal to the record (commit {old.get('commit')}): the demo's committed numbers hold here.")
        return 0
    print(
        f"{' and '.join(moved)} {'differ' if len(moved) > 1 else 'differs'} from the record of commit "
        f"{old.get('commit')}: this code trains the demo's "
        "models differently in their last bits on this machine, so the demo's committed numbers no longer reproduce "
        "here. Rerun `selective-attention demo` from a fresh clone, update README.md and results/demo_report.json, "
        "then `python benchmarks/demo_fingerprint.py --record`."
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
