"""Turning user masks into the two things attention needs: which keys are removed, and by how much
the remaining ones are penalised.

The mask rule (DESIGN §2; the seed text contradicts itself, this resolves it)::

    bool  selective_mask:  True  -> the key is removed for that query (weight exactly 0)
    float selective_mask = F:   finite -> subtracted from the scaled logits
                                +inf or -inf -> the key is removed
    NaN anywhere -> ValueError;  integer dtypes -> TypeError

so the seed's usage example (``-inf`` above the diagonal, 0 elsewhere) is a causal mask.

Accepted shapes, broadcast against ``(B, H, Lq, Lk)``:

* 2-D ``(Lq, Lk)``: the same mask for every sequence and head;
* 4-D ``(B or 1, H or 1, Lq, Lk)``.

3-D masks are refused: ``(B, Lq, Lk)`` and ``(B * H, Lq, Lk)`` (``nn.MultiheadAttention``'s layout)
cannot be told apart when ``H == 1`` or ``B == 1``, and guessing wrong is silent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .callers import caller_level

# finite F at or below this is a penalty of the opposite sign to an additive mask's -1e9: warned about
_ADDITIVE_MASK_LIKE = -1e4

__all__ = ["NormalizedMask", "normalize_mask", "causal_removed", "squeeze_expanded"]


@dataclass(frozen=True)
class NormalizedMask:
    """A user mask split into its two effects; every field broadcasts to ``(B, H, Lq, Lk)``.

    Attributes:
        removed: bool ``(b, h, Lq, Lk)`` with ``b in {1, B}``, ``h in {1, H}``; True = key removed.
            ``None`` when nothing beyond ``causal`` is removed.
        penalty: float ``(b, h, Lq, Lk)`` subtracted from the logits (0 where removed).
            ``None`` when every penalty is zero.
        causal: True when the removal is exactly the causal rule (key j removed for query i iff
            ``j > i + Lk - Lq``) and was folded into this flag instead of ``removed``.
        padding: the ``key_padding_mask`` itself, bool ``(B, Lk)``, when it pads any key (its keys are
            also in ``removed``, as ``(B, 1, 1, Lk)``); else ``None``. Paper-mode selection needs it
            apart: padding neither votes nor is voted on, and each sequence's first real token is
            the protected one (:func:`selective_attention.selection.vote_mask`).
    """

    removed: Tensor | None
    penalty: Tensor | None
    causal: bool
    padding: Tensor | None = None

    @property
    def is_plain(self) -> bool:
        """True when nothing is removed or penalised beyond the causal rule (and there is no padding)."""
        return self.removed is None and self.penalty is None and self.padding is None

    def removed_with_causal(self, Lq: int, Lk: int, device: torch.device | str | None = None) -> Tensor | None:
        """The full removal set, the causal rule written out when it was folded into ``causal``:
        bool, broadcasting to ``(B, H, Lq, Lk)``, or None when nothing is removed. The one place
        that unfolds the flag (``removed`` is None whenever ``causal`` is True)."""
        if not self.causal:
            return self.removed
        return causal_removed(Lq, Lk, device)


def causal_removed(Lq: int, Lk: int, device: torch.device | str | None = None) -> Tensor:
    """The causal rule as a bool ``(Lq, Lk)`` mask, True = removed.

    Queries are aligned to the *end* of the keys (query i sits at key position ``i + Lk - Lq``),
    which is what a query block appended to a cache needs; for ``Lq == Lk`` this is the usual
    upper triangle::

        Lq = Lk = 4       Lq = 2, Lk = 4
        . x x x           . . . x
        . . x x           . . . .
        . . . x
        . . . .           (x = removed)
    """
    return torch.ones(Lq, Lk, dtype=torch.bool, device=device).triu_(1 + Lk - Lq)


def squeeze_expanded(mask: Tensor) -> Tensor:
    """Undo ``expand`` on the leading (batch, head) dims: a size-n dim of stride 0 becomes size 1.

    The seed example expands a ``(1, 1, L, L)`` mask to ``(B, H, L, L)``; looking at only one copy
    makes validation and the causal check O(L^2) instead of O(B H L^2).
    """
    for d in range(mask.dim() - 2):
        if mask.size(d) > 1 and mask.stride(d) == 0:
            mask = mask.narrow(d, 0, 1)
    return mask


def _check_mask_shape(name: str, mask: Tensor, B: int, H: int, Lq: int, Lk: int) -> Tensor:
    """Return ``mask`` as 4-D ``(b, h, Lq, Lk)``, or raise naming the shape and the fix."""
    lead = "-1, -1, " if mask.dim() == 4 else ""  # expand's leading sizes in the fix below (kept as they are)
    if mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:
        raise ValueError(
            f"{name} has 3 dims {tuple(mask.shape)}, which is ambiguous: it could be (B, Lq, Lk) or "
            f"nn.MultiheadAttention's (B * H, Lq, Lk). Pass a 2-D (Lq, Lk) = ({Lq}, {Lk}) mask, or a "
            f"4-D (B, H, Lq, Lk) one: mask[:, None] for a per-sequence mask, "
            f"mask.view({B}, {H}, {Lq}, {Lk}) for a per-head one."
        )
    elif mask.dim() != 4:
        raise ValueError(
            f"{name} must be 2-D (Lq, Lk) or 4-D (B, H, Lq, Lk); got {mask.dim()}-D "
            f"{tuple(mask.shape)} for B={B}, H={H}, Lq={Lq}, Lk={Lk}."
        )
    if mask.shape[-2:] != (Lq, Lk):
        # Broadcasting along the query/key axes would be legal for torch, but a (1, Lk) mask where
        # (Lq, Lk) was meant is the classic silent bug; ask for it to be explicit.
        got = tuple(mask.shape[-2:])
        if all(g in (1, want) for g, want in zip(got, (Lq, Lk))):  # a broadcast: expand makes it explicit
            fix = f"Use mask.expand({lead}{Lq}, {Lk}) if the broadcast is intended (key padding: key_padding_mask)."
        elif got == (Lk, Lq):
            fix = "It looks transposed: rows are queries, columns keys (mask.transpose(-2, -1))."
        else:
            fix = (
                "Build it for these lengths: Lq is the queries' length and Lk the keys' (the module's inputs are "
                "batch-first, [B, L, d_model]; the functional's [B, H, L, D])."
            )
        raise ValueError(f"{name} must cover the full (Lq, Lk) = ({Lq}, {Lk}) in its last two dims; got {got}. {fix}")
    expected = (B, H, Lq, Lk)
    for got, want in zip(mask.shape, expected):
        if got != want and got != 1:
            raise ValueError(
                f"{name} of shape {tuple(mask.shape)} does not broadcast to (B, H, Lq, Lk) = "
                f"{expected}; each dim must equal the target or be 1."
            )
    return mask


def has_values(t: Tensor) -> bool:
    """Whether ``t`` holds values to read: not on the meta device, not a fake tensor (shape inference, FLOP counting,
    torch.compile's tracing)."""
    return t.device.type != "meta" and not is_fake(t)


def _split(name: str, mask: Tensor, dtype: torch.dtype, read_values: bool = True) -> tuple[Tensor, Tensor | None]:
    """A validated mask -> (removed, penalty or None). ``read_values=False`` (a compiled call): on CPU the value checks
    raise through ``torch._assert_async`` (a RuntimeError, no graph break; on meta tensors they check nothing; elsewhere
    they read the values), the
    additive-mask warning is not given and an all-zero penalty is kept (the same result)."""
    if mask.dtype == torch.bool:
        return mask, None
    if not mask.is_floating_point():
        raise TypeError(
            f"{name} has dtype {mask.dtype}; accepted are torch.bool (True removes a key) or "
            f"a floating dtype (values subtracted from the logits, +-inf removes). "
            f"For a 0/1 integer mask: with 1 = removed use mask.bool(); with 1 = may attend (a tril(ones) mask) "
            f"use mask == 0."
        )
    nan_msg = (
        f"{name} contains NaN; use +inf (or True in a bool mask) to remove a key and a finite value to penalise it."
    )
    # compiled, the checks below raise through torch._assert_async on CPU only: on CUDA it becomes a device-side
    # assert, which leaves the process's CUDA context unusable; there they read the values (a graph break)
    checks_async = not read_values and (
        mask.device.type == "cpu" or (not torch.compiler.is_compiling() and not has_values(mask))  # eager meta / fake
    )
    if checks_async:
        torch._assert_async(~torch.isnan(mask).any(), nan_msg)
    elif torch.isnan(mask).any():
        raise ValueError(nan_msg)
    # Another float dtype (an fp32 mask for bf16 queries under autocast, say): which keys are removed is read
    # in the mask's own dtype, and only the finite penalties are cast, so a cast can never remove a key.
    removed = torch.isinf(mask)
    penalty = mask.masked_fill(removed, 0.0)
    if penalty.dtype != dtype:
        limit = torch.finfo(dtype).max
        if torch.finfo(penalty.dtype).max > limit:  # a wider mask: its finite penalties must fit the queries' dtype
            # compared in the mask's own dtype, before the cast: a compiled isinf-after-cast can be fused with the
            # cast and skip its rounding (inductor, fp16), and the limit is exact in the wider dtype
            over = penalty.abs() > limit
            msg = (
                f"{name} ({mask.dtype}) holds finite penalties beyond the queries' {dtype} range (max {limit:g}), "
                f"which are inf in the queries' {dtype}: a cast would remove those keys. Use +-inf (or a bool mask) "
                f"to remove a key, penalties within {dtype}'s range to weight it, or queries in {mask.dtype}."
            )
            if checks_async:
                torch._assert_async(~over.any(), msg)
            elif over.any():
                raise ValueError(f"{msg} (The largest is {penalty.abs().max().item():g}.)")
        penalty = penalty.to(dtype)
    if not read_values:
        return removed, penalty
    if bool((penalty <= _ADDITIVE_MASK_LIKE).any()):
        warnings.warn(
            f"{name} holds finite values <= {_ADDITIVE_MASK_LIKE:g}: F is *subtracted* from the logits, so those keys "
            f"get more weight, not less. If this is an additive mask (-1e9 or finfo.min = masked, as in "
            f"nn.MultiheadAttention or transformers), pass its negation, or a bool mask (True = removed).",
            stacklevel=caller_level(),
        )
    if not penalty.any() and not _differentiated(mask):  # all zero: no penalty (unless it is learned, from zero)
        penalty = None
    return removed, penalty


def _differentiated(t: Tensor) -> bool:
    """Whether a derivative may be taken with respect to ``t``: it requires grad, carries a forward-mode tangent
    (a dual tensor reports ``requires_grad=False``), or is an input of a ``torch.func`` transform. An all-zero F
    that is one of these must stay: dropped, its tangent came out None (forward_ad) or zero (jvp), silently."""
    if t.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(t):
        return True
    fwd = torch.autograd.forward_ad
    return fwd._current_level >= 0 and fwd.unpack_dual(t).tangent is not None


def normalize_mask(
    selective_mask: Tensor | None,
    *,
    B: int,
    H: int,
    Lq: int,
    Lk: int,
    dtype: torch.dtype,
    device: torch.device,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
    read_values: bool = True,
) -> NormalizedMask:
    """Validate and combine the user's masks into a :class:`NormalizedMask`.

    Args:
        selective_mask: bool or float, 2-D ``(Lq, Lk)`` or 4-D ``(B|1, H|1, Lq, Lk)``; see the module
            docstring for the rule.
        B, H, Lq, Lk: the attention problem's sizes.
        dtype, device: the queries'; a float mask's finite penalties are cast to the dtype (an error if one
            overflows there), any mask must be on the device.
        is_causal: also remove future keys (``j > i + Lk - Lq``).
        key_padding_mask: bool ``(B, Lk)``, True = padding (removed for every query). Kept as
            ``(B, 1, 1, Lk)`` in ``removed`` unless ``is_causal`` or a full mask widens it (paper mode
            passes ``is_causal=False``: its kernels apply causality themselves, so key padding stays
            O(B Lk)), and returned as ``padding`` for the selection's vote rule.
        read_values: False keeps the masks as given, skipping the shortcuts that read their values (no padding
            at all, no key removed, a mask that is the causal rule): the same result on the masked path, and no
            graph break under ``torch.compile`` (every compiled call but one Triton could serve, which takes no
            mask); a float mask's value checks then raise through ``torch._assert_async``.
    """
    removed: Tensor | None = None
    penalty: Tensor | None = None
    padding: Tensor | None = None
    if selective_mask is not None:
        if not isinstance(selective_mask, Tensor):
            raise TypeError(f"selective_mask must be a torch.Tensor or None, got {type(selective_mask).__name__}.")
        if selective_mask.device != device:
            raise ValueError(
                f"selective_mask is on {selective_mask.device} but the inputs are on {device}; "
                f"move it with .to({str(device)!r})."
            )
        mask = _check_mask_shape("selective_mask", selective_mask, B, H, Lq, Lk)
        removed, penalty = _split("selective_mask", squeeze_expanded(mask), dtype, read_values)

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}.")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask must be torch.bool (True = padding), got {key_padding_mask.dtype}; for a 0/1 "
                f"mask with 1 = padding use key_padding_mask.bool(), with 1 = a real token (transformers' "
                f"attention_mask) use key_padding_mask == 0."
            )
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(
                f"key_padding_mask must have shape (B, Lk) = ({B}, {Lk}), got {tuple(key_padding_mask.shape)}."
            )
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but the inputs are on {device}.")
        if not read_values or key_padding_mask.any():
            padding = key_padding_mask
            pad = key_padding_mask[:, None, None, :]  # [B, 1, 1, Lk]
            removed = pad if removed is None else removed | pad

    causal = is_causal
    if removed is not None and read_values and not removed.any():
        removed = None
    if removed is not None and removed.shape[:2] == (1, 1) and read_values:
        # A mask that *is* the causal rule (the seed's example) runs on the causal kernels.
        rule = causal_removed(Lq, Lk, device)
        if is_causal:
            removed = removed | rule
        if torch.equal(removed[0, 0], rule):
            removed, causal = None, True
    if causal and removed is not None:
        removed = removed | causal_removed(Lq, Lk, device)
        causal = False
    return NormalizedMask(removed=removed, penalty=penalty, causal=causal, padding=padding)
