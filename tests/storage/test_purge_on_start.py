"""`purge_on_start`: the first store opened in a backend first empties the default store.

As Crawlee does it: never a named store, and before any opener reads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import pytest

from recoverable_state import Configuration, service_locator
from recoverable_state.storage import (
    DEFAULT_STORE_NAME,
    JSON_CONTENT_TYPE,
    KeyValueStore,
    RecordWrite,
    StorageBackend,
)

pytestmark = pytest.mark.anyio


def fresh_name() -> str:
    return f"store-{uuid.uuid4().hex[:12]}"


# -- purge_on_start --------------------------------------------------------------


async def _seed(backend: StorageBackend, names: list[str]) -> None:
    """Records in these stores, written before this "process" opens any store.

    Written through the backend protocol, so that the facade's first open is still ahead.
    """
    writes = []
    for name in names:
        info = await backend.open_store(name=name)
        writes += [RecordWrite(info.id, key, b'"old"', JSON_CONTENT_TYPE) for key in ("one", "two")]
    await backend.write_batch(writes)


def test_purge_on_start_is_a_setting_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Configuration().purge_on_start is False
    monkeypatch.setenv("RECOVERABLE_STATE_PURGE_ON_START", "true")
    assert Configuration().purge_on_start is True
    monkeypatch.setenv("RECOVERABLE_STATE_PURGE_ON_START", "0")
    assert Configuration().purge_on_start is False


async def test_purge_on_start_empties_the_default_store_and_never_a_named_one(
    backend: StorageBackend,
) -> None:
    await _seed(backend, [DEFAULT_STORE_NAME, "named"])
    service_locator.set_configuration(Configuration(purge_on_start=True))

    named = await KeyValueStore.open(name="named", storage=backend)  # the first open, of a named store
    default = await KeyValueStore.open(storage=backend)
    assert await default.list_keys() == []
    assert [i.key for i in await named.list_keys()] == ["one", "two"]

    # Only on the first open: what is written afterwards stays.
    await default.set_value("new", 1)
    await KeyValueStore.open(name=fresh_name(), storage=backend)
    assert [i.key for i in await (await KeyValueStore.open(storage=backend)).list_keys()] == ["new"]


async def test_purge_on_start_when_the_default_store_is_opened_first(backend: StorageBackend) -> None:
    await _seed(backend, [DEFAULT_STORE_NAME])
    service_locator.set_configuration(Configuration(purge_on_start=True))
    default = await KeyValueStore.open(storage=backend)
    assert await default.get_value("one") is None
    assert await default.list_keys() == []


async def test_purge_on_start_finishes_before_any_opener_reads(backend: StorageBackend) -> None:
    await _seed(backend, [DEFAULT_STORE_NAME, "named"])
    service_locator.set_configuration(Configuration(purge_on_start=True))
    seen: list[object] = []

    async def open_and_read(name: str | None) -> None:
        kvs = await KeyValueStore.open(name=name, storage=backend)
        seen.append((kvs.name, await kvs.get_value("one")))

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(open_and_read, None if i % 2 else "named")
    assert sorted(seen, key=str) == sorted([(DEFAULT_STORE_NAME, None)] * 5 + [("named", "old")] * 5, key=str)


async def test_without_purge_on_start_nothing_is_purged(backend: StorageBackend) -> None:
    await _seed(backend, [DEFAULT_STORE_NAME, "named"])
    service_locator.set_configuration(Configuration())
    default = await KeyValueStore.open(storage=backend)
    assert await default.get_value("one") == "old"
    assert await (await KeyValueStore.open(name="named", storage=backend)).get_value("two") == "old"


_WORKER = """
import sys
import anyio
from recoverable_state import KeyValueStore

async def main() -> None:
    named = await KeyValueStore.open(name="named")
    default = await KeyValueStore.open()
    if sys.argv[1] == "seed":
        await default.set_value("k", "kept?")
        await named.set_value("k", "kept")
    print(await default.get_value("k"), await named.get_value("k"))

anyio.run(main)
"""


def test_purge_on_start_from_the_environment_in_a_new_process(
    shared_storage_url: str, tmp_path: Path
) -> None:
    """A worker restarted with RECOVERABLE_STATE_PURGE_ON_START=1 finds its default store empty."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECOVERABLE_STATE_")}
    env["RECOVERABLE_STATE_STORAGE_URL"] = shared_storage_url

    def run(step: str, **extra: str) -> str:
        done = subprocess.run(
            [sys.executable, str(script), step],
            env={**env, **extra},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run("seed") == "kept? kept"
    assert run("look") == "kept? kept"  # off by default
    assert run("look", RECOVERABLE_STATE_PURGE_ON_START="1") == "None kept"
