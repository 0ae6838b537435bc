"""Fixtures of the process tests (the helpers are in harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_metadata import FakeMetadata, serve_metadata
from harness import WorkerFactory, sqlite_url


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerFactory]:
    """Workers on a SQLite store in tmp_path."""
    factory = WorkerFactory(tmp_path, sqlite_url(tmp_path))
    yield factory
    factory.close()


@pytest.fixture
def metadata() -> Iterator[FakeMetadata]:
    """A fake cloud metadata service on 127.0.0.1 (AWS and GCP paths)."""
    with serve_metadata() as fake:
        yield fake


_NO_THREADS_AT_SHUTDOWN = (
    "CPython 3.12.0-3.12.2 refuse to start a thread once the main thread has ended (gh-113964, fixed in "
    "3.12.3): the exit watchdog's hard_exit() dies starting its logging thread, so the process waits ~30 s "
    "for the worker thread stuck in SQLite's busy wait; fixed when hard_exit() survives that RuntimeError"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark what a Python version is known to break, strictly: it fails once the fix is in."""
    if (3, 12, 0) <= sys.version_info[:3] < (3, 12, 3):
        for item in items:
            if item.name == "test_run_ends_within_the_timeout_when_the_store_is_locked[asyncio]":
                item.add_marker(pytest.mark.xfail(strict=True, reason=_NO_THREADS_AT_SHUTDOWN))
