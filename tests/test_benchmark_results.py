"""Where the benchmarks keep their tables: one folder per CPU model, and the README blocks that name them.
Checks the bookkeeping (no run on one CPU may overwrite another's table), not any timing."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)  # as the benchmark scripts import it (`from common import ...`)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def common(tmp_path, monkeypatch):
    mod = _load("common", monkeypatch)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    return mod


@pytest.mark.parametrize(
    "model, folder",
    [
        ("Intel(R) Xeon(R) Processor", "intel-xeon"),
        ("AMD EPYC", "amd-epyc"),
        ("AMD EPYC 7763 64-Core Processor", "amd-epyc-7763-64-core"),
        ("Intel(R) Core(TM) i7-10700K CPU @ 3.80GHz", "intel-core-i7-10700k"),
        ("Apple M2", "apple-m2"),
        ("", "unknown-cpu"),
    ],
)
def test_each_cpu_model_gets_its_own_folder(common, monkeypatch, model, folder):
    monkeypatch.setattr(common, "cpu_model", lambda: model)
    assert common.cpu_results() == common.RESULTS / folder
    assert common.cpu_results().is_dir()


def test_runs_on_two_cpus_keep_both_tables(common, monkeypatch):
    for model in ("Intel(R) Xeon(R) Processor", "AMD EPYC"):
        monkeypatch.setattr(common, "cpu_model", lambda m=model: m)
        common.write("bench", [{"x": model}], ["x"], "title")
    for folder, model in (("intel-xeon", "Intel(R) Xeon(R) Processor"), ("amd-epyc", "AMD EPYC")):
        md = (common.RESULTS / folder / "bench.md").read_text()
        assert f"| {model} |" in md and model in md.splitlines()[0]
        assert json.loads((common.RESULTS / folder / "bench.json").read_text())["rows"] == [{"x": model}]
    assert not (common.RESULTS / "bench.md").exists()


def test_two_chips_of_one_name_keep_both_tables(common, monkeypatch):
    """Virtual machines give different chips one model name: the first chip's family/model/stepping is recorded in
    the folder, another chip of that name writes beside it, and the first one keeps writing to its own. A folder from
    before the record (no cpu.json) is taken by the first chip that writes; an unknown signature ("?") never splits."""
    monkeypatch.setattr(common, "cpu_model", lambda: "Intel(R) Xeon(R) Processor")
    legacy = common.RESULTS / "intel-xeon"
    legacy.mkdir(parents=True)
    for signature in ("6/207/2", "6/167/1", "6/207/2", "?/?/?"):
        monkeypatch.setattr(common, "cpu_signature", lambda s=signature: s)
        common.write("bench", [{"x": 1, "chip": signature}], ["x", "chip"], "title")
        assert signature in common.machine()
    assert json.loads((legacy / "bench.json").read_text())["rows"][0]["chip"] == "?/?/?"  # the last of its three runs
    assert json.loads((legacy / "cpu.json").read_text())["signature"] == "6/207/2"
    other = common.RESULTS / "intel-xeon-6-167-1"
    assert json.loads((other / "bench.json").read_text())["rows"][0]["chip"] == "6/167/1"
    assert json.loads((other / "cpu.json").read_text())["signature"] == "6/167/1"
    assert "6/167/1" in (other / "bench.md").read_text().splitlines()[0]
    assert sorted(p.name for p in common.RESULTS.iterdir()) == ["intel-xeon", "intel-xeon-6-167-1"]


def test_the_committed_intel_xeon_folders_record_their_chip():
    """Two chips have reported the name "Intel(R) Xeon(R) Processor": each committed folder of that name records
    which one its tables are from (a later run of the other chip must not land in it)."""
    folders = sorted((ROOT / "benchmarks" / "results").glob("intel-xeon*"))
    assert folders
    for folder in folders:
        signature = json.loads((folder / "cpu.json").read_text())["signature"]
        assert re.fullmatch(r"\d+/\d+/\d+", signature)
        assert folder.name == "intel-xeon" or folder.name.endswith(signature.replace("/", "-"))


def test_a_run_of_fewer_rows_does_not_cut_the_table_down(common, monkeypatch, capsys):
    monkeypatch.setattr(common, "cpu_model", lambda: "AMD EPYC")
    folder = common.RESULTS / "amd-epyc"
    full = [{"context": c, "mode": m, "ratio": 1.0} for c in (256, 1024) for m in ("eager", "compiled")]
    common.write("tt", full, ["context", "mode", "ratio"], "t", key=("context", "mode"))
    # a quick check of one context and one mode: beside the table, which keeps its four rows
    common.write("tt", [{"context": 1024, "mode": "eager", "ratio": 0.5}], ["context", "mode", "ratio"], "t",
                 key=("context", "mode"))  # fmt: skip
    assert json.loads((folder / "tt.json").read_text())["rows"] == full
    assert json.loads((folder / "tt.partial.json").read_text())["rows"][0]["ratio"] == 0.5
    assert "| 1024 | eager | 0.5 |" in (folder / "tt.partial.md").read_text()
    assert "256 / compiled" in capsys.readouterr().err
    assert common.side_path("tt", "_raw.json") == folder / "tt.partial_raw.json"  # its side files beside it
    # every row again (new values): the table is replaced
    common.write("tt", [dict(r, ratio=2.0) for r in full], ["context", "mode", "ratio"], "t", key=("context", "mode"))
    assert common.side_path("tt", ".png") == folder / "tt.png"
    assert [r["ratio"] for r in json.loads((folder / "tt.json").read_text())["rows"]] == [2.0] * 4
    # the default key is the first column: rows told apart by context alone collide, (context, mode) does not
    common.write("tt", [dict(full[0], ratio=3.0), dict(full[2], ratio=3.0)], ["context", "mode", "ratio"], "t")
    assert [r["ratio"] for r in json.loads((folder / "tt.json").read_text())["rows"]] == [3.0, 3.0]


def test_interleaved_alternates_all_but_the_baseline(common):
    order = []
    fns = {n: (lambda n=n: order.append(n)) for n in ("base", "a", "b")}
    times = common.interleaved(fns, repeats=3, warmup=0, alternate=True)
    assert order == ["base", "a", "b", "base", "b", "a", "base", "a", "b"]
    assert all(len(ts) == 3 for ts in times.values())
    order.clear()
    common.interleaved(fns, repeats=2, warmup=0)
    assert order == ["base", "a", "b"] * 2


def test_readme_blocks_name_a_cpu_folder(tmp_path, monkeypatch):
    tables = _load("readme_tables", monkeypatch)
    results = tmp_path / "results"
    (results / "amd-epyc").mkdir(parents=True)
    (results / "amd-epyc" / "bench.md").write_text("| new |\n")
    monkeypatch.setattr(tables, "SOURCES", [results])
    doc = tmp_path / "README.md"
    blocks = [
        "<!-- table:amd-epyc/bench -->\nold\n<!-- /table -->",
        "<!-- table:intel-xeon/bench -->\nkept\n<!-- /table -->",
    ]
    doc.write_text("a\n" + "\n".join(blocks) + "\n")
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    tables.refresh(doc)
    text = doc.read_text()
    assert "<!-- table:amd-epyc/bench -->\n| new |\n<!-- /table -->" in text
    assert "<!-- table:intel-xeon/bench -->\nkept\n<!-- /table -->" in text  # no file: left as it was


def test_committed_readme_blocks_have_their_tables():
    """Every table block in the READMEs names a results file that is in the repository."""
    for doc in ("README.md", "benchmarks/README.md", "experiments/README.md"):
        for name in re.findall(r"<!-- table:([\w/-]+) -->", (ROOT / doc).read_text()):
            found = [d / f"{name}.md" for d in (ROOT / "benchmarks" / "results", ROOT / "results")]
            assert any(f.exists() for f in found), f"{doc}: table {name!r} has no results file"


def test_ab_commits_loads_another_commit_apart_and_compares(tmp_path, monkeypatch):
    """The A/B script imports a commit's package under another name (nothing shared with this checkout's) and
    times it against this checkout's on the same inputs."""
    if not (ROOT / ".git").exists():
        pytest.fail("benchmarks/ab_commits.py needs a git checkout (CI runs on a clone)")
    _load("common", monkeypatch)
    ab = _load("ab_commits", monkeypatch)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_commit puts its folder first
    other = ab.load_commit("HEAD", tmp_path)
    assert other.__module__ == "sa_HEAD.functional" and (tmp_path / "sa_HEAD").is_dir()
    for f in (tmp_path / "sa_HEAD").rglob("*.py"):  # hf_demo.py imports the package by its name
        text = f.read_text()
        assert not re.search(r"^\s*(from|import) selective_attention\b", text, re.M), f
        assert '"selective_attention::' not in text, f  # custom ops' names: the copy's own namespace
    assert sys.modules["sa_HEAD.functional"] is not sys.modules["selective_attention.functional"]
    row = ab.compare(other, 1, 2, 8, 16, rounds=1)
    assert row["shape"] == "B1 H2 D8 L16" and all(row[k] > 0 for k in ("this / sdpa", "other / sdpa", "this / other"))
    lm = ab.compare_lm("HEAD", 16, rounds=1, steps=1)  # the LM's training step, both versions beside the standard LM
    keys = ("this throughput / standard", "other throughput / standard", "this / other time")
    assert lm["LM context"] == 16 and all(lm[k] > 0 for k in keys)
    # the checkout's custom ops still run the checkout's code (a copy registered under the same names replaced them)
    import selective_attention.ops.chunked as chunked
    from selective_attention.functional import selective_attention

    def marked(*args):
        raise LookupError("the checkout's chunked forward ran")

    monkeypatch.setattr(chunked, "_forward", marked)
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(LookupError, match="checkout's"):
        selective_attention(q, q, q, selection=True, backend="chunked")
    other(q, q, q, selection=True, backend="chunked")  # the copy's op runs its own code


