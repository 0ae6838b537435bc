"""Every code block in README.md and docs/ runs as written, or says why not.

A fenced block must name its language. A `python` block is run as a script of
its own, in an empty directory (the default SQLite store lands there), and must
exit 0. An HTML comment on the line before a block changes that:

- `<!-- code: fragment -->`: deliberately partial (a line out of a larger
  program); not run.
- `<!-- code: worker -->`: a worker that runs until stopped; it is started,
  sent SIGTERM once it printed a line (or after 3 s), and must exit 143.

Other languages (bash, text, ...) are not run. Indented code blocks are not
used in these pages: a block must be fenced, so that it has a language.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
MARK = re.compile(r"^\s*<!--\s*code:\s*(?P<kind>fragment|worker)\s*-->\s*$")
PYTHON = {"python", "py"}

KNOWN_BROKEN: dict[tuple[str, str], str] = {}
"""Blocks known not to run, on pages this suite's owners do not edit: strict, so a fix is noticed."""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    kind: str  # "run", "fragment", "worker"
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(before)
        code = "\n".join(body) + "\n"
        found.append(Block(page, start + 1, opening["lang"], mark["kind"] if mark else "run", code))
    return found


ALL = [block for page in PAGES for block in blocks(page)]
RUNNABLE = [b for b in ALL if b.lang in PYTHON and b.kind != "fragment"]


def _param(block: Block) -> object:
    first = block.code.strip().splitlines()[0]
    reason = KNOWN_BROKEN.get((str(block.page.relative_to(ROOT)), first))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(block, id=block.where, marks=marks)


def test_every_code_block_names_its_language() -> None:
    unnamed = [b.where for b in ALL if not b.lang]
    assert not unnamed, f"fenced blocks without a language (```bash, ```text, ...): {unnamed}"


def test_markers_sit_only_on_python_blocks() -> None:
    odd = [b.where for b in ALL if b.kind != "run" and b.lang not in PYTHON]
    assert not odd, f"a code: marker on a block that is not Python: {odd}"


def test_the_pages_have_runnable_samples() -> None:
    assert len(RUNNABLE) >= 10  # the collector found the samples (a broken parser finds none)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECOVERABLE_STATE_", "CRAWLEE_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.slow
@pytest.mark.parametrize("block", [_param(b) for b in RUNNABLE])
def test_the_sample_runs_as_written(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "sample.py"
    script.write_text(block.code, encoding="utf-8")
    if block.kind == "worker":
        _run_worker(script, tmp_path)
        return
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{block.where} exited {done.returncode}:\n{done.stderr[-3000:]}"


def _run_worker(script: Path, cwd: Path) -> None:
    worker = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    printed = threading.Event()

    def read() -> None:
        assert worker.stdout is not None
        for _ in worker.stdout:
            printed.set()

    threading.Thread(target=read, daemon=True).start()
    printed.wait(3.0)
    assert worker.poll() is None, f"the worker ended before it was stopped:\n{worker.stderr.read()}"  # type: ignore[union-attr]
    worker.send_signal(signal.SIGTERM)
    try:
        code = worker.wait(60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert code == 128 + signal.SIGTERM, worker.stderr.read()  # type: ignore[union-attr]
