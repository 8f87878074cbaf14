"""Paper-mode selective attention vs standard causal attention (SDPA), forward + backward.

Compares, at B1 H8 D64 fp32 (``--shape B H D`` for another) over sequence lengths:
  * ``sdpa``     F.scaled_dot_product_attention(is_causal=True): standard attention, the baseline;
  * ``chunked``  ours, paper mode (F from head 0), the default backend;
  * ``chunked-eager``  the same with its eager CPU passes, where the compiled ones run (Numba, extra ``[cpu]``):
    ``SELECTIVE_ATTENTION_NUMBA=0`` around its forward and backward;
  * ``naive``    ours, the spec (materialises F and the weights);
  * ``x-transformers``  its ``Attend(causal=True, selective=True)``, if installed (``bench`` extra).
Times are medians of interleaved rounds; ratios are medians of per-round ratios to ``sdpa``.
Extra peak memory (peak RSS during one fwd+bwd minus RSS with the inputs allocated) is measured in
a fresh subprocess per method, so the allocator's cache of one cannot hide another's peak: with the
default allocator (what a user gets), the same after one small fwd+bwd in that process (a first call's
one-time costs apart: the goal's figure is the first call's), and with glibc's mmap threshold fixed at 64 KiB so
that RSS follows live tensor memory (``--mmap-threshold``). Every figure includes the output and the three
gradients, which both methods allocate alike (32 MiB at L = 4096).

    python benchmarks/paper_mode.py [--lengths 512 1024 2048 4096 8192] [--repeats 5] [--plot]
    python benchmarks/paper_mode.py --methods sdpa chunked --lengths 2048 --no-memory --no-save  # quick check
    python benchmarks/paper_mode.py --shape 2 4 32 --lengths 256 512 1024 --methods sdpa chunked --no-memory \
        --no-save  # the demo LM's attention (4 heads of 32; B2 at 1024 is its 2048 tokens a step)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from common import eager_passes, interleaved, machine, median_ratio, side_path, write

from selective_attention.functional import selective_attention
from selective_attention.ops import cpu_kernels

DEFAULT_SHAPE = (1, 8, 64)
B, H, D = DEFAULT_SHAPE  # or --shape B H D
THREADS: int | None = None  # --threads, for the timings and the memory subprocesses alike
NAIVE_MAX_L = 4096  # the materialising methods need O(H L^2) memory and get slow beyond this


def make_methods(L: int, names: list[str]) -> dict:
    """The methods of ``names`` that run at length L. Only those: importing x-transformers imports
    ``torch._dynamo`` (~150 MiB of resident memory), which must not land in another method's memory figure."""
    methods = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "chunked": lambda q, k, v: selective_attention(q, k, v, selection=True),
    }
    if cpu_kernels.available() and "chunked-eager" in names:
        methods["chunked-eager"] = methods["chunked"]  # run under eager_passes (fwd_bwd)
    if L <= NAIVE_MAX_L:
        methods["naive"] = lambda q, k, v: selective_attention(q, k, v, selection=True, backend="naive")
    if L <= NAIVE_MAX_L and "x-transformers" in names:
        try:
            from x_transformers.attend import Attend

            attend = Attend(causal=True, selective=True)
            methods["x-transformers"] = lambda q, k, v: attend(q, k, v)[0]
        except ImportError:
            pass
    return methods


def fwd_bwd(name: str, f, q, k, v, g) -> None:
    with eager_passes(name == "chunked-eager"):
        f(q, k, v).backward(g)


def inputs(L: int):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g, requires_grad=True) for _ in range(3))
    return q, k, v, torch.randn(B, H, L, D, generator=g)


def time_length(L: int, repeats: int, methods: list[str]) -> dict:
    q, k, v, g = inputs(L)
    fns = {
        name: (lambda f=f, name=name: fwd_bwd(name, f, q, k, v, g))
        for name, f in make_methods(L, methods).items()
        if name in methods
    }
    t = interleaved(fns, repeats=repeats, warmup=1)
    row = {"L": L}
    for name in fns:
        row[f"{name} s"] = statistics.median(t[name])
        row[f"{name} / sdpa"] = median_ratio(t, name, "sdpa")
    return row


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


