"""Block sizes for the Triton paper-mode kernels on this GPU, and where the kernels' time goes (CUDA).

    python benchmarks/triton_tune.py [--L 8192] [--dims 64 128] [--dtype bf16] [--out DIR] [--budget-s 240]

Shapes as ``triton_gpu.py``'s: 16k tokens (``B = 16384 / L``), ``H = 2048 / D``, paper mode (head 0 votes).

1. **compile**: every candidate config, in worker processes at a short length with the same specialisation, so
   Triton's on-disk cache serves the timing process (``--workers 0``: compile while timing);
2. **profile**: one fwd+bwd of the current config (``kernels.config_for``) per kernel (``torch.profiler``),
   beside SDPA flash's;
3. **ablations**, time only (their results are wrong on purpose): the kernels without the two row scans
   (of the votes and of dZ), and without the votes too (flash attention in our kernels' shape); and the scans
   by ``tl.cumsum`` or by products with a triangle (``Config.dot_scans``), both right;
4. **sweep**: every forward config (``fwd_m, fwd_n``, warps, stages) and every backward config (both passes'
   blocks, warps, stages) timed alone (medians of CUDA events), each checked against the current config's
   outputs (relative error under 1e-2 in 16-bit, 1e-3 in fp32: they differ only in summation order), and the
   fastest correct ones printed as a ``Config(...)`` for ``kernels._GPU``.

Writes DIR/triton_tune.{json,md} (default results/<gpu>/) after every stage. ``--budget-s``: no new stage
or config starts after that many seconds; what ran is written. ``--smoke``: a few configs at L = 256 on the
CPU through the Triton interpreter, to check the script itself where no GPU is at hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path

import torch
from common import RESULTS, device_ms

TOKENS, MODEL_DIM = 16384, 2048
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = Path(__file__).resolve().parents[1] / "selective_attention" / "ops" / "triton" / "kernels.py"

# Ablations: (what is replaced, by what) in kernels.py's source. Each must match exactly once.
NO_SCANS = [
    ("carry[None, :] + _row_scan(s, False, DOT_SCANS)", "carry[None, :] + s"),
    ("-(later[None, :] + _row_scan(dz, True, DOT_SCANS))", "-(later[None, :] + dz)"),
]
NO_VOTES = NO_SCANS + [
    (
        "s = tl.dot(qs, tl.trans(ks), input_precision=PREC) * sel_scale",
        "s = (offs_m[:, None] - offs_n[None, :]).to(tl.float32) * sel_scale",
    )
]
VARIANTS = {"as is": [], "no scans": NO_SCANS, "no scans, no votes": NO_VOTES}
# the current config with these fields changed (the kernels as they are)
CONFIG_VARIANTS = {"scans by tl.cumsum": dict(dot_scans=False), "scans by dot": dict(dot_scans=True)}


def variant_module(name: str):
    """kernels.py with the variant's replacements, imported from a file of its own (Triton reads the source)."""
    if not VARIANTS[name]:
        from selective_attention.ops.triton import kernels

        return kernels
    src = KERNELS.read_text()
    for old, new in VARIANTS[name]:
        assert src.count(old) == 1, f"ablation {name!r}: {old!r} is not in kernels.py once"
        src = src.replace(old, new)
    folder = Path(tempfile.gettempdir()) / "sa_triton_tune"
    folder.mkdir(exist_ok=True)
    mod_name = "sa_kernels_" + name.replace(",", "").replace(" ", "_")
    path = folder / f"{mod_name}.py"
    if not path.exists() or path.read_text() != src:
        path.write_text(src)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def candidates(smoke: bool) -> tuple[list[dict], list[dict]]:
    """Forward and backward block sizes to try (dicts of Config fields; the others from the current config)."""
    if smoke:
        return ([dict(fwd_m=32, fwd_n=16), dict(fwd_m=16, fwd_n=32)],
                [dict(bwd_kv_m=16, bwd_kv_n=32, bwd_q_m=32, bwd_q_n=16)])  # fmt: skip
    fwd = [
        dict(fwd_m=m, fwd_n=n, fwd_warps=w, fwd_stages=s)
        for m, n, (w, s) in itertools.product((64, 128), (32, 64, 128), ((4, 2), (4, 3), (8, 2), (8, 3), (8, 4)))
    ]
    bwd = [
        dict(bwd_kv_m=km, bwd_kv_n=kn, bwd_q_m=qm, bwd_q_n=qn, bwd_warps=w, bwd_stages=s)
        for km, kn, qm, qn, (w, s) in itertools.product(
            (32, 64), (64, 128), (64, 128), (32, 64), ((4, 2), (8, 2), (4, 3), (8, 3))
        )
    ]
    return fwd, bwd


