"""The backend contract (ops/registry.py): every backend takes one Request and returns (out, rows);
supports() says why not; "auto" takes the first that serves; each agrees with the naive spec."""

import pytest
import torch
from helpers import TOL

from selective_attention.functional import _request, selective_attention
from selective_attention.masks import causal_removed, normalize_mask
from selective_attention.ops import registry
from selective_attention.selection import Selection


def _req(selection=False, mask=None, pad=False, tau=None, dropout_p=0.0, L=13, Lk=None, is_causal=False):
    gen = torch.Generator().manual_seed(0)
    Lk = L if Lk is None else Lk
    q = torch.randn(2, 3, L, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 3, Lk, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    selective_mask = None
    if mask == "bool":
        selective_mask = torch.rand(L, Lk, generator=gen) < 0.2
    elif mask == "float":
        selective_mask = torch.rand(1, 3, L, Lk, generator=gen, dtype=torch.float64)
    kpm = None
    if pad:
        kpm = torch.zeros(2, Lk, dtype=torch.bool)
        kpm[0, :3] = True
    return _request(
        q, k, v, selective_mask, is_causal=is_causal, key_padding_mask=kpm, selection=selection, selection_qk=None,
        dropout_p=dropout_p, scale=None, chunk_size=4, memory_tau=tau,
    )  # fmt: skip


REQUESTS = {
    "standard": dict(),
    "standard-causal-mask": dict(mask="float", is_causal=True),
    "cross-causal": dict(L=5, Lk=9, is_causal=True),
    "paper": dict(selection=True),
    "paper-per-head-masks-tau": dict(selection=Selection(per_head=True), mask="bool", pad=True, tau=0.5),
    "paper-head2-float": dict(selection=Selection(head=2), mask="float", tau=1.0),
}


@pytest.mark.parametrize("case", list(REQUESTS))
def test_every_backend_that_serves_equals_the_spec(case):
    req = _req(**REQUESTS[case])
    ref_out, ref_rows = registry.backend_module("naive").attend(req)
    served = []
    for name in registry.PREFERENCE:
        module = registry.backend_module(name)
        reason = module.supports(req)
        if reason is not None:
            assert isinstance(reason, str) and f"backend='{name}'" in reason
            continue
        out, rows = module.attend(req)
        torch.testing.assert_close(out, ref_out, **TOL[torch.float64])
        assert (rows is None) == (req.tau is None)
        if rows is not None:
            torch.testing.assert_close(rows, ref_rows, **TOL[torch.float64])
        served.append(name)
    assert "naive" in served and len(served) >= 2  # the spec, and a fast path


@pytest.mark.parametrize(
    "kwargs, chosen",
    [
        (dict(), "sdpa"),
        (dict(dropout_p=0.1), "sdpa"),
        (dict(selection=True), "chunked"),
        (dict(selection=True, mask="bool", pad=True, tau=1.0), "chunked"),
        (dict(selection=True, dropout_p=0.1), "naive"),  # only the spec has paper mode with dropout
    ],
)
def test_auto_takes_the_first_that_serves_on_cpu(kwargs, chosen):
    assert registry.choose("auto", _req(**kwargs)) == chosen


def test_named_backend_refusal_is_its_reason():
    req = _req()
    reason = registry.backend_module("chunked").supports(req)
    with pytest.raises(registry.BackendRefused) as e:
        registry.choose("chunked", req)
    assert str(e.value) == reason and isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.choose("flash", req)
    assert registry.NAMES[0] == "auto" and set(registry.NAMES[1:]) == {"naive", "sdpa", "chunked", "triton"}


def test_public_function_is_the_dispatch():
    req = _req(selection=True, tau=1.0)
    out, rows = selective_attention(req.q, req.k, req.v, selection=True, memory_tau=1.0, chunk_size=4)
    ref = registry.dispatch("chunked", req)
    torch.testing.assert_close(out, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(rows, ref[1], rtol=0, atol=0)


def test_removed_with_causal_unfolds_the_flag_once():
    m = normalize_mask(None, B=1, H=1, Lq=3, Lk=5, dtype=torch.float32, device=torch.device("cpu"), is_causal=True)
    assert m.causal and m.removed is None
    assert torch.equal(m.removed_with_causal(3, 5), causal_removed(3, 5))
    plain = normalize_mask(None, B=1, H=1, Lq=3, Lk=5, dtype=torch.float32, device=torch.device("cpu"))
    assert plain.removed_with_causal(3, 5) is None
