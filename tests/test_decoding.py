"""Decoding lives in the model: one attention layer serves the full forward, prefill and steps; the
loop above it (decoding.py) only calls the model and never imports it."""

import ast
import inspect

import pytest
import torch

from selective_attention import cache, decoding
from selective_attention.decoding import Decoder
from selective_attention.model import GPT, Attention, GPTConfig

VARIANTS = {
    "standard": dict(),
    "selective": dict(selection=True),
    "per-head": dict(selection=True, selection_per_head=True),
    "projection": dict(selection=True, selection_projection=True),
    "projection-per-head": dict(selection=True, selection_projection=True, selection_per_head=True),
    "head-2": dict(selection=True, selection_head=2),
}


def test_decoding_does_not_import_the_model():
    tree = ast.parse(inspect.getsource(decoding))
    local = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert local <= {"kv_cache", "callers"}  # the cache, and where warnings point


def test_cache_module_is_a_compatibility_shim():
    assert cache.Decoder is decoding.Decoder and cache.sample is decoding.sample


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_prefill_then_steps_equal_the_full_forward(variant):
    """Attention.forward(x, rope, cache): a prompt of 4, then one token at a time, in float64, gives
    the rows of the full causal forward."""
    cfg = GPTConfig(vocab_size=40, context_len=32, n_head=4, d_model=32, **VARIANTS[variant])
    attn = Attention(cfg, cfg.selection_for(0)).double().eval()
    for lin in (attn.qkv, attn.sel_qk):
        if lin is not None:
            lin.weight.data *= 6  # strong logits: F matters
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        full, _ = attn(x, torch.arange(12))
        c = attn.new_cache(2, 12, dtype=torch.float64)
        rows = [attn(x[:, :4], torch.arange(4), c)[0]]
        for t in range(4, 12):
            rows.append(attn(x[:, t : t + 1], torch.tensor([t]), c, input_pos=torch.tensor([t]))[0])
    torch.testing.assert_close(torch.cat(rows, 1), full, rtol=1e-10, atol=1e-10)
    assert c.pos[0].tolist() == list(range(12))


def test_a_prompt_longer_than_the_context_goes_through_a_bounded_cache():
    """With a budget <= context_len in every layer a prompt may be longer than the context: its first context_len
    tokens are read exactly, the rest one at a time through the pruned caches. Without one (a threshold alone
    bounds nothing) it is refused before anything runs."""
    from selective_attention.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, context_len=16, n_layer=2, n_head=2, d_model=16, selection=True)).eval()
    idx = torch.randint(0, 40, (2, 23))
    got = decoding.Decoder(model, budget=8).prefill(idx, 5)
    ref = decoding.Decoder(model, budget=8)
    want = ref.prefill(idx[:, :16], 7 + 5)
    for i in range(16, 23):
        want = ref.step(idx[:, i])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    out = decoding.Decoder(model, budget=8).generate(idx, 5, temperature=0.0)
    assert out.shape == (2, 28) and torch.equal(out[:, :23], idx)
    for kw in (dict(), dict(threshold=1.0)):
        with pytest.raises(ValueError, match="prompt length 23 exceeds context_len=16.*budget of at most 16"):
            decoding.Decoder(model, **kw).prefill(idx, 0)
    with pytest.raises(ValueError, match="budget 32 exceeds the model's context_len=16"):  # refused when built
        decoding.Decoder(model, budget=32)


def test_generate_takes_numpy_token_counts_and_warns_in_training_mode():
    """max_new_tokens may be any integer (numpy's too); a model left in training mode would apply its dropout while
    decoding: said, not silently done."""
    import warnings

    import numpy as np

    from selective_attention.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, context_len=32, n_layer=1, n_head=2, d_model=16, dropout=0.1, selection=True))
    idx = torch.randint(0, 40, (1, 5))
    calls = (lambda: decoding.Decoder(model).generate(idx, np.int64(3), temperature=0), lambda: model.generate(idx, 3))
    for call in calls:
        with pytest.warns(UserWarning, match=r"training mode.*model\.eval\(\)") as caught:
            out = call()
        assert out.shape == (1, 8)
        assert caught[0].filename == __file__  # the user's line, not the library's or torch's no_grad wrapper
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoding.Decoder(model).generate(idx, torch.tensor(2), temperature=0)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
            decoding.Decoder(model).prefill(idx, bad)


