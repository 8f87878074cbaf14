"""Triton paper-mode kernels vs flash attention (SDPA causal) and the naive paper mode, on a CUDA GPU.

For each head dim D and length L (tokens per batch fixed at 16k, ``H = 2048 / D``) it times forward,
backward and forward + backward (medians of CUDA-event timings over ``--repeats`` rounds, after
warm-up; every round synchronises), and reports TFLOP/s counted with standard causal attention's FLOPs
for every method (``4 B H L^2 D / 2`` forward, 2.5x that backward), so the TFLOP/s are comparable across
methods and the ratio to flash is the slowdown. It also measures each method's peak memory of one
forward + backward (``torch.cuda.max_memory_allocated`` above what was allocated before the call: the
inputs excluded; the gradients, the saved tensors and every temporary included). Methods:
  * ``flash``   F.scaled_dot_product_attention(is_causal=True), flash backend: the baseline;
  * ``triton``  ours, paper mode (F from head 0), fused Triton kernels;
  * ``naive``   ours, the spec (materialises F and the weights; up to ``--naive-max-L``; OOM noted).

    python benchmarks/triton_gpu.py [--lengths 1024 2048 4096 8192 16384] [--dims 64 128] [--repeats 10]
        [--methods flash triton naive] [--out DIR --name NAME] [--budget-s SECONDS]

Writes DIR/NAME.{json,md} (default results/triton_gpu.{json,md}) after every (D, L), so a run that is
stopped keeps what it measured. A method that fails (out of memory, a compile error) is noted in its row
and the others go on. ``--budget-s``: start no new (D, L) once that many seconds have passed (the rows
not run say so). Exits with a message (status 1) where no CUDA GPU is available.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, device_ms, machine

TOKENS = 16384  # B * L
MODEL_DIM = 2048  # H * D
MODES = ("fwd", "bwd", "fwd+bwd")
COLUMNS = ["D", "L", "B", "H", "method", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd TFLOP/s", "bwd TFLOP/s",
           "fwd+bwd TFLOP/s", "fwd / flash", "bwd / flash", "fwd+bwd / flash", "peak MiB", "peak / flash",
           "note"]  # fmt: skip


def flops(B: int, H: int, L: int, D: int, mode: str) -> float:
    fwd = 4 * B * H * L * L * D / 2  # two GEMMs over the causal half
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def make_methods(names: list[str], L: int, naive_max_L: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from selective_attention.functional import selective_attention
    from selective_attention.ops.triton import triton_selective_attention

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def triton(q, k, v):
        s = q.shape[-1] ** -0.5
        return triton_selective_attention(q, k, v, heads=slice(0, 1), scale=s, sel_scale=s)

    def naive(q, k, v):
        return selective_attention(q, k, v, selection=True, backend="naive")

    every = {"flash": flash, "triton": triton, "naive": naive}
    return {n: every[n] for n in names if n != "naive" or L <= naive_max_L}


def time_method(fn, q, k, v, dout, repeats: int) -> dict[str, float]:
    """Median ms of fwd (no grad), bwd (on a retained graph) and fwd+bwd."""

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(dout)

    out = fn(q, k, v)

    def bwd():
        for t in (q, k, v):
            t.grad = None
        out.backward(dout, retain_graph=True)

    res = {}
    for name, f in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
        for _ in range(3):  # warm-up: compile, autotune caches, allocator
            f()
        torch.cuda.synchronize()
        res[name] = statistics.median(device_ms(f, repeats))
    for t in (q, k, v):
        t.grad = None
    return res


def peak_mib(fn, q, k, v, dout) -> tuple[float, str]:
    """Peak memory allocated during one forward + backward, above what was allocated before it (MiB),
    and a note if the output or a gradient is not finite. Counts the gradients dq, dk, dv, the saved
    tensors and every temporary; not q, k, v, dout."""
    for t in (q, k, v):
        t.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(q, k, v)
    out.backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    bad = [n for n, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)) if not t.isfinite().all()]
    del out
    for t in (q, k, v):
        t.grad = None
    return peak / 2**20, f"non-finite {', '.join(bad)}!" if bad else ""


def _ratio(a, b) -> float | str:
    return round(a / b, 2) if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"


def run(D: int, L: int, dtype: torch.dtype, names: list[str], repeats: int, naive_max_L: int, rows: list[dict]) -> None:
    """Appends one row per method to ``rows`` as it is measured (a crash keeps the rows before it)."""
    B, H = max(1, TOKENS // L), MODEL_DIM // D
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    base = {}
    for name, fn in make_methods(names, L, naive_max_L).items():
        row = {c: "-" for c in COLUMNS} | {"D": D, "L": L, "B": B, "H": H, "method": name, "note": ""}
        try:
            # first call: Triton compiles here (outside torch's allocator: not in the peak)
            mem, row["note"] = peak_mib(fn, q, k, v, dout)
            ms = time_method(fn, q, k, v, dout, repeats)
        except Exception as e:  # OOM, compile error, a crashed kernel: note it, go on with the others
            row["note"] = "OOM" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {e}"[:300]
            for t in (q, k, v):
                t.grad = None
            try:
                torch.cuda.empty_cache()
            except Exception:  # after an illegal memory access the context is gone: keep the row, go on
                pass
            rows.append(row)
            print(f"D={D} L={L} {name}: {row['note']}", flush=True)
            continue
        if name == "flash":
            base = {**ms, "peak": mem}
        for mode in MODES:
            row[f"{mode} ms"] = round(ms[mode], 3)
            row[f"{mode} TFLOP/s"] = round(flops(B, H, L, D, mode) / (ms[mode] * 1e-3) / 1e12, 1)
            row[f"{mode} / flash"] = _ratio(ms[mode], base.get(mode))
        row["peak MiB"] = round(mem, 1)
        row["peak / flash"] = _ratio(mem, base.get("peak"))
        rows.append(row)
        print(row, flush=True)
    del q, k, v, dout
    torch.cuda.empty_cache()


def environment() -> dict:
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "capability": f"{p.major}.{p.minor}",
        "sms": p.multi_processor_count,
        "gpu_memory_GiB": round(p.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "host": machine(),
    }


def save(out: Path, name: str, rows: list[dict], meta: dict) -> str:
    """Write ``out/NAME.json`` (rows + environment) and ``out/NAME.md``; return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    env = meta["environment"]
    lines = [
        f"**{meta['title']}** — {env['gpu']} (sm {env['capability']}), torch {env['torch']}, CUDA {env['cuda']}, "
        f"Triton {env['triton']}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--methods", nargs="+", choices=["flash", "triton", "naive"], default=["flash", "triton", "naive"])
    ap.add_argument("--naive-max-L", type=int, default=4096, help="skip the naive path beyond this length")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    ap.add_argument("--name", default="triton_gpu", help="output file stem (default triton_gpu)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new (D, L) after this many seconds")
    args = ap.parse_args()
    if "flash" in args.methods:  # the ratios are to flash: time it first
        args.methods = ["flash"] + [m for m in args.methods if m != "flash"]
    if not torch.cuda.is_available():
        sys.exit("benchmarks/triton_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/triton_gpu.py needs Triton: pip install triton.")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    meta = {
        "title": (
            f"Paper-mode selective attention (Triton) vs flash attention (SDPA causal), {args.dtype}, "
            f"B*L = {TOKENS}, H*D = {MODEL_DIM}; TFLOP/s counted as standard causal attention; peak = extra "
            "memory of one fwd+bwd"
        ),
        "environment": environment(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "complete": False,
    }
    print(meta["environment"], flush=True)
    t0, rows = time.monotonic(), []
    for D in args.dims:
        for L in args.lengths:
            if args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
                B, H = max(1, TOKENS // L), MODEL_DIM // D
                rows.append({c: "-" for c in COLUMNS} | {"D": D, "L": L, "B": B, "H": H, "method": "all",
                                                         "note": "not run: time budget spent"})  # fmt: skip
                continue
            try:
                run(D, L, dtype, args.methods, args.repeats, args.naive_max_L, rows)
            finally:  # a crash (a dead CUDA context) keeps every row measured so far
                save(args.out, args.name, rows, meta)
    meta["complete"] = True
    meta["seconds"] = round(time.monotonic() - t0, 1)
    print(save(args.out, args.name, rows, meta))


if __name__ == "__main__":
    main()
