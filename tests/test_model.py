"""GPTConfig, GPT and the memory loss."""

import dataclasses

import pytest
import torch

from selective_attention.model import GPT, GPTConfig, memory_loss
from selective_attention.selection import selection_penalty


def tiny(**kw):
    base = dict(vocab_size=40, context_len=48, n_layer=2, n_head=4, d_model=32)
    base.update(kw)
    return GPTConfig(**base)


def test_forward_shape_and_tying():
    m = GPT(tiny())
    logits = m(torch.randint(0, 40, (3, 11)))
    assert logits.shape == (3, 11, 40)
    assert m.lm_head.weight is m.tok_emb.weight


def test_selection_adds_no_parameters_but_changes_output():
    torch.manual_seed(0)
    std, sel = GPT(tiny()), GPT(tiny(selection=True))
    assert std.num_params() == sel.num_params()
    sel.load_state_dict(std.state_dict())
    for b in list(std.blocks) + list(sel.blocks):
        b.attn.qkv.weight.data *= 6  # strong logits: F matters
    idx = torch.randint(0, 40, (2, 30))
    assert not torch.allclose(std(idx), sel(idx))


def test_selection_layers_option():
    m = GPT(tiny(n_layer=3, selection=True, selection_layers=[1]))
    assert [b.attn.selects for b in m.blocks] == [False, True, False]
    m = GPT(tiny(n_layer=3, selection=True))
    assert all(b.attn.selects for b in m.blocks)
    msg = r"selection_layers=\(1,\): an option of selective attention, which this model \(selection=False\) does not"
    with pytest.raises(ValueError, match=msg):
        tiny(n_layer=3, selection=False, selection_layers=[1])  # silently ignored before
    # every layer listed is the same model as None (a resume compares the layers that select), but stays as given:
    # a config copied to more layers keeps selecting in the listed ones only
    from selective_attention.checkpoint import _model_diff

    listed = tiny(n_layer=2, selection=True, selection_layers=[1, 0])
    assert listed.selection_layers == (1, 0) and not _model_diff(listed, tiny(n_layer=2, selection=True))
    assert _model_diff(tiny(n_layer=2, selection=True, selection_layers=[1]), tiny(n_layer=2, selection=True))
    grown = dataclasses.replace(listed, n_layer=4)
    assert [grown.layer_selects(i) for i in range(4)] == [True, True, False, False]
    with pytest.raises(ValueError, match=r"selection_layers=\(0,\): an option"):
        tiny(n_layer=1, selection=False, selection_layers=[0])


def test_selection_for_reads_the_flat_fields_once():
    from selective_attention.selection import Selection

    cfg = tiny(n_layer=3, selection=True, selection_layers=[0, 2], selection_head=3)
    assert [cfg.selection_for(i) for i in range(3)] == [Selection(head=3), None, Selection(head=3)]
    assert tiny(selection=True, selection_per_head=True).selection_for(1) == Selection(per_head=True)
    assert tiny().selection_for(0) is None
    m = GPT(tiny(selection=True, selection_projection=True))
    assert m.blocks[0].attn.selection == Selection(projection=True)
    with pytest.raises(ValueError, match="selection_projection=True votes with its own q/k pair, so selection_head=1"):
        tiny(selection=True, selection_projection=True, selection_head=1)


def test_d_head_widens_attention_only():
    m = GPT(tiny(n_head=8, d_head=8))  # 2x heads of the default 4 x 8, same d_model
    assert m.blocks[0].attn.qkv.out_features == 3 * 64 and m.blocks[0].attn.proj.in_features == 64
    assert m(torch.randint(0, 40, (2, 9))).shape == (2, 9, 40)
    assert m.generate(torch.randint(0, 40, (1, 4)), 3, temperature=0).shape == (1, 7)


