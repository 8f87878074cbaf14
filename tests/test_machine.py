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


def test_provenance_names_the_machine(monkeypatch):
    monkeypatch.setenv("SELECTIVE_ATTENTION_NUMBA", "0")  # the eager CPU passes: no Numba version to name
    assert machine.provenance()["numba"] is None
    monkeypatch.delenv("SELECTIVE_ATTENTION_NUMBA")
    p = machine.provenance()
    assert p["cpu"] == machine.cpu_model() and p["cpu"]
    assert set(p) == {"cpu", "cpu_signature", "cores", "torch", "threads", "numba", "commit"}
    assert p["cpu_signature"] == machine.cpu_signature()
    try:  # which CPU passes trained a model (they round apart): Numba's version where it loads
        import numba

        assert p["numba"] == numba.__version__
    except ImportError:
        assert p["numba"] is None
    assert p["cores"] == machine.cores() >= 1


def test_cores_are_those_the_process_may_use(monkeypatch):
    """Under ``taskset -c 1`` the count was os.cpu_count(), every core of the machine."""
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {1}, raising=False)
    assert machine.cores() == 1


def test_a_git_status_that_fails_is_not_a_clean_tree(tmp_path, monkeypatch):
    real = subprocess.run

    def run(cmd, *a, **k):
        if "status" in cmd:
            return subprocess.CompletedProcess(cmd, 128, "", "fatal: index file corrupt")
        return real(cmd, *a, **k)

    _git(tmp_path, "init", "-q")
    (tmp_path / "f.txt").write_text("a")
    _git(tmp_path, "add", "f.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    monkeypatch.setattr(machine.subprocess, "run", run)
    assert machine.commit(tmp_path).endswith("+status-unknown")


def test_cpu_model_and_signature_read_cpuinfo(tmp_path, monkeypatch):
    """The model name and family/model/stepping come from /proc/cpuinfo's first processor; '?' for a field it lacks,
    and platform's name where there is no cpuinfo."""
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\ncpu family\t: 6\nmodel\t\t: 207\nmodel name\t: Some CPU @ 2.0GHz\nstepping\t: 2\n\n"
        "processor\t: 1\ncpu family\t: 7\nmodel\t\t: 1\nmodel name\t: Other\nstepping\t: 9\n"
    )
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(info if f == "/proc/cpuinfo" else f, *a, **k))
    assert machine.cpu_model() == "Some CPU @ 2.0GHz"
    assert machine.cpu_signature() == "6/207/2"
    info.write_text("processor\t: 0\ncpu family\t: 25\nmodel name\t: X\n")
    assert machine.cpu_signature() == "25/?/?"
    info.unlink()
    assert machine.cpu_signature() == "?/?/?" and machine.cpu_model()  # no cpuinfo: platform's name
