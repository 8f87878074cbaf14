"""attn_implementation="selective" inside Hugging Face models, SelectiveCache, the memory loss.

Tiny random configs built here (nothing downloaded). The reference is our naive spec run on the same
model's q/k/v with keys/values repeated for grouped-query attention (registered as another attention
implementation), never HF's eager attention (float32 softmax, NaN rows under padding in fp64).
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import selective_attention.hf as sa_hf  # noqa: E402
from selective_attention.functional import selective_attention  # noqa: E402
from selective_attention.machine import cpu_signature  # noqa: E402
from selective_attention.selection import Selection, selection_penalty  # noqa: E402

CACHE = sa_hf.cache_keyword()  # the keyword this transformers takes a cache by (cache=, or past_key_values=)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sa_hf.register()

CAPTURED: list = []  # (layer_idx, q, k, v) of the reference's calls, for the memory-loss formula


def reference_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The naive spec on the model's own q/k/v, keys and values repeated to H heads."""
    s = sa_hf.settings(module.config)
    sel = s.selection_for(module.layer_idx)
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    kpm = None if attention_mask is None else ~attention_mask
    CAPTURED.append((module.layer_idx, query, k, v))
    kw = dict(is_causal=True) if sel is None else dict(selection=sel)
    out = selective_attention(query, k, v, key_padding_mask=kpm, scale=scaling, backend="naive", **kw)
    return out.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register("selective_ref", reference_forward)
transformers.masking_utils.AttentionMaskInterface.register("selective_ref", sa_hf.padding_mask)

V = 61


def tiny_config(family: str, **sel):
    common = dict(
        vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=8, **common)
    elif family == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
    else:
        raise ValueError(family)
    return sa_hf.configure(cfg, **sel)


def build(family: str, dtype=torch.float64, seed: int = 0, impl: str = "selective", **sel):
    torch.manual_seed(seed)
    cfg = tiny_config(family, **sel)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=dtype)
    return model.eval()


def padded_batch(seed: int = 1, lengths=(11, 8, 5), side: str = "left"):
    """Token ids [B, T], the 2-D mask (1 = real) and positions counted from each first real token."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        ids[b, sl] = torch.randint(1, V, (n,), generator=g)
        mask[b, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_grads_match_the_spec(family):
    ids, mask, pos = padded_batch()
    sel_model = build(family).train()  # training mode: the path Trainer takes (no dropout configured)
    ref_model = build(family, impl="selective_ref").train()
    out = sel_model(ids, attention_mask=mask, position_ids=pos).logits
    ref = ref_model(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=1e-10)  # fp64: only summation order differs
    (out[real] ** 2).sum().backward()
    (ref[real] ** 2).sum().backward()
    for (name, p), (_, r) in zip(sel_model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=1e-9, msg=name)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_the_unpadded_sequence(side):
    model = build("llama")
    ids, mask, pos = padded_batch(side=side)
    out = model(ids, attention_mask=mask, position_ids=pos).logits
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        alone = model(ids[b : b + 1, real]).logits[0]
        torch.testing.assert_close(out[b, real], alone, rtol=0, atol=1e-12)


def test_selection_changes_the_model_and_options_reach_it():
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    paper = build("llama")(ids).logits
    std = build("llama", impl="sdpa")(ids).logits
    assert (paper - std).abs().max() > 1e-6  # F is not zero
    for sel in [dict(selection=Selection(head=3)), dict(selection=Selection(per_head=True)), dict(layers=[1])]:
        out = build("llama", **sel)(ids).logits
        ref = build("llama", impl="selective_ref", **sel)(ids).logits
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        assert (out - paper).abs().max() > 1e-8, sel
    # layers=[] selects nowhere: standard attention
    torch.testing.assert_close(build("llama", layers=[])(ids).logits, std, rtol=0, atol=1e-10)


def test_settings_survive_save_and_reload(tmp_path):
    model = build("llama", selection=Selection(head=2), layers=[0], memory_eps=0.25, memory_tau=2.0)
    model.save_pretrained(tmp_path)
    auto = transformers.AutoModelForCausalLM
    again = auto.from_pretrained(tmp_path, attn_implementation="selective", dtype=torch.float64)
    s = sa_hf.settings(again.config)
    assert s == sa_hf.HFSettings(Selection(head=2), (0,), 0.25, 2.0)
    ids = torch.randint(0, V, (1, 9))
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    again.set_attn_implementation("sdpa")
    assert (again(ids).logits - model(ids).logits).abs().max() > 1e-8
    again.set_attn_implementation("selective")
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_saved_selective_model_reloads_selective_without_being_told(tmp_path):
    """from_pretrained(path) with no attn_implementation gives back selective attention for a model that ran it (it
    came back as sdpa, silently); an sdpa model built from the same configured config stays sdpa; an explicit
    attn_implementation still wins, and its model saves without the record."""
    auto = transformers.AutoModelForCausalLM
    ids = torch.randint(0, V, (2, 12))
    model = build("llama")
    want = model(ids).logits
    model.save_pretrained(tmp_path / "sel")
    again = auto.from_pretrained(tmp_path / "sel", dtype=torch.float64)
    assert again.config._attn_implementation == "selective"
    torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=0)
    std = build("llama", impl="sdpa")
    std(ids)
    std.save_pretrained(tmp_path / "std")
    assert auto.from_pretrained(tmp_path / "std").config._attn_implementation == "sdpa"
    assert json.loads((tmp_path / "std" / "config.json").read_text()).get("attn_implementation") is None
    other = auto.from_pretrained(tmp_path / "sel", attn_implementation="sdpa", dtype=torch.float64)
    assert other.config._attn_implementation == "sdpa"
    assert (other(ids).logits - want).abs().max() > 1e-8
    other.save_pretrained(tmp_path / "other")
    assert auto.from_pretrained(tmp_path / "other").config._attn_implementation == "sdpa"
    bare = transformers.LlamaConfig()  # a config of no model keeps a record set by hand
    bare.attn_implementation = "selective"
    assert bare.to_dict()["attn_implementation"] == "selective"


def test_the_record_is_the_implementation_run_when_saved(tmp_path):
    """The record was written at a forward: a selective model loaded and saved again without one (a dtype conversion,
    a push) lost it and came back as sdpa (0.003 off), and a model switched to sdpa after running selective saved as
    selective. Now save_pretrained records what the model runs at that moment, before any forward too."""
    auto = transformers.AutoModelForCausalLM
    ids = torch.randint(0, V, (2, 12))
    model = build("llama")  # never run
    want = model(ids).logits
    model.save_pretrained(tmp_path / "a")
    auto.from_pretrained(tmp_path / "a", dtype=torch.float64).save_pretrained(tmp_path / "b")  # no forward between
    again = auto.from_pretrained(tmp_path / "b", dtype=torch.float64)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["attn_implementation"] == "selective"
    assert again.config._attn_implementation == "selective"
    torch.testing.assert_close(again(ids).logits, want, rtol=0, atol=0)
    again.set_attn_implementation("sdpa")  # after a selective forward: it runs sdpa now
    again.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text()).get("attn_implementation") is None
    assert auto.from_pretrained(tmp_path / "c").config._attn_implementation == "sdpa"
    assert "attn_implementation" not in transformers.LlamaConfig().to_dict()  # other configs: no record


def test_configure_takes_numpy_and_tensor_layer_indices(tmp_path):
    """Layer indices as numpy or tensor integers (as budgets take them) are stored as plain ints, so config.json
    serialises them; bools, floats and negatives are still refused."""
    import numpy as np

    for layers in (np.array([0, 1]), [np.int64(1)], torch.tensor([0])):
        cfg = tiny_config("llama", layers=layers)
        stored = cfg.selective_attention["layers"]
        assert stored == [int(i) for i in layers] and all(type(i) is int for i in stored)
        json.dumps(stored)
    model = build("llama", layers=np.array([1]))
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="selective")
    assert sa_hf.settings(again.config).layers == (1,)
    for bad in ([True], [0.0], [-1], np.array([[0]])):
        with pytest.raises(ValueError, match=r"layers \[.*\] are not layer indices \(ints >= 0\)"):
            tiny_config("llama", layers=bad)
    for bad, hint in (
        (1, r"layers=\[1\]"),
        (torch.tensor(1), r"layers=\[1\]"),
        (np.array(1), r"layers=\[1\]"),
        ("01", "sequence of layer indices"),
    ):
        with pytest.raises(ValueError, match=hint):
            tiny_config("llama", layers=bad)


def test_configure_takes_numpy_and_tensor_numbers_and_refuses_bools_and_bad_stored_settings():
    """memory_eps and memory_tau as numpy or 0-d tensor numbers are stored as plain floats (config.json serialises
    them); a bool (True would be eps = 1) is refused; a hand-edited selection with an unknown key is named."""
    import numpy as np

    for eps in (np.float32(0.25), torch.tensor(0.25), np.array(0.25), np.int64(1)):
        cfg = tiny_config("llama", memory_eps=eps, memory_tau=np.float64(0.5))
        stored = cfg.selective_attention
        assert stored["memory_eps"] == float(eps) and type(stored["memory_eps"]) is float
        assert stored["memory_tau"] == 0.5 and type(stored["memory_tau"]) is float
        json.dumps(stored)
    for bad in (True, np.bool_(True), torch.tensor(True), torch.tensor([0.1]), "0.1", float("nan")):
        with pytest.raises(ValueError, match="memory_eps must be a finite number"):
            tiny_config("llama", memory_eps=bad)
    cfg = tiny_config("llama")
    cfg.selective_attention = {"selection": {"heads": 1}}
    with pytest.raises(ValueError, match=r"\{'heads': 1\} is not a selection.*head, per_head, projection"):
        sa_hf.settings(cfg)


def test_configure_a_composite_model_reaches_its_text_decoder(tmp_path):
    """A vision-language model's attention layers read its text config: configure() on the top config writes the
    settings there (it once wrote them where no layer looked, and the defaults ran silently)."""
    text = tiny_config("llama")
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    cfg = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=V - 1)
    sa_hf.configure(cfg, layers=[1], selection=Selection(head=3), memory_eps=0.5)
    want = sa_hf.HFSettings(Selection(head=3), (1,), 0.5, 1.0)
    assert sa_hf.settings(cfg.text_config) == want and sa_hf.settings(cfg) == want
    with pytest.raises(ValueError, match="layers the model lacks"):
        sa_hf.configure(cfg, layers=[7])
    torch.manual_seed(0)
    impl = {"text_config": "selective", "vision_config": "sdpa"}
    model = transformers.LlavaForConditionalGeneration._from_config(cfg, attn_implementation=impl, dtype=torch.float64)
    attn = model.model.language_model.layers[0].self_attn
    assert sa_hf.settings(attn.config) == want
    model.save_pretrained(tmp_path)
    again = transformers.AutoConfig.from_pretrained(tmp_path)
    assert sa_hf.settings(again.text_config) == want


def greedy_by_recomputation(model, ids, mask, n):
    ids, mask = ids.clone(), mask.clone()
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        nxt = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_without_budget_equals_recomputation(family):
    model = build(family)
    ids, mask, _ = padded_batch(seed=5)
    cache = sa_hf.SelectiveCache()
    out = model.generate(ids, attention_mask=mask, **{CACHE: cache}, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_by_recomputation(model, ids, mask, 12))
    n_tokens = ids.shape[1] + 12 - 1  # the last token is sampled, not cached
    assert max(cache.occupancy()) == n_tokens - 0  # left padding: the longest prompt has no padding


def test_generate_without_budget_grows_when_any_row_is_full():
    """The unbudgeted buffers start at the prompt + 64 slots. With left padding the longest row fills them first
    while the others still have room: the buffers must grow then (they once grew only when every row was full,
    and the longest row's new tokens overwrote its protected first token). Logits equal recomputation."""
    model = build("llama")
    ids, mask, _ = padded_batch(seed=6, lengths=(11, 5))
    n = 70  # past 11 + 64 slots in the first row
    out = model.generate(ids, attention_mask=mask, **{CACHE: sa_hf.SelectiveCache()}, max_new_tokens=n, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    seq, m = out.sequences[:, : ids.shape[1]], mask
    for t, logits in enumerate(out.logits):
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        want = model(seq, attention_mask=m, position_ids=pos, use_cache=False).logits[:, -1]
        # generate returns the fp64 model's logits as fp32: equal up to that rounding (the bug: 1e-2 at step 65)
        torch.testing.assert_close(logits, want.to(logits.dtype), rtol=1e-6, atol=1e-6)
        seq = out.sequences[:, : ids.shape[1] + t + 1]
        m = torch.cat([m, torch.ones_like(m[:, :1])], 1)


def test_generate_a_second_time_continues_exactly():
    """A cache passed again continues where it stopped (several new tokens at once go token by token)."""
    model = build("llama")
    ids = torch.randint(1, V, (1, 7), generator=torch.Generator().manual_seed(2))
    cache = sa_hf.SelectiveCache()
    first = model.generate(ids, **{CACHE: cache}, max_new_tokens=4, do_sample=False, pad_token_id=0)
    more = torch.randint(1, V, (1, 3), generator=torch.Generator().manual_seed(4))
    prompt = torch.cat([first, more], 1)
    out = model.generate(prompt, **{CACHE: cache}, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_by_recomputation(model, prompt, torch.ones_like(prompt), 5))


def test_a_prompt_with_padding_inside_continues_exactly_and_a_new_prompt_is_named():
    """Padding inside a prompt (not only on the left) decodes exactly, and so does its continuation: that was refused
    as "passed with use_cache=False", the positions (counted over real tokens) taken for a sequence fed again. A new
    prompt on a filled cache is named as such (it was blamed on use_cache=False too)."""
    model = build("llama")
    ids = torch.randint(1, V, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 3:5] = 0
    cache = sa_hf.SelectiveCache()
    kw = dict(do_sample=False, pad_token_id=0)
    first = model.generate(ids, attention_mask=mask, **{CACHE: cache}, max_new_tokens=4, **kw)
    assert torch.equal(first, greedy_by_recomputation(model, ids, mask, 4))
    more = torch.randint(1, V, (2, 2), generator=torch.Generator().manual_seed(1))
    prompt, pmask = torch.cat([first, more], 1), torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    out = model.generate(prompt, attention_mask=pmask, **{CACHE: cache}, max_new_tokens=3, do_sample=False,
                         pad_token_id=0)  # fmt: skip
    assert torch.equal(out, greedy_by_recomputation(model, prompt, pmask, 3))
    # a continuation ending in padding is named as padding, not as a sequence fed again
    tail = torch.cat([out, torch.randint(1, V, (2, 2))], 1)
    tmask = torch.cat([pmask, torch.ones(2, 3, dtype=mask.dtype), torch.tensor([[1, 1], [1, 0]])], 1)
    with pytest.raises(NotImplementedError, match="padding after the prompt"):
        model.generate(tail, attention_mask=tmask, **{CACHE: cache}, max_new_tokens=2, **kw)
    cache = sa_hf.SelectiveCache(budget=4)
    model.generate(ids[:1], **{CACHE: cache}, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match=r"start again.*a new prompt \(pass a new SelectiveCache\(\)"):
        model.generate(ids[1:], **{CACHE: cache}, max_new_tokens=4, do_sample=False, pad_token_id=0)


def test_a_continuation_of_several_tokens_with_the_models_own_positions_is_exact():
    """A left-padded batch continued by a call of several tokens without position_ids: the model's default positions
    count the padding (the cache position), which the check for a sequence fed again refused ("they start again")."""
    model = build("llama")
    ids, mask, _ = padded_batch(seed=5)
    more = torch.randint(1, V, (3, 3), generator=torch.Generator().manual_seed(9))
    full = torch.cat([mask, torch.ones_like(more)], 1)
    cache = sa_hf.SelectiveCache()
    model(ids, attention_mask=mask, **{CACHE: cache}, use_cache=True)
    out = model(more, attention_mask=full, **{CACHE: cache}, use_cache=True).logits
    ref = model(torch.cat([ids, more], 1), attention_mask=full, use_cache=False).logits[:, -3:]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="use_cache=False"):  # the whole sequence fed again is still refused
        model(torch.cat([ids, more], 1), attention_mask=full, position_ids=(full.cumsum(-1) - 1).clamp(min=0),
              **{CACHE: cache}, use_cache=True)  # fmt: skip


def test_a_continuation_at_offset_positions_is_exact():
    """Positions that start at an offset (a later window of a text) run without a cache and token by token through
    one; a continuation of several tokens was refused as a sequence fed again ("they start again")."""
    model = build("llama")
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(100, 109)[None].expand(2, 9)
    ref = model(ids, position_ids=pos, use_cache=False).logits
    cache = sa_hf.SelectiveCache()
    model(ids[:, :6], position_ids=pos[:, :6], **{CACHE: cache}, use_cache=True)
    out = model(ids[:, 6:], position_ids=pos[:, 6:], **{CACHE: cache}, use_cache=True).logits
    torch.testing.assert_close(out, ref[:, 6:], rtol=0, atol=1e-12)
    for start in (100, 106):  # the window (or its tail) fed again at its own positions: refused, at any offset
        with pytest.raises(ValueError, match="start again"):
            model(ids[:, start - 100 :], position_ids=pos[:, start - 100 :], **{CACHE: cache}, use_cache=True)


@pytest.mark.parametrize("layers", [None, []])  # selecting layers, and none (standard attention through the cache)
def test_gradients_through_several_cached_calls_equal_the_full_forward(layers):
    """A forward with gradients through a SelectiveCache: a prompt, a call of 3 tokens, then 2 single tokens; the loss
    on every call's logits has the gradients of the same loss over one forward of the whole sequence. Two or more
    steps raised autograd's "modified by an inplace operation" (the cache's buffers were written in place after an
    earlier step had saved them, and relu's output was masked in place)."""
    model = build("llama", layers=layers)
    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(3))
    cache = sa_hf.SelectiveCache()
    logits = [model(ids[:, :7], **{CACHE: cache}, use_cache=True).logits]
    logits.append(model(ids[:, 7:10], **{CACHE: cache}, use_cache=True).logits)
    logits += [model(ids[:, t : t + 1], **{CACHE: cache}, use_cache=True).logits for t in (10, 11)]
    loss = (torch.cat(logits, 1) ** 2).mean()
    got = torch.autograd.grad(loss, list(model.parameters()))
    ref_logits = model(ids, use_cache=False).logits
    want = torch.autograd.grad((ref_logits**2).mean(), list(model.parameters()))
    torch.testing.assert_close(torch.cat(logits, 1), ref_logits, rtol=0, atol=1e-12)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("budget", [4, [3, 6]])
