import subprocess
import sys

from selective_attention.cli import main


def test_demo_runs_and_shows_masking(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "output shape (32, 64, 512)" in out
    assert "<- keys" in out
    # the causal grid: the first query sees only itself
    first_row = [line for line in out.splitlines() if line.startswith("the |")][0]
    assert first_row.split("|")[1].split() == ["1.00", "x", "x", "x", "x", "x"]


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "selective_attention", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout
