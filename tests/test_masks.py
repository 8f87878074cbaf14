"""The mask rule of DESIGN §2: bool True removes; float F subtracted; any +-inf removes."""

import math
import re
import warnings

import pytest
import torch
from helpers import qkv

from selective_attention.functional import attention_weights, selective_attention
from selective_attention.masks import causal_removed, normalize_mask

INF = float("inf")


def test_worked_example_3x3():
    """The README's 3x3 example, checked against softmax written out by hand."""
    q = torch.zeros(1, 1, 3, 4, dtype=torch.float64)  # zero queries: all logits 0
    k = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    F = torch.tensor([[0.0, INF, INF], [0.0, 0.0, -INF], [2.0, 0.0, 0.0]], dtype=torch.float64)
    w = attention_weights(q, k, F)[0, 0]
    e = math.exp(-2.0)
    expected = torch.tensor(
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]], dtype=torch.float64
    )
    torch.testing.assert_close(w, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_any_infinity_removes(sign):
    q, k, v = qkv(2, 3, 5, 5, 8, requires_grad=False)
    F = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), sign * INF)
    w = attention_weights(q, k, F)
    assert (w[..., torch.ones(5, 5, dtype=torch.bool).triu(1)] == 0).all()
    torch.testing.assert_close(selective_attention(q, k, v, F), selective_attention(q, k, v, is_causal=True))


def test_bool_true_removes_and_equals_inf_float():
    q, k, v = qkv(2, 2, 6, 7, 4, requires_grad=False)
    m = torch.rand(2, 2, 6, 7) < 0.4
    w = attention_weights(q, k, m)
    assert (w[m.expand_as(w)] == 0).all()
    Fm = torch.zeros(m.shape).masked_fill(m, INF)
    torch.testing.assert_close(selective_attention(q, k, v, m), selective_attention(q, k, v, Fm))


def test_positive_F_lowers_negative_raises():
    q, k, v = qkv(1, 1, 4, 4, 8, requires_grad=False)
    base = attention_weights(q, k)
    F = torch.zeros(4, 4)
    F[:, 1] = 1.5
    F[:, 2] = -1.5
    w = attention_weights(q, k, F)
    assert (w[..., 1] < base[..., 1]).all() and (w[..., 2] > base[..., 2]).all()
    # exactly: weight ratio between two keys changes by exp(F_b - F_a)
    ratio = (w[..., 2] / w[..., 1]) / (base[..., 2] / base[..., 1])
    torch.testing.assert_close(ratio, torch.full_like(ratio, math.exp(3.0)), rtol=1e-5, atol=0)


def test_nan_mask_raises():
    q, k, v = qkv(1, 1, 3, 3, 4)
    F = torch.zeros(3, 3)
    F[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        selective_attention(q, k, v, F)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_mask_raises(dtype):
    q, k, v = qkv(1, 1, 3, 3, 4)
    # both 0/1 conventions named: .bool() alone turns a tril(ones) "may attend" mask anti-causal
    with pytest.raises(
        TypeError, match=r"torch.bool.*with 1 = removed use mask.bool\(\); with 1 = may attend.*mask == 0"
    ):
        selective_attention(q, k, v, torch.zeros(3, 3, dtype=dtype))
    with pytest.raises(TypeError, match=r"1 = padding use key_padding_mask.bool\(\), with 1 = a real token.*== 0"):
        selective_attention(q, k, v, key_padding_mask=torch.ones(1, 3, dtype=dtype))


def test_a_float_mask_of_another_dtype_is_read_then_cast():
    """Removal is read in the mask's own dtype and only its finite penalties are cast to the queries'
    (an fp32 seed mask with bf16 queries under autocast, an fp64 mask with fp32 queries); a finite penalty
    that the cast would turn into inf (removing its key) is an error naming the value."""
    q, k, v = qkv(1, 2, 5, 5, 4)
    F64 = torch.rand(5, 5, dtype=torch.float64) * 3
    F64[1, 3] = INF
    F64[4, 0] = -INF
    want = selective_attention(q, k, v, F64.float())
    torch.testing.assert_close(selective_attention(q, k, v, F64), want, rtol=0, atol=0)
    # the seed's float mask under autocast: the module's q is bf16, the user's mask fp32
    from selective_attention import SelectiveAttention

    torch.manual_seed(0)
    m = SelectiveAttention(16, 4, dropout=0.0).eval()
    x = torch.randn(2, 5, 16)
    seed_mask = torch.triu(torch.full((5, 5), -INF), diagonal=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x, x, x, seed_mask)
        ref = m(x, x, x, torch.ones(5, 5, dtype=torch.bool).triu(1))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    h = qkv(1, 1, 3, 3, 4)
    with pytest.raises(ValueError, match=r"beyond the queries. torch.float16 range.*bool mask.*largest is 100000"):
        selective_attention(*(t.half() for t in h), torch.tensor([[0.0, 1e5, 0.0]] * 3))


def test_the_additive_mask_warning_points_at_the_callers_line():
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selective_attention(q, k, v, torch.full((4, 4), -1e9))
    assert [w.filename for w in caught] == [__file__]


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 3, 3), "ambiguous"),
        ((3,), "2-D"),
        ((1, 1, 1, 3, 3), "2-D"),
        ((3, 3, 3, 3), "does not broadcast"),
        ((2, 3), "full"),
        ((1, 1, 1, 3), "full"),
        ((4, 4), "full"),
    ],
)
def test_bad_mask_shapes_raise(shape, match):
    q, k, v = qkv(2, 2, 3, 3, 4)
    with pytest.raises(ValueError, match=match):
        selective_attention(q, k, v, torch.zeros(shape, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(2, 1, 1, 5), (1, 5), (3, 1)])
def test_the_fix_a_partial_mask_shape_error_names_runs(shape):
    """The refusal of a mask that broadcasts along its query or key axis names an expand() call that works: it said
    mask.expand(..., Lq, Lk), a TypeError when run."""
    q, k, v = qkv(2, 1, 3, 5, 4, requires_grad=False)
    mask = torch.zeros(shape, dtype=torch.bool)
    with pytest.raises(ValueError, match="must cover the full") as err:
        selective_attention(q, k, v, mask)
    fix = re.search(r"Use (mask\.expand\([^)]*\))", str(err.value)).group(1)
    fixed = eval(fix, {"mask": mask})  # noqa: S307 -- the error's own text, built from ints
    assert selective_attention(q, k, v, fixed).shape == (2, 1, 3, 4)


def test_mask_not_a_tensor_raises():
    q, k, v = qkv(1, 1, 3, 3, 4)
    with pytest.raises(TypeError, match="selective_mask must be a torch.Tensor"):
        selective_attention(q, k, v, [[0, 1]])


@pytest.mark.parametrize("shape", [(3, 5), (1, 1, 3, 5), (2, 1, 3, 5), (1, 4, 3, 5), (2, 4, 3, 5)])
def test_accepted_broadcast_shapes(shape):
    q, k, v = qkv(2, 4, 3, 5, 8, requires_grad=False)
    m = torch.rand(shape) < 0.3
    full = m.expand(2, 4, 3, 5) if m.dim() == 4 else m[None, None].expand(2, 4, 3, 5)
    torch.testing.assert_close(selective_attention(q, k, v, m), selective_attention(q, k, v, full.contiguous()))


