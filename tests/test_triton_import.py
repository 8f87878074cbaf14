"""The Triton backend's package imports without Triton and without a GPU (no import-time probing)."""

from __future__ import annotations

import subprocess
import sys


def test_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import selective_attention.ops.triton as t\n"
        "assert t.is_available() is False\n"
        "import torch\n"
        "assert hasattr(torch.ops.selective_attention, 'paper_fwd')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_triton_older_than_3_2_is_refused_by_name(monkeypatch):
    """Triton 3.1 (what PyTorch 2.5 installs) runs the kernels to NaN in its interpreter: the backend refuses it,
    naming the version and the way out, and ``auto`` passes it by."""
    import pytest
    import torch

    from selective_attention.functional import selective_attention
    from selective_attention.ops.registry import BackendRefused
    from selective_attention.ops.triton import op

    monkeypatch.setattr(op, "_triton_version", lambda: (3, 1))
    monkeypatch.setattr(op, "_interpreting", lambda: True)  # as if it could run here
    assert op.is_available() is False
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    with pytest.raises(BackendRefused, match=r"Triton >= 3\.2, found 3\.1.*backend='chunked'"):
        selective_attention(q, k, v, selection=True, backend="triton")
    with pytest.raises(RuntimeError, match=r"Triton >= 3\.2, found 3\.1"):
        op.triton_selective_attention(q, k, v, heads=slice(0, 1), scale=0.3, sel_scale=0.3)
    auto = selective_attention(q, k, v, selection=True)
    torch.testing.assert_close(auto, selective_attention(q, k, v, selection=True, backend="chunked"))


def test_the_refusal_names_what_is_missing(monkeypatch):
    """Triton installed and no CUDA device: the refusal says the device is missing (it said "pip install triton");
    Triton missing: it says to install it."""
    import pytest
    import torch

    from selective_attention.functional import selective_attention
    from selective_attention.ops.registry import BackendRefused
    from selective_attention.ops.triton import op

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    monkeypatch.setattr(op, "_interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(op, "_triton_version", lambda: (3, 8))
    with pytest.raises(BackendRefused, match=r"needs a CUDA device \(Triton is installed"):
        selective_attention(q, k, v, selection=True, backend="triton")
    monkeypatch.setattr(op, "_triton_version", lambda: None)
    with pytest.raises(BackendRefused, match=r"needs Triton \(pip install triton\)"):
        selective_attention(q, k, v, selection=True, backend="triton")
