"""The GPU block configs compile for an H100/H200 (sm_90) within its shared memory, checked here without a GPU.

Each launch that ``kernels.forward`` / ``kernels.backward`` would make on CUDA is recorded (on meta tensors, with
the GPU configs) and compiled ahead of time for sm_90 by Triton's own compiler and the ``ptxas`` its wheel ships.
A block asking for more than the 227 KB a block may have fails only at launch on the GPU: the fp32 configs once
did (246 KB with tf32), which no interpreter test could see. The compilation runs in a subprocess: the tests'
Triton interprets its kernels (``TRITON_INTERPRET=1``, set before they are first imported), and the compiler needs
them compiled.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

SM90_SHARED = 227 * 1024  # the most shared memory one block may have on sm_90 (opt-in)
KERNELS = ("_vote_carry_kernel", "_fwd_kernel", "_delta_kernel", "_bwd_kv_kernel", "_bwd_q_kernel")


def shared_memory(D: int, dtype: torch.dtype) -> list[tuple[str, int]]:
    """``(kernel, bytes of shared memory)`` of every launch of one forward and backward on sm_90: one F shared by
    the heads, grouped-query keys, fp32 with tf32 dots (the tensor-core path, which keeps tiles in shared memory).
    Needs Triton with its kernels compiled (not interpreted)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from selective_attention.ops.triton import kernels

    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
    seen = []

    class Kernel:  # stands in for a @triton.jit kernel: kernel[grid](*args, **kw) records the launch
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append((self.fn, args, kw))

    cfg = kernels.config_for(D, torch.device("cuda"), dtype)  # the GPU config (only the device type is read)
    kernels.config_for = lambda D, device, dtype: cfg
    for name in KERNELS:
        setattr(kernels, name, Kernel(getattr(kernels, name)))
    B, H, HKV, L = 2, 8, 2, 256
    q = torch.empty(B, H, L, D, dtype=dtype, device="meta")
    k, v = (torch.empty(B, HKV, L, D, dtype=dtype, device="meta") for _ in range(2))
    torch.set_float32_matmul_precision("high")  # tf32
    out, lse = kernels.forward(q, k, v, 0, D**-0.5, D**-0.5)
    kernels.backward(torch.empty_like(out), q, k, v, out, lse, 0, D**-0.5, D**-0.5)
    result = []
    for fn, args, kw in seen:
        options = {key: kw.pop(key) for key in ("num_warps", "num_stages") if key in kw}
        values = dict(zip(fn.arg_names, args), **kw)
        signature, constexprs = {}, {}
        for p in fn.params:
            value = values[p.name]
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[p.name] = ptr[value.dtype]
            else:
                signature[p.name] = "fp32" if isinstance(value, float) else "i32"
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        result.append((fn.__name__, compiled.metadata.shared))
    return result


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_configs_fit_sm90_shared_memory(D, dtype):
    triton = pytest.importorskip("triton")
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:  # the compiler API this check is written for
        pytest.skip(f"written for ASTSource(constexprs=...), which Triton {triton.__version__} lacks; CI runs 3.8")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, __file__, str(D), dtype], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    launches = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted({name for name, _ in launches}) == sorted(KERNELS), launches
    for name, shared in launches:
        assert shared <= SM90_SHARED, f"{name} (D={D}, {dtype}): {shared} bytes of shared memory > {SM90_SHARED}"


if __name__ == "__main__":  # python tests/test_triton_sm90.py D DTYPE: the launches' shared memory, as JSON
    print(json.dumps(shared_memory(int(sys.argv[1]), getattr(torch, sys.argv[2]))))
