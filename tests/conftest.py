"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from recoverable_state import Configuration, service_locator
from recoverable_state.storage import MemoryBackend


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _fresh_services(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with default services that write under its own tmp_path."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("RECOVERABLE_STATE_"):  # a developer's settings must not leak in
            monkeypatch.delenv(name)
    service_locator.reset()
    yield
    service_locator.reset()


@pytest.fixture
def memory_storage() -> MemoryBackend:
    """A memory backend installed as the default storage."""
    backend = MemoryBackend()
    service_locator.set_storage(backend)
    service_locator.set_configuration(Configuration(storage_url="memory://"))
    return backend
