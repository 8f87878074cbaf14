"""Subword tokens: the BPE tokenizer (trained on the training split only, deterministic, exactly reversible),
windows that start with <bos>, and the tokenizer saved with a checkpoint and used by eval and generate."""

import json
import random

import pytest
import torch

from selective_attention import checkpoint
from selective_attention.cli import main as cli
from selective_attention.data import BPETokenizer, ByteTokenizer, TextData, load_text, split_text
from selective_attention.train import CheckpointError, Task, TrainConfig, load_checkpoint, main, model_from_checkpoint

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def pydoc_bpe():
    train, _ = split_text(load_text("pydoc"), 0.1)
    return BPETokenizer.train(train, vocab_size=1024)


def _random_text(rng: random.Random, n: int) -> str:
    """Any text: ASCII, whitespace and control characters, accents, CJK, emoji, and a lone "<bos>"."""
    pieces = ["the ", "def ", "\n", "\t", "\r\n", "  ", "é", "ß", "Ω", "日本語", "🙂", "\x00", "\x7f", "<bos>"]
    pieces += ["\u200b", "\U0001f469\u200d\U0001f52c"]  # zero-width space, an emoji with a joiner
    return "".join(rng.choice(pieces) if rng.random() < 0.5 else chr(rng.randrange(0x20, 0x3000)) for _ in range(n))


def test_bpe_round_trips_any_text(pydoc_bpe):
    tok = pydoc_bpe
    rng = random.Random(0)
    texts = ["", "a", "héllo wörld", "<bos>", "  leading and trailing  \n\n", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff"]
    texts += [_random_text(rng, rng.randrange(1, 200)) for _ in range(200)]
    for text in texts:
        ids = tok.encode(text)
        assert ids.dtype == torch.long and (ids != tok.bos_id).all()  # the text "<bos>" is text, not the token
        assert tok.decode(ids) == text
    corpus = load_text("pydoc")[:200_000]  # long enough for the line-parallel encoder
    assert tok.decode(tok.encode(corpus)) == corpus
    assert int(tok.token_bytes()[tok.encode(corpus)].sum()) == len(corpus.encode("utf-8"))  # bits per byte
    assert len(tok.encode(corpus)) < len(corpus) / 2.5  # subwords: well under one token per character
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 1024\)"):
        tok.decode([5, 1024])


def test_a_text_encodes_alike_whatever_its_length():
    """A short text (a validation split, a prompt) encodes as a long one (a training split) does: line by line.
    In one piece, " \\n" and "\\r\\n" were two tokens where training made one, and a file with trailing spaces
    scored a validation loss of 4.5 against a training loss of 2.0."""
    line = "the quick brown fox jumps over the lazy dog "
    text = "".join(f"{line}{i} \n{line}\r\n" for i in range(2000))  # trailing spaces, CRLF; > 65536 characters
    tok = BPETokenizer.train(text, vocab_size=400)
    short = text[: text.index("\n", 2000) + 1]  # whole lines
    long_ids = tok.encode(text)
    assert torch.equal(tok.encode(short), long_ids[: len(tok.encode(short))])
    pieces = [tok.encode(piece) for piece in short.splitlines(keepends=True)]
    assert torch.equal(tok.encode(short), torch.cat(pieces))
    assert tok.decode(tok.encode(short)) == short
    assert tok.encode("").numel() == 0


def test_a_vocabulary_smaller_than_asked_for_is_warned_about(tmp_path):
    """A small text runs out of pairs to merge: --bpe_vocab_size 4096 gave a 300-token model, silently."""
    path = tmp_path / "small.txt"
    path.write_text("abc abd abe\n" * 400, encoding="utf-8")
    cfg = TrainConfig.from_options(dict(data=str(path), tokenizer="bpe", bpe_vocab_size=4096, context_len=16))
    with pytest.warns(UserWarning, match=r"--bpe_vocab_size=4096: the training split of .* gives only (\d+) tokens"):
        task = Task(cfg)
    assert task.vocab_size < 4096


def test_training_is_deterministic(pydoc_bpe):
    train, _ = split_text(load_text("pydoc"), 0.1)
    again = BPETokenizer.train(train, vocab_size=1024)
    assert again.to_json() == pydoc_bpe.to_json() and again == pydoc_bpe
    assert pydoc_bpe.vocab_size == 1024 and pydoc_bpe.bos_id == 0
    other = BPETokenizer.train(train, vocab_size=1000)
    assert other != pydoc_bpe