def test_demo_fingerprint_says_when_the_code_moved_the_demo(tmp_path, monkeypatch, capsys):
    """benchmarks/demo_fingerprint.py: the hashes are deterministic, tell the selective model from the standard one,
    and a record that differs for this machine fails (exit 1) naming what to rerun; an equal one passes; another
    machine's record is not compared. (The training is cut to 1 step here: the bookkeeping, not the demo.)"""
    mod = _load("demo_fingerprint", monkeypatch)
    monkeypatch.setattr(mod, "STEPS", 1)
    monkeypatch.setattr(mod, "RECORDS", tmp_path / "fp.json")
    monkeypatch.setattr(sys, "argv", ["demo_fingerprint.py", "--record", "--demo-run", "abc, today"])
    assert mod.main() == 0
    rec = json.loads((tmp_path / "fp.json").read_text())
    ((key, entry),) = rec.items()
    assert key == mod.cpu_key() and entry["demo_run"] == "abc, today"
    assert entry["selective"] != entry["standard"]
    monkeypatch.setattr(sys, "argv", ["demo_fingerprint.py"])
    assert mod.main() == 0 and "hold here" in capsys.readouterr().out  # deterministic: equal to the record
    entry["selective"] = "0" * 16
    (tmp_path / "fp.json").write_text(json.dumps({key: entry, "another CPU | torch 0 | 1 threads": entry}))
    assert mod.main() == 1
    out = capsys.readouterr().out
    assert "selective differs" in out and "standard" not in out.split("selective differs")[1][:5]
    assert "Rerun `selective-attention demo` from a fresh clone" in out
    (tmp_path / "fp.json").write_text(json.dumps({"another CPU | torch 0 | 1 threads": entry}))
    assert mod.main() == 0 and "no record for this machine" in capsys.readouterr().out


def test_readme_tables_help_rewrites_nothing(tmp_path, monkeypatch, capsys):
    tables = _load("readme_tables", monkeypatch)
    doc = tmp_path / "README.md"
    doc.write_text("<!-- table:missing -->\nold\n<!-- /table -->\n")
    monkeypatch.setattr(tables, "DOCS", [doc])
    touched = []
    monkeypatch.setattr(tables, "refresh", touched.append)
    with pytest.raises(SystemExit) as exc:
        tables.main(["--help"])
    assert exc.value.code == 0 and "readme_tables.py" in capsys.readouterr().out and touched == []
    with pytest.raises(SystemExit) as exc:
        tables.main(["--oops"])
    assert exc.value.code == 2 and touched == []
    tables.main([])
    assert touched == [doc]
