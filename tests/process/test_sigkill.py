"""SIGKILL at random moments of heavy persistence never leaves a torn, unreadable or older record.

A worker changes 120 states without pause, persists them on a 20 ms timer and by
hand in a loop (racing the timer), and is SIGKILLed at a random moment; then the
test reads every record with the library. The rounds alternate asyncio and trio
workers on one store, so each loop also resumes what the other left behind.

The kill moments are spread over the first WINDOW seconds of writing on purpose
(stratified: round i is killed at a random moment of the i-th slice), so a
dozen kills reach from the first inserts to the steady updates that thirty
unplanned ones would hit only by luck.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from harness import WorkerFactory, file_url, load_store, sqlite_url
from worker import Item, is_whole, key_of

pytestmark = pytest.mark.slow

KILLS = 12
STATES = 120
WINDOW = 0.25
"""Seconds after READY within which the kills fall."""


def kill_delays(rng: random.Random) -> list[float]:
    """One delay per round, each inside its own slice of the window, in shuffled order.

    The shuffle keeps early and late kills on both runtimes and in any order of
    what the store holds when the round starts.
    """
    slices = [(i + rng.random()) * WINDOW / KILLS for i in range(KILLS)]
    rng.shuffle(slices)
    return slices


def total(values: dict[str, Any]) -> int:
    return sum(v["a"] for v in values.values())


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_sigkill_during_heavy_persistence_leaves_whole_snapshots(tmp_path: Path, store: str) -> None:
    url = sqlite_url(tmp_path) if store == "sqlite" else file_url(tmp_path)
    workers = WorkerFactory(tmp_path, url)
    workers.env["RECOVERABLE_STATE_PERSIST_STATE_INTERVAL"] = "0.02"
    seed = int(os.environ.get("SIGKILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    default = Item().model_dump(mode="json")
    previous: dict[str, Any] = {}
    progressed = 0
    delays = kill_delays(rng)
    try:
        for round_, delay in enumerate(delays):
            backend = ("asyncio", "trio")[round_ % 2]
            worker = workers.start(
                backend,
                *("--states", str(STATES), "--batch", "40", "--pause", "0"),
                *("--note-size", "400", "--explicit", "20"),
            )
            worker.wait_for_line("READY")
            time.sleep(delay)
            assert worker.proc.poll() is None, f"seed {seed}: worker ended on its own: {worker.stderr()}"
            worker.proc.send_signal(signal.SIGKILL)
            assert worker.proc.wait(10) == -signal.SIGKILL
            worker.close()

            # The worker started from exactly what the previous round left in the store.
            start = workers.report("start")
            assert start == {key_of(i): previous.get(key_of(i), default) for i in range(STATES)}, seed

            stored = load_store(url)
            assert set(stored) <= set(start), seed
            for key, value in stored.items():
                item = Item.model_validate(value)
                assert is_whole(item), f"seed {seed}, round {round_}: torn record {key}: {value}"
                before = previous.get(key, default)["a"]
                assert item.a >= before, f"seed {seed}, round {round_}: {key} went back from {before}"
            if total(stored) > total(previous):
                progressed += 1
            previous = stored
    finally:
        workers.close()
    # Most kills hit a worker that had been writing (a kill before the first write is possible).
    assert progressed >= KILLS // 2, f"seed {seed}: only {progressed} of {KILLS} rounds stored anything"
    assert len(previous) == STATES