def test_budget_bounds_every_layer(budget):
    model = build("qwen2")
    ids, mask, _ = padded_batch(seed=6)
    cache = sa_hf.SelectiveCache(budget=budget)
    out = model.generate(ids, attention_mask=mask, **{CACHE: cache}, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert out.shape == (3, ids.shape[1] + 10)
    budgets = [budget] * 2 if isinstance(budget, int) else budget
    assert cache.occupancy() == budgets
    D, Hkv = 8, 2
    assert cache.kv_bytes() == sum(2 * 3 * Hkv * b * D * 8 for b in budgets)  # k and v, fp64, every slot


def test_budget_keeps_the_first_real_token_and_drops_the_most_masked():
    """Budget 3: after the prompt each layer holds the first token and the two others with the smallest
    accumulated F (the next step then evicts one of them to make room), checked against the spec's F."""
    model = build("llama")
    CAPTURED.clear()
    ids = torch.randint(1, V, (1, 9), generator=torch.Generator().manual_seed(8))
    ref = build("llama", impl="selective_ref")
    ref(ids)
    cache = sa_hf.SelectiveCache(budget=3)
    model(ids, **{CACHE: cache}, use_cache=True)
    for layer_idx, q, k, _ in CAPTURED:
        F = selection_penalty(q[:, 0], k[:, 0])  # [1, T, T]: F[i, j]
        Fnext = F[0, -1] + torch.relu(q[0, 0, -1] @ k[0, 0].T / math.sqrt(q.shape[-1])) * (
            (torch.arange(9) > 0) & (torch.arange(9) < 8)
        )  # the F the query after the prompt sees
        keep = {0, *sorted(range(1, 9), key=lambda j: (Fnext[j].item(), -j))[:2]}  # ties: the newer kept
        kept = cache.layers[layer_idx].cache.pos[0]
        assert set(kept[kept >= 0].tolist()) == keep


def test_errors_name_the_case_and_the_fix():
    model = build("llama")
    ids = torch.randint(1, V, (2, 6))
    with pytest.raises(ValueError, match="SelectiveCache"):  # a plain DynamicCache cannot hold the votes
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="beam search"):
        cache = sa_hf.SelectiveCache()
        model.generate(ids, **{CACHE: cache}, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="budget"):
        sa_hf.SelectiveCache(budget=1)
    with pytest.raises(ValueError, match="policy='window' chooses what a full layer evicts, and no layer has a budget"):
        sa_hf.SelectiveCache(policy="window")
    with pytest.raises(ValueError, match="projection"):
        sa_hf.configure(transformers.LlamaConfig(), selection=Selection(projection=True))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        sa_hf.configure(transformers.LlamaConfig(num_hidden_layers=2), layers=[2])
    # a sliding window shorter than the sequence would change the model
    torch.manual_seed(0)
    cfg = tiny_config("mistral")
    cfg.sliding_window = 4
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="selective").eval()
    with pytest.raises(NotImplementedError, match="sliding window"):
        m(ids)
    # packed sequences (positions restarting, no mask) would need a block mask
    with pytest.raises(NotImplementedError, match="packed|mask"):
        model(torch.randint(1, V, (1, 6)), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), use_cache=False)


