"""SIGKILL at random points of a tick loop that writes deltas: the reload holds the last tick or the next.

A real worker process (delta_worker.py) ticks, persisting one big state as
deltas, and is SIGKILLed at a random moment; the test then loads the record with
the library in a fresh process-like state. Its value must be whole (its keys,
lines and count agree: no delta torn or half applied) and hold the last tick
whose persist returned, or the one after (written, not yet reported). Rounds
alternate asyncio and trio on one store, each resuming what the last left.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from recoverable_state import RecoverableState
from recoverable_state.storage import CHAIN_CONTENT_TYPE, KeyValueStore, open_backend

sys.path.insert(0, str(Path(__file__).parent))
from delta_worker import Ticks, whole

from servers import flush_postgres, flush_redis

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("delta_worker.py")
ROUNDS = 5  # alternating loops; each store has left a chain in one of them in every run seen


async def _load(url: str) -> tuple[Ticks, bool]:
    storage = open_backend(url)
    try:
        kvs = await KeyValueStore.open(name="ticks", storage=storage)

        async def factory() -> KeyValueStore:
            return kvs

        state = RecoverableState(
            default_state=Ticks,
            persist_state_key="ticks",
            persistence_enabled="explicit_only",
            persist_state_kvs_factory=factory,
        )
        value = (await state.initialize()).model_copy(deep=True)
        record = await kvs.get_record("ticks", chain=True)
        await state.teardown()
        return value, record is not None and record.content_type == CHAIN_CONTENT_TYPE
    finally:
        await storage.aclose()


def _round(url: str, backend: str, delay: float) -> tuple[int, int]:
    """Run a worker, kill it after `delay` seconds of ticking; (its start, its last reported tick)."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), url, backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        why = proc.stderr.read() if proc.stderr is not None and not first else ""
        assert first.startswith("START "), f"the worker failed: {first!r} {why}"
        start = int(first.split()[1])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        ticks = [int(line.split()[1]) for line in proc.stdout.read().splitlines() if line.startswith("TICK ")]
        return start, ticks[-1] if ticks else start
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(params=["sqlite", "file", "redis", "postgresql"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty store of each durable kind (the servers come from tests/conftest.py)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ticks.sqlite3"
    if request.param == "file":
        return f"file://{tmp_path}/ticks"
    url = str(request.getfixturevalue("redis_url" if request.param == "redis" else "postgres_url"))
    (flush_redis if request.param == "redis" else flush_postgres)(url)
    return url


def test_sigkill_in_a_tick_loop_leaves_the_last_tick_or_the_next(durable_url: str) -> None:
    seed = int(os.environ.get("SIGKILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    chains = 0
    for round_ in range(ROUNDS):
        start, reported = _round(durable_url, ("asyncio", "trio")[round_ % 2], 0.3 + rng.random() * 0.7)
        value, chained = anyio.run(_load, durable_url)
        chains += chained
        assert whole(value), f"seed {seed}, round {round_}: a torn value (n={value.n})"
        assert reported <= value.n <= reported + 1, f"seed {seed}, round {round_}: {value.n} vs {reported}"
        assert value.n >= start, f"seed {seed}: older than where the round started"
    assert chains, f"seed {seed}: no round left deltas behind (the test would not be about them)"