def test_causality():
    m = GPT(tiny(selection=True)).eval()
    idx = torch.randint(0, 40, (1, 20))
    idx2 = idx.clone()
    idx2[0, 15] = (idx[0, 15] + 1) % 40
    a, b = m(idx), m(idx2)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(d_model=30), "divisible"),
        (dict(d_model=36, n_head=12), "even"),
        (dict(n_layer=0), "n_layer must be a positive int"),
        (dict(dropout=1.0), "dropout"),
        (dict(selection=True, selection_layers=[5]), r"\[5\] are not layer indices"),
        (dict(selection_head=4), "selection_head"),
        (dict(memory_tau=0.0), "memory_tau"),
        # NaN and inf pass every `<`/`>` check: they must be refused, not trained with
        (dict(memory_tau=float("nan")), "memory_tau must be a finite number > 0"),
        (dict(memory_tau=float("inf")), "memory_tau must be a finite number > 0"),
        (dict(memory_eps=float("nan"), selection=True), "memory_eps must be a finite number >= 0"),
        (dict(memory_eps=float("inf"), selection=True), "memory_eps must be a finite number >= 0"),
        (dict(dropout=float("nan")), "dropout"),
        (dict(mlp_ratio=float("nan")), "mlp_ratio must be a finite number > 0"),
        (dict(mlp_ratio=0.01), "mlp_ratio"),
        (dict(rope_base=-1.0), "rope_base must be a finite number > 0"),
        (dict(d_head=5.0), "d_head must be a positive even int"),
        (dict(vocab_size=True), "vocab_size must be a positive int"),
        (dict(selection="false"), "selection must be True or False"),
        # combinations the modules would refuse later, or ignore silently
        (dict(selection=True, selection_per_head=True, selection_head=2), "selection_head=2 does not apply"),
        (dict(selection_per_head=True), r"selection_per_head=True: an option of selective attention"),
        (dict(selection_projection=True), "does not use; pass selection=True, or drop it"),
        (dict(selection_head=1), "selection_head=1: an option of selective attention"),
        (dict(memory_eps=0.1), r"memory_eps=0.1: an option of selective attention"),
        (dict(selection=True, selection_layers=[]), r"selection_layers=\(\) selects in no layer"),
        (dict(selection=True, selection_layers=[True]), r"\[True\] are not layer indices"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


def test_bad_token_ids_and_length():
    m = GPT(tiny())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=40\)"):
        m(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match="exceeds context_len=48"):
        m(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx is torch.float32; token ids must be an integer tensor.*idx.long\(\)"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"1-D shape \(4,\); for one sequence use idx\[None\]"):
        m(torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_every_integer_dtype_is_token_ids(dtype):
    m = GPT(tiny()).eval()
    idx = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(m(idx.to(dtype)), m(idx), rtol=0, atol=0)
    assert m.loss(idx.to(dtype), idx.to(dtype))[0].item() == m.loss(idx, idx)[0].item()
    torch.testing.assert_close(m.generate(idx.to(dtype), 3, temperature=0), m.generate(idx, 3, temperature=0))


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["B0", "T0"])
def test_loss_of_an_empty_batch_is_an_error_not_nan(shape):
    m = GPT(tiny(selection=True, memory_eps=0.1))
    idx = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"loss of an empty batch: idx has shape \({shape[0]}, {shape[1]}\)"):
        m.loss(idx, idx)
    with pytest.raises(ValueError, match=r"memory_loss of an empty batch: masked counts have shape \(2, 1, 0\)"):
        memory_loss([torch.zeros(2, 1, 0)])


def test_loss_checks_targets():
    m = GPT(tiny())
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"targets \(2, 4\) must have the shape of idx \(2, 5\)"):
        m.loss(idx, idx[:, 1:])
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        m.loss(idx, idx.float())


def test_memory_loss_hand_checked():
    # one layer, one sequence, T = 4: masked counts 0, 0, 0.5, 1.5 -> kept 1, 2, 2.5, 2.5
    masked = [torch.tensor([[[0.0, 0.0, 0.5, 1.5]]])]
    assert memory_loss(masked).item() == pytest.approx(2.5 / 4)
    # two layers average; batch averages
    masked2 = [torch.tensor([[[0.0, 1.0, 0.0, 0.0]]]), torch.tensor([[[0.0, 0.0, 0.0, 3.0]], [[0.0, 0.0, 0.0, 0.0]]])]
    # layer 1: kept 1, 1, 3, 4 -> max 4;  layer 2: seq a kept 1, 2, 3, 1 -> 3, seq b -> 4: mean 3.5
    assert memory_loss(masked2).item() == pytest.approx((4 + 3.5) / (2 * 4))


