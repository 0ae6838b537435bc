"""Persist figures: manager.stats, PERSISTED, last_persist_age() and the OpenTelemetry instruments.

The instruments are read through the real OpenTelemetry SDK's InMemoryMetricReader.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from pydantic import BaseModel

from recoverable_state import (
    Event,
    EventManager,
    EventPersistedData,
    KeyValueStore,
    RecoverableState,
    service_locator,
)
from recoverable_state.storage import MemoryBackend
from recoverable_state.testing import FaultInjectingBackend

pytestmark = pytest.mark.anyio

_reader: InMemoryMetricReader | None = None


@pytest.fixture(scope="session")
def reader() -> InMemoryMetricReader:
    """One SDK meter provider for the session (OpenTelemetry allows setting it once)."""
    global _reader
    if _reader is None:
        _reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[_reader]))
    return _reader


@pytest.fixture
def faulty() -> FaultInjectingBackend:
    wrapped = FaultInjectingBackend(MemoryBackend())
    service_locator.set_storage(wrapped)
    return wrapped


class Progress(BaseModel):
    done: int = 0
    note: str = ""


def points(reader: InMemoryMetricReader, name: str, manager: EventManager) -> list[Any]:
    """The data points of metric `name` that belong to `manager`."""
    found: list[Any] = []
    data = reader.get_metrics_data()
    if data is None:
        return found
    ours = manager.metric_attributes
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    attributes = dict(point.attributes or {})
                    if all(attributes.get(k) == v for k, v in ours.items()):
                        found.append(point)
    return found


async def persist_round(manager: EventManager) -> None:
    manager.emit(event=Event.PERSIST_STATE)
    await manager.wait_for_all_listeners_to_complete(timeout=10)


async def test_figures_match_what_was_written(
    memory_storage: MemoryBackend, reader: InMemoryMetricReader
) -> None:
    manager = EventManager(persist_state_interval=3600)
    heard: list[EventPersistedData] = []
    manager.on(event=Event.PERSISTED, listener=heard.append)
    states = [
        RecoverableState(
            default_state=Progress(),
            persist_state_key=f"p{i}",
            persistence_enabled=True,
            event_manager=manager,
        )
        for i in range(3)
    ]
    async with manager:
        for state in states:
            await state.initialize()
        rounds: list[EventPersistedData] = []
        await persist_round(manager)  # the defaults: three records written
        rounds.append(heard[-1])
        states[0].current_value.done = 7
        states[1].current_value.note = "x" * 100
        await persist_round(manager)  # two changed, one not
        rounds.append(heard[-1])
        await persist_round(manager)  # nothing changed
        rounds.append(heard[-1])
        kvs = await KeyValueStore.open()
        sizes = {s.persist_state_key: len((await kvs.get_record(s.persist_state_key)).value) for s in states}  # type: ignore[union-attr]

    assert [data.states_written for data in rounds] == [3, 2, 0]
    assert rounds[1].bytes_written == sizes["p0"] + sizes["p1"]
    assert all(data.succeeded and data.duration >= timedelta(0) for data in heard)
    stats = manager.stats
    assert stats.persists == len(heard)
    assert stats.states_written == sum(d.states_written for d in heard)
    assert stats.bytes_written == sum(d.bytes_written for d in heard)
    assert dict(stats.persists_failed) == {}
    assert stats.last_success_at is not None
    age = manager.last_persist_age()
    assert age is not None and age < timedelta(seconds=60)

    (duration,) = points(reader, "recoverable_state.persist.duration", manager)
    assert duration.count == stats.persists
    (written,) = points(reader, "recoverable_state.persist.states", manager)
    assert written.sum == stats.states_written
    (size,) = points(reader, "recoverable_state.persist.bytes", manager)
    assert size.sum == stats.bytes_written
    (last,) = points(reader, "recoverable_state.persist.last_success", manager)
    assert last.value == pytest.approx(stats.last_success_at.timestamp())


async def test_failures_are_counted_by_kind(
    faulty: FaultInjectingBackend, reader: InMemoryMetricReader
) -> None:
    manager = EventManager(persist_state_interval=3600)
    state = RecoverableState(
        default_state=Progress(),
        persist_state_key="p",
        persistence_enabled=True,
        event_manager=manager,
        persistence_timeout=0.2,
    )
    async with manager:
        await state.initialize()
        await persist_round(manager)
        state.current_value.done = 1
        faulty.fail_next()
        await persist_round(manager)
        state.current_value.done = 2
        faulty.fail_next()
        await persist_round(manager)
        state.current_value.done = 3
        faulty.hang_next()
        await persist_round(manager)
        before_last = manager.stats
    assert dict(before_last.persists_failed) == {"StorageError": 2, "PersistenceTimeoutError": 1}
    failures = {
        dict(p.attributes)["error.type"]: p.value
        for p in points(reader, "recoverable_state.persist.failures", manager)
    }
    assert failures == {"StorageError": 2, "PersistenceTimeoutError": 1}


async def test_no_persist_yet_has_no_age(memory_storage: MemoryBackend) -> None:
    manager = EventManager(persist_state_interval=3600)
    assert manager.last_persist_age() is None
    assert manager.stats.persists == 0


async def test_a_failed_round_does_not_count_as_alive(faulty: FaultInjectingBackend) -> None:
    manager = EventManager(persist_state_interval=3600)
    state = RecoverableState(
        default_state=Progress(), persist_state_key="p", persistence_enabled=True, event_manager=manager
    )
    async with manager:
        await state.initialize()
        faulty.fail_next()
        await persist_round(manager)  # the first tick's round may have run already: this one fails
        assert manager.stats.persists_failed.get("StorageError") == 1
        succeeded_at = manager.stats.last_success_at
        state.current_value.done = 5
        faulty.fail_next()
        await persist_round(manager)
        assert manager.stats.last_success_at == succeeded_at


async def test_coalesced_ticks_are_counted(
    faulty: FaultInjectingBackend, reader: InMemoryMetricReader
) -> None:
    manager = EventManager(persist_state_interval=0.02)
    state = RecoverableState(
        default_state=Progress(), persist_state_key="p", persistence_enabled=True, event_manager=manager
    )
    await state.initialize()
    faulty.delay_next(0.5)
    async with manager:
        with anyio.fail_after(10):
            while manager.stats.ticks_skipped < 2:
                await anyio.sleep(0.02)
    skipped = points(reader, "recoverable_state.persist.ticks_skipped", manager)
    assert skipped[0].value == manager.stats.ticks_skipped


async def test_log_lines_about_a_state_carry_store_and_key(
    faulty: FaultInjectingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    manager = EventManager(persist_state_interval=3600)
    state = RecoverableState(
        default_state=Progress(), persist_state_key="the-key", persistence_enabled=True, event_manager=manager
    )
    async with manager:
        await state.initialize()
        await persist_round(manager)
        state.current_value.done = 1
        faulty.fail_next()
        with caplog.at_level("ERROR", logger="recoverable_state"):
            await persist_round(manager)
    failures = [r for r in caplog.records if "not persisted" in r.getMessage()]
    assert failures
    for record in failures:
        assert getattr(record, "key", None) == "the-key"
        assert getattr(record, "store", None) == "default"
        assert "'the-key'" in record.getMessage()
        assert "'default'" in record.getMessage()


def test_persisted_event_value_and_payload_json() -> None:
    assert Event.PERSISTED.value == "persisted"
    data = EventPersistedData(duration=timedelta(milliseconds=1500), states_written=2, bytes_written=40)
    dumped = data.model_dump(by_alias=True, mode="json")
    assert dumped["durationSecs"] == 1.5
    assert dumped["statesWritten"] == 2
    assert dumped["bytesWritten"] == 40
    assert data.succeeded


def test_the_library_works_without_opentelemetry_installed(tmp_path: Path) -> None:
    script = """
