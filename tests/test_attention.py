"""SelectiveAttention, the seed's module: the seed's five test groups and beyond."""

import pathlib
import re
import warnings

import pytest
import torch
from helpers import TOL
from torch import nn

from selective_attention import SelectiveAttention
from selective_attention.functional import selective_attention as functional_attention

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The seed README's usage example, character for character.
SEED_EXAMPLE = """\
import torch
from torch import nn
from selective_attention import SelectiveAttention

d_model = 512
n_heads = 8
batch_size = 32
seq_len = 64

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Initialize the inputs
Q = torch.randn(batch_size, seq_len, d_model).to(device)
K = torch.randn(batch_size, seq_len, d_model).to(device)
V = torch.randn(batch_size, seq_len, d_model).to(device)

# Create a causal mask to prevent attending to future tokens
selective_mask = torch.triu(torch.ones((seq_len, seq_len), dtype=torch.bool, device=Q.device) * float('-inf'), diagonal=1).unsqueeze(0).unsqueeze(1).expand(batch_size, n_heads, seq_len, seq_len)

# Initialize and run the SelectiveAttention module
selective_attention = SelectiveAttention(d_model, n_heads).to(device)
output = selective_attention(Q, K, V, selective_mask=selective_mask)
print(output.shape)  # Expected output: (batch_size, seq_len, d_model)
"""  # noqa: E501


def test_seed_usage_example_runs_verbatim_and_is_causal(capsys):
    ns: dict = {}
    exec(compile(SEED_EXAMPLE, "seed_example", "exec"), ns)
    assert capsys.readouterr().out.strip() == "torch.Size([32, 64, 512])"
    module, Q, K, V = ns["selective_attention"], ns["Q"], ns["K"], ns["V"]
    module.eval()
    with torch.no_grad():
        masked = module(Q, K, V, selective_mask=ns["selective_mask"])
        causal = module(Q, K, V, is_causal=True)
        # Causal: changing the last key/value changes only the last query's output.
        K2, V2 = K.clone(), V.clone()
        K2[:, -1] += 1.0
        V2[:, -1] += 1.0
        changed = module(Q, K2, V2, selective_mask=ns["selective_mask"])
    torch.testing.assert_close(masked, causal)
    assert torch.equal(changed[:, :-1], masked[:, :-1])
    assert not torch.allclose(changed[:, -1], masked[:, -1])


def test_readme_contains_seed_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert SEED_EXAMPLE in readme


# --- 1. basic sanity ---------------------------------------------------------------------------
@pytest.mark.parametrize("B, Lq, Lk", [(2, 5, 5), (3, 4, 9), (1, 7, 2)])
def test_output_shape_and_cross_attention(B, Lq, Lk):
    attn = SelectiveAttention(32, 4)
    out = attn(torch.randn(B, Lq, 32), torch.randn(B, Lk, 32), torch.randn(B, Lk, 32))
    assert out.shape == (B, Lq, 32)
    assert torch.isfinite(out).all()


def test_module_equals_functional_with_projections():
    attn = SelectiveAttention(24, 3, dropout=0.0)
    x, y = torch.randn(2, 5, 24), torch.randn(2, 6, 24)
    m = torch.rand(5, 6) < 0.3

    def heads(t):
        return t.view(2, -1, 3, 8).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(y)), heads(attn.v_proj(y))
    ref = attn.out_proj(functional_attention(q, k, v, m, backend="naive").transpose(1, 2).reshape(2, 5, 24))
    torch.testing.assert_close(attn(x, y, y, m), ref, **TOL[torch.float32])


# --- 2. selective masking ----------------------------------------------------------------------
def test_mask_reduces_attention_to_masked_tokens():
    attn = SelectiveAttention(16, 2, dropout=0.0)
    x = torch.randn(1, 6, 16)
    F = torch.zeros(6, 6)
    F[:, 2] = 3.0
    _, w0 = attn(x, x, x, need_weights=True)
    _, w1 = attn(x, x, x, F, need_weights=True)
    assert (w1[..., 2] < w0[..., 2]).all()
    m = torch.zeros(6, 6, dtype=torch.bool)
    m[:, 2] = True
    out, w2 = attn(x, x, x, m, need_weights=True)
    assert (w2[..., 2] == 0).all()
    torch.testing.assert_close(w2.sum(-1), torch.ones(1, 2, 6))
    # the removed token's value has no effect on the output
    x2 = x.clone()
    x2[:, 2] += 5.0
    out2 = attn(x, x2, x2, m)
    torch.testing.assert_close(out, out2)