@pytest.mark.parametrize("inference", [False, True])
def test_padding_after_the_prompt_is_refused_in_every_call(inference):
    """A continuation whose padding mask has padding after the prompt is refused, naming the fix. Every layer of a
    call sees the same mask, which is read once per call: the next call's mask is read again. Under
    torch.inference_mode the mask has no version to remember, and is read in every layer."""
    model = build("llama")
    ids, mask, _ = padded_batch(lengths=(6, 4), side="left")
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        cache = sa_hf.SelectiveCache(budget=4)
        model(ids, attention_mask=mask, **{CACHE: cache}, use_cache=True)
        step = torch.randint(1, V, (2, 1))
        ok = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        model(step, attention_mask=ok, **{CACHE: cache}, use_cache=True)  # all real after the prompt
        nxt = torch.cat([ok, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        nxt[1, -1] = 0  # the second row pads its new token
        with pytest.raises(NotImplementedError, match="padded continuation.*pad prompts on the left"):
            model(step, attention_mask=nxt, **{CACHE: cache}, use_cache=True)
    # the memo (a weak reference) does not stop a used cache from being saved: pickled and loaded, it decodes on
    ok2 = torch.cat([ok, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        want = model(step, attention_mask=ok2, **{CACHE: copy.deepcopy(cache)}, use_cache=True).logits
        got = model(step, attention_mask=ok2, **{CACHE: pickle.loads(pickle.dumps(cache))}, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_packed_sequences_are_refused_with_the_default_cache():
    """Packed sequences (positions restarting, no attention_mask) reach the mask hook only without a cache; with the
    DynamicCache a model builds by default (use_cache, in eval and in training) they ran silently, every token
    attending across the other sequences of its row. The positions refuse them; consecutive ones, from any start,
    and left padding (which has a mask) still run."""
    model = build("llama")
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(0))
    packed = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2]])
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with pytest.raises(NotImplementedError, match=r"packed sequences.*row 1: \[0, 1, 2, 0, 1, 2\].*attention_mask"):
            model(ids, position_ids=packed)
    model.eval()
    start = torch.arange(5, 11)[None]  # a window of a longer text: consecutive, not packed
    torch.testing.assert_close(model(ids, position_ids=start).logits, model(ids, position_ids=start).logits)
    start[0, 3:] = torch.arange(3)  # the same tensor, changed in place: checked again
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(ids, position_ids=start)
    with torch.inference_mode():  # an inference tensor has no version counter: checked every time
        pos = torch.arange(6)[None]
        model(ids[:1], position_ids=pos)
        pos[0, 3:] = torch.arange(3)
        with pytest.raises(NotImplementedError, match="packed sequences"):
            model(ids[:1], position_ids=pos)
    cache = sa_hf.SelectiveCache()  # and through a SelectiveCache (its prefill)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(ids, position_ids=packed, **{CACHE: cache}, use_cache=True)
    pids, pmask, ppos = padded_batch(seed=5)  # left padding: positions repeat 0 under the mask
    model(pids, attention_mask=pmask, position_ids=ppos)
    out = model.generate(pids, attention_mask=pmask, **{CACHE: sa_hf.SelectiveCache()}, max_new_tokens=3,
                         do_sample=False, pad_token_id=0)  # fmt: skip
    assert torch.equal(out, greedy_by_recomputation(model, pids, pmask, 3))


def test_output_attentions_warns_once_and_names_the_alternatives(caplog):
    """Like sdpa, the selective function returns no attention weights: output_attentions=True says so (once)
    instead of returning an empty tuple silently."""
    import logging

    logging.Logger.warning_once.cache_clear()  # transformers' once-per-message cache
    model = build("llama")
    ids = torch.randint(1, V, (1, 5))
    with caplog.at_level(logging.WARNING, logger="selective_attention.hf"):
        out = model(ids, output_attentions=True)
        model(ids, output_attentions=True)
    assert out.attentions == ()
    said = [r.getMessage() for r in caplog.records if "attention weights" in r.getMessage()]
    assert len(said) == 1, said  # two calls of two layers: one warning
    assert "attention_weights" in said[0] and "attn_implementation='eager'" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selective_attention.hf"):
        model(ids)
    assert not caplog.records


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_longer_than_the_sequence_is_plain_causal(family):
    """Mistral-7B-v0.1 and Qwen2 with use_sliding_window configure a window; while a sequence fits in it the window
    masks nothing, so the model runs (it was refused whatever the length), with the logits of the same model
    without a window, generation included; a longer sequence is refused, naming the setting."""
    ids, mask, pos = padded_batch(seed=7)
    models = []
    for window in (32, None):
        cfg = tiny_config(family)
        cfg.sliding_window = window
        if family == "qwen2":
            cfg.use_sliding_window, cfg.max_window_layers = window is not None, 1  # layer 1 slides, layer 0 not
            cfg.layer_types = None
            cfg = type(cfg)(**cfg.to_dict())  # rebuilt: layer_types follow the window settings
        torch.manual_seed(0)
        models.append(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="selective",
                                                                    dtype=torch.float64).eval())  # fmt: skip
    windowed, plain = models
    assert windowed.config.sliding_window == 32
    torch.testing.assert_close(windowed(ids, attention_mask=mask, position_ids=pos).logits,
                               plain(ids, attention_mask=mask, position_ids=pos).logits, rtol=0, atol=0)  # fmt: skip
    gen = {}
    for name, m in (("windowed", windowed), ("plain", plain)):
        gen[name] = m.generate(ids, attention_mask=mask, **{CACHE: sa_hf.SelectiveCache()}, max_new_tokens=8,
                               do_sample=False, pad_token_id=0)  # fmt: skip
    assert torch.equal(gen["windowed"], gen["plain"])
    with pytest.raises(
        NotImplementedError, match=r"local span of 32 tokens \(a sliding window.*has 40.*sliding_window"
    ):
        windowed(torch.randint(1, V, (1, 40)))


def test_cache_arguments_and_misuse_are_clear_errors():
    import numpy as np

    model = build("llama")  # 2 layers
    ids = torch.randint(1, V, (1, 6))
    assert sa_hf.SelectiveCache(budget=np.int64(4)).budget == 4 and sa_hf.SelectiveCache(torch.tensor(5)).budget == 5
    assert sa_hf.SelectiveCache(budget=(np.int32(3), 4)).budget == [3, 4]
    assert sa_hf.SelectiveCache(budget=np.array([3, 4])).budget == [3, 4]
    assert sa_hf.SelectiveCache(budget=torch.tensor([5, 6])).budget == [5, 6]
    for bad in (True, 1, 2.5, "4", [4, 1]):
        with pytest.raises(ValueError, match="budget must be"):
            sa_hf.SelectiveCache(budget=bad)
    with pytest.raises(ValueError, match="threshold"):
        sa_hf.SelectiveCache(threshold=True)
    plain = build("llama", layers=[])  # no selecting layer: F = 0, a threshold evicted nothing, silently
    cache = sa_hf.SelectiveCache(threshold=0.0)
    with pytest.raises(ValueError, match=r"threshold=0.0 evicts .*no selecting layer.*evict nothing"):
        plain.generate(ids, **{CACHE: cache}, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert cache.broken is None  # refused in the first layer: the cache is as it was
    for budget in ([4], [4, 4, 4]):  # too few or too many for 2 layers (the extra one was silently ignored)
        with pytest.raises(ValueError, match=r"lists \d budgets and the model has 2 layers"):
            model.generate(ids, **{CACHE: sa_hf.SelectiveCache(budget=budget)}, max_new_tokens=2, do_sample=False)
    pids, pmask, _ = padded_batch(seed=8)  # (checked where a padding mask is given)
    with pytest.raises(ValueError, match="use_cache=False"):  # the cache and the whole sequence again, each step
        model.generate(pids, attention_mask=pmask, **{CACHE: sa_hf.SelectiveCache()}, use_cache=False, max_new_tokens=3,
                       do_sample=False, pad_token_id=0)  # fmt: skip
    for mask in (None, torch.ones_like(pids)):  # unpadded too (generate drops an all-ones mask): it decoded wrongly
        cache = sa_hf.SelectiveCache()
        with pytest.raises(ValueError, match="SelectiveCache was passed with use_cache=False"):
            model.generate(pids[:, -5:], attention_mask=mask, **{CACHE: cache}, use_cache=False, max_new_tokens=3,
                           do_sample=False, pad_token_id=0)  # fmt: skip
        # the prompt is read (use_cache=False alone is not refused: some models' layers say it by default); the
        # sequence fed again is refused in the first layer, its count undone: the cache holds the prompt, usable
        assert [layer.seen for layer in cache.layers] == [5, 5] and cache.broken is None
    # a model that does not pass use_cache down to its attention (Gemma 2): refused by the positions, which start again
    g2 = transformers.Gemma2Config(
        vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=4096,
        attn_logit_softcapping=None,
    )  # fmt: skip
    gemma = transformers.AutoModelForCausalLM.from_config(sa_hf.configure(g2), attn_implementation="selective").eval()
    with pytest.raises(ValueError, match=r"start again.*generate\(use_cache=False\) is feeding the whole sequence"):
        gemma.generate(pids[:, -5:], **{CACHE: sa_hf.SelectiveCache()}, use_cache=False, max_new_tokens=3,
                       do_sample=False, pad_token_id=0)  # fmt: skip
    want = gemma.generate(pids[:, -5:], use_cache=False, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for chunk in (None, 2):  # a continuation whose positions follow the cache's (chunked prefill) still runs
        kw = {} if chunk is None else {"prefill_chunk_size": chunk}
        got = gemma.generate(pids[:, -5:], **{CACHE: sa_hf.SelectiveCache()}, max_new_tokens=3, do_sample=False,
                             pad_token_id=0, **kw)  # fmt: skip
        assert torch.equal(got, want), chunk
    with pytest.raises(NotImplementedError, match="2-D padding mask"):
        model(ids, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))
    # a filled cache reused for a new padded prompt, or for another batch size: named, with the fix, and the cache
    # is left as it was (it still continues its own batch)
    cache = sa_hf.SelectiveCache(budget=4)
    first = model.generate(
        pids, attention_mask=pmask, **{CACHE: cache}, max_new_tokens=2, do_sample=False, pad_token_id=0
    )
    with pytest.raises(ValueError, match=r"new SelectiveCache\(\) or cache.reset\(\)"):
        model.generate(pids, attention_mask=pmask, **{CACHE: cache}, max_new_tokens=2, do_sample=False, pad_token_id=0)
    cache = sa_hf.SelectiveCache(budget=4)
    model.generate(pids, attention_mask=pmask, **{CACHE: cache}, max_new_tokens=2, do_sample=False, pad_token_id=0)
    seen = [layer.seen for layer in cache.layers]
    with pytest.raises(ValueError, match=r"holds 3 sequences and the call has 1.*new SelectiveCache\(\)"):
        model.generate(
            torch.randint(1, V, (1, 20)), **{CACHE: cache}, max_new_tokens=2, do_sample=False, pad_token_id=0
        )
    assert [layer.seen for layer in cache.layers] == seen and cache.broken is None
    prompt = torch.cat([first, torch.randint(1, V, (3, 2))], 1)
    more = model.generate(prompt, attention_mask=torch.cat([pmask, torch.ones(3, 4, dtype=pmask.dtype)], 1),
                          **{CACHE: cache}, max_new_tokens=1, do_sample=False, pad_token_id=0)  # fmt: skip
    assert more.shape == (3, prompt.shape[1] + 1)


def _tiny_family(family: str, **sel):
    """A tiny model of another family (its config's defaults, shrunk), float64, selective attention."""
    cfg = transformers.AutoConfig.for_model(
        family, vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    if getattr(cfg, "layer_types", None) is not None:  # a window longer than every sequence here (masks nothing)
        cfg.layer_types, cfg.sliding_window = cfg.layer_types[: cfg.num_hidden_layers], 256
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        sa_hf.configure(cfg, **sel), attn_implementation="selective", dtype=torch.float64
    ).eval()


def test_a_model_whose_layers_say_use_cache_false_by_default_decodes_exactly():
    """Olmo 3's decoder layers default to use_cache=False and its model passes none down, so every attention call said
    False and SelectiveCache refused every generate, blaming the user (found by a review helper). use_cache=False alone
    is no longer refused; the whole sequence fed again still is, by its positions."""
    model = _tiny_family("olmo3")
    ids, mask, _ = padded_batch(seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, use_cache=False, **kw)
        assert torch.equal(model.generate(ids, **{CACHE: sa_hf.SelectiveCache()}, **kw), want)
        with pytest.raises(ValueError, match="use_cache=False"):
            model.generate(ids, **{CACHE: sa_hf.SelectiveCache()}, use_cache=False, **kw)


@pytest.mark.parametrize("layers", [None, []])
def test_a_model_that_attends_twice_per_cache_update_is_refused(layers):
    """DiffLlama calls the attention function twice with one update's keys: the second call found nothing to claim
    and ran as a call without a cache, which at a decoding step sees only the new token (greedy tokens apart from the
    second, logits 0.42 off in float64, with or without selecting layers; found by a review helper). Refused by name;
    use_cache=False serves it."""
    model = _tiny_family("diffllama", layers=layers)
    ids = torch.randint(1, V, (1, 8), generator=torch.Generator().manual_seed(0))
    cache = sa_hf.SelectiveCache()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="twice with the keys of one cache update"):
        model(ids, **{CACHE: cache})
    with pytest.raises(RuntimeError, match="twice with the keys"):  # the first call stored tokens: unusable
        model(ids, **{CACHE: cache})
    with torch.no_grad():
        out = model.generate(ids, use_cache=False, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)


