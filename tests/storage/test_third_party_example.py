"""The third-party backend of the storage guide passes the shipped suite, and the guide shows it as it is.

`examples/third_party_backend.py` is the code the guide prints: a test compares
the two. It runs the conformance suite here, and once more from outside this
repository, as its own package would: a test module with one import, in a
directory of its own, the backend registered by an entry point.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from recoverable_state.testing import BackendConformance
from recoverable_state.testing.conformance import MakeBackend

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "third_party_backend.py"
GUIDE = ROOT / "docs" / "guides" / "backends.md"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("third_party_backend", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["third_party_backend"] = module
    spec.loader.exec_module(module)
    return module


example = _load()


class TestTheGuidesBackend(BackendConformance):
    @pytest.fixture
    def make_backend(self, tmp_path: Path) -> MakeBackend:
        return lambda: example.open_snapshot_file(f"snapshotfile://{tmp_path}/state.db")


def code_lines(source: str) -> int:
    """Lines of code: blank lines, comments and docstrings aside (as the module budgets count them)."""
    tree = ast.parse(source)
    docs: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            docs.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    lines = source.splitlines()
    return sum(
        1
        for n, line in enumerate(lines, 1)
        if line.strip() and not line.strip().startswith("#") and n not in docs
    )


def test_the_guide_shows_the_example_as_it_is() -> None:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    assert EXAMPLE.read_text() in blocks, (
        "docs/guides/backends.md must show examples/third_party_backend.py whole"
    )


def test_the_example_is_under_100_lines_of_code() -> None:
    assert code_lines(EXAMPLE.read_text()) < 100


def test_a_package_proves_its_backend_with_one_import(tmp_path: Path) -> None:
    """Outside this repository: the backend installed with its entry point, its tests one subclass."""
    shutil.copy(EXAMPLE, tmp_path / "third_party_backend.py")
    info = tmp_path / "snapshot_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: snapshot-backend\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[recoverable_state.backends]\nsnapshotfile = third_party_backend:open_snapshot_file\n"
    )
    (tmp_path / "test_backend.py").write_text(
        textwrap.dedent(
            """
            import pytest

            from recoverable_state.storage import open_backend
            from recoverable_state.testing import BackendConformance


            class TestSnapshotFile(BackendConformance):
                @pytest.fixture
                def make_backend(self, tmp_path):
                    return lambda: open_backend(f"snapshotfile://{tmp_path}/state.db")
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "RECOVERABLE_STATE_"))}
    env["PYTHONPATH"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_backend.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    passed = re.search(r"\b(\d+) passed\b", done.stdout)
    assert passed is not None and int(passed.group(1)) >= 90, done.stdout[-500:]  # the whole suite ran