def test_key_padding_mask_rules():
    q, k, v = qkv(2, 2, 3, 4, 8, requires_grad=False)
    with pytest.raises(TypeError, match="torch.bool"):
        selective_attention(q, k, v, key_padding_mask=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(B, Lk\) = \(2, 4\)"):
        selective_attention(q, k, v, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    pad = torch.tensor([[False, False, True, True], [False, False, False, True]])
    w = attention_weights(q, k, key_padding_mask=pad)
    assert (w[0, :, :, 2:] == 0).all() and (w[1, :, :, 3] == 0).all()
    assert (w[1, :, :, :3] > 0).all()


def test_seed_mask_is_recognised_as_causal():
    """The seed's expanded -inf mask runs on the causal kernels: nothing materialised per (B, H)."""
    L = 6
    m = torch.triu(torch.ones((L, L), dtype=torch.bool) * float("-inf"), diagonal=1)[None, None].expand(3, 2, L, L)
    nm = normalize_mask(m, B=3, H=2, Lq=L, Lk=L, dtype=torch.float32, device=torch.device("cpu"))
    assert nm.causal and nm.removed is None and nm.penalty is None


def test_causal_with_other_removals_keeps_both():
    L = 5
    m = torch.zeros(L, L, dtype=torch.bool)
    m[4, 0] = True
    nm = normalize_mask(m, B=1, H=1, Lq=L, Lk=L, dtype=torch.float32, device=torch.device("cpu"), is_causal=True)
    expected = causal_removed(L, L)
    expected[4, 0] = True
    assert not nm.causal and torch.equal(nm.removed[0, 0], expected)


def test_causal_alignment_cross_lengths():
    assert torch.equal(causal_removed(2, 4), torch.tensor([[0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool))
    assert torch.equal(causal_removed(3, 3), torch.ones(3, 3, dtype=torch.bool).triu(1))


def test_a_learned_mask_starting_at_zero_gets_its_gradient():
    """A zero parameter (plus a -inf causal part) is the usual start of a learned bias: it is a penalty whose
    gradient flows, not 'no penalty' (its values all 0 once dropped it from the graph)."""
    L = 6
    bias = torch.zeros(L, L, dtype=torch.float64, requires_grad=True)
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    q, k, v = (torch.randn(1, 2, L, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for backend in ("naive", "auto"):
        (g,) = torch.autograd.grad(selective_attention(q, k, v, bias + causal, backend=backend).pow(2).sum(), bias)
        assert g.abs().sum() > 0
        if backend == "naive":
            want = g
    torch.testing.assert_close(g, want)


def test_an_additive_style_mask_is_warned_about_and_a_bad_scale_refused():
    """F is subtracted (DESIGN §2): -1e9, the additive-mask convention for "masked", gives those keys the most
    weight. That is warned about (the fix named); a non-finite scale is refused."""
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    additive = torch.zeros(4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), -1e9)
    with pytest.warns(UserWarning, match=r"subtracted.*pass its negation, or a bool mask") as seen:
        selective_attention(q, k, v, additive)
    from selective_attention import SelectiveAttention

    with pytest.warns(UserWarning, match=r"subtracted") as through_module:
        x = torch.randn(1, 4, 8)
        SelectiveAttention(8, 1, dropout=0.0)(x, x, x, additive, need_weights=True)
    # the user's line, not the package's (through the module it pointed into attention.py, once per call inside)
    assert {w.filename for w in [*seen, *through_module]} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selective_attention(q, k, v, -additive)  # the same mask negated: a penalty, no warning
        selective_attention(q, k, v, torch.full((4, 4), -5.0))  # a moderate bonus is legitimate
    for bad in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            selective_attention(q, k, v, scale=bad)


@pytest.mark.parametrize(
    ("shape", "fix"),
    [((5, 3), "looks transposed"), ((2, 1, 5, 3), "looks transposed"), ((7, 7), "Build it for these lengths")],
)
def test_a_mask_shape_that_cannot_broadcast_is_not_told_to_expand(shape, fix):
    """A mask for other lengths (transposed, or built for a sequence-first layout) was told to mask.expand(Lq, Lk),
    which fails; the error names what looks wrong instead, and a transposed mask's fix runs."""
    q, k, v = qkv(2, 1, 3, 5, 4, requires_grad=False)
    mask = torch.zeros(shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=fix) as err:
        selective_attention(q, k, v, mask)
    assert "expand" not in str(err.value)
    if fix == "looks transposed":
        assert selective_attention(q, k, v, mask.transpose(-2, -1)).shape == (2, 1, 3, 4)
