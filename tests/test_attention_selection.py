"""SelectiveAttention(selection=True): the paper's layer, its options, and torch.compile."""

import pytest
import torch
from helpers import TOL

from selective_attention import SelectiveAttention
from selective_attention.functional import selective_attention
from selective_attention.selection import Selection, selection_penalty


def heads(x, d_k):
    B, L, C = x.shape
    return x.view(B, L, C // d_k, d_k).transpose(1, 2)


def reference(attn: SelectiveAttention, x, F):
    """The layer written out: project, attend with causal and the given F on every head, project."""
    d_k = attn.d_k
    q, k, v = heads(attn.q_proj(x), d_k), heads(attn.k_proj(x), d_k), heads(attn.v_proj(x), d_k)
    B, H, L, _ = q.shape
    o = selective_attention(q, k, v, F.expand(B, H, L, L).contiguous(), is_causal=True, backend="naive")
    return attn.out_proj(o.transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("backend", ["naive", "chunked", "auto"])
def test_paper_layer_equals_reference(backend):
    torch.manual_seed(0)
    attn = SelectiveAttention(24, 3, dropout=0.0, selection=True, backend=backend).double()
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    q, k = heads(attn.q_proj(x), 8), heads(attn.k_proj(x), 8)
    F = selection_penalty(q[:, 0], k[:, 0])[:, None]
    torch.testing.assert_close(attn(x, x, x), reference(attn, x, F), **TOL[torch.float64])
    torch.testing.assert_close(attn.selection_penalty(x), F)


def test_paper_layer_adds_no_parameters():
    std = SelectiveAttention(32, 4)
    sel = SelectiveAttention(32, 4, selection=True)
    assert sum(p.numel() for p in sel.parameters()) == sum(p.numel() for p in std.parameters())


def test_selection_head_option():
    torch.manual_seed(1)
    attn = SelectiveAttention(24, 3, dropout=0.0, selection=Selection(head=2)).double()
    x = torch.randn(2, 15, 24, dtype=torch.float64)
    q, k = heads(attn.q_proj(x), 8), heads(attn.k_proj(x), 8)
    F = selection_penalty(q[:, 2], k[:, 2])[:, None]
    torch.testing.assert_close(attn(x, x, x), reference(attn, x, F), **TOL[torch.float64])
    head0 = SelectiveAttention(24, 3, dropout=0.0, selection=True).double()
    head0.load_state_dict(attn.state_dict())
    assert not torch.allclose(head0(x, x, x), attn(x, x, x))


def test_per_head_option():
    torch.manual_seed(2)
    attn = SelectiveAttention(24, 3, dropout=0.0, selection=Selection(per_head=True)).double()
    x = torch.randn(2, 15, 24, dtype=torch.float64)
    q, k = heads(attn.q_proj(x), 8), heads(attn.k_proj(x), 8)
    F = torch.stack([selection_penalty(q[:, h], k[:, h]) for h in range(3)], dim=1)  # [B, H, L, L]
    torch.testing.assert_close(attn(x, x, x), reference(attn, x, F), **TOL[torch.float64])
    assert attn.selection_penalty(x).shape == (2, 3, 15, 15)


@pytest.mark.parametrize("per_head", [False, True])
def test_dedicated_projection_option(per_head):
    torch.manual_seed(3)
    attn = SelectiveAttention(24, 3, dropout=0.0, selection=Selection(projection=True, per_head=per_head)).double()
    assert attn.sel_q_proj.out_features == (24 if per_head else 8)
    x = torch.randn(2, 15, 24, dtype=torch.float64)
    qs, ks = heads(attn.sel_q_proj(x), 8), heads(attn.sel_k_proj(x), 8)
    F = selection_penalty(qs, ks)
    torch.testing.assert_close(attn(x, x, x), reference(attn, x, F), **TOL[torch.float64])
    attn(x, x, x).sum().backward()
    assert attn.sel_q_proj.weight.grad.abs().sum() > 0 and attn.sel_k_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "new, old",
    [
        (Selection(head=2), dict(selection_head=2)),
        (Selection(per_head=True), dict(selection_per_head=True)),
        (Selection(projection=True), dict(selection_projection=True)),
        (Selection(projection=True, per_head=True), dict(selection_projection=True, selection_per_head=True)),
    ],
)
def test_deprecated_option_aliases(new, old):
    """selection_head / selection_per_head / selection_projection still build the same layer, with a warning."""
    with pytest.warns(DeprecationWarning, match=r"deprecated; pass selection=Selection\("):
        legacy = SelectiveAttention(24, 3, dropout=0.0, selection=True, **old).double()
    attn = SelectiveAttention(24, 3, dropout=0.0, selection=new).double()
    assert attn.selection == legacy.selection == new
    attn.load_state_dict(legacy.state_dict())  # same parameters (sel_q_proj / sel_k_proj with projection)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    torch.testing.assert_close(attn(x, x, x), legacy(x, x, x), rtol=0, atol=0)


def test_paper_layer_with_padding_and_weights():
    attn = SelectiveAttention(16, 2, dropout=0.0, selection=True)
    x = torch.randn(2, 9, 16)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    out, w = attn(x, x, x, key_padding_mask=pad, need_weights=True)
    assert (w[1, :, :, 6:] == 0).all() and (w.triu(1) == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 9))
    assert torch.isfinite(out).all()


def test_bad_selection_options():
    with pytest.raises(ValueError, match=r"Selection.head=4 is not a head .* n_heads=4 \(heads 0 .. 3\)"):
        SelectiveAttention(32, 4, selection=Selection(head=4))
    with pytest.raises(ValueError, match=r"Selection.head=4 is not a head .* n_heads=4"):
        SelectiveAttention(32, 4, selection=True, selection_head=4)
    with pytest.raises(ValueError, match="pass selection=True"):
        SelectiveAttention(32, 4, selection_per_head=True)
    with pytest.raises(ValueError, match="does not apply"):
        SelectiveAttention(32, 4, selection=True, selection_per_head=True, selection_head=1)
    attn = SelectiveAttention(32, 4, selection=True)
    with pytest.raises(ValueError, match="Lq == Lk"):
        attn(torch.randn(1, 3, 32), torch.randn(1, 5, 32), torch.randn(1, 5, 32))
    with pytest.raises(ValueError, match="selection=True"):
        SelectiveAttention(32, 4).selection_penalty(torch.randn(1, 3, 32))


def test_repr_mentions_selection():
    assert "selection=True (head=0)" in repr(SelectiveAttention(32, 4, selection=True))


def test_torch_compile_paper_layer():
    """torch.compile (inductor) of the paper layer (the chunked custom ops inside its graph): same outputs and grads."""
    torch.manual_seed(0)
    attn = SelectiveAttention(32, 4, dropout=0.0, selection=True)
    x = torch.randn(2, 70, 32, requires_grad=True)
    ref = attn(x, x, x)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    compiled = torch.compile(attn)
    out = compiled(x, x, x)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)  # sums over 70 x 32 fp32 terms


def test_readme_paper_mode_example_runs():
    """The README's paper-mode snippet, executed as written."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Paper mode") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README paper mode", "exec"), ns)
    assert ns["y"].shape == (2, 100, 256) and ns["F"].shape == (2, 100, 100)
    assert ns["o"].shape == (2, 8, 100, 64)
