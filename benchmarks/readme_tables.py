"""Refresh the README's result tables from the files the benchmarks and experiments wrote.

Each ``<!-- table:NAME -->`` ... ``<!-- /table -->`` block in README.md, benchmarks/README.md and
experiments/README.md is replaced by ``benchmarks/results/NAME.md`` (or ``results/NAME.md``) when that
file exists. NAME may name a folder: the CPU benchmarks write to ``benchmarks/results/<cpu>/``
(``common.cpu_results``), so ``<!-- table:amd-epyc/paper_mode -->`` is that CPU's paper-mode table.

    python benchmarks/readme_tables.py
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "benchmarks" / "results", ROOT / "results"]


DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "experiments" / "README.md"]


def main(argv: list[str] | None = None) -> None:
    # no options; parsing still answers --help (and refuses a stray argument) before any README is rewritten
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    for doc in DOCS:
        if doc.exists():
            refresh(doc)


def refresh(readme: Path) -> None:
    text = readme.read_text()

    def fill(m: re.Match) -> str:
        name = m.group(1)
        for d in SOURCES:
            f = d / f"{name}.md"
            if f.exists():
                return f"<!-- table:{name} -->\n{f.read_text().strip()}\n<!-- /table -->"
        print(f"no results for table {name!r}; left as is")
        return m.group(0)

    new = re.sub(r"<!-- table:([\w/-]+) -->.*?<!-- /table -->", fill, text, flags=re.S)
    readme.write_text(new)
    print(f"{readme.relative_to(ROOT)}: " + ("tables refreshed" if new != text else "unchanged"))


if __name__ == "__main__":
    main()
