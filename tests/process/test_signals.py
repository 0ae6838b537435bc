"""Shutdown that always ends: starved loops, SIGHUP, mixed signals, nesting, stuck stores.

Each test drives worker.py in a real subprocess with real signals, on asyncio
and trio, on a SQLite store in tmp_path.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from harness import BACKENDS, WorkerFactory

from recoverable_state.events import EXIT_NOT_PERSISTED

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", BACKENDS)]

GRACE = 2.0  # the documented grace past the shutdown timeout
SLACK = 3.0  # interpreter start-up and a loaded machine


@pytest.mark.parametrize(
    ("signum", "code"),
    [pytest.param(signal.SIGTERM, 143, id="SIGTERM"), pytest.param(signal.SIGINT, 130, id="SIGINT")],
)
def test_a_worker_whose_loop_never_yields_is_interrupted_persists_and_exits(
    workers: WorkerFactory, backend: str, signum: int, code: int
) -> None:
    timeout = 3.0
    worker = workers.start(
        backend, "--states", "50", "--busy", RECOVERABLE_STATE_SHUTDOWN_TIMEOUT=str(timeout)
    )
    worker.wait_for_line("READY")
    time.sleep(0.5)
    sent = worker.signal(signum)
    assert worker.wait(timeout + GRACE + SLACK) == code
    assert time.monotonic() - sent < timeout + GRACE + 1.0
    log = worker.stderr()
    assert "did not yield" in log
    # What the interrupted work ended with is what the store holds.
    final = workers.report("final")
    assert sum(v["a"] for v in final.values()) > 0
    assert workers.stored() == final


def test_sighup_persists_every_state_and_exits_129(workers: WorkerFactory, backend: str) -> None:
    worker = workers.start(backend, "--states", "200")
    worker.wait_for_line("READY")
    time.sleep(0.4)
    worker.signal(signal.SIGHUP)
    assert worker.wait(15) == 129
    assert workers.stored() == workers.report("final")


def test_sighup_handling_can_be_turned_off(workers: WorkerFactory, backend: str) -> None:
    worker = workers.start(backend, "--states", "20", "--no-sighup")
    worker.wait_for_line("READY")
    worker.signal(signal.SIGHUP)
    assert worker.wait(15) == -signal.SIGHUP


def test_one_sigint_after_sigterm_does_not_cut_a_slow_persist_short(
    workers: WorkerFactory, backend: str
) -> None:
    worker = workers.start(backend, "--states", "200", "--slow-persist", "1.5")
    worker.wait_for_line("READY")
    time.sleep(0.3)
    worker.signal(signal.SIGTERM)
    worker.wait_for_line("SLOW-PERSIST")
    worker.signal(signal.SIGINT)
    time.sleep(0.3)
    assert worker.proc.poll() is None
    assert worker.wait(15) == 143
    assert "SLOW-PERSIST-DONE" in worker.lines
    assert workers.stored() == workers.report("final")
    assert "press Ctrl-C again" in worker.stderr()


def test_sigterm_then_two_sigints_exits_at_once(workers: WorkerFactory, backend: str) -> None:
    worker = workers.start(backend, "--states", "50", "--slow-persist", "60")
    worker.wait_for_line("READY")
    worker.signal(signal.SIGTERM)
    worker.wait_for_line("SLOW-PERSIST")
    worker.signal(signal.SIGINT)
    time.sleep(0.3)
    assert worker.proc.poll() is None
    sent = worker.signal(signal.SIGINT)
    assert worker.wait(5) == 130
    assert time.monotonic() - sent < 2.0


def test_leaving_a_nested_signal_handling_manager_keeps_the_outer_handler(
    workers: WorkerFactory, backend: str
) -> None:
    worker = workers.start(backend, "--states", "200", "--nested-signals")
    worker.wait_for_line("READY")
    time.sleep(0.4)
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 143
    assert workers.stored() == workers.report("final")


def test_run_ends_within_the_timeout_when_a_sync_listener_hangs_in_the_last_persist(
    workers: WorkerFactory, backend: str
) -> None:
    timeout = 1.0
    worker = workers.start(
        backend,
        "--states",
        "50",
        "--return-after",
        "0.3",
        "--hang-on-exit",
        RECOVERABLE_STATE_SHUTDOWN_TIMEOUT=str(timeout),
    )
    worker.wait_for_line("RETURN")
    returned = time.monotonic()
    assert worker.wait(timeout + GRACE + SLACK + 5) == EXIT_NOT_PERSISTED
    assert time.monotonic() - returned < timeout + GRACE + SLACK
    log = worker.stderr()
    assert "hang_on_exit" in log and "not every state was persisted" in log
    assert workers.stored() == workers.report("final")  # the states' own listener did finish


def test_run_ends_within_the_timeout_when_the_store_is_locked(
    workers: WorkerFactory, backend: str, tmp_path: Path
) -> None:
    timeout = 1.0
    worker = workers.start(
        backend, "--states", "50", "--return-after", "1.0", RECOVERABLE_STATE_SHUTDOWN_TIMEOUT=str(timeout)
    )
    worker.wait_for_line("READY")
    lock = sqlite3.connect(tmp_path / "state.sqlite3", isolation_level=None, timeout=10)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the file: every write waits 30 s
    try:
        worker.wait_for_line("RETURN")
        returned = time.monotonic()
        assert worker.wait(timeout + GRACE + SLACK + 30) == EXIT_NOT_PERSISTED
        assert time.monotonic() - returned < timeout + GRACE + SLACK
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    log = worker.stderr()
    assert "not every state" in log
    # The states that were not saved are named by store and key, however the persist ended.
    named = r"not persisted.*store 'default', key '[^']+'|store 'default', key '[^']+': not persisted"
    assert re.search(named, log), log


def test_ticks_coalesce_while_the_store_is_locked_and_sigterm_still_saves(
    workers: WorkerFactory, backend: str, tmp_path: Path
) -> None:
    worker = workers.start(backend, "--states", "500", RECOVERABLE_STATE_PERSIST_STATE_INTERVAL="0.02")
    worker.wait_for_line("READY")
    time.sleep(0.3)
    lock = sqlite3.connect(tmp_path / "state.sqlite3", isolation_level=None, timeout=10)
    lock.execute("BEGIN EXCLUSIVE")
    time.sleep(2.0)  # a hundred ticks while the store stalls
    lock.execute("ROLLBACK")
    lock.close()
    time.sleep(0.3)
    worker.signal(signal.SIGTERM)
    assert worker.wait(20) == 143
    log = worker.stderr()
    assert log.count("timer ticks are coalesced") == 1
    assert workers.stored() == workers.report("final")


def test_run_ends_within_the_timeout_when_a_postgresql_write_waits_on_a_lock(
    backend: str, tmp_path: Path, postgres_url: str
) -> None:
    import psycopg

    from servers import flush_postgres

    flush_postgres(postgres_url)
    factory = WorkerFactory(tmp_path, postgres_url)
    timeout = 1.0
    try:
        worker = factory.start(
            backend,
            "--states",
            "50",
            "--return-after",
            "1.0",
            RECOVERABLE_STATE_SHUTDOWN_TIMEOUT=str(timeout),
        )
        worker.wait_for_line("READY")
        with psycopg.connect(postgres_url) as lock:
            # Every write of the worker now waits on this transaction's lock.
            lock.execute("LOCK TABLE recoverable_state.records IN ACCESS EXCLUSIVE MODE")
            worker.wait_for_line("RETURN")
            returned = time.monotonic()
            assert worker.wait(timeout + GRACE + SLACK + 40) == EXIT_NOT_PERSISTED
            assert time.monotonic() - returned < timeout + GRACE + SLACK
            lock.rollback()
        assert "not every state" in worker.stderr()
    finally:
        factory.close()
        flush_postgres(postgres_url)
