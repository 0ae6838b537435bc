"""Lifetimes: a state that can no longer persist frees its key and its manager.

A worker that returns without tearing its states down, a test that ends, a run
followed by another in the same process: the keys are usable again, and the
managers and states of earlier runs are collected, not kept for the life of
the process. On asyncio and trio.
"""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

import recoverable_state
from recoverable_state import EventManager, KeyValueStore, RecoverableState, service_locator, use_state

BACKENDS = ["asyncio", "trio"]


class Progress(BaseModel):
    done: int = 0


def stored(key: str) -> Any:
    async def read() -> Any:
        return await (await KeyValueStore.open()).get_value(key)

    return anyio.run(read)


def collected(refs: list[weakref.ref[Any]]) -> int:
    """How many of `refs` are gone after a full collection."""
    gc.collect()
    return sum(ref() is None for ref in refs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_states_never_torn_down_free_their_keys_and_managers_between_runs(backend: str) -> None:
    managers: list[weakref.ref[EventManager]] = []
    states: list[weakref.ref[RecoverableState[Progress]]] = []

    async def main(run: int) -> None:
        managers.append(weakref.ref(service_locator.get_event_manager()))
        for i in range(10):
            state = RecoverableState(
                default_state=Progress(), persist_state_key=f"k{i}", persistence_enabled=True
            )
            value = await state.initialize()  # the same keys as the run before: no StateAlreadyInUseError
            assert value.done == run
            value.done += 1
            states.append(weakref.ref(state))
        # returns without teardown(): the manager's last persist saves them all

    for run in range(12):
        recoverable_state.run(main, run, backend=backend, handle_signals=False)
    assert stored("k9") == {"done": 12}
    assert collected(managers) == 12
    assert collected(states) == 120  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", BACKENDS)
def test_states_initialized_before_the_manager_is_entered_free_their_keys_once_dropped(backend: str) -> None:
    async def one_run(run: int) -> None:
        manager = EventManager(persist_state_interval=3600)
        state = RecoverableState(
            default_state=Progress(),
            persist_state_key="early",
            persistence_enabled=True,
            event_manager=manager,
        )
        value = await state.initialize()  # before entering: the manager keeps its group across exits
        assert value.done == run
        async with manager:
            value.done += 1

    for run in range(5):
        anyio.run(one_run, run, backend=backend)
    assert stored("early") == {"done": 5}


@pytest.mark.parametrize("backend", BACKENDS)
def test_use_state_values_move_to_the_next_runs_manager(backend: str) -> None:
    async def main(run: int) -> None:
        counts = await use_state("counts", {"runs": 0})
        assert counts["runs"] == run
        counts["runs"] += 1

    for run in range(4):
        recoverable_state.run(main, run, backend=backend, handle_signals=False)
    assert stored("counts") == {"runs": 4}


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_stays_flat_over_many_runs(backend: str) -> None:
    async def main() -> None:
        states = [
            RecoverableState(default_state=Progress(), persist_state_key=f"m{i}", persistence_enabled=True)
            for i in range(200)
        ]
        await RecoverableState.initialize_many(states)
        for state in states:
            state.current_value.done += 1

    def live_objects() -> int:
        gc.collect()
        return len(gc.get_objects())

    for _ in range(5):
        recoverable_state.run(main, backend=backend, handle_signals=False)
    before = live_objects()
    for _ in range(20):
        recoverable_state.run(main, backend=backend, handle_signals=False)
    # 20 runs of 200 states each: what stays is a few objects per run at most (caches, not states).
    assert live_objects() - before < 2000
    assert stored("m199") == {"done": 25}


def test_a_second_run_with_opentelemetry_metrics_reuses_the_keys(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from pydantic import BaseModel

        import recoverable_state
        from recoverable_state import RecoverableState

        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


        class Progress(BaseModel):
            done: int = 0


        async def main() -> None:
            for i in range(10):
                state = RecoverableState(
                    default_state=Progress(), persist_state_key=f"k{i}", persistence_enabled=True
                )
                (await state.initialize()).done += 1
            reader.collect()


        recoverable_state.run(main)
        recoverable_state.run(main)
        print("OK")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "RECOVERABLE_STATE_STORAGE_URL": f"sqlite:///{tmp_path}/s.sqlite3"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["OK"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_cold_start_makes_the_default_only_when_nothing_is_stored(memory_storage: Any) -> None:
    copies: list[int] = []
    made: list[int] = []

    @dataclasses.dataclass
    class Job:
        done: int = 0

        def __deepcopy__(self, memo: Any) -> Job:
            copies.append(1)
            return Job(self.done)

    def fresh() -> Job:
        made.append(1)
        return Job()

    kvs = await KeyValueStore.open()
    for i in range(10):
        await kvs.set_value(f"job-{i}", {"done": i})
    explicit: Any = "explicit_only"
    by_value = [
        RecoverableState(default_state=Job(), persist_state_key=f"job-{i}", persistence_enabled=explicit)
        for i in range(20)
    ]
    by_factory = [
        RecoverableState(default_state=fresh, persist_state_key=f"job-{i}", persistence_enabled=explicit)
        for i in range(20, 30)
    ]
    await RecoverableState.initialize_many([*by_value, *by_factory])
    assert [s.current_value.done for s in by_value[:10]] == list(range(10))
    assert len(copies) == 10  # the ten states with nothing stored copied the default once each
    assert len(made) == 10  # once each, to learn the type: the same value then serves as the default


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_factory_with_a_record_stored_is_called_once(memory_storage: Any) -> None:
    made: list[int] = []

    def fresh() -> dict[str, int]:
        made.append(1)
        return {"runs": 0}

    await (await KeyValueStore.open()).set_value("runs", {"runs": 7})
    state = RecoverableState(
        default_state=fresh, persist_state_key="runs", persistence_enabled="explicit_only"
    )
    assert await state.initialize() == {"runs": 7}
    assert len(made) == 1  # to learn the type; never twice
