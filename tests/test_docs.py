"""The Python blocks of README.md and docs/: every one compiles, and the runnable ones run.

A fenced block opened with ```python is a Python block. It is *runnable* when it is on
docs/integrations.md (every block there is a complete script) or when the line before its
fence (blank lines aside) is the HTML comment ``<!-- test: run -->``. A runnable block runs
in a fresh namespace, as ``__main__``, in a temporary working directory; it must finish
without error (its own ``assert`` lines check what the page claims). Compiled with the
block's line numbers, so a traceback points at the Markdown line.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN_ALL = {ROOT / "docs" / "integrations.md"}
RUN_MARK = "<!-- test: run -->"
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    code: str
    runnable: bool

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def compiled(self):
        # pad with blank lines so that line numbers in errors are the Markdown file's
        return compile("\n" * (self.line - 1) + self.code, str(self.path), "exec")


def blocks(path: Path) -> list[Block]:
    """The ```python blocks of one Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening["fence"]
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence[0] * len(fence)):
            end += 1
        if opening["info"].lower() in ("python", "py", "python3"):
            before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
            found.append(Block(path, i + 2, code, path in RUN_ALL or before == RUN_MARK))
        i = end + 1
    return found


ALL = [block for path in FILES for block in blocks(path)]
RUNNABLE = [block for block in ALL if block.runnable]


def test_the_pages_have_blocks_to_check():
    assert len(ALL) >= 20, [b.id for b in ALL]
    on_integrations = [b for b in RUNNABLE if b.path.name == "integrations.md"]
    assert len(on_integrations) >= 4, "integrations.md shows prefetching, Lightning, Accelerate and LR schedules"
    assert any(b.path.name == "README.md" for b in RUNNABLE), "README.md has a runnable block"


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_every_python_block_compiles(block: Block):
    block.compiled()  # raises SyntaxError pointing at the Markdown line


@pytest.mark.filterwarnings("ignore")  # Lightning and Accelerate are chatty; the asserts matter
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_runnable_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    try:
        exec(block.compiled(), {"__name__": "__main__", "__file__": str(block.path)})
    finally:  # the block ran in this process: leave its global state as it was
        torch.set_rng_state(rng)
        torch.set_num_threads(threads)