def inputs(D: int, L: int, dtype, device, B: int | None = None, H: int | None = None):
    """q, k, v, dout ``[B, H, L, D]``: by default the benchmark's shape (16k tokens, H * D = 2048)."""
    B, H = B or max(1, TOKENS // L), H or MODEL_DIM // D
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for _ in range(4)]


def run_fwd(mod, cfg, q, k, v):
    s = q.shape[-1] ** -0.5
    return mod.forward(q, k, v, 0, s, s, cfg=cfg)


def run_bwd(mod, cfg, q, k, v, dout, out, lse):
    s = q.shape[-1] ** -0.5
    return mod.backward(dout, q, k, v, out, lse, 0, s, s, cfg=cfg)


def _compile_job(job) -> tuple[str, str]:
    """In a worker: run one (variant, D, kind, fields) once at a short length: Triton compiles and caches it."""
    variant, D, kind, fields, dtype_name, device, L, H = job
    try:
        mod = variant_module(variant)
        cfg = dataclasses.replace(mod.config_for(D, torch.device(device), DTYPES[dtype_name]), **fields)
        q, k, v, dout = inputs(D, L, DTYPES[dtype_name], device, B=1, H=H)
        out, lse = run_fwd(mod, cfg, q, k, v)
        if kind != "fwd":
            run_bwd(mod, cfg, q, k, v, dout, out, lse)
        return (kind, "")
    except Exception as e:  # noqa: BLE001 - recorded, the timing stage reports it per config
        return (kind, f"{type(e).__name__}: {str(e)[:200]}")


def timer(fn, repeats: int, warmup: int = 2) -> float:
    """Median ms of ``fn()`` (CUDA events on a GPU, a synchronised host clock otherwise)."""
    for _ in range(warmup):
        fn()
    return statistics.median(device_ms(fn, repeats))


