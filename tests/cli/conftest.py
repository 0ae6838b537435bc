"""CLI fixtures: the command run as a user runs it, on a store a real worker filled.

Every command runs in a subprocess (`python -m recoverable_state.cli`) with its
working directory in the test's tmp_path and the storage URL passed explicitly.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/servers.py

from cli_support import Cli, empty_storage, run_worker


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


@pytest.fixture(scope="session")
def filled_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database the worker filled (see cli_worker.py `fill`); tests use copies of it."""
    directory = tmp_path_factory.mktemp("filled")
    run_worker(f"sqlite:///{directory}/state.sqlite3", "fill", directory)
    return directory / "state.sqlite3"


@pytest.fixture
def filled_url(filled_db: Path, tmp_path: Path) -> str:
    """The URL of this test's own copy of the filled database."""
    for part in filled_db.parent.glob(filled_db.name + "*"):  # the WAL too, if any
        shutil.copy(part, tmp_path / part.name)
    return f"sqlite:///{tmp_path / filled_db.name}"


@pytest.fixture(params=["file", "redis", "postgresql"])
def other_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty storage of another kind than SQLite."""
    return empty_storage(request, request.param, tmp_path)