# --- 3. edge cases -----------------------------------------------------------------------------
def test_zero_length_sequence():
    attn = SelectiveAttention(16, 4)
    x = torch.randn(3, 0, 16, requires_grad=True)
    out = attn(x, x, x)
    assert out.shape == (3, 0, 16)
    out.sum().backward()
    assert attn.out_proj.weight.grad is not None and (attn.out_proj.weight.grad == 0).all()


def test_single_token_sequence_is_value_projection():
    attn = SelectiveAttention(16, 4, dropout=0.0)
    x = torch.randn(3, 1, 16)
    out = attn(x, x, x, is_causal=True)
    torch.testing.assert_close(out, attn.out_proj(attn.v_proj(x)), **TOL[torch.float32])


def test_all_removed_query_outputs_out_proj_bias_with_finite_grads():
    attn = SelectiveAttention(16, 4, dropout=0.0)
    x = torch.randn(2, 4, 16, requires_grad=True)
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[1] = True
    out = attn(x, x, x, m)
    torch.testing.assert_close(out[:, 1], attn.out_proj.bias.expand(2, 16))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())


# --- 4. gradients ------------------------------------------------------------------------------
def test_gradcheck_module_float64():
    attn = SelectiveAttention(8, 2, dropout=0.0).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    F = torch.randn(4, 4, dtype=torch.float64).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("inf"))
    assert torch.autograd.gradcheck(lambda x: attn(x, x, x, F), (x,))


def test_every_parameter_gets_a_gradient():
    attn = SelectiveAttention(16, 4)
    x = torch.randn(2, 5, 16)
    attn(x, x, x, is_causal=True).pow(2).sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- 5. random masks ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_random_masks_match_reference_weights(seed):
    g = torch.Generator().manual_seed(seed)
    attn = SelectiveAttention(32, 4, dropout=0.0)
    x = torch.randn(2, 9, 32, generator=g)
    m = torch.rand(2, 4, 9, 9, generator=g) < 0.5
    out, w = attn(x, x, x, m, need_weights=True)
    assert (w[m] == 0).all()
    alive = ~m.all(-1)
    torch.testing.assert_close(w.sum(-1)[alive], torch.ones(int(alive.sum())))
    assert (w.sum(-1)[~alive] == 0).all()
    assert torch.isfinite(out).all()


# --- dropout -----------------------------------------------------------------------------------
def test_dropout_only_in_training():
    attn = SelectiveAttention(32, 4, dropout=0.5)
    x = torch.randn(2, 8, 32)
    attn.eval()
    assert torch.equal(attn(x, x, x), attn(x, x, x))
    attn.train()
    assert not torch.equal(attn(x, x, x), attn(x, x, x))


