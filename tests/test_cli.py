import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from selective_attention import cli
from selective_attention.cli import main
from selective_attention.machine import cpu_model
from selective_attention.train import CheckpointError, parse_overrides
from selective_attention.train import main as train_main


def test_demo_runs_and_shows_masking(capsys):
    assert main(["seed-example"]) == 0
    out = capsys.readouterr().out
    assert "output shape (32, 64, 512)" in out
    assert "<- keys" in out
    # the causal grid: the first query sees only itself
    first_row = [line for line in out.splitlines() if line.startswith("the |")][0]
    assert first_row.split("|")[1].split() == ["1.00", "x", "x", "x", "x", "x"]
    assert main(["seed-example", "--seed", "99999999999999999999"]) == 2  # was "Overflow when unpacking long long"
    assert "--seed: 99999999999999999999 is beyond 2**32 - 1" in capsys.readouterr().err


def test_the_policy_option_offers_the_caches_policies():
    # the CLI names them itself (it does not import torch's modules to build its parser): kept equal here
    from selective_attention.kv_cache import POLICIES

    assert cli.POLICY_CHOICES == POLICIES


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "selective_attention", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--data", "pydoc", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| standard |" in text and "| selective |" in text and "less" in text
    report = json.loads((out / "report.json").read_text())
    assert report["budget_search"]["memory_ratio"] >= 1.0
    assert report["machine"]["cpu"] == cpu_model() and report["machine"]["torch"] == torch.__version__
    if report["budget_search"]["found"]:  # the searched budgets, also as a plain window on the same model
        assert set(report["heldout"]["window_same_budgets"]) == {"search", "heldout"}
        assert "instead of the largest F (selective + window)" in text
    for png in ("loss_curves.png", "memory_vs_loss.png", "penalty_F.png"):
        assert (out / png).stat().st_size > 1000


def test_demo_against_its_own_full_cache_reads_it_as_the_pruned_caches(tmp_path, capsys, monkeypatch):
    """When the selective model misses the standard's loss, the demo searches at its own full cache: that target and
    the held-out reference were the full forward's losses, which differ from the one-token-at-a-time reading of the
    pruned caches in the last bits, so a verdict there could follow that rounding. Both are now the full cache read
    as the pruned ones are, the reference on the held-out windows (those the uniform curves read)."""
    from selective_attention import demo as demo_mod

    real, real_pruned, full_reads = demo_mod.mean_loss, demo_mod.pruned_loss, []
    monkeypatch.setattr(demo_mod, "mean_loss", lambda m, x, y: real(m, x, y) + (10.0 if m.config.selection else 0.0))

    held = []  # the windows the uniform curves read: the held-out ones

    def pruned(model, x, y, **kw):
        loss = real_pruned(model, x, y, **kw)
        if model.config.selection and kw.get("budget") is None:  # the selective model's full cache, read pruned-wise
            full_reads.append((x, loss[0]))
        elif isinstance(kw.get("budget"), int):
            held.append(x)
        return loss

    monkeypatch.setattr(demo_mod, "pruned_loss", pruned)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--data", "pydoc", "--no-progress"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    b, h = report["budget_search"], report["heldout"]
    assert b["equal_to"] == "selective (own full cache)" and not b["reached_standard"]
    assert b["target_loss"] == b["full_loss"]  # the search's own one-token-at-a-time full cache
    # the held-out reference: that reading too, of the held-out windows, not the full forward
    assert held and [loss for x, loss in full_reads if x is held[0]] == [h["reference_loss"]]
    assert h["holds"] == (h["pruned_loss"] <= h["reference_loss"] + b["tolerance"])


