"""A progress bar that behaves in a terminal and in a log file.

``progress(total, desc)`` returns a tqdm bar when the output is a terminal. Written to a file or a
pipe, tqdm's ``\\r`` redraws become thousands of lines (a run's log grows to megabytes), so there it
returns a plain printer instead: one line at each tenth of the way, at most 11 lines per bar.

    bar = progress(n_steps, "train", enabled=show)
    for _ in range(n_steps):
        ...
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()

Both kinds (and the disabled one) have just these three methods: ``update(n=1)``,
``set_postfix(**values)``, ``close()``.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

__all__ = ["progress", "Progress"]


class Progress(Protocol):
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **values: object) -> None: ...
    def close(self) -> None: ...


def progress(total: int, desc: str = "", *, enabled: bool = True, initial: int = 0, file: TextIO | None = None):
    """A progress bar over ``total`` steps, starting at ``initial`` (a resumed run), on ``file`` (stderr).

    A tqdm bar when ``file`` is a terminal (and tqdm is installed); otherwise a ``LineProgress`` that
    prints a plain line at each 10% of ``total``; nothing at all when ``enabled`` is false."""
    if not enabled:
        return _NoProgress()
    file = sys.stderr if file is None else file
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, initial=initial, desc=desc, file=file, dynamic_ncols=True)
    return LineProgress(total, desc, initial=initial, file=file)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: object) -> None:
        pass

    def close(self) -> None:
        pass


class LineProgress:
    """Prints ``desc: 300/1000 (30%) 12.5 it/s, eta 0:00:56 | loss=1.234`` when a new tenth of
    ``total`` is reached, and once more at ``close()`` unless the last line showed the final count."""

    def __init__(self, total: int, desc: str = "", *, initial: int = 0, file: TextIO | None = None) -> None:
        self.total, self.desc, self.n, self.initial = total, desc, initial, initial
        self.file = sys.stderr if file is None else file
        self.postfix: dict[str, object] = {}
        self._t0 = time.perf_counter()
        self._tenth = self._tenth_of(initial)  # the last tenth reported: a resumed run does not repeat it
        self._pending = False  # a tenth was reached; its line waits for the step's set_postfix
        self._printed_n: int | None = None

    def _tenth_of(self, n: int) -> int:
        return 10 * n // self.total if self.total > 0 else 0

    def update(self, n: int = 1) -> None:
        if self._pending:  # no set_postfix came after the update that reached the tenth
            self._write()
        self.n += n
        tenth = self._tenth_of(self.n)
        if tenth > self._tenth:
            self._tenth, self._pending = tenth, True

    def set_postfix(self, **values: object) -> None:
        self.postfix = values
        if self._pending:  # callers update() then set_postfix(): the line shows this step's values
            self._write()

    def close(self) -> None:
        if self._pending or (self._printed_n != self.n and self.n != self.initial):
            self._write()

    def _write(self) -> None:
        self._pending = False
        self._printed_n = self.n
        elapsed = time.perf_counter() - self._t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        line = f"{self.desc}: " if self.desc else ""
        line += f"{self.n}/{self.total}"
        if self.total > 0:
            line += f" ({100 * self.n // self.total}%)"
        if rate > 0:
            line += f" {rate:.3g} it/s, eta {_hms(max(0, self.total - self.n) / rate)}"
        if self.postfix:
            line += " | " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        print(line, file=self.file, flush=True)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
