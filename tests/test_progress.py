"""The progress helper: tqdm in a terminal, a few plain lines in a file or a pipe."""

import io

import pytest

from selective_attention.progress import LineProgress, progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_file_gets_a_few_plain_lines_with_the_postfix():
    out = io.StringIO()
    bar = progress(1000, "run", file=out)
    assert isinstance(bar, LineProgress)
    for i in range(1000):
        bar.update(1)
        bar.set_postfix(loss=f"{1000 - i}")
    bar.close()
    bar.close()  # twice is harmless
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 5 <= len(lines) <= 11
    assert lines[0].startswith("run: 100/1000 (10%)") and lines[0].endswith("loss=901")
    assert lines[-1].startswith("run: 1000/1000 (100%)") and lines[-1].endswith("loss=1")


def test_a_resumed_bar_starts_at_initial_and_close_reports_a_partial_run():
    out = io.StringIO()
    bar = progress(100, "r", initial=40, file=out)
    for _ in range(15):
        bar.update()  # no set_postfix: lines still come out
    bar.close()
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["50/100", "55/100"]


def test_disabled_prints_nothing_and_a_terminal_gets_tqdm():
    out = io.StringIO()
    bar = progress(10, "x", enabled=False, file=out)
    bar.update(5)
    bar.set_postfix(a=1)
    bar.close()
    assert out.getvalue() == ""
    tty = _Tty()
    bar = progress(10, "x", file=tty)
    tqdm = pytest.importorskip("tqdm").tqdm
    assert isinstance(bar, tqdm)
    bar.close()
