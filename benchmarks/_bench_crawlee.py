"""The optional comparison: the same cases through Crawlee's RecoverableState and file storage.

Crawlee is not a dependency: when it is not importable these cases are skipped
with a note. Crawlee runs on asyncio only, and its states load and persist one
by one (it has no batch API), so this is what a Crawlee user gets today.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _bench_cases import NEVER, WorkerState, key_of, load, mutate, payloads, stopwatch

INSTALL_HINT = "the crawlee column needs crawlee: `.venv/bin/python -m pip install crawlee` (optional)"

_log = logging.getLogger("bench.crawlee")


def crawlee_available() -> bool:
    return importlib.util.find_spec("crawlee") is not None


class _CrawleeWorld:
    """A fresh Crawlee service locator with a file-system store under `directory`."""

    def __init__(self, directory: Path) -> None:
        import crawlee
        from crawlee.configuration import Configuration
        from crawlee.events import LocalEventManager
        from crawlee.storage_clients import FileSystemStorageClient

        self.directory = directory
        self.configuration = Configuration(storage_dir=str(directory), purge_on_start=False)
        self.storage_client = FileSystemStorageClient()
        self.events = LocalEventManager(persist_state_interval=NEVER)
        # Crawlee's RecoverableState asks `crawlee.service_locator` for its event manager
        # at call time; a locator of our own keeps every repetition apart.
        self._previous = crawlee.service_locator
        locator = type(crawlee.service_locator)()
        locator.set_configuration(self.configuration)
        locator.set_storage_client(self.storage_client)
        locator.set_event_manager(self.events)
        crawlee.service_locator = locator

    def close(self) -> None:
        import crawlee

        crawlee.service_locator = self._previous
        shutil.rmtree(self.directory, ignore_errors=True)

    async def open_kvs(self) -> Any:
        from crawlee.storages import KeyValueStore

        return await KeyValueStore.open(
            name="bench", configuration=self.configuration, storage_client=self.storage_client
        )

    def states(self, n: int, defaults: Sequence[WorkerState] | WorkerState, kvs: Any) -> list[Any]:
        from crawlee._utils.recoverable_state import RecoverableState

        async def factory() -> Any:
            return kvs

        return [
            RecoverableState(
                default_state=defaults if isinstance(defaults, WorkerState) else defaults[i],
                persist_state_key=key_of(i),
                persistence_enabled=True,
                persist_state_kvs_factory=factory,
                logger=_log,
            )
            for i in range(n)
        ]

    async def emit_persist(self) -> None:
        from crawlee.events import Event, EventPersistStateData

        self.events.emit(event=Event.PERSIST_STATE, event_data=EventPersistStateData(is_migrating=False))
        await self.events.wait_for_all_listeners_to_complete()


async def crawlee_persist(directory: Path, n: int) -> float:
    """Seconds for one PERSIST_STATE reaching `n` changed Crawlee states (all records existing)."""
    world = _CrawleeWorld(directory)
    times: list[float] = []
    try:
        async with world.events:
            kvs = await world.open_kvs()
            states = world.states(n, [load(data) for data in payloads(n)], kvs)
            for state in states:
                await state.initialize()
            try:
                await world.emit_persist()
                for state in states:
                    mutate(state.current_value, 1)
                with stopwatch(times, sync_disk=True):
                    await world.emit_persist()
                stored = await kvs.get_value(key_of(n - 1))
                if WorkerState.model_validate(stored) != states[-1].current_value:
                    raise AssertionError("crawlee: the last record does not hold the persisted model")
            finally:
                for state in states:
                    await state.teardown()
    finally:
        world.close()
    return times[0]


async def crawlee_initialize(directory: Path, n: int) -> float:
    """Seconds for initializing `n` stored Crawlee states, one after another as Crawlee does."""
    import json

    world = _CrawleeWorld(directory)
    times: list[float] = []
    try:
        async with world.events:
            kvs = await world.open_kvs()
            for i, data in enumerate(payloads(n)):
                await kvs.set_value(key_of(i), json.loads(data), "application/json")
            states = world.states(n, WorkerState(worker_id=-1), kvs)
            try:
                with stopwatch(times, sync_disk=True):
                    for state in states:
                        await state.initialize()
                if states[-1].current_value != load(payloads(n)[-1]):
                    raise AssertionError("crawlee: the last state did not load its stored model")
            finally:
                for state in states:
                    await state.teardown()
    finally:
        world.close()
    return times[0]
