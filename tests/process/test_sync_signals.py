"""run_sync() workers in real subprocesses, on asyncio and trio: signals, exit codes, resuming, SIGKILL."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import anyio
import harness
import pytest
from harness import BACKENDS, Worker, WorkerFactory

from recoverable_state import KeyValueStore, open_backend

pytestmark = pytest.mark.slow

SYNC_WORKER = Path(__file__).with_name("sync_worker.py")
SHUTDOWN_TIMEOUT = 10.0  # the factory's RECOVERABLE_STATE_SHUTDOWN_TIMEOUT
STOP_GRACE = 1.0
EXIT_GRACE = 2.0


@pytest.fixture
def sync_workers(workers: WorkerFactory, monkeypatch: pytest.MonkeyPatch) -> WorkerFactory:
    """The process tests' factory, starting sync_worker.py with a persist timer of 0.05 s."""
    monkeypatch.setattr(harness, "WORKER", SYNC_WORKER)
    workers.env["RECOVERABLE_STATE_PERSIST_STATE_INTERVAL"] = "0.05"
    return workers


def numbers(worker: Worker, tag: str) -> tuple[int, int]:
    line = next(line for line in worker.lines if line.startswith(tag + " "))
    a, count = line.split()[1:]
    return int(a), int(count)


def pair_history(storage_url: str) -> list[dict[str, Any]]:
    """Every snapshot of the pair the store kept (history=500), the current one first."""

    async def load() -> list[dict[str, Any]]:
        backend = open_backend(storage_url)
        try:
            kvs = await KeyValueStore.open(storage=backend)
            return [kvs.decode(record) for record in await kvs.get_history("pair")]
        finally:
            await backend.aclose()

    return anyio.run(load)