WARM_L = 256  # the warm-up call's length (--warm): one-time costs of a first call, next to no tensor memory


def _peak_child(method: str, L: int, warm: bool = False) -> None:
    """Run in a subprocess: print the extra peak RSS (bytes) of one fwd+bwd of ``method``; with ``warm``, after one
    fwd+bwd at ``WARM_L`` (a first call's one-time costs then fall outside the figure: on an AMD EPYC a first call at
    L = 64 already added 5 MiB for sdpa and 11 for chunked). The warm figure is a lower bound: memory the warm-up
    freed stays in RSS and is reused uncounted (chunked at L = 2048 after warm-ups at 16 / 256 / 1024 rows: 36 /
    33 / 31 MiB); the cold one, the goal's, an upper bound."""
    if warm:
        wq, wk, wv, wg = inputs(WARM_L)
        fwd_bwd(method, make_methods(WARM_L, [method])[method], wq, wk, wv, wg)
        del wq, wk, wv, wg
    q, k, v, g = inputs(L)
    # the compiled CPU passes' Numba, imported (make_methods asks whether it runs) and compiled (or loaded from its
    # disk cache) before the baseline: a fixed cost once per process, whatever the length, reported on a row of its
    # own ("one_time")
    before = _status_bytes("VmRSS")
    fn = make_methods(L, [method])[method]
    if method == "chunked":
        cpu_kernels.warm_up(q.dtype)
    one_time = _status_bytes("VmRSS") - before
    # what the harness's own first `Tensor.backward(gradient)` imports (sympy, through torch's symbolic shapes: ~35 MiB
    # of resident memory, torch 2.13), imported before the baseline: it is no method's cost, and it once landed in
    # every figure alike
    import torch.fx.experimental.symbolic_shapes  # noqa: F401

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark (VmHWM) to the current RSS: imports don't count
    base = _status_bytes("VmRSS")
    fwd_bwd(method, fn, q, k, v, g)
    print(json.dumps({"extra": _status_bytes("VmHWM") - base, "one_time": one_time}))