def test_sampling_edges_an_empty_batch_and_a_vanishing_temperature():
    """temperature=1e-300 passed validation and crashed in torch.multinomial (1e-300 is 0 in float32: inf and NaN
    odds); it now samples the largest logit, the limit as the temperature goes to 0. An empty batch is refused by
    name (it crashed in a reduction inside the cache). Sampling itself: the odds are softmax(logits / temperature)."""
    from selective_attention.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, context_len=32, n_layer=1, n_head=2, d_model=16, selection=True)).eval()
    idx = torch.randint(0, 40, (3, 5))
    greedy = model.generate(idx, 4, temperature=0)
    for t in (1e-30, 1e-300):
        assert torch.equal(model.generate(idx, 4, temperature=t, generator=torch.Generator().manual_seed(1)), greedy)
    with pytest.raises(ValueError, match=r"prompt batch is empty \(shape \(0, 5\)\)"):
        model.generate(idx[:0], 2)
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    counts = torch.bincount(decoding.sample(logits, 0.5, None, torch.Generator().manual_seed(0)), minlength=3)
    torch.testing.assert_close(counts / 20000.0, torch.softmax(logits[0] / 0.5, -1), atol=0.01, rtol=0)


def test_suppressed_tokens_are_never_sampled():
    """A BPE tokenizer's <bos> starts a text and never follows one: sampled mid-text, it was fed back as input
    and dropped from the printed text. suppress_tokens (the CLI passes <bos>) takes ids out of every draw."""
    from selective_attention.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=6, context_len=64, n_layer=1, n_head=2, d_model=16, selection=True)).eval()
    idx = torch.randint(0, 6, (4, 3))
    greedy = model.generate(idx, 8, temperature=0)
    first = int(greedy[0, 3])  # the first greedy token of row 0: suppressed, greedy picks another
    assert int(model.generate(idx, 1, temperature=0, suppress_tokens=[first])[0, 3]) != first
    out = model.generate(idx, 60, temperature=3.0, suppress_tokens=[0, 1], generator=torch.Generator().manual_seed(0))
    new = out[:, 3:]
    assert not ((new == 0) | (new == 1)).any() and set(new.unique().tolist()) == {2, 3, 4, 5}
    for bad in ([6], [-1], [0.5], list(range(6))):
        with pytest.raises(ValueError, match=r"suppress_tokens must be ids in \[0, 6\), leaving one to sample"):
            model.generate(idx, 1, suppress_tokens=bad)


def test_a_threshold_on_a_model_without_selective_layers_is_refused():
    """F = 0 everywhere on a standard model: a threshold would never evict, and the decoder (generate, pruned_loss)
    reported pruning while it held every token. The CLI refused it already; the library does too now."""
    std = GPT(GPTConfig(vocab_size=11, context_len=16, n_layer=2, n_head=2, d_model=8)).eval()
    with pytest.raises(ValueError, match="no selecting layer.*would evict nothing"):
        Decoder(std, threshold=0.5)
    with pytest.raises(ValueError, match="no selecting layer"):
        std.generate(torch.zeros(1, 3, dtype=torch.long), 2, threshold=0.5)
    Decoder(std, budget=4)  # a budget still applies (the oldest token goes)
    Decoder(
        GPT(GPTConfig(vocab_size=11, context_len=16, n_layer=2, n_head=2, d_model=8, selection=True)), threshold=0.5
    )


def _strong(seed=0, **kw):
    """A tiny selective float64 model whose votes are large (evictions happen)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=40, context_len=64, n_layer=2, n_head=4, d_model=32, selection=True)
    m = GPT(GPTConfig(**{**cfg, **kw})).double().eval()
    for b in m.blocks:
        b.attn.qkv.weight.data *= 6.0
    return m


@torch.no_grad()
def test_caches_filled_again_hold_only_the_new_prompt():
    """GPT.decode with caches that held a longer prompt: its tokens past the new prompt's stayed kept and were
    attended (the first step's logits moved by 0.14)."""
    m = _strong()
    gen = torch.Generator().manual_seed(1)
    long, short = torch.randint(0, 40, (2, 12), generator=gen), torch.randint(0, 40, (2, 4), generator=gen)
    reused, fresh = m.new_caches(2, 20), m.new_caches(2, 20)
    m.decode(long, reused)
    torch.testing.assert_close(m.decode(short, reused), m.decode(short, fresh), rtol=0, atol=0)
    tok, pos = torch.tensor([[3], [7]]), torch.tensor([4])
    torch.testing.assert_close(m.decode(tok, reused, pos), m.decode(tok, fresh, pos), rtol=0, atol=0)
    for a, b in zip(reused, fresh):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.fcum, b.fcum)


