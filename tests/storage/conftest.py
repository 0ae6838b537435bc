"""Storage fixtures: one URL per backend (the servers come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from recoverable_state.storage import StorageBackend, open_backend
from servers import flush_postgres, flush_redis

BACKENDS = ["memory", "sqlite", "file", "redis", "postgresql"]
SHARED_BACKENDS = ["sqlite", "file", "redis", "postgresql"]
"""Backends whose data two backend instances (as two processes would) share."""


def empty_storage_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty storage of this kind (servers are flushed first)."""
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/s.sqlite3"
    if kind == "file":
        return f"file://{tmp_path}/files"
    if kind == "redis":
        url = str(request.getfixturevalue("redis_url"))
        flush_redis(url)
        return url
    url = str(request.getfixturevalue("postgres_url"))
    flush_postgres(url)
    return url


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty storage of each kind."""
    return empty_storage_url(str(request.param), request, tmp_path)


@pytest.fixture(params=SHARED_BACKENDS)
def shared_storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty storage of each kind that several backend instances share."""
    return empty_storage_url(str(request.param), request, tmp_path)


@pytest.fixture
async def backend(storage_url: str) -> AsyncIterator[StorageBackend]:
    """An opened backend of each kind, closed after the test."""
    storage = open_backend(storage_url)
    yield storage
    await storage.aclose()


@pytest.fixture
def backend_kind(storage_url: str) -> str:
    """`memory`, `sqlite`, `file`, `redis` or `postgresql`."""
    return storage_url.split(":", 1)[0]
