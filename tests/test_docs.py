"""Every Python block of README.md and docs/ runs, so none of them can go stale.

A fenced block opened with ```python is a Python block, and each one is a complete program:
synthetic data, a tiny model, a CPU, a few seconds. It runs in a fresh namespace, as
``__main__``, in a temporary working directory, and must finish without error; its own
``assert`` lines check what the page claims next to it. It is compiled with the block's line
numbers, so a traceback points at the Markdown line, and a failure names the block
``file:line``.

The line before a block's fence (blank lines aside) may say how the block runs:

- ``<!-- test: run -->`` (the default, so it may be left out): in this process, as above;
- ``<!-- test: torchrun N -->``: the block is a ``torch.distributed`` script, written to a file
  and launched as it would be by hand, ``python -m torch.distributed.run --nproc_per_node=N``
  on 127.0.0.1 (CPU processes, gloo), bounded by a timeout.

Any other ``<!-- test: ... -->`` comment is an error. A block that imports ffcv needs it: it is
skipped without ffcv, except with the ``CI`` environment variable set (as in test_ffcv.py).
"""

from __future__ import annotations

import logging
import os
import re
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .distributed_helpers import run_torchrun

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
MARK = re.compile(r"^<!--\s*test:\s*(?P<how>.*?)\s*-->$")
TORCHRUN = re.compile(r"^torchrun (?P<n>[1-9][0-9]*)$")
USES_FFCV = re.compile(r"^\s*(?:from|import)\s+ffcv\b", re.MULTILINE)
LAUNCH_TIMEOUT = 120  # seconds per torchrun launch; a few seconds on an idle 2-core machine

# Namespaces of blocks that built FFCV Loaders live until the interpreter exits: a Loader
# collected mid-session breaks numba's finalizers (see the note in tests/test_ffcv.py).
_KEPT: list[dict] = []


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    code: str
    how: str  # "run" (in this process) or "torchrun N"

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def padded(self) -> str:
        # blank lines first, so that line numbers in errors are the Markdown file's
        return "\n" * (self.line - 1) + self.code

    def compiled(self):
        return compile(self.padded, str(self.path), "exec")


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
            mark = MARK.match(before)
            how = mark["how"] if mark else "run"
            if not (how == "run" or TORCHRUN.match(how)):
                raise ValueError(f"{path.relative_to(ROOT)}:{i + 1}: unknown marker {before!r} (known: test: torchrun N)")
            code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
            found.append(Block(path, i + 2, code, how))
        i = end + 1
    return found


ALL = [block for path in FILES for block in blocks(path)]
IDS = [b.id for b in ALL]


def test_the_pages_have_blocks_to_check():
    assert len(ALL) >= 20, IDS
    by_page = {path.name: [b for b in ALL if b.path == path] for path in FILES}
    assert len(by_page["integrations.md"]) >= 4, "integrations.md shows prefetching, Lightning, Accelerate and LR schedules"
    assert len(by_page["README.md"]) >= 2 and by_page["ffcv.md"], "the README and the FFCV page have blocks"
    assert any(b.how.startswith("torchrun") for b in by_page["distributed.md"]), "distributed.md runs under torchrun"


@pytest.mark.parametrize("block", ALL, ids=IDS)
def test_every_python_block_compiles(block: Block):
    block.compiled()  # raises SyntaxError pointing at the Markdown line


@pytest.mark.filterwarnings("ignore")  # Lightning and Accelerate are chatty; the asserts matter
@pytest.mark.parametrize("block", ALL, ids=IDS)
def test_every_python_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if USES_FFCV.search(block.code):
        if os.environ.get("CI"):
            import ffcv  # noqa: F401  (CI must run it: a missing ffcv fails, it is not skipped)
        else:
            pytest.importorskip("ffcv", reason=f"{block.id} needs ffcv: pip install 'sbdata[ffcv]' (see README)")
    if block.how != "run":
        torchrun(block, int(TORCHRUN.match(block.how)["n"]), tmp_path)
        return
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__", "__file__": str(block.path)}
    if USES_FFCV.search(block.code):
        _KEPT.append(namespace)
    failure = None
    with isolated_globals():
        try:
            exec(block.compiled(), namespace)
        except Exception as e:  # the traceback from the block's own frame, with its Markdown lines
            failure = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
    if failure:
        pytest.fail(f"the block at {block.id} failed:\n{failure}", pytrace=False)


class isolated_globals:
    """The block runs in this process: leave the global state it may change as it was (the
    RNG, torch's thread count, the root and ``sbdata`` loggers). It starts as in a fresh
    interpreter: the same global seed whatever ran before (its claims hold for any seed, but a
    failure should reproduce), and a root logger without handlers, so that a block's
    ``logging.basicConfig`` takes effect. Blocks run on one torch thread: their tensors are
    tiny, and on a busy machine every op of a second thread waits for a free core (20x slower)."""

    def __enter__(self):
        self.rng, self.threads = torch.get_rng_state(), torch.get_num_threads()
        torch.manual_seed(0)
        torch.set_num_threads(1)
        self.loggers = {
            logger: (logger.level, logger.handlers[:]) for logger in (logging.getLogger(), logging.getLogger("sbdata"))
        }
        logging.getLogger().handlers.clear()

    def __exit__(self, *exc):
        torch.set_rng_state(self.rng)
        torch.set_num_threads(self.threads)
        for logger, (level, handlers) in self.loggers.items():
            logger.setLevel(level)
            logger.handlers[:] = handlers


def torchrun(block: Block, nproc: int, tmp_path: Path) -> None:
    """Launch the block with torchrun on ``nproc`` CPU processes; fail with its output if it
    fails or runs past LAUNCH_TIMEOUT (torchrun and its workers are then killed)."""
    script = tmp_path / f"{block.path.stem}_line{block.line}.py"
    script.write_text(block.padded, encoding="utf-8")  # tracebacks name the Markdown line
    code, out, err = run_torchrun(script, [], nproc=nproc, cwd=tmp_path, timeout=LAUNCH_TIMEOUT)
    if code is None:
        pytest.fail(f"the block at {block.id} timed out after {LAUNCH_TIMEOUT}s under torchrun:\n{out}{err}", pytrace=False)
    if code != 0:
        pytest.fail(f"the block at {block.id} failed under torchrun (exit {code}):\n{out}{err}", pytrace=False)