@torch.no_grad()
def test_a_step_into_a_full_unbudgeted_layer_is_refused_not_written_over_the_first_token():
    m = _strong()
    caches = m.new_caches(1, 5)  # the prompt and one token
    m.decode(torch.randint(0, 40, (1, 4)), caches)
    m.decode(torch.tensor([[5]]), caches, torch.tensor([4]))  # the fifth slot
    before = [c.pos.clone() for c in caches]
    with pytest.raises(ValueError, match=r"no budget and its 5 slots are full.*new_caches\(max_len"):
        m.decode(torch.tensor([[6]]), caches, torch.tensor([5]))
    assert torch.equal(caches[0].pos, before[0]) and int(caches[0].pos.min()) == 0  # the first token kept
    # slots freed since (as a threshold frees them): written, although the host count says full; then refused
    for c in caches:
        c.pos[:, 1:3], c.fcum[:, :, 1:3] = -1, float("inf")
    m.decode(torch.tensor([[6]]), caches, torch.tensor([5]))
    m.decode(torch.tensor([[7]]), caches, torch.tensor([6]))
    with pytest.raises(ValueError, match="slots are full"):
        m.decode(torch.tensor([[8]]), caches, torch.tensor([7]))
    assert sorted(caches[0].pos[0].tolist()) == [0, 3, 4, 5, 6]


@torch.no_grad()
def test_a_threshold_of_any_real_number_type_decodes_as_its_float():
    """check_policy took any real number, and a Fraction then failed inside the cache (a tensor compared with it: a
    TypeError), an int beyond a float's range with an OverflowError (found by a review helper): a Fraction now
    decodes as its float, and a number no float holds is refused up front, by name."""
    from fractions import Fraction

    m = _strong()
    prompt = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    want = Decoder(m, threshold=0.5, budget=8).generate(prompt, 10, temperature=0)
    assert torch.equal(Decoder(m, threshold=Fraction(1, 2), budget=8).generate(prompt, 10, temperature=0), want)
    for bad in (10**400, Fraction(10**400)):
        with pytest.raises(ValueError, match="threshold must be None or a number >= 0"):
            Decoder(m, threshold=bad)


def test_a_threshold_alone_sizes_the_buffers_within_the_context():
    """Each step past context_len checks that no layer attends to more than it, so an unbudgeted layer never holds
    more: its buffers stop there (they were the prompt plus max_new_tokens: 309 slots for a context of 16)."""
    m = _strong(context_len=16)
    dec = Decoder(m, threshold=0.0)
    prompt = torch.randint(0, 40, (1, 10), generator=torch.Generator().manual_seed(0))
    out = dec.generate(prompt, 60, temperature=0)
    assert out.shape == (1, 70) and [c.capacity for c in dec.caches] == [16, 16]
    # the same tokens as with buffers of every token's size (what a threshold keeps does not depend on them)
    ref = Decoder(m, threshold=0.0)
    ref.prefill(prompt, 60)
    assert [c.capacity for c in ref.caches] == [16, 16]
    big = m.new_caches(1, 70, threshold=0.0)
    logits = m.decode(prompt, big)
    for i, t in enumerate(out[0, 10:].tolist()):
        assert int(logits.argmax()) == t
        logits = m.decode(torch.tensor([[t]]), big, torch.tensor([10 + i]))
    # without a threshold a step past max_new_tokens is still refused before any layer writes
    dec = Decoder(m)
    dec.prefill(prompt, 2)
    dec.step(torch.tensor([1]))
    dec.step(torch.tensor([2]))
    with pytest.raises(ValueError, match="full after 12 tokens"):
        dec.step(torch.tensor([3]))


def test_a_prefill_under_inference_mode_steps_outside_it():
    """The caches and position a prefill made under torch.inference_mode were inference tensors: a step outside it
    failed with torch's raw "Inplace update to inference tensor outside InferenceMode"."""
    m = _strong()
    idx = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    dec, ref = Decoder(m, budget=5), Decoder(m, budget=5)
    with torch.inference_mode():
        logits = dec.prefill(idx, 4)
    torch.testing.assert_close(logits, ref.prefill(idx, 4), rtol=0, atol=0)
    for _ in range(3):
        tok = logits.argmax(-1)
        logits = dec.step(tok)
        torch.testing.assert_close(logits, ref.step(tok), rtol=0, atol=0)