def start(factory: WorkerFactory, backend: str, *args: str) -> Worker:
    worker = factory.start(backend, "--stop-grace", str(STOP_GRACE), *args)
    worker.wait_for_line("WORKING")
    return worker


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_mid_work_saves_and_the_next_run_resumes_exactly(
    sync_workers: WorkerFactory, backend: str
) -> None:
    first = start(sync_workers, backend)
    time.sleep(0.3)
    first.signal(signal.SIGTERM)
    assert first.wait(SHUTDOWN_TIMEOUT + EXIT_GRACE + 5) == 143
    final = numbers(first, "FINAL")
    stored = sync_workers.stored()
    assert (stored["pair"]["a"], stored["tally"]["count"]) == final
    assert stored["pair"]["a"] == stored["pair"]["b"]

    second = start(sync_workers, backend)
    assert numbers(second, "START") == final
    second.signal(signal.SIGINT)
    assert second.wait(SHUTDOWN_TIMEOUT + EXIT_GRACE + 5) == 130
    assert numbers(second, "FINAL")[0] > final[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_worker_that_returns_exits_zero_with_everything_saved(
    sync_workers: WorkerFactory, backend: str
) -> None:
    worker = sync_workers.start(backend, "--limit", "20")
    assert worker.wait(30) == 0
    assert numbers(worker, "FINAL") == (20, 20)
    stored = sync_workers.stored()
    assert stored["pair"] == {"a": 20, "b": 20}
    assert stored["tally"] == {"count": 20}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_worker_ignoring_the_stop_flag_is_interrupted_and_every_state_saved(
    sync_workers: WorkerFactory, backend: str
) -> None:
    worker = start(sync_workers, backend, "--mode", "ignore")
    worker.signal(signal.SIGTERM)
    assert worker.wait(SHUTDOWN_TIMEOUT + EXIT_GRACE + 5) == 143
    assert "WorkerInterrupted" in worker.stderr() or any(
        line.startswith("INTERRUPTED") for line in worker.lines
    )
    interrupted = numbers(worker, "INTERRUPTED")
    stored = sync_workers.stored()
    assert (stored["pair"]["a"], stored["tally"]["count"]) == interrupted
    assert stored["pair"]["a"] == stored["pair"]["b"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_worker_that_never_returns_is_ended_within_the_timeout_plus_grace(
    sync_workers: WorkerFactory, backend: str
) -> None:
    worker = start(sync_workers, backend, "--mode", "stubborn")
    sent = worker.signal(signal.SIGTERM)
    code = worker.wait(SHUTDOWN_TIMEOUT + EXIT_GRACE + 5)
    took = time.monotonic() - sent
    assert code == 143, worker.stderr()[-2000:]
    assert took < SHUTDOWN_TIMEOUT + EXIT_GRACE + 1  # a bound on the process, not a measurement
    stored = sync_workers.stored()
    assert stored["pair"]["a"] == stored["pair"]["b"] > 0
    assert "never returned" in worker.stderr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_worker_holding_editing_across_persists_is_never_saved_half_updated(
    sync_workers: WorkerFactory, backend: str
) -> None:
    # Each change holds editing() for 0.15 s between `a` and `b`, across three timer ticks.
    worker = start(sync_workers, backend, "--hold", "0.15")
    time.sleep(1.5)
    worker.signal(signal.SIGTERM)
    assert worker.wait(SHUTDOWN_TIMEOUT + EXIT_GRACE + 5) == 143
    snapshots = pair_history(sync_workers.storage_url)
    assert len(snapshots) >= 5
    torn = [s for s in snapshots if s["a"] != s["b"]]
    assert torn == []
    assert snapshots[0]["a"] == numbers(worker, "FINAL")[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_never_tears_a_record(sync_workers: WorkerFactory, backend: str) -> None:
    for _ in range(3):
        worker = start(sync_workers, backend)
        time.sleep(0.4)
        worker.signal(signal.SIGKILL)
        assert worker.wait(10) == -signal.SIGKILL
        stored = sync_workers.stored()
        assert stored["pair"]["a"] == stored["pair"]["b"]
        assert all(s["a"] == s["b"] for s in pair_history(sync_workers.storage_url))
    again = start(sync_workers, backend)
    assert numbers(again, "START")[0] == stored["pair"]["a"]
    again.signal(signal.SIGTERM)
    assert again.wait(SHUTDOWN_TIMEOUT + EXIT_GRACE + 5) == 143


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_inside_an_editing_block_longer_than_the_grace_ends_in_time_and_tears_nothing(
    sync_workers: WorkerFactory, backend: str
) -> None:
    # The fourth change holds editing() for longer than the whole shutdown timeout (a shorter
    # one than the other tests', which must save under load: here nothing can be saved).
    shutdown_timeout = 4.0
    sync_workers.env["RECOVERABLE_STATE_SHUTDOWN_TIMEOUT"] = str(shutdown_timeout)
    worker = start(sync_workers, backend, "--mode", "ignore", "--long-hold", str(SHUTDOWN_TIMEOUT * 3))
    worker.wait_for_line("HOLDING")
    time.sleep(0.2)
    sent = worker.signal(signal.SIGTERM)
    code = worker.wait(shutdown_timeout + EXIT_GRACE + 10)
    took = time.monotonic() - sent
    assert code == 75, worker.stderr()[-2000:]  # the pair could not be saved: it was never let go
    assert took < shutdown_timeout + EXIT_GRACE + 2  # a bound on the process, not a measurement
    assert took > shutdown_timeout - 1  # it waited for the hold as long as it was allowed to
    stored = sync_workers.stored()
    assert stored["pair"]["a"] == stored["pair"]["b"] == 3  # the last whole pair, never a half one
    assert all(s["a"] == s["b"] for s in pair_history(sync_workers.storage_url))


THREADS_WORKER = """
import argparse
import threading

from pydantic import BaseModel, Field

import recoverable_state
from recoverable_state import RecoverableState, stop_requested


class Shared(BaseModel):
    counts: dict[str, int] = Field(default_factory=dict)
    total: int = 0
    plain: dict[str, int] = Field(default_factory=dict)


def work() -> None:
    state = RecoverableState(
        default_state=Shared(), persist_state_key="shared", persistence_enabled=True, history=300
    )
    with state as shared:
        def counter(name: str) -> None:
            while not stop_requested():
                with state.editing():  # counts and total change together
                    shared.counts[name] = shared.counts.get(name, 0) + 1
                    shared.total += 1
                shared.plain[name] = shared.plain.get(name, 0) + 1  # a field of its own: no editing()

        threads = [threading.Thread(target=counter, args=(f"t{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        print("WORKING", flush=True)
        for thread in threads:
            thread.join()
        print("FINAL", shared.total, flush=True)


parser = argparse.ArgumentParser()
parser.add_argument("--backend", default="asyncio")
parser.add_argument("--report-dir", default=None)
parser.add_argument("--stop-grace", default=None)
recoverable_state.run_sync(work, backend=parser.parse_args().backend)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_of_a_sync_worker_sharing_one_state_are_saved_whole(
    workers: WorkerFactory, backend: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = tmp_path / "threads_worker.py"
    script.write_text(THREADS_WORKER)
    monkeypatch.setattr(harness, "WORKER", script)
    workers.env["RECOVERABLE_STATE_PERSIST_STATE_INTERVAL"] = "0.05"
    worker = workers.start(backend)
    worker.wait_for_line("WORKING")
    time.sleep(1.0)
    worker.signal(signal.SIGTERM)
    assert worker.wait(SHUTDOWN_TIMEOUT + EXIT_GRACE + 5) == 143, worker.stderr()[-2000:]
    final = int(next(line for line in worker.lines if line.startswith("FINAL ")).split()[1])

    async def load() -> list[dict[str, Any]]:
        backend_ = open_backend(workers.storage_url)
        try:
            kvs = await KeyValueStore.open(storage=backend_)
            return [kvs.decode(record) for record in await kvs.get_history("shared")]
        finally:
            await backend_.aclose()

    snapshots = anyio.run(load)
    assert len(snapshots) >= 5
    assert all(s["total"] == sum(s["counts"].values()) for s in snapshots)  # never half a change
    assert snapshots[0]["total"] == final > 0
    assert "refused" not in worker.stderr() and "Unrepresentable" not in worker.stderr()