def peak_memory(method: str, L: int, fixed_threshold: bool = False, warm: bool = False) -> tuple[float, float]:
    """``(extra peak MiB of one fwd+bwd, MiB the compiled passes' Numba took before it)`` in a fresh process."""
    # glibc's adaptive mmap threshold keeps freed multi-MiB temporaries in the heap, so RSS also
    # counts allocator slack; a fixed threshold makes RSS follow live tensor memory, for every method.
    env = dict(os.environ)
    if fixed_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    shape = [str(n) for n in (B, H, D)]
    threads = ["--threads", str(THREADS)] if THREADS else []
    warm_flag = ["--_warm"] if warm else []
    out = subprocess.run(
        [sys.executable, __file__, "--shape", *shape, *threads, "--_peak", method, str(L), *warm_flag],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return got["extra"] / 2**20, got["one_time"] / 2**20


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = [("sdpa", "k-o"), ("chunked", "C0-o"), ("chunked-eager", "C0:x"), ("naive", "C1--s"),
              ("x-transformers", "C2:^")]  # fmt: skip
    for name, style in styles:
        pts = [(r["L"], r[f"{name} s"]) for r in rows if f"{name} s" in r]
        if pts:
            label = {
                "sdpa": "standard attention (SDPA causal)",
                "chunked": "ours, paper mode (chunked)",
                "chunked-eager": "ours, chunked with its eager CPU passes",
            }.get(  # fmt: skip
                name, f"{name}, paper mode" if name != "naive" else "ours, naive spec"
            )
            ax.plot(*zip(*pts), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("forward + backward (s)")
    ax.set_title(f"Selective attention, B{B} H{H} D{D} fp32, CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-length", type=int, default=4096)
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=["sdpa", "chunked", "chunked-eager", "naive", "x-transformers"],
        default=["sdpa", "chunked", "chunked-eager", "naive", "x-transformers"],
        help="sdpa, the baseline of every ratio, always runs",
    )
    ap.add_argument(
        "--plot", action="store_true", help="write results/<cpu>/paper_mode.png (another --shape: own name)"
    )
    ap.add_argument("--no-save", action="store_true", help="print only: leave results/ as it is")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument(
        "--mmap-threshold", action="store_true", help="also measure memory with MALLOC_MMAP_THRESHOLD_=64 KiB"
    )
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for the timings (default: torch's own)")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("B", "H", "D"), help="batch, heads, head dim (1 8 64)")
    ap.add_argument("--_peak", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_warm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plot and args.no_save:
        ap.error("--plot writes results/<cpu>/paper_mode.png, which --no-save leaves alone: pass one of them.")
    args.methods = ["sdpa"] + [m for m in dict.fromkeys(args.methods) if m != "sdpa"]  # every ratio's baseline
    global B, H, D, THREADS
    if args.shape:
        B, H, D = args.shape
    if args.threads:
        torch.set_num_threads(args.threads)
        THREADS = args.threads  # the memory subprocesses run with it too
    if args._peak:
        _peak_child(args._peak[0], int(args._peak[1]), args._warm)
        return

    rows = []
    for L in args.lengths:
        row = time_length(L, args.repeats, args.methods)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    names = [
        n for n in ("sdpa", "chunked", "chunked-eager", "naive", "x-transformers") if any(f"{n} s" in r for r in rows)
    ]
    table = []
    for r in rows:
        t = {"L": r["L"]}
        for n in names:
            t[n] = f"{r[f'{n} s'] * 1e3:.0f} ms ({r[f'{n} / sdpa']:.2f}x)" if f"{n} s" in r else "-"
        table.append(t)
    Lm = args.memory_length
    mem = {}
    if not args.no_memory:
        measured = [n for n in names if n in ("sdpa", "chunked", "chunked-eager") or Lm <= NAIVE_MAX_L]
        # the goal's figure: a fresh process's first call; then the same after one small call (the first call's
        # one-time costs apart), and with --mmap-threshold the allocator's slack apart
        once = {}
        for fixed, warm in [(False, False), (False, True)] + ([(True, False)] if args.mmap_threshold else []):
            m = {}
            for n in measured:
                m[n], one_time = peak_memory(n, Lm, fixed, warm)
                if not (fixed or warm):  # a fresh process's (the warm-up call has loaded Numba in the others)
                    once[n] = one_time
            how = f", after one call at L={WARM_L}" if warm else ", MALLOC_MMAP_THRESHOLD_=64K" if fixed else ""
            mrow = {"L": f"extra peak memory, L={Lm}{how}"}
            for n in names:
                mrow[n] = f"{m[n]:.0f} MiB ({m[n] / m['sdpa']:.2f}x)" if n in m else "-"
            table.append(mrow)
            mem.update({(f"{n} mmap64k" if fixed else f"{n} warm" if warm else n): x for n, x in m.items()})
        if once.get("chunked"):  # Numba ran: its fixed cost, outside the figures above
            orow = {"L": "Numba's one-time resident memory (compiled CPU passes), before the figures above"}
            for n in names:
                orow[n] = f"{once[n]:.0f} MiB" if n == "chunked" else "-"
            table.append(orow)
            mem["chunked numba one-time"] = once["chunked"]
    if args.no_save:
        print(machine())
        for t in table:
            print(" | ".join(str(t.get(c, "-")) for c in ["L"] + names))
        return
    name = "paper_mode" if (B, H, D) == DEFAULT_SHAPE else f"paper_mode_B{B}H{H}D{D}"  # the README's table: default
    md = write(
        name,
        table,
        ["L"] + names,
        f"Paper-mode fwd+bwd vs standard causal attention (SDPA), B{B} H{H} D{D} fp32; ratio to SDPA in ()",
    )
    print(md)
    side_path(name, "_raw.json").write_text(json.dumps({"timing": rows, "peak_mib": mem}, indent=2))
    if args.plot:
        plot(rows, side_path(name, ".png"))


if __name__ == "__main__":
    main()