def test_a_dropped_cache_is_freed():
    """The attention function remembers the last cache layer it served (to refuse a second call with its keys), and
    must not keep that layer, with its key and value buffers, alive once the user drops the cache."""
    import gc
    import weakref

    model = build("llama", dtype=torch.float32)
    cache = sa_hf.SelectiveCache(budget=8)
    with torch.no_grad():
        ids = torch.randint(1, V, (2, 12))
        model.generate(ids, **{CACHE: cache}, max_new_tokens=3, do_sample=False, pad_token_id=0)
    refs = [weakref.ref(cache), *(weakref.ref(layer) for layer in cache.layers)]
    del cache
    gc.collect()
    assert all(r() is None for r in refs)


def test_budget_list_may_leave_a_layer_unbudgeted():
    """budget=[None, b] keeps every token in layer 0 and b in layer 1 (as GPT.generate takes it); [None, None] is
    the exact unbudgeted cache."""
    import numpy as np

    model = build("llama")
    ids, mask, _ = padded_batch(seed=5)
    n_tokens = ids.shape[1] + 6 - 1  # the last token is sampled, not cached
    cache = sa_hf.SelectiveCache(budget=[None, np.int64(4)])
    assert cache.budget == [None, 4]
    model.generate(ids, attention_mask=mask, **{CACHE: cache}, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert cache.occupancy() == [n_tokens, 4]
    unbudgeted = sa_hf.SelectiveCache(budget=[None, None])
    out = model.generate(ids, attention_mask=mask, **{CACHE: unbudgeted}, max_new_tokens=6, do_sample=False,
                         pad_token_id=0)  # fmt: skip
    assert torch.equal(out, greedy_by_recomputation(model, ids, mask, 6))


def test_budget_in_a_layer_that_does_not_select_is_a_sliding_window():
    """A layer left out of configure(layers=[...]) has F = 0: a budget there keeps the first real token and the
    newest ones (what the README says); None in its place keeps everything."""
    model = build("llama", layers=[1])
    ids, mask, _ = padded_batch(seed=7, lengths=(9, 6))
    for budget in (4, [4, 4], [None, 4]):
        cache = sa_hf.SelectiveCache(budget=budget)
        model.generate(ids, attention_mask=mask, **{CACHE: cache}, max_new_tokens=5, do_sample=False, pad_token_id=0)
        layer0 = cache.layers[0].cache
        for b, n in enumerate((9, 6)):
            pos = layer0.pos[b]
            seen = n + 5 - 1
            want = list(range(seen)) if budget == [None, 4] else [0, seen - 3, seen - 2, seen - 1]
            assert sorted(pos[pos >= 0].tolist()) == want, budget


SOFTCAP_AT: dict = {"layer": None}  # the layer where "selective_softcap" adds a soft-cap (a refusal), or None


def softcap_at_forward(module, *args, **kwargs):
    """The selective function, refusing the call at one layer (as a Gemma 2 layer's softcap is refused)."""
    if module.layer_idx == SOFTCAP_AT["layer"]:
        kwargs["softcap"] = 30.0
    return sa_hf.attention_forward(module, *args, **kwargs)


transformers.AttentionInterface.register("selective_softcap", softcap_at_forward)
transformers.masking_utils.AttentionMaskInterface.register("selective_softcap", sa_hf.padding_mask)


def test_a_refused_call_leaves_the_cache_usable_or_says_why():
    """A refusal after the cache's update() once left the layer counted but unclaimed: the next use of the cache
    reported an unrelated error (keys never attended, or a wrong position). Refused at the call's first layer, the
    cache is as before the call and serves the fixed model exactly; refused at a later layer (the earlier ones
    hold the tokens), the cache refuses every use, naming the first error, until reset()."""
    model = build("llama", impl="selective_softcap")
    ids = torch.randint(1, V, (1, 7), generator=torch.Generator().manual_seed(2))
    want = greedy_by_recomputation(model, ids, torch.ones_like(ids), 4)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    try:
        SOFTCAP_AT["layer"] = 0
        cache = sa_hf.SelectiveCache()
        with pytest.raises(NotImplementedError, match="softcap"):
            model.generate(ids, **{CACHE: cache}, **kw)
        SOFTCAP_AT["layer"] = None
        assert torch.equal(model.generate(ids, **{CACHE: cache}, **kw), want)

        SOFTCAP_AT["layer"] = 1
        cache = sa_hf.SelectiveCache()
        with pytest.raises(NotImplementedError, match="softcap"):
            model.generate(ids, **{CACHE: cache}, **kw)
        SOFTCAP_AT["layer"] = None
        with pytest.raises(RuntimeError, match=r"left part-way.*softcap=30\.0.*new SelectiveCache.*reset"):
            model.generate(ids, **{CACHE: cache}, **kw)
        cache.reset()
        assert torch.equal(model.generate(ids, **{CACHE: cache}, **kw), want)
    finally:
        SOFTCAP_AT["layer"] = None


def test_a_dropout_refusal_in_training_mode_leaves_the_cache_usable():
    """Decoding in training mode with attention dropout is refused; after model.eval() the same cache works (the
    refused call once left the tokens counted: "the first call of a layer must start at position 0")."""
    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.attention_dropout = 0.3
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="selective", dtype=torch.float64)
    ids = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(1))
    cache = sa_hf.SelectiveCache(budget=4)
    with pytest.raises(ValueError, match="eval mode"):
        model.train()(ids, **{CACHE: cache}, use_cache=True)
    model.eval()
    got = model(ids, **{CACHE: cache}, use_cache=True).logits
    torch.testing.assert_close(got, model(ids, **{CACHE: sa_hf.SelectiveCache(budget=4)}, use_cache=True).logits,
                               rtol=0, atol=0)  # fmt: skip
    assert cache.occupancy() == [4, 4]


def test_a_stored_config_naming_missing_layers_is_refused(tmp_path):
    model = build("llama", layers=[1])
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    stored = json.loads(path.read_text())
    stored[sa_hf.CONFIG_KEY]["layers"] = [1, 5]  # edited by hand, or a config of a deeper model
    path.write_text(json.dumps(stored))
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="selective")
    with pytest.raises(ValueError, match=r"layers=\[1, 5\], but the model has 2"):
        again(torch.randint(1, V, (1, 5)))


def test_mask_check_reads_real_keys_and_names_the_local_span():
    """The causal check of another mask function compares real keys only (transformers' chunked attention puts left
    padding in chunk -1: not causal there, and removed anyway), refuses a function that cannot take index tensors,
    and a span past the local one names both settings."""
    from transformers.masking_utils import and_masks, causal_mask_function, chunked_overlay

    mask = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)  # 2 left padding
    chunked = and_masks(chunked_overlay(8, (~mask).sum(-1)), causal_mask_function)
    kw = dict(mask_function=chunked, attention_mask=mask, local_size=8)
    assert torch.equal(sa_hf.padding_mask(1, 6, 6, **kw), mask)  # the 6 tokens fit in a chunk of 8

    def scalar_only(b, h, q, kv):
        return bool(kv <= q)  # Python control flow on an index: not an index-tensor function

    with pytest.raises(NotImplementedError, match="plain causal"):
        sa_hf.padding_mask(1, 6, 6, mask_function=scalar_only, attention_mask=mask)
    with pytest.raises(NotImplementedError, match="local span of 4 tokens.*attention_chunk_size"):
        sa_hf.padding_mask(1, 6, 6, mask_function=chunked, attention_mask=mask, local_size=4)


def test_attention_sinks_are_refused_not_ignored():
    """gpt-oss passes learned attention sinks (s_aux) to the attention function; with its sliding window now allowed
    for short sequences, they must be refused, not dropped."""
    cfg = transformers.GptOssConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                    num_experts_per_tok=1, sliding_window=64, max_position_embeddings=128)  # fmt: skip
    sa_hf.configure(cfg)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="selective").eval()
    with pytest.raises(NotImplementedError, match="does not apply s_aux"):
        model(torch.randint(1, V, (1, 10)))


def test_sparse_attention_layers_are_refused_not_run_dense():
    """MiniMax-M3's sparse layers hand the key blocks its indexer picks to any implementation but eager/sdpa as
    block_indices, which selective attention ignored: it ran dense attention, silently another model. The DSA families
    (layer type "indexed_attention") failed inside transformers, naming nothing. Refused by configure() and at the
    first forward (a config configured before its layer types changed), and the arguments themselves too."""
    cfg = transformers.AutoConfig.for_model(
        "minimax_m3_vl_text", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rotary_dim=8, num_local_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=16, dense_intermediate_size=64, shared_intermediate_size=16,
        layer_types=["minimax_m3_sparse"] * 2, index_block_size=4, index_topk_blocks=2, index_local_blocks=1,
        index_n_heads=2, index_head_dim=8,
    )  # fmt: skip
    with pytest.raises(NotImplementedError, match=r"layers of type \['minimax_m3_sparse'\].*indexer"):
        sa_hf.configure(cfg)
    cfg.layer_types = ["full_attention"] * 2
    sa_hf.configure(cfg)  # dense layers only: runs
    cfg.layer_types = ["minimax_m3_sparse"] * 2
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="selective").eval()
    with pytest.raises(NotImplementedError, match="indexer picks"):
        model(torch.randint(1, V, (1, 10)))
    dsa = transformers.AutoConfig.for_model("deepseek_v32")
    with pytest.raises(NotImplementedError, match=r"\['indexed_attention'\]"):
        sa_hf.configure(dsa)
    q = torch.randn(1, 4, 6, 8)
    layer = build("llama").model.layers[0].self_attn
    for name in ("block_indices", "indices"):
        with pytest.raises(NotImplementedError, match=f"does not apply {name}.*sparse layer"):
            sa_hf.attention_forward(
                layer, q, q[:, :2], q[:, :2], None, **{name: torch.zeros(1, 6, 2, dtype=torch.long)}
            )


def test_models_that_bypass_the_attention_interface_are_refused():
    """transformers 5.24 accepts a registered name for any model; Bloom runs its own attention code with the mask this
    package's hook returns (no causal mask: the last token moved the logits of earlier positions, silently). Refused,
    naming the model; a family that goes through the interface (BioGPT, whose class flag says otherwise) still runs."""
    cfg = transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)
    with pytest.raises(NotImplementedError, match="BloomModel runs its own attention code.*'eager'"):
        sa_hf.configure(cfg)  # at once when configured
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="selective").eval()
    with pytest.raises(NotImplementedError, match="BloomModel runs its own attention code.*'eager'"):
        model(torch.randint(1, V, (1, 6)))  # at the first forward when not
    with pytest.raises(NotImplementedError, match="OpenAIGPTModel runs its own attention code.*'eager'"):
        sa_hf.configure(transformers.OpenAIGPTConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4))


def test_the_interface_check_passes_what_it_cannot_read(monkeypatch):
    """transformers' heuristic reads the model's source; without one (a .pyc-only install) it says False for every
    family, Llama's included: then nothing is refused."""
    import inspect

    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    sa_hf._check_uses_interface.cache_clear()
    try:
        sa_hf.configure(transformers.LlamaConfig(num_hidden_layers=2))
        sa_hf.configure(transformers.BloomConfig(n_layer=2))  # cannot be judged either
    finally:
        sa_hf._check_uses_interface.cache_clear()
    cfg = sa_hf.configure(transformers.BioGptConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=32))  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="selective", dtype=torch.float64)
    ids = torch.randint(1, V, (1, 7))
    changed = torch.cat([ids[:, :-1], (ids[:, -1:] + 1) % V], 1)
    with torch.no_grad():  # causal: the last token moves no earlier position's logits
        torch.testing.assert_close(model.eval()(ids).logits[:, :-1], model(changed).logits[:, :-1], rtol=0, atol=0)


@pytest.mark.parametrize("sel", [{}, {"layers": []}])
def test_a_cache_with_slots_allocated_ahead_is_refused(sel):
    """A StaticCache holds more key slots than tokens; in layers that do not select, causal attention aligned to the
    last slot then read the empty ones (prefill logits 0.41 off, silently). Refused in every layer, naming it."""
    model = build("llama", **sel)
    ids = torch.randint(1, V, (1, 12))
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(NotImplementedError, match=r"32 key slots for queries ending at position 12.*StaticCache"):
        model(ids, **{CACHE: cache}, use_cache=True)
    with pytest.raises(NotImplementedError, match="StaticCache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static", pad_token_id=0)
    # initialized ahead (as generate's prefill_chunk_size does), a static cache gives its offset as a tensor
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    cache.early_initialization(batch_size=1, num_heads=2, head_dim=8, dtype=torch.float64, device="cpu")
    with pytest.raises(NotImplementedError, match="position given as a tensor.*StaticCache"):
        model(ids, **{CACHE: cache}, use_cache=True)
    with pytest.raises(NotImplementedError, match="StaticCache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static", prefill_chunk_size=4,
                       pad_token_id=0)  # fmt: skip
    # a padding mask longer than the tokens given, no cache: the same rule, the message names it
    with pytest.raises(
        NotImplementedError, match="8 key slots for queries ending at position 5.*attention_mask longer"
    ):
        model(ids[:, :5], attention_mask=torch.ones(1, 8, dtype=torch.long), use_cache=False)


def test_a_window_no_layer_uses_is_not_refused():
    """transformers 5.24 gives Qwen2-MoE sliding_window = 0 when use_sliding_window is off (its default) and builds a
    window mask no layer reads (every layer_types entry full_attention): the model runs, as the spec on its q/k/v."""
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
              shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts=2, num_experts_per_tok=1)  # fmt: skip
    cfg = sa_hf.configure(transformers.Qwen2MoeConfig(**kw))
    assert cfg.sliding_window == 0 and set(cfg.layer_types) == {"full_attention"}
    # only the window mask is let through: the full-attention mask with a bidirectional prefix is still refused
    cfg._attn_implementation = sa_hf.NAME
    with pytest.raises(NotImplementedError, match="supports plain causal self-attention"):
        transformers.masking_utils.create_causal_mask(config=cfg, inputs_embeds=torch.zeros(1, 6, 32),
                                                      attention_mask=None, cache=None,
                                                      or_mask_function=lambda b, h, q, kv: kv < 3)  # fmt: skip
    cfg._attn_implementation = None
    outs = {}
    for impl in ("selective", "selective_ref"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
        with torch.no_grad():
            outs[impl] = model(torch.arange(1, 10)[None]).logits
    torch.testing.assert_close(outs["selective"], outs["selective_ref"], rtol=1e-5, atol=1e-5)


def test_hybrid_models_name_what_selective_cache_cannot_hold():
    """Qwen3-Next's linear-attention layers keep a recurrent state that SelectiveCache does not hold: generate with it
    raises naming the case and the alternatives (it failed with an IndexError inside transformers)."""
    cfg = transformers.Qwen3NextConfig(vocab_size=V, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, num_experts=2, num_experts_per_tok=1,
                                       linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                                       linear_value_head_dim=8)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(sa_hf.configure(cfg), attn_implementation="selective").eval()
    with pytest.raises(NotImplementedError, match="recurrent state.*without a SelectiveCache and with use_cache=False"):
        model.generate(torch.randint(1, V, (1, 6)), **{CACHE: sa_hf.SelectiveCache()}, max_new_tokens=2,
                       do_sample=False, pad_token_id=0)  # fmt: skip


def test_configure_registers_the_name():
    """configure() makes attn_implementation="selective" available (a user who configures first, then builds, gets
    the model, not transformers' "not supported")."""
    mapping = transformers.AttentionInterface._global_mapping
    saved = mapping.pop(sa_hf.NAME)
    try:
        cfg = tiny_config("llama")  # calls configure
        transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=sa_hf.NAME)
    finally:
        mapping[sa_hf.NAME] = saved


def test_a_model_copies_after_a_training_forward():
    """deepcopy (an EMA or teacher model) right after a training forward with the memory loss: the copy has no
    counts (they are graph tensors), the original's memory loss still works."""
    import copy

    model = build("llama", memory_eps=0.1).train()
    model(torch.randint(1, V, (2, 7)))
    twin = copy.deepcopy(model)
    with pytest.raises(ValueError, match="computed no masked counts"):
        sa_hf.memory_loss(twin)
    assert torch.isfinite(sa_hf.memory_loss(model))


# --- the memory loss ---------------------------------------------------------------------------------------
def memory_loss_by_formula(captured, sel_layers, tau, lengths):
    """L_mem from the spec's F: sum over layers of max_i M_l[i] / (n_layers * T), per sequence, mean."""
    per_seq = []
    for b, T in enumerate(lengths):
        total = 0.0
        for _, q, k, _ in [c for c in captured if c[0] in sel_layers]:
            F = selection_penalty(q[b : b + 1, 0, -T:], k[b : b + 1, 0, -T:])[0]  # [T, T]
            M = torch.arange(1, T + 1, dtype=F.dtype) - torch.clamp(F, max=tau).tril().sum(-1) / tau
            total = total + M.max()
        per_seq.append(total / (len(sel_layers) * T))
    return torch.stack(per_seq).mean()


def test_memory_loss_matches_the_formula_with_left_padding():
    ids, mask, pos = padded_batch(seed=9)
    model = build("llama", memory_eps=0.1, memory_tau=0.5).train()
    ref = build("llama", impl="selective_ref", memory_eps=0.1, memory_tau=0.5).train()
    model(ids, attention_mask=mask, position_ids=pos)
    CAPTURED.clear()
    ref(ids, attention_mask=mask, position_ids=pos)
    got = sa_hf.memory_loss(model)
    want = memory_loss_by_formula(CAPTURED, {0, 1}, 0.5, mask.sum(-1).tolist())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    got.backward()  # differentiable, finite gradients
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(sa_hf.memory_loss_term(model), 0.1 * got.detach(), rtol=1e-12, atol=0)


