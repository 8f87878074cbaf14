"""Triton paper-mode kernels vs flash attention (SDPA causal) and the naive paper mode, on a CUDA GPU.

For each head dim D and length L (tokens per batch fixed at 16k, ``H = 2048 / D``) it times forward,
backward and forward + backward (medians of CUDA-event timings over ``--repeats`` interleaved rounds,
after warm-up), and reports TFLOP/s counted with standard causal attention's FLOPs for every method
(``4 B H L^2 D / 2`` forward, 2.5x that backward), so the TFLOP/s are comparable across methods and
the ratio to flash is the slowdown. Methods:
  * ``flash``   F.scaled_dot_product_attention(is_causal=True), flash backend: the baseline;
  * ``triton``  ours, paper mode (F from head 0), fused Triton kernels;
  * ``naive``   ours, the spec (materialises F and the weights; up to ``--naive-max-L``; OOM noted).

    python benchmarks/triton_gpu.py [--lengths 1024 2048 4096 8192 16384] [--dims 64 128] [--repeats 10]

Writes results/triton_gpu.{json,md}. Exits with a message where no CUDA GPU is available.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from common import write

TOKENS = 16384  # B * L
MODEL_DIM = 2048  # H * D


def flops(B: int, H: int, L: int, D: int, mode: str) -> float:
    fwd = 4 * B * H * L * L * D / 2  # two GEMMs over the causal half
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def make_methods(L: int, naive_max_L: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from selective_attention.functional import selective_attention
    from selective_attention.ops.triton import triton_selective_attention

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def triton(q, k, v):
        s = q.shape[-1] ** -0.5
        return triton_selective_attention(q, k, v, heads=slice(0, 1), scale=s, sel_scale=s)

    methods = {"flash": flash, "triton": triton}
    if L <= naive_max_L:
        methods["naive"] = lambda q, k, v: selective_attention(q, k, v, selection=True, backend="naive")
    return methods


def cuda_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


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
        res[name] = statistics.median(cuda_ms(f, repeats))
    return res


def run(D: int, L: int, dtype: torch.dtype, repeats: int, naive_max_L: int) -> list[dict]:
    B, H = max(1, TOKENS // L), MODEL_DIM // D
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    rows, base = [], None
    for name, fn in make_methods(L, naive_max_L).items():
        row = {"D": D, "L": L, "B": B, "H": H, "method": name}
        try:
            ms = time_method(fn, q, k, v, dout, repeats)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({**row, **{c: "OOM" for c in COLUMNS[5:]}})
            continue
        if name == "flash":
            base = ms
        for mode in ("fwd", "bwd", "fwd+bwd"):
            row[f"{mode} ms"] = round(ms[mode], 3)
            row[f"{mode} TFLOP/s"] = round(flops(B, H, L, D, mode) / (ms[mode] * 1e-3) / 1e12, 1)
        row["fwd+bwd / flash"] = round(ms["fwd+bwd"] / base["fwd+bwd"], 2) if base else "-"
        rows.append(row)
        print(row, flush=True)
    return rows


COLUMNS = ["D", "L", "B", "H", "method", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd TFLOP/s", "bwd TFLOP/s",
           "fwd+bwd TFLOP/s", "fwd+bwd / flash"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--naive-max-L", type=int, default=4096, help="skip the naive path beyond this length")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/triton_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/triton_gpu.py needs Triton: pip install triton.")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    for D in args.dims:
        for L in args.lengths:
            rows += run(D, L, dtype, args.repeats, args.naive_max_L)
    title = (
        f"Paper-mode selective attention (Triton) vs flash attention (SDPA causal), {args.dtype}, "
        f"B*L = {TOKENS}, H*D = {MODEL_DIM}; TFLOP/s counted as standard causal attention, "
        f"{torch.cuda.get_device_name()}"
    )
    print(write("triton_gpu", rows, COLUMNS, title))


if __name__ == "__main__":
    main()