@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_memory_rows_and_loss_are_summed_in_float32_for_bfloat16(backend):
    """The loss subtracts the rows from a count of ~T tokens, where bfloat16's spacing is 8 (T = 1024): rows and
    count are kept in float32, so the bf16 model's memory term is the fp32 one's up to the rounding of its q, k."""
    from selective_attention.functional import selective_attention

    gen = torch.Generator().manual_seed(0)
    B, H, T, D = 1, 2, 1030, 8
    q, k, v = (torch.randn(B, H, T, D, generator=gen) * 0.6 for _ in range(3))
    rows = {}
    for dt in (torch.float64, torch.bfloat16):
        qd, kd, vd = (t.to(torch.float64).to(dt) for t in (q.bfloat16(), k.bfloat16(), v.bfloat16()))
        _, rows[dt] = selective_attention(qd, kd, vd, selection=True, memory_tau=1.0, backend=backend)
    assert rows[torch.bfloat16].dtype == torch.float32
    ref = memory_loss([rows[torch.float64]]).item()
    got = memory_loss([rows[torch.bfloat16]]).item()
    kept = T - rows[torch.float64][..., -1].max().item()  # the reference's kept count at the end: ~ its max
    assert kept < 200  # a trained-like case: most of the T tokens masked, so the loss is a small difference
    # F's own bf16 rounding (relative 2^-8 per entry, each min(F, 1) <= 1) moves a row by well under 1 token
    assert abs(got - ref) * T < 1.0, (got * T, ref * T)


def test_model_loss_includes_memory_term_from_F():
    torch.manual_seed(0)
    cfg = tiny(selection=True, memory_eps=0.1, memory_tau=1.0)
    m = GPT(cfg).double()
    for b in m.blocks:
        b.attn.qkv.weight.data *= 8
    idx = torch.randint(0, 40, (2, 24))
    tgt = torch.randint(0, 40, (2, 24))
    loss, stats = m.loss(idx, tgt)
    # the memory term from F written out, layer by layer
    pos = torch.arange(24)
    x = m.tok_emb(idx)
    per_layer = []
    for block in m.blocks:
        q, k, v, sel = block.attn.project(block.norm1(x), pos)
        qs, ks = block.attn.selection.voters(q, k, sel)
        F = selection_penalty(qs, ks)  # [B, 1, T, T]
        kept = torch.arange(1, 25, dtype=torch.float64) - F.clamp(max=1.0).sum(-1)
        per_layer.append(kept.amax(-1).mean())
        x = block(x, pos)[0]
    mem = torch.stack(per_layer).sum() / (2 * 24)
    assert mem.item() > 0
    # the logged parts are detached 0-d tensors (no host sync inside a compiled step)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())
    assert float(stats["memory"]) == pytest.approx(mem.item(), rel=1e-10)
    assert loss.item() == pytest.approx(float(stats["ce"]) + 0.1 * mem.item(), rel=1e-10)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_memory_loss_lowers_kept_tokens_when_trained():
    """A few steps of the memory loss alone push the model to mask more (the kept count drops)."""
    torch.manual_seed(0)
    m = GPT(tiny(selection=True, memory_eps=1.0))
    idx = torch.randint(0, 40, (4, 32))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        _, masked = m.hidden(idx, memory_tau=1.0)
        mem = memory_loss(masked)
        first = mem.item() if first is None else first
        opt.zero_grad()
        mem.backward()
        opt.step()
    assert mem.item() < first * 0.9