def _corpus_with_a_val_only_word(tmp_path):
    """A file whose validation tail (its last 10%) repeats a word its training part never has."""
    rng = random.Random(1)
    words = "in the beginning god created heaven and earth light was good day night".split()
    train = "".join(" ".join(rng.choice(words) for _ in range(12)) + "\n" for _ in range(900))
    val = " zqxjvwk" * (len(train) // 9 // 8)
    path = tmp_path / "corpus.txt"
    path.write_text(train + val, encoding="utf-8")
    return path, train + val


def test_trained_on_the_training_split_only(tmp_path):
    path, text = _corpus_with_a_val_only_word(tmp_path)
    cfg = TrainConfig.from_options({"data": str(path), "tokenizer": "bpe", "bpe_vocab_size": 400, "context_len": 16})
    task = Task(cfg)
    tok = task.tokenizer
    train, val = split_text(text, 0.1)
    assert "zqxjvwk" not in train and val.count("zqxjvwk") > 100
    # the val-only word stays in pieces: no token spans two of its letters
    assert not [t for t in tok._tok.get_vocab() if sum(c in t for c in "zqxjvwk") >= 2]
    assert len(tok.encode(" zqxjvwk")) >= 7
    # the control: trained on the whole text, it is one token (so the test above can fail)
    assert len(BPETokenizer.train(text, vocab_size=400).encode(" zqxjvwk")) == 1
    # both splits are encoded with it, and decode back to the text
    assert tok.decode(task.text.train) + tok.decode(task.text.val) == text


def test_windows_start_with_bos_and_bos_is_never_a_target(pydoc_bpe):
    tok = pydoc_bpe
    data = TextData.from_text(load_text("pydoc"), 0.1, tok)
    assert data.bos == tok.bos_id and not (data.train == tok.bos_id).any() and not (data.val == tok.bos_id).any()
    T = 24
    x, y = data.batch("train", 16, T, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, T)
    assert (x[:, 0] == tok.bos_id).all() and not (x[:, 1:] == tok.bos_id).any() and not (y == tok.bos_id).any()
    assert torch.equal(x[:, 1:], y[:, :-1])  # next-token targets
    # evaluation windows: the same rule; every val token is a target once, in order
    batches = list(data.eval_batches("val", 8, T))
    ys = torch.cat([yb for _, yb in batches])
    assert all((xb[:, 0] == tok.bos_id).all() and torch.equal(xb[:, 1:], yb[:, :-1]) for xb, yb in batches)
    assert len(ys) == data.n_eval_windows("val", T) == len(data.val) // T
    assert torch.equal(ys.reshape(-1), data.val[: len(ys) * T])
    # a window needs T tokens of the split after <bos>: the smallest split that fits
    small = TextData(torch.arange(1, 11), val_fraction=0.5, bos=0)
    (xs, ys_), *_ = small.eval_batches("val", 4, 5)
    assert xs.tolist() == [[0, 6, 7, 8, 9]] and ys_.tolist() == [[6, 7, 8, 9, 10]]
    with pytest.raises(ValueError, match=r"needs context_len \(after the <bos>\) = 6"):
        small.batch("val", 1, 6)


def test_byte_level_is_unchanged():
    text = load_text("pydoc")[:5000]
    a, b = TextData.from_text(text, 0.1), TextData(ByteTokenizer().encode(text), 0.1)
    assert a.bos is None and torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    x, y = a.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (4, 16)
    assert TrainConfig().tokenizer == "byte"


TINY = ["--data=pydoc", "--tokenizer=bpe", "--bpe_vocab_size=512", "--n_layer=2", "--n_head=2", "--d_model=32",
        "--context_len=32", "--batch_size=4", "--eval_interval=4", "--eval_batches=2", "--ckpt_interval=4",
        "--selection=true", "--progress=false"]  # fmt: skip


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("bpe") / "run"
    assert cli(["train", *TINY, f"--out_dir={run}", "--max_steps=4"]) == 0
    return run


def test_checkpoint_holds_the_tokenizer_eval_and_generate_use_it(bpe_run, capsys, monkeypatch):
    capsys.readouterr()
    model, meta = model_from_checkpoint(bpe_run)
    tok = meta["tokenizer"]
    assert isinstance(tok, BPETokenizer) and model.config.vocab_size == tok.vocab_size == 512
    train, _ = split_text(load_text("pydoc"), 0.1)
    assert tok == BPETokenizer.train(train, vocab_size=512)  # the one training made, from the training split
    assert cli(["eval", "--ckpt", str(bpe_run), "--json", "--batches", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokenizer"] == "bpe" and out["bits_per_byte"] < out["val_loss"] / 0.693  # > 1 byte per token
    # generate: the prompt with <bos> first, the output decoded without it
    from selective_attention.decoding import Decoder

    seen = []
    real = Decoder.generate
    monkeypatch.setattr(Decoder, "generate", lambda self, idx, *a, **k: seen.append(idx) or real(self, idx, *a, **k))
    assert cli(["generate", "--ckpt", str(bpe_run), "--prompt", "def héllo", "--max_new_tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert seen[0][0, 0].item() == tok.bos_id and tok.decode(seen[0][0, 1:]) == "def héllo"
    assert text.startswith("def héllo") and "<bos>" not in text


def test_resume_keeps_the_tokenizer_and_refuses_another(bpe_run, tmp_path):
    import shutil

    from selective_attention.train import parse_overrides

    run = tmp_path / "run"
    shutil.copytree(bpe_run, run)  # a 4-step BPE run
    first = load_checkpoint(run)[1]
    b = main(parse_overrides([*TINY, f"--out_dir={run}", "--max_steps=8"]))  # resumed with the stored tokenizer
    assert [r["step"] for r in b["history"]] == [4, 8] and b["history"][0] == first["extra"]["history"][0]
    assert load_checkpoint(run)[1]["tokenizer"] == first["tokenizer"]
    for other in (["--tokenizer=byte"], ["--bpe_vocab_size=600"]):
        base = [a for a in TINY if not (other == ["--tokenizer=byte"] and a.startswith("--bpe_vocab_size"))]
        cfg = parse_overrides([*base, *other, f"--out_dir={run}", "--max_steps=12", "--allow_config_change=true"])
        with pytest.raises(CheckpointError, match="cannot change its tokenizer"):
            main(cfg)


def _rewrite(path, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
    save_file(tensors, str(path), metadata=checkpoint.signed(tensors, meta))  # as that code would have written it


def test_damaged_or_foreign_tokenizer_is_a_clear_error(bpe_run, tmp_path, capsys):
    import shutil

    from tokenizers import Tokenizer, models

    src = bpe_run / "ckpt.safetensors"
    stored = json.loads(load_checkpoint(src)[1]["tokenizer"].to_json())
    d = load_checkpoint(src)[1]["tokenizer"].to_dict()

    def case(name, **changes):
        path = tmp_path / name / "ckpt.safetensors"
        path.parent.mkdir()
        shutil.copy(src, path)
        _rewrite(path, **changes)
        return path

    damaged = case("damaged", tokenizer=json.dumps({**d, "json": d["json"].replace('"merges"', '"mergez"')}))
    with pytest.raises(CheckpointError, match="fails its sha256"):
        model_from_checkpoint(damaged)
    assert cli(["eval", "--ckpt", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "fails its sha256" in err and err.count("\n") == 1

    foreign_json = Tokenizer(models.WordLevel({"<bos>": 0, "a": 1}, unk_token="a")).to_str()
    foreign = {**d, "json": foreign_json, "sha256": __import__("hashlib").sha256(foreign_json.encode()).hexdigest()}
    with pytest.raises(CheckpointError, match="does not encode text reversibly"):
        model_from_checkpoint(case("foreign", tokenizer=json.dumps(foreign)))
    unloadable = {**d, "json": "{not json", "sha256": __import__("hashlib").sha256(b"{not json").hexdigest()}
    with pytest.raises(CheckpointError, match="does not load"):
        model_from_checkpoint(case("unloadable", tokenizer=json.dumps(unloadable)))
    with pytest.raises(CheckpointError, match="unknown tokenizer kind 'sentencepiece'"):
        model_from_checkpoint(case("kind", tokenizer=json.dumps({"kind": "sentencepiece"})))
    with pytest.raises(CheckpointError, match="unreadable metadata"):
        model_from_checkpoint(case("garbage", tokenizer="{"))
    # the tokenizer dropped from a BPE checkpoint: read as bytes, which do not fit its 512-token model
    with pytest.raises(CheckpointError, match=r"tokenizer \(ByteTokenizer\(\), 256 tokens\) does not fit"):
        model_from_checkpoint(case("dropped", tokenizer=None, format_version="3"))
    assert stored["model"]["type"] == "BPE"


def test_byte_and_older_checkpoints_load_as_byte_level(tmp_path, capsys):
    run = tmp_path / "run"
    byte = [a for a in TINY if not a.startswith(("--tokenizer", "--bpe"))]
    assert cli(["train", *byte, f"--out_dir={run}", "--max_steps=2"]) == 0
    capsys.readouterr()
    tensors, meta = load_checkpoint(run)
    assert meta["tokenizer"] == ByteTokenizer() and meta["format_version"] == checkpoint.FORMAT_VERSION
    _rewrite(run / "ckpt.safetensors", tokenizer=None, format_version="3")  # as written before tokenizers were stored
    model, meta = model_from_checkpoint(run)
    assert meta["format_version"] == "3" and meta["tokenizer"] == ByteTokenizer() and model.config.vocab_size == 256
    assert cli(["eval", "--ckpt", str(run), "--json", "--batches", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokenizer"] == "byte" and out["bits_per_byte"] == pytest.approx(out["val_loss"] / 0.6931471805599453)
    assert cli(["generate", "--ckpt", str(run), "--prompt", "def ", "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("def ")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"tokenizer": "wordpiece"}, "--tokenizer='wordpiece' is invalid: it must be byte or bpe."),
        ({"tokenizer": "bpe", "bpe_vocab_size": 100}, "--bpe_vocab_size=100 is invalid: it must be an int >= 257"),
        ({"tokenizer": "bpe", "data": "varassign"}, "--tokenizer=bpe does not apply to --data=varassign"),
    ],
)
def test_bad_tokenizer_options_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        TrainConfig.from_options(options)


def test_bpe_decodes_an_iterator_of_ids_like_a_list(pydoc_bpe):
    ids = pydoc_bpe.encode("the hat").tolist()
    assert pydoc_bpe.decode(iter(ids)) == pydoc_bpe.decode(ids) == "the hat"  # the check consumed it: ''
