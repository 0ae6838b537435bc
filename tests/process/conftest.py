"""Fixtures of the process tests (the helpers are in harness.py)."""

from __future__ import annotations

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
