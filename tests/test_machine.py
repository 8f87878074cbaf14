import subprocess

from selective_attention import machine


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_commit_names_the_checkout_and_says_when_it_has_changes(tmp_path):
    assert machine.commit(tmp_path) is None  # not a git checkout (an installed wheel's folder)
    _git(tmp_path, "init", "-q")
    (tmp_path / "f.txt").write_text("a")
    _git(tmp_path, "add", "f.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert machine.commit(tmp_path) == head.strip()
    (tmp_path / "new.txt").write_text("untracked files are not changes to the code measured")
    assert machine.commit(tmp_path) == head.strip()
    (tmp_path / "f.txt").write_text("b")
    assert machine.commit(tmp_path) == head.strip() + "+changes"


def test_provenance_names_the_machine():
    p = machine.provenance()
    assert p["cpu"] == machine.cpu_model() and p["cpu"]
    assert set(p) == {"cpu", "cores", "torch", "threads", "commit"}
