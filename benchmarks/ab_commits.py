"""Paper mode of another commit against this checkout's, in one process, taking turns (an A/B of the code).

Separate runs on a shared machine differ by 5-20% (benchmarks/README.md), more than most changes to the
chunked path. Here both versions run in the same process on the same inputs: each round times SDPA causal,
then the two versions in alternating order; the ratios are medians of per-round ratios. The other commit's
package is extracted with ``git archive`` into a temporary folder and imported under another name, so the
two share nothing but torch. Outputs are checked equal first (fp32, 1e-4; attention mode only: ``--lm`` times the
two models' training steps without comparing their losses).

    python benchmarks/ab_commits.py 23e20f5                     # that commit against this checkout
    python benchmarks/ab_commits.py 23e20f5 --shapes 1,8,64,2048 2,4,32,1024 --rounds 15
    python benchmarks/ab_commits.py 23e20f5 --lm 256 1024       # the LM's training step instead (train_throughput's)

Time attention inside the model too before keeping a change: tiles that skipped the diagonal's upper half timed
0.96-0.99 of the old attention alone and 1.01-1.065 of the old training step (contexts 256-1024; reverted).
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import torch
import torch.nn.functional as F
from common import interleaved, machine, median_ratio

from selective_attention.functional import selective_attention

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ["1,8,64,1024", "1,8,64,2048", "1,8,64,4096", "2,4,32,1024", "4,4,32,512"]


def package_name(rev: str) -> str:
    """The name :func:`load_commit` imports ``rev``'s package under."""
    return "sa_" + re.sub(r"\W", "_", rev)


def load_commit(rev: str, into: Path):
    """``selective_attention.functional.selective_attention`` as of ``rev``, imported as package ``sa_<rev>``."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "selective_attention"], capture_output=True)
    if blob.returncode != 0:
        raise SystemExit(f"git archive {rev!r} failed: {blob.stderr.decode().strip()}")
    tarfile.open(fileobj=BytesIO(blob.stdout)).extractall(into, filter="data")
    name = package_name(rev)
    pkg = (into / "selective_attention").rename(into / name)
    for f in pkg.rglob("*.py"):
        text = f.read_text()
        # absolute imports of the package point at the renamed copy, and its torch.library custom ops get their
        # own namespace: registered under the checkout's names, they would replace the checkout's kernels
        text = re.sub(r"\bselective_attention(?=\.|\s+import\b)", name, text)
        f.write_text(text.replace('"selective_attention::', f'"{name}::'))
    sys.path.insert(0, str(into))
    return importlib.import_module(f"{name}.functional").selective_attention


def compare_lm(rev: str, T: int, rounds: int, steps: int = 3) -> dict:
    """One AdamW training step of train_throughput's selective LM (4 layers, d128, 4 heads, 2048 tokens a step at
    context ``T``) built from this checkout and from ``rev`` (loaded by :func:`load_commit`), beside the standard LM,
    ``steps`` steps a turn. Throughput ratios to the standard LM and this / other time, medians of per-round ratios."""
    other = importlib.import_module(package_name(rev) + ".model")
    this = importlib.import_module("selective_attention.model")
    B = max(1, 2048 // T)

    def step_fn(mod, selection: bool):
        torch.manual_seed(0)
        model = mod.GPT(mod.GPTConfig(context_len=T, n_layer=4, n_head=4, d_model=128, selection=selection))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))

        def run():
            for _ in range(steps):
                loss, _ = model(x, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return run

    fns = {"standard": step_fn(this, False), "this": step_fn(this, True), "other": step_fn(other, True)}
    t = interleaved(fns, repeats=rounds, warmup=2, alternate=True)
    return {
        "LM context": T,
        "standard ms/step": round(1e3 * statistics.median(t["standard"]) / steps, 1),
        "this throughput / standard": round(1 / median_ratio(t, "this", "standard"), 3),
        "other throughput / standard": round(1 / median_ratio(t, "other", "standard"), 3),
        "this / other time": round(median_ratio(t, "this", "other"), 3),
    }


def compare(other, B: int, H: int, D: int, L: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g, requires_grad=True) for _ in range(3))
    go = torch.randn(B, H, L, D, generator=g)
    with torch.no_grad():
        diff = (selective_attention(q, k, v, selection=True) - other(q, k, v, selection=True)).abs().max().item()
    if not diff < 1e-4:
        raise SystemExit(f"B{B} H{H} D{D} L{L}: the two versions' outputs differ by {diff:.3g}; not the same function")
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go),
        "this": lambda: selective_attention(q, k, v, selection=True).backward(go),
        "other": lambda: other(q, k, v, selection=True).backward(go),
    }
    t = interleaved(fns, repeats=rounds, warmup=2, alternate=True)
    return {
        "shape": f"B{B} H{H} D{D} L{L}",
        "sdpa ms": round(1e3 * statistics.median(t["sdpa"]), 1),
        "this / sdpa": round(median_ratio(t, "this", "sdpa"), 3),
        "other / sdpa": round(median_ratio(t, "other", "sdpa"), 3),
        "this / other": round(median_ratio(t, "this", "other"), 3),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the other commit (anything git names: a hash, a tag, HEAD~3)")
    ap.add_argument("--shapes", nargs="+", default=SHAPES, metavar="B,H,D,L")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--lm", type=int, nargs="+", metavar="CONTEXT", help="time the LM's training step at these")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        other = load_commit(args.rev, Path(tmp))
        what = "the LM's training step" if args.lm else "paper-mode fwd+bwd"
        print(f"this checkout against {args.rev}, {what} fp32 — {machine()}", flush=True)
        runs = [(compare_lm, (args.rev, T)) for T in args.lm or []] or [
            (compare, (other, *(int(x) for x in s.split(",")))) for s in args.shapes
        ]
        for fn, fn_args in runs:
            row = fn(*fn_args, rounds=args.rounds)
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