def rel_err(x, ref) -> float:
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def profile(fns: dict, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Per method: device ms per fwd+bwd of each kernel (summed over its launches), from torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    res = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize()
        per = {}
        for e in p.key_averages():
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0.0)
            if t > 0:
                key = e.key[:80]
                per[key] = round(per.get(key, 0.0) + t / 1e3 / repeats, 3)
        res[name] = dict(sorted(per.items(), key=lambda kv: -kv[1]))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--L", type=int, default=8192)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workers", type=int, default=None, help="compiling processes (default: CPUs - 2, at most 12)")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="a few configs at L = 256 through the Triton interpreter")
    args = ap.parse_args()
    t0 = time.monotonic()
    left = lambda: args.budget_s - (time.monotonic() - t0)  # noqa: E731
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device, args.L = "cpu", 256
        args.workers = 0 if args.workers is None else args.workers
    elif not torch.cuda.is_available():
        print("triton_tune.py: no CUDA GPU (torch.cuda.is_available() is False); --smoke checks the script on CPU.")
        return 1
    else:
        device = "cuda"
    if args.workers is None:
        args.workers = min(12, max(1, (os.cpu_count() or 2) - 2))
    dtype = DTYPES[args.dtype]
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    out_dir = args.out or RESULTS / re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")  # as gpu_check's folder
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    report = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "L": args.L,
              "dtype": args.dtype, "argv": sys.argv[1:], "smoke": args.smoke, "dims": {}}  # fmt: skip

    def save():
        (out_dir / "triton_tune.json").write_text(json.dumps(report, indent=1))
        (out_dir / "triton_tune.md").write_text(markdown(report))

    fwd_c, bwd_c = candidates(args.smoke)
    # 1. compile everything in parallel (a short L with the same integer specialisation: L and its block counts
    # stay multiples of 16 at 2048 for blocks up to 128)
    if args.workers > 0:
        L, H = (args.L, 2) if args.smoke else (2048, None)
        jobs = [(var, D, "fwd+bwd", {}, args.dtype, device, L, H) for var in VARIANTS for D in args.dims]
        jobs += [("as is", D, "fwd+bwd", f, args.dtype, device, L, H) for f in CONFIG_VARIANTS.values()
                 for D in args.dims]  # fmt: skip
        jobs += [("as is", D, "fwd", f, args.dtype, device, L, H) for D in args.dims for f in fwd_c]
        jobs += [("as is", D, "bwd", f, args.dtype, device, L, H) for D in args.dims for f in bwd_c]
        tc = time.monotonic()
        import multiprocessing as mp

        for var in VARIANTS:  # the ablations' source files, written once before the workers import them
            variant_module(var)
        ex = ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"))
        futures = [ex.submit(_compile_job, j) for j in jobs]
        done, failed = 0, []
        try:  # at most 40% of the budget: what is not compiled by then compiles while it is timed
            for f in as_completed(futures, timeout=max(10.0, 0.4 * left())):
                done += 1
                try:
                    err = f.result()[1]
                except Exception as e:  # noqa: BLE001 - a worker that died (a compiler crash): noted, go on
                    err = f"worker died: {type(e).__name__}: {str(e)[:160]}"
                if err:
                    failed.append(err)
        except FuturesTimeout:
            pass
        # the jobs still running finish first (seconds): none may share the GPU with the timings below
        ex.shutdown(wait=True, cancel_futures=True)
        report["compile"] = {"jobs": len(jobs), "done": done, "failed": len(failed), "first failures": failed[:3],
                             "seconds": round(time.monotonic() - tc, 1)}  # fmt: skip
        print(f"compiled {done} of {len(jobs)} configs in {report['compile']['seconds']} s "
              f"({len(failed)} failed: {failed[:2]})", flush=True)  # fmt: skip

    for D in args.dims:
        if left() < 10:
            break
        rec = report["dims"].setdefault(str(D), {})
        tune_dim(rec, D, args, dtype, device, fwd_c, bwd_c, left, save)
    report["seconds"] = round(time.monotonic() - t0, 1)
    save()
    print(markdown(report))
    return 0


