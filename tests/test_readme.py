"""Every Python block of README.md runs as written, each on its own (a fresh namespace, a scratch directory)."""

import importlib.util
import pathlib
import re

import pytest

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks() -> list:
    """``(section heading, code)`` of each ```python block, in order."""
    out = []
    for m in re.finditer(r"```python\n(.*?)```", README, re.S):
        heading = re.findall(r"^#+ (.*)$", README[: m.start()], re.M)[-1]
        out.append(pytest.param(m.group(1), id=f"{len(out)}-{re.sub(r'[^a-z]+', '-', heading.lower()).strip('-')}"))
    return out


BLOCKS = _blocks()


def test_the_readme_has_its_blocks():
    assert len(BLOCKS) >= 6  # the seed example, the module, paper mode, GQA, the language model, Hugging Face


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_block_runs(code, tmp_path, monkeypatch):
    if "transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("the Hugging Face block needs transformers (extra [hf])")
    monkeypatch.chdir(tmp_path)  # blocks may write files (save_pretrained)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
