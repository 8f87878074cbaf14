"""Decoding lives in the model: one attention layer serves the full forward, prefill and steps; the
loop above it (decoding.py) only calls the model and never imports it."""

import ast
import inspect

import pytest
import torch

from selective_attention import cache, decoding
from selective_attention.model import Attention, GPTConfig

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
    assert local <= {"kv_cache"}


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