def tune_dim(rec: dict, D: int, args, dtype, device: str, fwd_c, bwd_c, left, save) -> None:
    """Stages 2-4 for head dim D, into ``rec`` (saved after each stage)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, dout = inputs(D, args.L, dtype, device, *((1, 2) if args.smoke else ()))
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    base_mod = variant_module("as is")
    base = base_mod.config_for(D, q.device, dtype)
    rec["current"] = dataclasses.asdict(base)
    out_ref, lse_ref = run_fwd(base_mod, base, q, k, v)
    grads_ref = run_bwd(base_mod, base, q, k, v, dout, out_ref, lse_ref)
    if device == "cuda":  # SDPA flash: the baseline of every ratio
        qf, kf, vf = (t.detach().clone().requires_grad_() for t in (q, k, v))

        def flash_fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=True)

        with torch.no_grad():
            rec["flash fwd ms"] = timer(flash_fwd, args.repeats)
        o = flash_fwd()
        rec["flash bwd ms"] = timer(lambda: torch.autograd.grad(o, (qf, kf, vf), dout, retain_graph=True), args.repeats)

        def flash_fb():
            torch.autograd.grad(flash_fwd(), (qf, kf, vf), dout)

        def ours_fb():
            o, lse = run_fwd(base_mod, base, q, k, v)
            run_bwd(base_mod, base, q, k, v, dout, o, lse)

        rec["profile ms per fwd+bwd"] = profile({"flash": flash_fb, "triton": ours_fb})
    # ablations: the current config, parts of the work left out
    rec["ablations"] = {}
    for var in [*VARIANTS, *CONFIG_VARIANTS]:
        if left() < 10:
            break
        try:
            mod = variant_module(var if var in VARIANTS else "as is")
            c = dataclasses.replace(base, **CONFIG_VARIANTS.get(var, {}))
            o, lse = run_fwd(mod, c, q, k, v)
            rec["ablations"][var] = {
                "fwd ms": timer(lambda m=mod, c=c: run_fwd(m, c, q, k, v), args.repeats),
                "bwd ms": timer(lambda m=mod, c=c, o=o, lse=lse: run_bwd(m, c, q, k, v, dout, o, lse), args.repeats),
            }
        except Exception as e:  # noqa: BLE001 - recorded in the report
            rec["ablations"][var] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(f"D={D} {var}: {rec['ablations'][var]}", flush=True)
    save()
    # sweeps, forward then backward (the backward from the current forward's outputs)
    for kind, cands in (("fwd", fwd_c), ("bwd", bwd_c)):
        rows = rec.setdefault(kind, [])
        for fields in cands:
            if left() < 5:
                rows.append({**fields, "note": "not run: --budget-s spent"})
                continue
            row = dict(fields)
            try:
                cfg = dataclasses.replace(base, **fields)
                if kind == "fwd":
                    o, lse = run_fwd(base_mod, cfg, q, k, v)
                    row["err"] = max(rel_err(o, out_ref), rel_err(lse, lse_ref))
                    row["ms"] = timer(lambda c=cfg: run_fwd(base_mod, c, q, k, v), args.repeats)
                else:
                    got = run_bwd(base_mod, cfg, q, k, v, dout, out_ref, lse_ref)
                    row["err"] = max(rel_err(a, b) for a, b in zip(got, grads_ref))
                    row["ms"] = timer(lambda c=cfg: run_bwd(base_mod, c, q, k, v, dout, out_ref, lse_ref), args.repeats)
                row["ok"] = row["err"] < tol
            except Exception as e:  # noqa: BLE001 - out of shared memory, a compile error: noted
                row["note"] = f"{type(e).__name__}: {str(e)[:160]}"
            rows.append(row)
        good = sorted((r for r in rows if r.get("ok")), key=lambda r: r["ms"])
        rec[f"best {kind}"] = good[:5]
        print(f"D={D} {kind}: best {good[:3]}", flush=True)
        save()
    best = dict(rec["current"])
    for kind in ("fwd", "bwd"):
        if rec.get(f"best {kind}"):
            best.update({key: val for key, val in rec[f"best {kind}"][0].items() if key in best})
    if rec.get("best fwd") or rec.get("best bwd"):
        rec["best config"] = best
        print(f"D={D} best: Config(**{best})", flush=True)
    else:
        print(f"D={D}: no sweep config ran correctly (budget spent or every one failed): no best config", flush=True)
    save()


def markdown(rep: dict) -> str:
    shape = "B = 1, H = 2 (--smoke)" if rep.get("smoke") else f"B·L = {TOKENS}, H·D = {MODEL_DIM}"
    argv = " ".join(rep.get("argv", []))
    lines = [f"### Triton kernel tuning on {rep['gpu']}", "",
             f"L = {rep['L']}, {rep['dtype']}, {shape}; torch {rep['torch']}, triton {rep['triton']}. "
             f"`python benchmarks/triton_tune.py {argv}`.", ""]  # fmt: skip
    if "compile" in rep:
        lines += [f"Compiled ahead: {rep['compile']}.", ""]
    for D, rec in rep["dims"].items():
        lines += [f"#### D = {D}", ""]
        if "flash fwd ms" in rec:
            lines.append(f"SDPA flash: fwd {rec['flash fwd ms']:.3f} ms, bwd {rec['flash bwd ms']:.3f} ms.")
        for var, r in rec.get("ablations", {}).items():
            lines.append(f"- current config, {var}: {r}")
        for name, per in rec.get("profile ms per fwd+bwd", {}).items():
            top = ", ".join(f"{k} {v}" for k, v in list(per.items())[:8])
            lines.append(f"- profile {name} (ms per fwd+bwd): {top}")
        for kind in ("fwd", "bwd"):
            for r in rec.get(f"best {kind}", [])[:3]:
                lines.append(f"- best {kind}: {r}")
            rows = rec.get(kind, [])
            unrun = sum("not run" in r.get("note", "") for r in rows)
            failed = sum("note" in r and "not run" not in r["note"] for r in rows)
            wrong = sum(r.get("ok") is False for r in rows)
            if rows:
                lines.append(f"- {kind} sweep: {len(rows)} configs, {unrun} not run (budget), {failed} failed, "
                             f"{wrong} outside the error bound")  # fmt: skip
        if "best config" in rec:
            lines.append(f"- best config: `Config(**{rec['best config']})`")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
