"""Where a warning should point: the user's line, however deep in this package it was raised."""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["caller_level"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def caller_level() -> int:
    """``warnings.warn``'s stacklevel, for a warning raised by the function calling this one, of the first frame
    outside this package and torch (whose ``nn.Module.__call__`` and ``no_grad`` decorator add frames): the user's
    call. Not under ``torch.compile``, which cannot trace frame walks."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE, _TORCH)):
        frame, level = frame.f_back, level + 1
    return level