def test_memory_loss_of_a_batch_of_padding_only_is_zero():
    """No real token, nothing to keep or mask: 0 (it raised torch.stack's "expects a non-empty TensorList")."""
    model = build("llama", memory_eps=0.3).train()
    model(torch.randint(1, V, (2, 6)), attention_mask=torch.zeros(2, 6, dtype=torch.long))
    assert sa_hf.memory_loss_term(model).item() == 0.0


def test_memory_loss_refuses_when_nothing_was_computed():
    model = build("llama")  # memory_eps = 0: no counts
    model.train()(torch.randint(1, V, (1, 5)))
    with pytest.raises(ValueError, match="memory_eps"):
        sa_hf.memory_loss(model)
    assert sa_hf.memory_loss_term(model).item() == 0.0


def test_memory_eps_without_a_selecting_layer_is_refused_up_front():
    """layers=[] with memory_eps > 0 was accepted, then memory_loss_term blamed the training mode; refused where the
    settings are made (and read back), naming both values and the fix."""
    with pytest.raises(ValueError, match=r"memory_eps=0\.1 with layers=\[\].*memory_eps=0.*layers="):
        tiny_config("llama", layers=[], memory_eps=0.1)
    assert sa_hf.settings(tiny_config("llama", layers=[], memory_eps=0.0)).layers == ()
    # a config stored with the combination (before this check) still runs; only its memory loss is refused
    model = build("llama", dtype=torch.float32, layers=[0])
    model.config.selective_attention = {**model.config.selective_attention, "layers": [], "memory_eps": 0.5}
    out = model.train()(torch.randint(1, V, (1, 5)), labels=torch.randint(1, V, (1, 5)))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=r"memory_eps=0\.5 with layers=\[\]"):
        sa_hf.memory_loss_term(model)


def test_memory_loss_refuses_counts_of_an_implementation_switched_away():
    """After a selective training forward and set_attn_implementation("sdpa"), a forward leaves the old counts in
    the layers: memory_loss refuses them, naming the switch, instead of returning the earlier batch's value (whose
    graph a backward may already have freed). Switched back, it reads the new forward's counts."""
    model = build("llama", dtype=torch.float32, memory_eps=0.5).train()
    ids = torch.randint(1, V, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids)
    sa_hf.memory_loss(model).backward()
    model.set_attn_implementation("sdpa")
    model(ids)
    with pytest.raises(ValueError, match="attention is now 'sdpa'.*set_attn_implementation"):
        sa_hf.memory_loss_term(model)
    model.set_attn_implementation("selective")
    model(ids[:, :6])
    sa_hf.memory_loss(model).backward()  # fresh counts: a graph not yet freed
    # a wrapper of the attention function under a name of its own (logging, profiling) still gives the loss
    transformers.AttentionInterface.register("selective_wrapped", lambda *a, **kw: sa_hf.attention_forward(*a, **kw))
    transformers.masking_utils.AttentionMaskInterface.register("selective_wrapped", sa_hf.padding_mask)
    model.set_attn_implementation("selective_wrapped")
    model(ids)
    sa_hf.memory_loss(model).backward()


def test_memory_loss_refuses_data_parallel(tmp_path):
    """nn.DataParallel (Trainer's wrapper when n_gpu > 1) runs each forward on replicas, which keep the masked
    counts: the memory loss refuses it by name, naming DistributedDataParallel / torchrun, where the wrapped model
    is given and where a replica computes the counts. (On CPU the wrapper runs the model itself.)"""
    model = build("llama", dtype=torch.float32, memory_eps=0.5).train()
    dp = torch.nn.DataParallel(model)
    ids = torch.randint(1, V, (2, 8), generator=torch.Generator().manual_seed(0))
    dp(ids)
    for fn in (sa_hf.memory_loss, sa_hf.memory_loss_term):
        with pytest.raises(ValueError, match="DataParallel.*DistributedDataParallel.*torchrun"):
            fn(dp)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                          save_strategy="no")  # fmt: skip
    trainer = sa_hf.SelectiveTrainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    with pytest.raises(ValueError, match="SelectiveTrainer.*DataParallel.*torchrun"):
        trainer.compute_loss(dp, {"input_ids": ids, "labels": ids})
    attn = model.model.layers[0].self_attn
    replica = attn._replicate_for_data_parallel()  # what DataParallel runs on each GPU
    q, k = torch.randn(1, 6, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="DataParallel.*torchrun"):
        sa_hf.attention_forward(replica, q, k, k, None)
    assert sa_hf.attention_forward(attn, q, k, k, None)[0].shape == (1, 5, 6, 8)  # the model itself computes them
    assert sa_hf.memory_loss_term(torch.nn.DataParallel(build("llama"))).item() == 0.0  # memory_eps = 0: no term