def test_train_eval_generate_commands(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--data=pydoc", f"--out_dir={run}", "--n_layer=2", "--n_head=2", "--d_model=32", "--context_len=32",
            "--batch_size=4", "--max_steps=6", "--eval_interval=3", "--eval_batches=2", "--selection=true",
            "--progress=false"]  # fmt: skip
    assert main(["train", *args]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 6
    assert main(["eval", "--ckpt", str(run), "--json", "--batches", "1"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["val_loss"] > 0 and full["perplexity"] > 1
    assert full["windows"] == 8 and full["targets"] == 8 * 32 and "note_windows" not in full  # what the loss is over
    assert main(["eval", "--ckpt", str(run), "--json", "--batches", "1", "--budget", "8"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["kv_tokens_per_layer"] == [8, 8]
    assert main(["generate", "--ckpt", str(run), "--prompt", "def ", "--max_new_tokens", "20", "--budget", "4"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert main(["generate", "--ckpt", str(run), "--prompt", "\udcff"]) == 2  # a non-UTF-8 byte, as argv gives it
    assert "--prompt holds characters that are not valid UTF-8 text" in capsys.readouterr().err
    # a prompt shaped like an option is the prompt as given (its dashes were rewritten to underscores)
    assert main(["generate", "--ckpt", str(run), "--prompt", "--well-known=a b", "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().out.startswith("--well-known=a b")


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "--ckpt", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["--lr=1", "train"]) == 2  # it said "unknown option --lr (did you mean --lr ...?)"
    assert "--lr=1 comes before the command; options go after it: selective-attention train --lr=1" in (
        capsys.readouterr().err
    )
    assert main(["generate", "--prompt", "-hello"]) == 2
    assert "expected one argument (give it as --prompt=VALUE; a value that begins with '-'" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert main(["eval", "--ckpt", str(text)]) == 2  # it said "corrupt ... restore it from a copy"
    assert "notes.txt is not a safetensors file" in capsys.readouterr().err
    run = tmp_path / "never"
    assert main(["train", "--data", str(tmp_path / "missing.txt"), f"--out_dir={run}", "--progress=false"]) == 2
    assert "neither a built-in corpus" in capsys.readouterr().err and not run.exists()  # no empty folder left
    assert main(["train", "--bogus=1"]) == 2
    assert "unknown option --bogus" in capsys.readouterr().err


def test_bench_command(capsys):
    assert main(["bench", "--lengths", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 64 |" in out and cli.cpu_model() in out.splitlines()[0]  # a benchmark names its CPU


# --- bad options: a usage error naming the option (exit 2, no traceback), before any work is done ---------
TINY = ["--n_layer=2", "--n_head=2", "--d_model=32", "--context_len=32", "--batch_size=4", "--eval_batches=1",
        "--selection=true", "--progress=false"]  # fmt: skip


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny text (selective), varassign and standard text checkpoints (2 training steps each), and their summaries."""
    root = tmp_path_factory.mktemp("ckpts")
    runs = {}
    kinds = (("text", ["--data=pydoc"]), ("va", ["--data=varassign", "--va_assign=4"]),
             ("standard", ["--data=pydoc", "--selection=false"]))  # fmt: skip
    for name, data in kinds:
        cfg = parse_overrides([*TINY, *data, f"--out_dir={root / name}", "--max_steps=2", "--eval_interval=2"])
        runs[name] = (root / name, train_main(cfg))
    return runs


@pytest.mark.parametrize(
    "argv, option",
    [
        (["eval", "--batches", "0"], "--batches"),
        (["eval", "--batches", "-1"], "--batches"),
        (["eval", "--batch_size", "0"], "--batch_size"),
        (["eval", "--context_len", "0"], "--context_len"),
        (["eval", "--threshold", "nan"], "--threshold"),
        (["bench", "--repeats", "0"], "--repeats"),
        (["bench", "--lengths", "-5"], "--lengths"),
        (["bench", "--lengths", "64", "0"], "--lengths"),
        (["demo", "--steps", "-1"], "--steps"),
        (["generate", "--temperature", "nan"], "--temperature"),
        (["generate", "--temperature", "-0.5"], "--temperature"),
        (["generate", "--max_new_tokens", "-1"], "--max_new_tokens"),
        (["generate", "--top_k", "0"], "--top_k"),
    ],
)
def test_bad_numbers_are_usage_errors(argv, option, tmp_path, capsys):
    bad = argv[-1]
    if argv[0] in ("eval", "generate"):
        argv = [*argv, "--ckpt", str(tmp_path / "missing")]  # refused before the checkpoint is read
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be " in err and f"got {bad!r}" in err and "Traceback" not in err


def test_demo_steps_zero_is_refused_not_replaced_by_the_default(monkeypatch, capsys):
    import selective_attention.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert main(["demo", "--quick", "--steps", "0"]) == 2
    assert "argument --steps: must be an int >= 1, got '0'" in capsys.readouterr().err
    assert main(["demo", "--quick", "--steps", "7", "--data", "pydoc"]) == 0
    assert [c.steps for c in seen] == [7]
    assert seen[0].tolerance == 0.0  # equal loss means the standard model's loss itself, by default
    assert main(["demo", "--quick", "--tolerance", "0.02"]) == 0 and seen[-1].tolerance == 0.02
    assert main(["demo", "--tolerance", "nan"]) == 2
    capsys.readouterr()
    assert main(["demo", "--quick", "--bpe_vocab_size=300"]) == 2  # byte level: it ran, and the report recorded 300
    assert "--bpe_vocab_size=300 would be ignored: it applies to --tokenizer=bpe" in capsys.readouterr().err
    assert main(["demo", "--quick", "--tokenizer=bpe", "--bpe_vocab_size=300"]) == 0
    assert seen[-1].bpe_vocab_size == 300


@pytest.mark.parametrize(
    "budget, match",
    [
        ("abc", "--budget expects one int or a comma-separated list, one per layer, of ints or none (that layer "
                "unpruned), e.g. 32 or 32,16,16,8 or none,16,16,8; got 'abc'"),
        ("4,", "got '4,'"),
        ("1", "--budget must be >= 2 in every layer"),
        ("8,0", "--budget must be >= 2 in every layer"),
    ],
)  # fmt: skip
def test_bad_budget_is_a_one_line_error(budget, match, tmp_path, capsys):
    for cmd in ("eval", "generate"):
        assert main([cmd, "--ckpt", str(tmp_path / "missing"), "--budget", budget]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_eval_context_len_and_budget_checked_against_the_model(ckpts, capsys):
    run = str(ckpts["text"][0])
    assert main(["eval", "--ckpt", run, "--context_len", "64"]) == 2
    assert "--context_len 64 exceeds the model's context_len=32; use --context_len <= 32, or pass --budget" in (
        capsys.readouterr().err
    )
    assert main(["eval", "--ckpt", run, "--budget", "8,8,8"]) == 2
    assert "--budget has 3 values but the model has 2 layers" in capsys.readouterr().err
    assert main(["eval", "--ckpt", run, "--context_len", "64", "--budget", "8", "--batches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_tokens_per_layer"] == [8, 8]
    # none in the list: that layer keeps the whole context (as budget=[8, None] in Python)
    assert main(["eval", "--ckpt", run, "--budget", "8,none", "--batches", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget"] == [8, None] and out["kv_tokens_per_layer"][0] == 8 and out["kv_tokens_per_layer"][1] > 8
    assert out["kv_slots_per_layer"] == [8, 32]  # what the buffers allocate: the budget, or the window
    # a threshold alone evicts, but static buffers keep a slot per token: the slots say so beside the peak held
    assert main(["eval", "--ckpt", run, "--threshold", "0", "--batches", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_slots_per_layer"] == [32, 32] and max(out["kv_tokens_per_layer"]) < 32
    assert main(["generate", "--ckpt", run, "--budget", "none,4", "--max_new_tokens", "3", "--prompt", "ab"]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", run, "--budget", "none,none", "--batches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget"] is None  # nothing pruned anywhere: no budget
    # H2O's recent window as each layer used it, a number (was the string "budget // 2")
    assert main(["eval", "--ckpt", run, "--budget", "8,none", "--policy", "h2o", "--batches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recent"] == [4, None]


def test_eval_varassign_checkpoint(ckpts, capsys):
    run, summary = ckpts["va"]
    # the same answers training evaluated on (batch_size, eval_batches as in training): the same loss
    assert main(["eval", "--ckpt", str(run), "--json", "--batch_size", "4", "--batches", "1"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["data"] == "varassign" and full["context_len"] == 4 * 4 + 3
    assert full["windows"] == 4 and full["targets"] == 4  # one answer per example
    assert full["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-4)
    assert full["val_accuracy"] == pytest.approx(summary["val_accuracy"])
    assert "bits_per_byte" not in full  # the loss of one answer digit is not a rate per byte of text
    # through the cache (answers only: -100 targets ignored); a budget of the whole example is exact
    assert main(["eval", "--ckpt", str(run), "--json", "--batch_size", "4", "--batches", "1", "--budget", "19"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["val_loss"] == pytest.approx(full["val_loss"], rel=1e-5)
    assert pruned["val_accuracy"] == full["val_accuracy"]  # answer accuracy through the cache too
    assert main(["eval", "--ckpt", str(run), "--json", "--batches", "1", "--budget", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_tokens_per_layer"] == [4, 4]
    assert main(["eval", "--ckpt", str(run), "--context_len", "32"]) == 2
    assert "--context_len does not apply to varassign: every example is 19 tokens" in capsys.readouterr().err


def test_generate_empty_prompt_is_a_one_line_error(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "missing"), "--prompt", ""]) == 2
    assert capsys.readouterr().err == "error: --prompt must not be empty: give at least one character to continue.\n"


def test_every_command_help_comes_from_its_dataclass(capsys):
    """train --help and eval --help are argparse's: usage, then an option per field with its type, help and
    default."""
    for cmd, lines in (
        ("train", ["--lr FLOAT", "peak learning rate", "(default: 0.003)", "--n_layer INT", "--context_len INT",
                   "(default: 128)", "--selection [BOOL]", "--no_progress"]),
        ("eval", ["--ckpt PATH", "(required)", "--batches INT", "(default: 4)", "--json [BOOL]"]),
        ("generate", ["--temperature FLOAT", "(default: 0.8)"]),
        ("demo", ["--quick [BOOL]", "--steps INT", "(default: 1000)"]),
    ):  # fmt: skip
        assert main([cmd, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: selective-attention {cmd} [-h]") and "\noptions:\n" in out
        words = " ".join(out.split())  # as wrapped for any terminal width
        for text in lines:
            assert text in words, (cmd, text)
    assert "--vocab_size" not in out  # the data sets it


def test_eval_on_other_data_than_the_checkpoints(tmp_path, capsys):
    """A varassign checkpoint trained with a curriculum evaluates on a text (the curriculum options are its training
    data's, dropped); a BPE checkpoint on varassign is refused with the reason."""
    run = tmp_path / "va"
    va = ["--data=varassign", "--va_assign=4", "--va_assign_start=2", "--va_ramp_steps=1"]
    cfg = parse_overrides([*va, *TINY, f"--out_dir={run}", "--max_steps=2", "--eval_interval=2", "--context_len=32"])
    train_main(cfg)
    assert main(["eval", "--ckpt", str(run), "--json", "--batches", "1", "--data", "pydoc"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"] == "pydoc" and out["val_loss"] > 0
    bpe = tmp_path / "bpe"
    train_main(parse_overrides(["--data=pydoc", "--tokenizer=bpe", "--bpe_vocab_size=300", *TINY,
                                f"--out_dir={bpe}", "--max_steps=1"]))  # fmt: skip
    assert main(["eval", "--ckpt", str(bpe), "--batches", "1", "--data", "varassign"]) == 2
    assert "this checkpoint reads 300-token BPE" in capsys.readouterr().err
    # a non-UTF-8 byte in the prompt (argv gives it as a lone surrogate): the BPE tokenizer raised a TypeError
    assert main(["generate", "--ckpt", str(bpe), "--prompt", "\udcff abc", "--max_new_tokens", "2"]) == 2
    assert "--prompt holds characters that are not valid UTF-8 text" in capsys.readouterr().err


def test_output_into_a_closed_pipe_or_a_narrow_encoding(ckpts):
    """`... | head` closing the pipe gave a BrokenPipeError traceback: now a quiet exit (141, as SIGPIPE); an
    output stdout's encoding cannot write names the encoding and the fix."""
    run = ckpts["text"][0]
    cmd = [sys.executable, "-m", "selective_attention", "generate", "--ckpt", str(run), "--prompt", "a",
           "--max_new_tokens", "8"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the text is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err
    env = {**__import__("os").environ, "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([*cmd[:-4], "--prompt", "\u00e9t\u00e9", "--max_new_tokens", "1"], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "stdout's encoding (ascii) cannot write" in done.stderr and "PYTHONIOENCODING=utf-8" in done.stderr


def test_a_resume_at_its_checkpoints_step_evaluates_that_model(tmp_path, capsys):
    """A run stopped after a checkpoint saved between evaluations (step 4; evaluated at 3), resumed with --max_steps=4:
    no step trains, and the run reported the step-3 val_loss as its final one (or none, with no evaluation yet). The
    step-4 model is evaluated now, as a run's end always is: eval gives the same loss on the same windows."""
    opts = ["--data=pydoc", *TINY, f"--out_dir={tmp_path / 'run'}", "--eval_batches=2"]
    train_main(parse_overrides([*opts, "--max_steps=8", "--stop_after=5", "--ckpt_interval=4", "--eval_interval=3"]))
    summary = train_main(parse_overrides([*opts, "--max_steps=4"]))
    assert summary["start_step"] == 4 and summary["history"][-1]["step"] == 4
    assert summary["tokens_per_s"] > 0  # the training steps' rate its history logged
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "--json", "--batch_size", "4", "--batches", "2"]) == 0
    assert summary["val_loss"] == pytest.approx(json.loads(capsys.readouterr().out)["val_loss"], abs=1e-5)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [3, 4]


def test_seeds_beyond_32_bits_are_refused_not_repeated(tmp_path, capsys):
    """torch keeps a seed's low 32 bits: --seed=4294967296 trained --seed=0's model to the bit, silently."""
    with pytest.raises(ValueError, match=r"--seed=4294967296: .*would repeat the run of seed 0"):
        parse_overrides(["--seed=4294967296"])
    assert parse_overrides(["--seed=4294967295"]).seed == 2**32 - 1
    assert parse_overrides(["--seed=-3"]).seed == -3  # negative seeds were always accepted: stored configs hold them
    assert main(["generate", "--ckpt", str(tmp_path), "--seed", str(2**32 + 7)]) == 2
    assert "would repeat the run of seed 7" in capsys.readouterr().err


def test_a_home_relative_path_after_an_equals_sign_is_expanded(tmp_path, capsys, monkeypatch):
    """--out_dir=~/runs/x: the shell expands no ~ after "=", and the run went to a folder named "~" in the current
    one (then `eval --ckpt ~/runs/x` found nothing)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    train_main(parse_overrides(["--data=pydoc", *TINY, "--out_dir=~/runs/x", "--max_steps=1"]))
    assert (tmp_path / "home" / "runs" / "x" / "ckpt.safetensors").exists() and not (tmp_path / "~").exists()
    assert main(["eval", "--ckpt=~/runs/x", "--json", "--batches", "1"]) == 0


def test_eval_and_resume_read_the_text_trained_on(tmp_path, capsys, monkeypatch):
    """A run trained on a relative --data file is evaluated on that file from any folder (another file of the same
    name there was read silently); an edited file, or another text on resume, is refused, naming --data."""
    from selective_attention.data import load_text

    text = load_text("pydoc")
    (tmp_path / "A").mkdir(), (tmp_path / "B").mkdir()
    (tmp_path / "A" / "corpus.txt").write_text(text[:60_000])
    (tmp_path / "B" / "corpus.txt").write_text(text[60_000:120_000])  # same name, another text
    monkeypatch.chdir(tmp_path / "A")
    opts = ["--data=corpus.txt", *TINY, "--out_dir=run", "--max_steps=2", "--eval_interval=2", "--eval_batches=2"]
    summary = train_main(parse_overrides(opts))
    monkeypatch.chdir(tmp_path / "B")
    assert main(["eval", "--ckpt", "../A/run", "--json", "--batch_size", "4", "--batches", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)  # A's text, not B's
    assert out["data"] == str((tmp_path / "A" / "corpus.txt").resolve()) and out["training_text"] is True
    assert main(["eval", "--ckpt", "../A/run", "--json", "--batches", "1", "--data", "corpus.txt"]) == 0  # knowingly
    out = json.loads(capsys.readouterr().out)  # B's text: evaluated, and said not to be the text trained on
    assert out["data"] == "corpus.txt" and out["training_text"] is False
    assert "not the text this checkpoint was trained on" in out["note_data"]
    assert main(["eval", "--ckpt", "../A/run", "--json", "--batches", "1", "--data", "../A/corpus.txt"]) == 0
    assert json.loads(capsys.readouterr().out)["training_text"] is True  # the training file, by another path
    with pytest.raises(CheckpointError, match=r"trained on .*A/corpus.txt .*another text"):  # resume on B's text
        train_main(parse_overrides([*opts[:-4], "--out_dir=../A/run", "--max_steps=4", "--eval_interval=2",
                                    "--eval_batches=2"]))  # fmt: skip
    (tmp_path / "A" / "corpus.txt").write_text(text[:50_000])  # the training file edited since
    assert main(["eval", "--ckpt", "../A/run", "--batches", "1"]) == 2
    assert "now reads another text" in capsys.readouterr().err
    (tmp_path / "A" / "corpus.txt").rename(tmp_path / "A" / "moved.txt")  # said: "'corpus.txt' is no text file"
    assert main(["eval", "--ckpt", "../A/run", "--batches", "1"]) == 2
    assert "trained on the file" in (err := capsys.readouterr().err) and "not there any more" in err
    # its new path, as the message says: reported as the training text (a moved file keeps its sha256)
    (tmp_path / "A" / "corpus.txt").write_text(text[:60_000])
    (tmp_path / "A" / "corpus.txt").rename(tmp_path / "A" / "moved.txt")
    assert main(["eval", "--ckpt", "../A/run", "--json", "--batches", "1", "--data", "../A/moved.txt"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["training_text"] is True and "note_data" not in out


def test_eval_and_generate_refuse_a_model_whose_forward_overflows(ckpts, capsys, monkeypatch):
    """A diverged run's last checkpoint can hold finite weights whose forward overflows: eval printed "val_loss": NaN
    (no JSON), or died in math.exp (a loss above ~709 nats); greedy generate took NaN's index for a token, and
    sampling failed inside torch.multinomial."""
    import selective_attention.train as train_mod
    from selective_attention.decoding import Decoder

    run, _ = ckpts["text"]
    for loss in (float("nan"), float("inf")):
        monkeypatch.setattr(train_mod, "evaluate", lambda *a, loss=loss, **k: {"val_loss": loss})
        assert main(["eval", "--ckpt", str(run), "--json"]) == 2
        assert f"validation loss of {loss}" in capsys.readouterr().err
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: {"val_loss": 800.0})
    assert main(["eval", "--ckpt", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["val_loss"] == 800.0 and out["perplexity"] is None and "exceeds" in out["note_perplexity"]
    prefill = Decoder.prefill
    monkeypatch.setattr(Decoder, "prefill", lambda self, *a, **k: prefill(self, *a, **k) * float("nan"))
    for temperature in ("0", "1"):
        assert main(["generate", "--ckpt", str(run), "--prompt", "ab", "--temperature", temperature]) == 2
        assert "logits for generated token 0 are not finite" in capsys.readouterr().err


def test_generate_a_prompt_longer_than_the_context(ckpts, capsys):
    run, _ = ckpts["text"]  # context_len 32, byte level
    prompt = "def f(x):\n    return x + 1  # forty chars"
    assert main(["generate", "--ckpt", str(run), "--prompt", prompt, "--max_new_tokens", "5", "--budget", "16"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    assert main(["generate", "--ckpt", str(run), "--prompt", prompt, "--max_new_tokens", "5"]) == 2
    assert "--budget on the command line" in capsys.readouterr().err
    # a threshold alone is refused before generating (it failed partway, losing what it had generated)
    argv = ["generate", "--ckpt", str(run), "--prompt", "ab", "--max_new_tokens", "60", "--threshold", "1000"]
    assert main(argv) == 2
    err = capsys.readouterr()
    assert "a --threshold alone does not bound" in err.err and err.out == ""


def test_a_built_in_corpus_is_not_a_file_of_its_name(tmp_path, monkeypatch):
    """--data=pydoc reads Python's help topics even where a file named pydoc exists: the checkpoint records no path
    for it, so eval does not read that file either."""
    from selective_attention.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pydoc").write_text("not the corpus " * 1000)
    train_main(parse_overrides(["--data=pydoc", *TINY, "--out_dir=run", "--max_steps=1"]))
    record = load_checkpoint(tmp_path / "run")[1]["extra"]["data"]
    assert record["source"] == "pydoc" and record["path"] is None


def test_train_options_that_would_be_ignored_are_refused(tmp_path, capsys):
    for argv, match in [
        (["--bpe_vocab_size=1000"], "--bpe_vocab_size=1000 would be ignored: it applies to --tokenizer=bpe"),
        (["--va_assign=64"], "--va_assign=64 would be ignored: it applies to --data=varassign"),
        (["--va_vars=3"], "--va_vars=3 would be ignored"),
        (["--va_vars=30"], "--va_vars=30 would be ignored"),  # on text, not out of range: a stored one loads
        (["--data=varassign", "--va_vars=30"], "--va_vars=30 is invalid: it must be an int in [1, 26]"),
        (["--selection=true", "--memory_tau=5"], "--memory_tau=5.0 would be ignored: it is the memory loss's"),
        (["--data=varassign", "--val_fraction=0.5"], "--val_fraction=0.5 would be ignored"),
    ]:
        assert main(["train", *argv, f"--out_dir={tmp_path}"]) == 2
        assert match in capsys.readouterr().err


def test_train_option_errors(tmp_path, capsys):
    assert main(["train", "--n_layer", "two"]) == 2  # a type error: argparse's usage and message
    err = capsys.readouterr().err
    assert err.startswith("usage: selective-attention train") and "argument --n_layer: expects int, got 'two'" in err
    assert main(["train", "--n_layer", "0", f"--out_dir={tmp_path}"]) == 2  # a range error: one line
    assert capsys.readouterr().err == "error: --n_layer=0 is invalid: it must be an int >= 1.\n"
    assert main(["train", "--d_model=30", f"--out_dir={tmp_path}"]) == 2  # GPTConfig's rule across fields
    assert "error: d_model (30) must be divisible by n_head (4)" in capsys.readouterr().err
    assert main(["train", "--lr=0.1", "lr"]) == 2
    assert "expected --key=value or --key value, got 'lr'" in capsys.readouterr().err


def _report(reached=True, found=True, holds=True, tolerance=0.0, curve=((4, 1.5), (8, 1.5), (16, 1.5))):
    """A demo report as run_demo writes it, for table()'s wording in every outcome."""
    return {
        "config": {"tokenizer": "byte"},
        "standard": {"val_loss": 1.6, "tokens_per_s": 1000.0},
        "selective": {"val_loss": 1.55 if reached else 1.7, "tokens_per_s": 800.0},
        "budget_search": {
            "budgets": [8, 8] if found else [32, 32],
            "context": 32,
            "full_loss": 1.55,
            "pruned_loss": 1.58,
            "standard_full_loss": 1.6,
            "equal_to": "standard" if reached else "selective (own full cache)",
            "reached_standard": reached,
            "found": found,
            "target_loss": 1.6,
            "tolerance": tolerance,
            "memory_ratio": 4.0 if found else 1.0,
        },  # fmt: skip
        "heldout": {
            "standard_full_loss": 1.6,
            "selective_full_loss": 1.55,
            "pruned_loss": 1.59,
            "holds": holds,
            "reference": "standard" if reached else "selective (own full cache)",
            "curves": {"selective + selective": [{"budget": b, "loss": v} for b, v in curve]},
        },  # fmt: skip
        "throughput_ratio": 0.8,
    }


def test_demo_table_says_what_each_outcome_is():
    from selective_attention.demo import table

    text = table(_report())
    assert "4.0x less at standard's loss on the search windows; held out: holds |" in text
    assert "the 4.0x (standard's loss) holds there" in text
    assert "held out: does NOT hold |" in table(_report(holds=False))
    # the selective model's full cache above the standard's: no saving at equal loss, whatever its own search found
    text = table(_report(reached=False))
    assert "none: even its full cache is above the standard's loss" in text and "less at" not in text
    assert "the 4.0x (the selective model's own full-cache loss, the standard's being out of reach) holds there" in text
    # nothing below the context met the target: not "1.0x less"
    text = table(_report(found=False))
    assert "32 (no budget below the context stays at the standard's loss)" in text and "nothing to check" in text
    # a tolerance is printed beside every verdict it produced
    assert "(standard's loss + 0.05 nats) does NOT hold" in table(_report(tolerance=0.05, holds=False))
    # the first budget tried already at the target: the curve may go lower, said so
    assert "selective + selective <= 4 (>= 8x, the smallest tried)" in table(_report())
    assert "selective + selective 16 (2x)" in table(_report(curve=((4, 1.5), (8, 1.7), (16, 1.5))))
    # the searched budgets with the selective model's own sliding window: what F-pruning adds at those budgets
    assert "evicting the oldest" not in text  # a report from before it was measured
    report = _report()
    report["heldout"]["window_same_budgets"] = {"search": 1.62, "heldout": 1.64}
    assert (
        "the same budgets evicting the oldest token instead of the largest F (selective + window): search 1.6200 "
        "(F: 1.5800), held out 1.6400 (F: 1.5900)"
    ) in table(report)


def test_demo_table_never_rounds_a_ratio_up():
    """A printed reduction is a floor of the measured one: 24.98x must not read as 25.0x, nor 32/3 = 10.67x as 11x
    (nor a lower bound '>= 11x'), where a target of 25x or 11x would then look met."""
    from selective_attention.demo import table

    report = _report(curve=((3, 1.5), (4, 1.5), (8, 1.5)))
    report["budget_search"]["memory_ratio"] = 24.98
    text = table(report)
    assert "24.9x less at standard's loss" in text and "the 24.9x (standard's loss)" in text and "25.0x" not in text
    assert "selective + selective <= 3 (>= 10x, the smallest tried)" in text
    report["heldout"]["curves"]["selective + selective"] = [{"budget": b, "loss": v} for b, v in ((3, 1.7), (6, 1.5))]
    assert "selective + selective 6 (5x)" in table(report)  # 32 / 6 = 5.33
    assert "(read off these windows: descriptive)" in text


def test_demo_refuses_before_training_what_it_cannot_evaluate(tmp_path, capsys):
    from selective_attention.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match="varassign has no text windows"):
        run_demo(DemoConfig.quick(out=str(tmp_path / "d"), data="varassign"))
    with pytest.raises(ValueError, match=r"--search_batch 5000 needs 10000 validation windows.*--search_batch <="):
        run_demo(DemoConfig.quick(out=str(tmp_path / "d"), data="pydoc", search_batch=5000))
    assert not (tmp_path / "d").exists()  # refused before anything was written
    (tmp_path / "f").write_text("a file")  # --out naming a file: the CLI's one-line error, not a traceback
    hf = importlib.util.find_spec("transformers") is not None  # (the floor CI job has none: hf-demo says so first)
    for cmd in (["demo", "--data", "pydoc"], *([["hf-demo"]] if hf else [])):
        assert main([*cmd, "--quick", "--out", str(tmp_path / "f")]) == 2
        assert "--out=" in capsys.readouterr().err.splitlines()[-1]  # "... is not a writable folder ..."
    assert (tmp_path / "f").read_text() == "a file"


def test_a_threshold_on_a_model_without_selective_layers_is_refused(ckpts, capsys):
    # F = 0 everywhere: the threshold evicted nothing, and the report said "policy: selective" all the same
    std = str(ckpts["standard"][0])
    for cmd in (["eval", "--batches", "1"], ["generate", "--max_new_tokens", "4"]):
        assert main([*cmd, "--ckpt", std, "--threshold", "1"]) == 2
        assert "no selecting layer (F = 0 everywhere)" in capsys.readouterr().err
    assert main(["eval", "--ckpt", std, "--batches", "1", "--budget", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "selective" and "F = 0, so the oldest token goes" in out["note"]


def test_generate_defaults_fit_the_context_and_budgets_are_bounded(ckpts, capsys):
    run, missing = str(ckpts["text"][0]), "/nonexistent"  # context_len 32, byte level
    # default --max_new_tokens: what fits the context (it was 200, refused on any model of context < 216)
    assert main(["generate", "--ckpt", run, "--prompt", "ab"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", run, "--prompt", "x" * 32]) == 0  # one token: sampled from a full context
    assert capsys.readouterr().out.startswith("x" * 32)
    assert main(["generate", "--ckpt", run, "--prompt", "x" * 33]) == 2
    assert "the prompt (33 tokens) is longer than the model's context_len=32" in capsys.readouterr().err
    # a budget above the context is refused before a slot is allocated (10^20 overflowed, 10^8 took gigabytes)
    for cmd in (["generate", "--prompt", "ab"], ["eval", "--batches", "1"]):
        for b in ("33", "1" + "0" * 20, "8,40"):
            assert main([cmd[0], "--ckpt", run, *cmd[1:], "--budget", b]) == 2
            err = capsys.readouterr().err
            assert "exceeds the model's context_len=32" in err and "Traceback" not in err
    # --threshold 0 prunes (every voted-on token goes): its KV line is printed like any other threshold's
    assert main(["generate", "--ckpt", run, "--prompt", "ab", "--max_new_tokens", "3", "--threshold", "0"]) == 0
    assert "KV bytes (all slots)" in capsys.readouterr().err
    assert main(["generate", "--ckpt", missing, "--seed", "1" * 25]) == 2
    assert "argument --seed: 1111111111111111111111111 is beyond 2**32 - 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--seed=-\d+: .*pass an int in \[-\(2\*\*32 - 1\), 2\*\*32 - 1\]"):
        parse_overrides(["--seed=-" + "9" * 20])
    parse_overrides(["--seed=-3"])  # negative seeds were always accepted: stored configs hold them
    # varassign on a text model whose context is shorter than an example: the fix is the training's
    assert main(["eval", "--ckpt", run, "--data", "varassign"]) == 2
    assert "longer than the model's context_len=32: a model trained with --context_len >= " in (capsys.readouterr().err)


def test_generate_takes_the_eviction_policy_as_eval_does(ckpts, capsys):
    """--policy and --recent reach the decoder (the text equals the library's with the same policy, greedy), and
    a non-default policy without a budget is refused before anything is loaded."""
    from selective_attention.checkpoint import model_from_checkpoint
    from selective_attention.decoding import Decoder

    run, _ = ckpts["text"]
    argv = ["generate", "--ckpt", str(run), "--prompt", "def f", "--max_new_tokens", "30", "--temperature", "0"]
    model, meta = model_from_checkpoint(str(run))
    idx = meta["tokenizer"].encode_prompt("def f")[None]
    for policy, extra in (("window", []), ("h2o", ["--recent", "3"])):
        assert main([*argv, "--budget", "6", "--policy", policy, *extra]) == 0
        text = capsys.readouterr().out
        dec = Decoder(model, budget=6, policy=policy, recent=3 if extra else None)
        want = meta["tokenizer"].decode(dec.generate(idx, 30, temperature=0)[0])
        assert text.startswith(want), policy
    assert main([*argv, "--policy", "window"]) == 2
    assert "budget" in capsys.readouterr().err


def test_an_empty_folder_or_checkpoint_is_refused_not_taken_as_the_current_folder(tmp_path, monkeypatch, capsys):
    """``--out_dir=`` trained into the current folder (its checkpoint and log beside the user's files), ``demo --out=``
    wrote its report and both runs there, and ``eval --ckpt=`` looked for ./ckpt.safetensors."""
    monkeypatch.chdir(tmp_path)
    for argv, option in (
        (["train", "--out_dir=", "--max_steps=1"], "--out_dir=''"),
        (["train", "--data=", "--max_steps=1"], "--data=''"),
        (["demo", "--quick", "--out="], "argument --out: must be a path, not empty"),
        (["eval", "--ckpt="], "argument --ckpt: must be a path, not empty"),
        (["generate", "--ckpt= "], "argument --ckpt: must be a path, not empty"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert option in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written