@pytest.mark.parametrize("selection", [False, True])
def test_an_fp32_model_runs_under_bf16_autocast(selection):
    # autocast makes the Linear outputs (q, k, v) bf16 while the rotary angles stayed fp32: q and k were
    # promoted back, v not ("q, k, v must share a dtype"); the decode step wrote bf16 k/v into fp32 caches
    torch.manual_seed(0)
    m = GPT(tiny(n_kv_head=2, selection=selection))
    idx = torch.randint(0, 40, (2, 20))
    ref = m(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(idx)
        out = m.generate(idx[:, :6], 8, temperature=0, budget=4 if selection else None)
    # bf16 keeps 8 bits of mantissa: logits ~1 off by a few 1e-2 at most; a wrong head or position is O(1)
    assert logits.dtype == torch.bfloat16 and (logits.float() - ref).abs().max() < 0.1
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters())
    assert out.shape == (2, 14) and torch.equal(out[:, :6], idx[:, :6])


def test_rope_angles_of_a_float64_model_are_float64_accurate():
    """A float64 model's rotary angles were computed in float32 (errors ~1e-4 rad at position 4000): float32 noise in
    every float64 result, enough that a compiled decode step (cos, sin an ulp off eager's) evicted another token
    than eager where two F values nearly tied. Float32 and lower keep float32 angles."""
    from selective_attention.model import rope_angles

    pos = torch.arange(4096)
    cos, sin = rope_angles(pos, 16, 10000.0, torch.float64)
    inv = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    ang = pos.double()[:, None] * inv
    # full width: channels i and i + 8 share angle i; sin carries the rotation's sign
    torch.testing.assert_close(cos, torch.cat([ang.cos(), ang.cos()], -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(sin, torch.cat([-ang.sin(), ang.sin()], -1), rtol=0, atol=1e-12)
    c32, _ = rope_angles(pos, 16, 10000.0, torch.float32)
    assert c32.dtype == torch.float32 and (c32[:, :8].double() - ang.cos()).abs().max() > 1e-6  # float32 angles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rotary_is_the_pairwise_rotation_to_the_bit(dtype):
    """``rotary`` computes ``(x1 cos - x2 sin, x1 sin + x2 cos)`` for the channel pairs (i, i + D/2) as
    ``x cos + swap(x) sin`` (fewer ops): the same numbers bit for bit, so trained models and committed results are
    unchanged, whatever the dtype."""
    from selective_attention.model import rope_angles, rotary

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 37, 16, generator=g, dtype=torch.float64) * 10).to(dtype)
    pos = torch.arange(1000, 1037)
    rope = rope_angles(pos, 16, 10000.0, dtype)
    cos, sin = (t[:, :8].to(dtype) for t in rope)
    sin = -sin  # the first half carries -sin
    x1, x2 = x[..., :8], x[..., 8:]
    want = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    assert torch.equal(rotary(x, rope), want)


def test_config_names_bad_selection_layers_dropout_and_budget_counts():
    import numpy as np

    base = dict(vocab_size=40, context_len=16, n_layer=2, n_head=2, d_model=16, selection=True)
    assert GPTConfig(**base, selection_layers=np.array([1])).selection_layers == (1,)  # was 'not layer indices'
    assert GPTConfig(**base, selection_layers=[torch.tensor(0)]).selection_layers == (0,)
    from fractions import Fraction

    for ok in (np.float32(0.25), np.int64(0), Fraction(1, 4), torch.tensor(0.25)):  # numbers, as before
        assert GPTConfig(**base, dropout=ok).dropout in (0.25, 0.0)
    for bad, match in [
        (dict(selection_layers=1), r"selection_layers must be a sequence of layer indices \(e.g. \[0\]"),
        (dict(selection_layers=[True]), r"selection_layers \[True\] are not layer indices"),
        (dict(selection_layers=[torch.tensor(True)]), r"selection_layers \[tensor\(True\)\] are not layer"),
        # a 0-d array raised "iteration over a 0-d array"; the Hugging Face settings named it (one rule now)
        (dict(selection_layers=np.array(1)), r"for one layer pass selection_layers=\[1\]"),
        (dict(dropout="0.1"), "dropout must be a number in \\[0, 1\\), got '0.1'"),
        (dict(dropout=None), "dropout must be a number in \\[0, 1\\), got None"),
    ]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(**base, **bad)
    with pytest.raises(ValueError, match="budgets has 1 entries but the model has n_layer=2 layers"):
        GPT(GPTConfig(**base)).new_caches(1, 8, budgets=[4])  # was zip()'s 'argument 2 is shorter'