import sys
sys.modules["opentelemetry"] = None  # as if it were not installed: importing it fails
import anyio
from recoverable_state import EventManager, RecoverableState, Configuration, service_locator

service_locator.set_configuration(Configuration(storage_url="memory://"))

async def main():
    manager = EventManager(persist_state_interval=3600)
    state = RecoverableState(
        default_state={"n": 1}, persist_state_key="k", persistence_enabled=True, event_manager=manager
    )
    async with manager:
        await state.initialize()
    print(manager.stats.persists, manager.stats.states_written, manager.last_persist_age() is not None)

anyio.run(main)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1", "True"]


async def test_ownership_losses_are_counted(
    memory_storage: MemoryBackend, reader: InMemoryMetricReader
) -> None:
    manager = EventManager(persist_state_interval=3600)
    state = RecoverableState(
        default_state=Progress(), persist_state_key="p", persistence_enabled=True, event_manager=manager
    )
    async with manager:
        await state.initialize()
        await persist_round(manager)
        await (await KeyValueStore.open()).get_record("p", claim=True)  # a successor loads it
        state.current_value.done = 1
        await persist_round(manager)
        assert state.ownership_lost
        stats = manager.stats
    assert stats.ownership_losses == 1
    assert dict(stats.persists_failed) == {"StateOwnershipLost": 1}
    (lost,) = points(reader, "recoverable_state.ownership.losses", manager)
    assert lost.value == 1