def test_trainer_adds_the_memory_loss(tmp_path):
    model = build("llama", dtype=torch.float32, memory_eps=0.5)
    ids = torch.randint(1, V, (4, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, learning_rate=1e-3,
    )  # fmt: skip
    trainer = sa_hf.SelectiveTrainer(model=model, args=args, train_dataset=data)
    model.train()
    batch = {"input_ids": ids[:2], "labels": ids[:2]}
    loss = trainer.compute_loss(model, batch)
    plain = model(**batch).loss
    torch.testing.assert_close(loss, plain + 0.5 * sa_hf.memory_loss(model), rtol=1e-6, atol=1e-6)
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.parametrize(("n", "split"), [(4, 2), (5, 2)])
def test_trainer_memory_loss_counts_once_with_gradient_accumulation(tmp_path, n, split):
    """Micro-batches of ``split`` accumulated give the update of one batch of all ``n``: the Trainer normalises the
    model's loss over the accumulated batch and does not divide again, so the memory term (the mean over a
    micro-batch's sequences) is weighted by the micro-batch's share of the step's sequences (it once counted twice;
    then with 2 + 2 + 1 the last sequence weighed 1/3 instead of 1/5)."""
    ids = torch.randint(1, V, (n, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r} for r in ids]
    weights = []
    for batch, accumulate in ((n, 1), (split, -(-n // split))):
        model = build("llama", dtype=torch.float64, memory_eps=1.0)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(batch)), max_steps=1, per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate, report_to=[], use_cpu=True, save_strategy="no", optim="sgd",
            learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, seed=0,
        )  # fmt: skip
        trainer = sa_hf.SelectiveTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        weights.append([p.detach().clone() for p in model.parameters()])
    start = build("llama", dtype=torch.float64, memory_eps=1.0).parameters()
    moved = max((a - b).abs().max() for a, b in zip(weights[0], start))
    assert moved > 1e-3  # the step changed the weights, so their equality below says something
    for a, b in zip(*weights):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_activation_checkpointing_keeps_loss_memory_loss_and_gradients():
    """Non-reentrant checkpointing (transformers' default) recomputes each layer in backward: the memory
    loss read after the forward is the same value with the same gradients as without checkpointing."""
    ids, mask, pos = padded_batch(seed=4)
    grads = []
    for checkpointing in (False, True):
        model = build("llama", memory_eps=0.1).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(ids, attention_mask=mask, position_ids=pos, labels=ids)
        loss = out.loss + sa_hf.memory_loss_term(model)
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_reentrant_checkpointing_is_refused_by_name():
    """Reentrant checkpointing runs the forward without gradients, so no masked counts exist: the error
    says to use the non-reentrant mode."""
    model = build("llama", memory_eps=0.1).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model(torch.randint(1, V, (1, 6)), labels=torch.randint(1, V, (1, 6)))
    with pytest.raises(ValueError, match="use_reentrant"):
        sa_hf.memory_loss(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(dtype):
    ids = torch.randint(1, V, (2, 20), generator=torch.Generator().manual_seed(1))
    model = build("llama", dtype=torch.float32)
    ref = model(ids).logits
    # the same weights rounded (building a second model in `dtype` draws other weights on some torch versions:
    # the same seed gave bf16 weights 0.79 apart in logits on torch 2.6 and 2.9)
    half = copy.deepcopy(model).to(dtype)
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    out = half(ids).logits.float()
    assert torch.isfinite(out).all()
    # half precision: ~3 significant digits per op through 2 layers; logits are O(0.1)
    assert (out - ref).abs().max() < (0.05 if dtype == torch.bfloat16 else 0.01)


def test_autocast_runs_forward_training_and_pruned_generate():
    """A float32 model inside torch.autocast (what Trainer(bf16=True) and accelerate use): the rotary embedding
    gives float32 q, k beside a bfloat16 v. The forward is as close to the float32 one as sdpa's under autocast,
    training with the memory loss back-propagates, and budgeted generation keeps its bound."""
    ids = torch.randint(1, V, (2, 20), generator=torch.Generator().manual_seed(1))
    err = {}
    for impl in ("sdpa", "selective"):
        model = build("llama", dtype=torch.float32, impl=impl)
        with torch.no_grad():
            ref = model(ids).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids).logits
        assert out.dtype == torch.bfloat16
        err[impl] = (out.float() - ref).abs().max().item()
    assert err["selective"] < max(2 * err["sdpa"], 1e-2), err
    model = build("llama", dtype=torch.float32, memory_eps=0.1).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss + sa_hf.memory_loss_term(model)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    cache = sa_hf.SelectiveCache(budget=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.eval().generate(ids, max_new_tokens=6, do_sample=False, **{CACHE: cache}, pad_token_id=0)
    assert out.shape == (2, 26) and max(cache.occupancy()) <= 4


def test_compiled_forward_matches_eager():
    model = build("llama", dtype=torch.float32)
    ids = torch.randint(1, V, (2, 16), generator=torch.Generator().manual_seed(1))
    eager = model(ids).logits
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(ids).logits, eager, rtol=1e-5, atol=1e-5)


def test_compiled_training_step_matches_eager():
    """torch.compile of the whole model, forward and backward: loss and gradients as in eager (fp32)."""
    ids = torch.randint(1, V, (2, 24), generator=torch.Generator().manual_seed(2))
    _assert_compiled_step_matches_eager(dict(input_ids=ids, labels=ids))


def _assert_compiled_step_matches_eager(inputs: dict, fullgraph: bool = False, **sel) -> None:
    """One training forward and backward of the tiny Llama (``sel``: its configure() settings), eager and compiled:
    the same loss and gradients (fp32; inductor reorders sums)."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = build("llama", dtype=torch.float32, **sel).train()
        run = torch.compile(model, fullgraph=fullgraph) if compiled else model
        loss = run(**inputs).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layers", [None, [0]])
def test_compiled_padded_training_is_one_graph_and_matches_eager(layers):
    """A padded batch through a compiled model on its first call (its settings parsed inside the trace): as
    many graph breaks as sdpa's model (none), and the loss and gradients of eager. With ``layers=[0]`` the other
    layer is standard attention given the padding mask, which also reads no mask value while compiling."""
    ids, mask, _ = padded_batch(side="left")
    breaks = {}
    for impl in ("sdpa", "selective"):
        torch._dynamo.reset()
        model = build("llama", dtype=torch.float32, impl=impl, layers=layers).train()
        explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=ids)
        breaks[impl] = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert breaks["selective"] == breaks["sdpa"] == [], breaks
    _assert_compiled_step_matches_eager(
        dict(input_ids=ids, attention_mask=mask, labels=ids), fullgraph=True, layers=layers
    )


def test_package_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import selective_attention, selective_attention.model\n"
        "try:\n    import selective_attention.hf\nexcept ImportError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "pip install" in out.stdout


def test_hf_demo_cli_runs_end_to_end(tmp_path, capsys):
    """`selective-attention hf-demo` (tiny): trains both, saves, reloads, evaluates, generates."""
    import json

    from selective_attention import cli

    out = tmp_path / "hf"
    argv = ["hf-demo", "--quick", "--steps=3", "--context_len=32", "--eval_windows=2", "--budgets=4,8",
            "--data=pydoc", f"--out={out}", "--no_progress"]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["val_loss"]) == {"standard", "selective"}
    assert [r["budget"] for r in report["pruned"]] == ["full", 4, 8]
    assert report["pruned"][1]["kv_bytes"] < report["pruned"][2]["kv_bytes"] < report["pruned"][0]["kv_bytes"]
    assert max(report["generated"]["occupancy"]) <= 4
    # the baselines at each budget: the standard model through a window and H2O; in full, its full forward's loss
    assert abs(report["pruned"][0]["window"] - report["val_loss"]["standard"]) < 1e-4
    smallest = report["pruned"][1]  # 4 of 32 tokens: both baselines lose context
    assert smallest["window"] != report["pruned"][0]["window"] and smallest["h2o"] != report["pruned"][0]["h2o"]
    # the control for F's rule: the selective model through a window, which at 4 of 32 tokens loses context
    assert smallest["selective_window"] != report["pruned"][0]["loss"] != smallest["loss"]
    # the machine the numbers are this run's (one VM name has been two chips)
    assert report["machine"]["cpu_signature"] == cpu_signature() and report["machine"]["transformers"]
    again = transformers.AutoModelForCausalLM.from_pretrained(out / "selective", attn_implementation="selective")
    assert sa_hf.settings(again.config) == sa_hf.HFSettings()
    printed = capsys.readouterr().out
    assert "| selective | selective |" in printed and f"family/model/stepping {cpu_signature()}" in printed


def test_hf_demo_refuses_empty_budgets_before_training(tmp_path, capsys):
    """--budgets= (none) trained both models, then failed on min() of no budgets: refused before any training."""
    from selective_attention import cli
    from selective_attention.hf_demo import HFDemoConfig

    with pytest.raises(ValueError, match="budgets is empty.*--budgets=16,32,64"):
        HFDemoConfig(budgets=())
    with pytest.raises(ValueError, match=r"budgets must be <= context_len=128 .*got \(16, 1000\)"):
        HFDemoConfig(budgets=(16, 1000), context_len=128)  # its table said 7.8x *more* KV memory
    out = tmp_path / "hf"
    assert cli.main(["hf-demo", "--quick", "--budgets=", f"--out={out}", "--no_progress"]) == 2
    assert "budgets is empty" in capsys.readouterr().err
    assert not out.exists()  # nothing was trained or written


def test_attention_dropout_applies_in_training_only():
    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.attention_dropout = 0.3
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="selective")
    ids = torch.randint(1, V, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    a, b = model(ids).logits, model(ids).logits
    assert (a - b).abs().max() > 1e-4  # different dropout draws
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_selective_cache_refuses_a_model_whose_attention_bypasses_it():
    model = build("llama", impl="sdpa")
    with pytest.raises(RuntimeError, match="attn_implementation='selective'"):
        model.generate(
            torch.randint(1, V, (1, 5)), **{CACHE: sa_hf.SelectiveCache()}, max_new_tokens=2, do_sample=False
        )
    # what that failed run left behind does not disturb the next cache
    ids = torch.randint(1, V, (1, 5), generator=torch.Generator().manual_seed(3))
    sel = build("llama")
    out = sel.generate(ids, **{CACHE: sa_hf.SelectiveCache()}, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_by_recomputation(sel, ids, torch.ones_like(ids), 3))


ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_path_forward_and_generate_match_the_spec(dtype, device):
    """In fp32 and bf16 on the fast path of the device (CPU: chunked; CUDA: the Triton kernel) against the fp64
    spec; the CPU run checks this test itself where no GPU is at hand."""
    ids, mask, pos = padded_batch(lengths=(40, 40))  # no padding: the Triton kernel serves it
    # the fp64 weights cast: a model built in another dtype draws other weights (0.11 apart in fp32)
    model = build("llama").to(device=device, dtype=dtype)
    ref = build("llama", impl="selective_ref").to(device)
    out = model(ids.to(device)).logits.double()
    want = ref(ids.to(device)).logits
    assert (out - want).abs().max() < (0.1 if dtype == torch.bfloat16 else 1e-3)
    cache = sa_hf.SelectiveCache(budget=8)
    gen = model.generate(ids.to(device), **{CACHE: cache}, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 48) and max(cache.occupancy()) <= 8


def test_window_policy_keeps_the_first_real_token_and_the_newest():
    model = build("llama")
    ids, mask, _ = padded_batch(seed=7, lengths=(9, 6))
    cache = sa_hf.SelectiveCache(budget=4, policy="window")
    model.generate(ids, attention_mask=mask, **{CACHE: cache}, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for layer in cache.layers:
        for b, n in enumerate((9, 6)):
            pos = layer.cache.pos[b]
            seen = n + 5 - 1  # the last generated token is sampled, not cached
            assert sorted(pos[pos >= 0].tolist()) == [0, seen - 3, seen - 2, seen - 1]
    with pytest.raises(ValueError, match="policy"):
        sa_hf.SelectiveCache(budget=4, policy="lru")
    with pytest.raises(ValueError, match="threshold"):
        sa_hf.SelectiveCache(budget=4, threshold=1.0, policy="window")


def test_attention_received_under_padding_is_the_unpadded_prompts():
    """H2O's prompt scores under padding (what SelectiveCache(policy='h2o') reads): a left- or right-padded sequence's
    real tokens receive what the unpadded sequence's do, selective or standard attention, and padding receives 0."""
    from selective_attention.kv_cache import attention_received

    g = torch.Generator().manual_seed(5)
    B, H, Hkv, T, D = 2, 4, 2, 11, 8
    q, k = torch.randn(B, H, T, D, generator=g, dtype=torch.float64), torch.randn(B, Hkv, T, D, generator=g).double()
    for side in ("left", "right"):
        kpm = torch.zeros(B, T, dtype=torch.bool)
        n = (T, 7)  # row 1: 7 real tokens
        (kpm[1, : T - n[1]] if side == "left" else kpm[1, n[1] :]).fill_(True)
        for sel in (None, Selection(), Selection(per_head=True)):
            voters = None if sel is None else sel.voters(q, k)
            got = attention_received(q, k, voters, chunk=4, scale=0.3, key_padding_mask=kpm)
            assert torch.isfinite(got).all() and (got[kpm] == 0).all()
            real = ~kpm[1]
            q1, k1 = q[1:2][:, :, real], k[1:2][:, :, real]
            want = attention_received(q1, k1, None if sel is None else sel.voters(q1, k1), scale=0.3)
            torch.testing.assert_close(got[1, real], want[0], rtol=1e-12, atol=1e-12)
            full = attention_received(q[:1], k[:1], None if sel is None else sel.voters(q[:1], k[:1]), scale=0.3)
            torch.testing.assert_close(got[0], full[0], rtol=1e-12, atol=1e-12)


def test_h2o_policy_in_hugging_face_generate():
    """SelectiveCache(policy='h2o'): the H2O baseline on a Hugging Face model (it was refused: its prompt scores
    needed the attention weights under padding). A left-padded batch generates what each prompt does alone, at most
    `budget` tokens a layer, the first real token and the recent window always kept; with room for every token it
    is greedy decoding exactly."""
    model = build("llama")
    ids, mask, _ = padded_batch(seed=7, lengths=(12, 8))
    new, budget, recent = 6, 6, 2
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
    cache = sa_hf.SelectiveCache(budget=budget, policy="h2o", recent=recent)
    gen = model.generate(ids, attention_mask=mask, **{CACHE: cache}, **kw)
    assert max(cache.occupancy()) <= budget
    for b, n in enumerate((12, 8)):
        alone = model.generate(
            ids[b : b + 1, -n:], **{CACHE: sa_hf.SelectiveCache(budget, policy="h2o", recent=2)}, **kw
        )
        assert torch.equal(gen[b, -(n + new) :], alone[0])
        for layer in cache.layers:
            pos = layer.cache.pos[b]
            seen = n + new - 1  # the last generated token is sampled, not cached
            kept = set(pos[pos >= 0].tolist())
            assert {0, seen - 2, seen - 1} <= kept and len(kept) == budget
    # the prompt's tokens kept are H2O's rule on the attention each received, from the layers' own q and k
    from selective_attention.kv_cache import attention_received, h2o_keep_after_prefill

    seen = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = (query, key, kwargs.get("scaling", module.scaling))
        return sa_hf.attention_forward(module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register("selective_capture", capture)
    transformers.masking_utils.AttentionMaskInterface.register("selective_capture", sa_hf.padding_mask)
    model.set_attn_implementation("selective_capture")
    prompt_cache = sa_hf.SelectiveCache(budget=budget, policy="h2o", recent=recent)
    model(ids, attention_mask=mask, **{CACHE: prompt_cache}, use_cache=True)
    model.set_attn_implementation("selective")
    kpm = mask == 0
    windows = 0
    for i, layer in enumerate(prompt_cache.layers):
        q, k, s = seen[i]
        acc = attention_received(q, k, Selection().voters(q, k), scale=s, key_padding_mask=kpm)
        keep = h2o_keep_after_prefill(acc, budget, recent, kpm)
        for b in range(ids.shape[0]):
            first = int((~kpm[b]).long().argmax())
            want = {t - first for t in keep[b].nonzero().flatten().tolist()}
            pos = layer.cache.pos[b]
            assert set(pos[pos >= 0].tolist()) == want
            n = int((~kpm[b]).sum())
            windows += want == {0, *range(n - budget + 1, n)}  # what a sliding window keeps
    assert windows < 2 * len(prompt_cache.layers)  # not a window's choice everywhere
    exact = model.generate(ids, attention_mask=mask, **{CACHE: sa_hf.SelectiveCache()}, **kw)
    roomy = sa_hf.SelectiveCache(budget=12 + new, policy="h2o")
    assert torch.equal(model.generate(ids, attention_mask=mask, **{CACHE: roomy}, **kw), exact)
    with pytest.raises(ValueError, match="recent=4 does not fit budget=4"):
        sa_hf.SelectiveCache(budget=4, policy="h2o", recent=4)
    with pytest.raises(ValueError, match="recent"):
        sa_hf.SelectiveCache(budget=4, recent=2)  # a window of the selective policy: ignored, so refused


def test_padding_inside_a_prompt_changes_no_policy_s_choice():
    """Padding inside a prompt (a gap in the cache's positions): every policy generates what the prompt without its
    padding does. H2O's recent window was position arithmetic, so the gap took a recent real token out of it and
    the first step evicted it (logits 0.55 apart); the window is now the newest stored tokens, by rank."""
    model = build("llama")
    ids = torch.randint(3, V, (1, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 8:11] = 0  # three padding tokens before the last prompt token
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=8, output_logits=True, return_dict_in_generate=True)
    for case in (dict(budget=8, policy="h2o", recent=6), dict(budget=6, policy="window"), dict(budget=6), {}):
        gapped = model.generate(ids, attention_mask=mask, **{CACHE: sa_hf.SelectiveCache(**case)}, **kw)
        alone = model.generate(ids[:, mask[0].bool()], **{CACHE: sa_hf.SelectiveCache(**case)}, **kw)
        for a, b in zip(gapped.logits, alone.logits):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, case=case: f"{case}: {m}")


def test_a_call_stopped_between_layers_leaves_the_cache_refusing_every_use():
    """An error outside the attention function (an MLP running out of memory, an interrupt) stops a call after
    some layers took its tokens: the next use of that cache is refused, naming the cause, until reset()."""
    model = build("llama")
    ids = torch.randint(1, V, (1, 7), generator=torch.Generator().manual_seed(3))
    cache = sa_hf.SelectiveCache()
    fail = [True]

    def hook(module, args):
        if fail[0]:
            fail[0] = False
            raise MemoryError("simulated: out of memory in layer 0's MLP")

    handle = model.model.layers[0].mlp.register_forward_pre_hook(hook)
    with pytest.raises(MemoryError):
        model(ids, **{CACHE: cache}, use_cache=True)
    with pytest.raises(RuntimeError, match=r"different numbers of tokens \(\[\d+\]\).*stopped part-way.*reset"):
        model(ids[:, :1], **{CACHE: cache}, use_cache=True)
    handle.remove()
    cache.reset()
    out = model.generate(ids, **{CACHE: cache}, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_by_recomputation(model, ids, torch.ones_like(ids), 3))


def test_an_interrupt_inside_the_last_layer_s_write_leaves_the_cache_refusing(monkeypatch):
    """A KeyboardInterrupt inside the last layer's step (after its token is written, before its votes are added):
    the attention function undid only Exceptions, and there every layer's count already agreed, so the next call
    was accepted and decoded 2.6e-3 off recomputation. Now refused until reset(), as an Exception is."""
    from selective_attention import kv_cache

    model = build("llama")
    ids = torch.randint(1, V, (1, 7), generator=torch.Generator().manual_seed(3))
    cache = sa_hf.SelectiveCache()
    model(ids, **{CACHE: cache}, use_cache=True)
    add_votes, calls = kv_cache.LayerCache.add_votes, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == model.config.num_hidden_layers:  # the step's last layer
            raise KeyboardInterrupt
        return add_votes(self, *args, **kwargs)

    monkeypatch.setattr(kv_cache.LayerCache, "add_votes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model(torch.tensor([[5]]), **{CACHE: cache}, use_cache=True)
    monkeypatch.setattr(kv_cache.LayerCache, "add_votes", add_votes)
    with pytest.raises(RuntimeError, match="KeyboardInterrupt"):
        model(torch.tensor([[9]]), **{CACHE: cache}, use_cache=True)


def test_a_cache_under_the_wrong_keyword_is_named():
    """Before transformers renamed it, a model's forward took the cache as past_key_values= and passed an unknown
    cache= on to the attention function in its **kwargs: the model would run without the cache. Refused by name."""
    model = build("llama")
    attn = model.model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match=r"past_key_values=, not cache=.*cache_keyword"):
        sa_hf.attention_forward(attn, q, k, v, None, cache=sa_hf.SelectiveCache())


def _kv_sharing(kind: str, impl: str = "selective", **sel):
    """A tiny Gemma 3n or Gemma 4 whose last layer reuses an earlier layer's keys and values."""
    kw = dict(vocab_size=V, vocab_size_per_layer_input=V, hidden_size=32, hidden_size_per_layer_input=8,
              intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              layer_types=["full_attention"] * 3, num_kv_shared_layers=1, max_position_embeddings=256,
              pad_token_id=0, eos_token_id=1, bos_token_id=2)  # fmt: skip
    cls = transformers.Gemma3nTextConfig if kind == "gemma3n" else transformers.Gemma4TextConfig
    cfg = cls(laurel_rank=4, altup_num_inputs=2, **kw) if kind == "gemma3n" else cls(**kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(sa_hf.configure(cfg, **sel), attn_implementation=impl,
                                                          dtype=torch.float64)  # fmt: skip
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.mark.parametrize("kind,layers", [("gemma3n", None), ("gemma4", [0, 1])])
def test_kv_sharing_models_are_refused_under_a_selective_cache(kind, layers):
    """Shared keys bypass SelectiveCache: it decoded these models 0.08-0.2 off the spec from the first step, silently.
    Refused by name; generating without a cache (selecting in the layers that own their keys) equals the spec."""
    sel = {} if layers is None else dict(layers=layers)
    model = _kv_sharing(kind, **sel)
    ids = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(1))
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="num_kv_shared_layers=1.*use_cache=False"):
        model.generate(ids, **{CACHE: sa_hf.SelectiveCache()}, **greedy)
    if kind == "gemma4":
        # a plain cache cannot decode a selecting layer (one that owns its keys here): the fix named is the one left
        with pytest.raises(ValueError, match=r"layer 0 selects.*Pass use_cache=False \(this model's shared keys"):
            model.generate(ids, **greedy)
        ref = _kv_sharing(kind, impl="selective_ref", **sel)
        assert torch.equal(model.generate(ids, use_cache=False, **greedy), ref.generate(ids, use_cache=False, **greedy))
        # every layer selecting: generate passes the shared layer the last token only (logits_to_keep)
        every = _kv_sharing(kind)
        with pytest.raises(NotImplementedError, match=r"Select only in the layers that own their keys"):
            every.generate(ids, use_cache=False, **greedy)
        torch.testing.assert_close(every(ids).logits, _kv_sharing(kind, impl="selective_ref")(ids).logits)


def test_crop_names_what_cannot_serve_a_selecting_model():
    """Assisted decoding crops its cache; the advice was "use the default cache", which a selecting layer refuses
    too (a plain cache holds no votes)."""
    with pytest.raises(
        NotImplementedError, match="cannot serve a model with selecting layers.*without assistant_model"
    ):
        sa_hf.SelectiveLayer().crop(1)


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_generate_with_a_budget_compiles_a_few_times_and_decodes_as_eager(padded):
    """model.forward under torch.compile, generate with SelectiveCache(budget=...): every step recompiled (the layers'
    token counts went into a set, which pinned the symbolic count to its value) until dynamo's limit, then ran eager.
    Now the steps compile twice (the first, then a dynamic count) and never again, every step runs compiled code,
    and greedy tokens equal eager ones; a left-padded batch too. (Dynamo with a counting backend that runs the traced
    graphs: what recompiles is dynamo's matter. Inductor's code is not run here: benchmarks/hf_compiled_generate.py
    checks its tokens against eager and times it.)"""
    model = build("llama", dtype=torch.float32)
    ids = torch.randint(1, V, (2, 24), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :5] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, **{CACHE: sa_hf.SelectiveCache(budget=8)}, **kw)
    graphs, step = [], [0]

    class Count(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            step[0] += 1
            return scores

    calls = collections.Counter()  # compiled graphs run, per step (past the recompile limit a frame runs eager)

    def backend(gm, example_inputs):
        graphs.append(step[0])

        def run(*args):
            calls[step[0]] += 1
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=backend)
    logits = transformers.LogitsProcessorList([Count()])
    try:
        out = model.generate(ids, **{CACHE: sa_hf.SelectiveCache(budget=8)}, logits_processor=logits, **kw)
        gen_graphs, gen_calls = list(graphs), collections.Counter(calls)  # generate's (the call below compiles more)
        # compiled, a padded continuation is refused on the device (no branch on the mask: it was not checked, and
        # the step stored and attended the padding as real tokens)
        cache = sa_hf.SelectiveCache(budget=8)
        model(ids, attention_mask=mask, **{CACHE: cache}, use_cache=True)
        nxt = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        nxt[1, -1] = 0
        with pytest.raises(RuntimeError, match="padded continuation"):
            model(ids[:, :1], attention_mask=nxt, **{CACHE: cache}, use_cache=True)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, eager)
    late = [s for s in gen_graphs if s >= 1]  # step 0: the prompt (its graph breaks: the cache's fill)
    assert late and max(late) <= 2, gen_graphs  # steps 1 and 2 only: none of the later ten recompiled
    # and every step ran as many compiled graphs as step 2 did (a frame past the limit would run eager: fewer)
    assert gen_calls[2] >= 1 and all(gen_calls[s] == gen_calls[2] for s in range(2, 12)), gen_calls


def test_an_unbudgeted_cache_grows_in_compiled_steps_too(monkeypatch):
    """The grow check reads the device only once a host count says a row may be full; compiled steps do not keep
    that count, so there it reads every step (with a compiled forward, the count stayed at the prompt and the 65th
    token took the first token's slot). Compiled code is stood in for by is_compiling() = True."""
    model = build("llama")
    ids = torch.randint(1, V, (1, 4), generator=torch.Generator().manual_seed(0))
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=70)  # past the prompt + 64 slots
    want = model.generate(ids, **{CACHE: sa_hf.SelectiveCache()}, **kw)
    cache = sa_hf.SelectiveCache()
    model.generate(ids, **{CACHE: cache}, max_new_tokens=1, do_sample=False, pad_token_id=0)  # the prompt, eager
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = model.generate(want[:, :5], **{CACHE: cache}, **{**kw, "max_new_tokens": 69})
    assert torch.equal(got, want)
    assert all(int((layer.cache.pos == 0).sum()) == 1 for layer in cache.layers)  # the first token kept