# --- equality with nn.MultiheadAttention -------------------------------------------------------
def _twin_mha(attn: SelectiveAttention) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(attn.d_model, attn.n_heads, dropout=0.0, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        mha.out_proj.weight.copy_(attn.out_proj.weight)
        mha.out_proj.bias.copy_(attn.out_proj.bias)
    return mha.eval()


@pytest.mark.parametrize("kind", ["none", "bool", "float", "padding", "causal+padding", "per-head"])
@pytest.mark.parametrize("Lq, Lk", [(7, 7), (5, 9)])
def test_equals_multihead_attention(kind, Lq, Lk):
    B, d, H = 3, 32, 4
    attn = SelectiveAttention(d, H, dropout=0.0).eval()
    mha = _twin_mha(attn)
    Q, K, V = torch.randn(B, Lq, d), torch.randn(B, Lk, d), torch.randn(B, Lk, d)
    ours_kw, mha_kw = {}, {}
    keep_first = torch.zeros(Lq, Lk, dtype=torch.bool)
    keep_first[:, 0] = True  # MHA gives NaN for fully removed rows; keep key 0 for everyone
    pad = torch.rand(B, Lk) < 0.3
    pad[:, 0] = False
    if kind == "bool":
        m = (torch.rand(Lq, Lk) < 0.4) & ~keep_first
        ours_kw["selective_mask"], mha_kw["attn_mask"] = m, m
    elif kind == "float":
        F = torch.randn(Lq, Lk).masked_fill((torch.rand(Lq, Lk) < 0.3) & ~keep_first, float("inf"))
        ours_kw["selective_mask"], mha_kw["attn_mask"] = F, -F  # ours subtracts, MHA adds
    elif kind == "padding":
        ours_kw["key_padding_mask"], mha_kw["key_padding_mask"] = pad, pad
    elif kind == "causal+padding":
        causal = torch.ones(Lq, Lk, dtype=torch.bool).triu(1 + Lk - Lq)
        ours_kw.update(is_causal=True, key_padding_mask=pad)
        mha_kw.update(attn_mask=causal, key_padding_mask=pad)
    elif kind == "per-head":
        m = (torch.rand(B, H, Lq, Lk) < 0.4) & ~keep_first
        ours_kw["selective_mask"], mha_kw["attn_mask"] = m, m.reshape(B * H, Lq, Lk)
    with torch.no_grad():
        ours, w_ours = attn(Q, K, V, need_weights=True, **ours_kw)
        ref, w_ref = mha(Q, K, V, need_weights=True, average_attn_weights=False, **mha_kw)
    torch.testing.assert_close(ours, ref, **TOL[torch.float32])
    torch.testing.assert_close(w_ours, w_ref, **TOL[torch.float32])


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, match",
    [
        ((512, 7), r"d_model \(512\) must be divisible by n_heads \(7\)"),
        ((512, 0), "n_heads must be a positive int, got 0"),
        ((512, -2), "n_heads must be a positive int"),
        ((0, 1), "d_model must be a positive int"),
        ((512, 8, 1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
        ((512, 8, -0.1), r"dropout must be a number in \[0, 1\)"),
    ],
)
def test_bad_constructor_args(args, match):
    with pytest.raises(ValueError, match=match):
        SelectiveAttention(*args)


def test_bad_forward_inputs():
    attn = SelectiveAttention(16, 4)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"3-D \[B, L, d_model\].*unsqueeze"):
        attn(x[0], x[0], x[0])
    with pytest.raises(ValueError, match=r"Q has 8 features .* built with d_model=16; project the inputs to 16"):
        attn(x[..., :8], x, x)
    with pytest.raises(ValueError, match=r"batch size \(no broadcasting\); got 2, 1, 1; .* K.expand\(2, -1, -1\)"):
        attn(x, x[:1], x[:1])
    with pytest.raises(ValueError, match="same length"):
        attn(x, x, x[:, :3])
    with pytest.raises(TypeError, match="float64 but the module's weights are torch.float32"):
        attn(x.double(), x.double(), x.double())
    with pytest.raises(TypeError, match="integer|torch.bool"):
        attn(x, x, x, torch.ones(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="ambiguous"):
        attn(x, x, x, torch.zeros(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        attn(x, x, x, torch.zeros(3, 4, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="Q must be a torch.Tensor"):
        attn([1.0], x, x)
    with pytest.raises(TypeError, match="is_causal must be True or False, got 'false'"):
        attn(x, x, x, is_causal="false")
    with pytest.raises(TypeError, match="need_weights must be True or False, got 'false'"):
        attn(x, x, x, need_weights="false")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_inputs_are_told_to_convert_not_to_cast_the_module(dtype):
    attn = SelectiveAttention(16, 4, selection=True)
    x = torch.randn(2, 5, 16)
    msg = rf"K is {dtype}, but attention inputs must be floating point .* convert with K.to\(torch.float32\)"
    with pytest.raises(TypeError, match=msg) as e:
        attn(x, x.to(dtype), x)
    assert "module.to" not in str(e.value)  # a module of int64 weights cannot attend
    with pytest.raises(TypeError, match=r"Q is .*must be floating point"):
        attn.selection_penalty(x.to(dtype))


def test_stacked_modules_run_under_autocast():
    """Under torch.autocast a first layer outputs bfloat16; the next module took it for a dtype mismatch with its
    float32 weights (and advised module.to(bfloat16), which defeats mixed precision). nn.Linear and
    nn.MultiheadAttention accept it there."""
    torch.manual_seed(0)
    a1, a2 = SelectiveAttention(32, 4, dropout=0.0).eval(), SelectiveAttention(32, 4, dropout=0.0).eval()
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = a1(x, x, x, is_causal=True)
        assert h.dtype == torch.bfloat16
        y = a2(h, h, x, is_causal=True)  # bfloat16 and float32 inputs together, as nn.Linear takes them
        assert y.dtype == torch.bfloat16
    want = a2(h.float(), h.float(), x, is_causal=True)
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)  # bf16 of values ~1: a few ulps of 2^-8
    with pytest.raises(TypeError, match="module's weights are torch.float32"):  # outside autocast: still refused
        a2(h, h, h, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="module's weights are"):
        a2(x.double(), x, x, is_causal=True)  # autocast leaves float64 alone: torch's own error otherwise


def test_bad_ranks_say_what_to_do():
    attn = SelectiveAttention(16, 4)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"V must be 3-D .* 2-D \(5, 16\); for a single sequence use V.unsqueeze\(0\)"):
        attn(x, x, x[0])
    with pytest.raises(
        ValueError, match=r"4-D .*split into heads .* selective_attention.functional.selective_attention"
    ):
        attn(torch.randn(2, 4, 5, 16), x, x)
    with pytest.raises(ValueError, match=r"got 1, 2, 2; expand a batch of one, e.g. Q.expand\(2, -1, -1\)"):
        attn(x[:1], x, x)


def test_repr_names_sizes():
    assert re.search(r"d_model=16, n_heads=4, dropout=0.1", repr(SelectiveAttention(16, 4)))


def test_numpy_integer_sizes_are_taken_as_ints():
    """d_model, n_heads and n_kv_heads from NumPy (a config array, np.prod) are taken, as nn.Linear takes them; they
    were refused as not positive ints. A NumPy bool is still refused."""
    np = pytest.importorskip("numpy")
    m = SelectiveAttention(np.int64(32), np.int32(4), dropout=0.0, n_kv_heads=np.int64(2))
    assert (m.d_model, type(m.d_model)) == (32, int)
    assert m(torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(2, 5, 32)).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        SelectiveAttention(np.bool_(True), 1)


@pytest.mark.parametrize("selection", [False, True])
def test_dynamically_quantized_projections_run(selection):
    """After torch.ao's dynamic quantization the projections' ``weight`` is a method: the input checks read its
    dtype and device and raised an AttributeError; they leave those checks to the projections now."""
    torch.manual_seed(0)
    m = SelectiveAttention(32, 4, dropout=0.0, selection=selection).eval()
    x = torch.randn(2, 6, 32)
    ref = m(x, x, x, is_causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in recent torch
        qm = torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    assert not isinstance(qm.q_proj.weight, torch.Tensor)
    out = qm(x, x, x, is_causal=True)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1  # int8 weights: an error of ~1% of the outputs' scale, not a different layer


@pytest.mark.parametrize("selection", [False, True])
@pytest.mark.parametrize("where", ["meta", "fake"])
def test_tensors_without_values_infer_shapes_with_masks(selection, where):
    """On the meta device and under FakeTensorMode (shape inference, FLOP counting) a call with a mask read the mask's
    values (Tensor.item() cannot be called on meta tensors); it takes the value-free path now, backward too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, L, d = 2, 9, 32

    def run(device):
        m = SelectiveAttention(d, 4, dropout=0.0, selection=selection)
        m = m.to(device) if device == "meta" else m
        x = torch.randn(B, L, d, device=device, requires_grad=True)
        masks = [
            {"key_padding_mask": torch.zeros(B, L, dtype=torch.bool, device=device)},
            {"selective_mask": torch.zeros(L, L, device=device)},
            {"selective_mask": torch.zeros(L, L, dtype=torch.bool, device=device)},
        ]
        for kw in masks:
            y = m(x, x, x, is_causal=True, **kw)
            y.sum().backward()
            assert y.shape == (B, L, d) and x.grad.shape == x.shape

    if where == "meta":
        run("meta")
    else:
        with FakeTensorMode():
            run("cpu")
