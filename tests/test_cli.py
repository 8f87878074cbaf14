import json
import subprocess
import sys

from selective_attention.cli import main


def test_demo_runs_and_shows_masking(capsys):
    assert main(["seed-example"]) == 0
    out = capsys.readouterr().out
    assert "output shape (32, 64, 512)" in out
    assert "<- keys" in out
    # the causal grid: the first query sees only itself
    first_row = [line for line in out.splitlines() if line.startswith("the |")][0]
    assert first_row.split("|")[1].split() == ["1.00", "x", "x", "x", "x", "x"]


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
    for png in ("loss_curves.png", "memory_vs_loss.png", "penalty_F.png"):
        assert (out / png).stat().st_size > 1000


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
    assert main(["eval", "--ckpt", str(run), "--json", "--batches", "1", "--budget", "8"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["kv_tokens_per_layer"] == [8, 8]
    assert main(["generate", "--ckpt", str(run), "--prompt", "def ", "--max_new_tokens", "20", "--budget", "4"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "--ckpt", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--bogus=1"]) == 2
    assert "unknown option --bogus" in capsys.readouterr().err


def test_bench_command(capsys):
    assert main(["bench", "--lengths", "64", "--repeats", "1"]) == 0
    assert "| 64 |" in capsys.readouterr().out
