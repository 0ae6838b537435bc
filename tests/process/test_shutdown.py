"""SIGTERM and SIGINT sent to a real worker process: every state is stored, then it exits.

Each test drives worker.py (500 RecoverableStates changed without pause, on a
SQLite store in tmp_path) through `recoverable_state.run`, on asyncio and trio.
The worker writes the values it ends with once its work is cancelled; after the
exit the store must hold exactly those values, and a restarted worker must
start from them.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
from harness import BACKENDS, WorkerFactory

from recoverable_state.events import EXIT_NOT_PERSISTED

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", BACKENDS)]

TIMEOUT = 10.0  # RECOVERABLE_STATE_SHUTDOWN_TIMEOUT the workers get unless a test says otherwise


def total(values: dict[str, Any]) -> int:
    return sum(v["a"] for v in values.values())


def run_and_stop(
    workers: WorkerFactory, backend: str, signum: int, *args: str
) -> tuple[int, float, dict[str, Any], dict[str, Any]]:
    """Start a worker, let it work, signal it: (exit code, seconds to exit, start and final report)."""
    worker = workers.start(backend, "--states", "500", *args)
    worker.wait_for_line("READY")
    start = workers.report("start")
    time.sleep(0.6)  # a few timer persists (every 0.2 s) while the states keep changing
    assert worker.proc.poll() is None, worker.stderr()
    sent = worker.signal(signum)
    code = worker.wait(TIMEOUT + 10)
    return code, time.monotonic() - sent, start, workers.report("final")


@pytest.mark.parametrize(
    ("signum", "code"),
    [pytest.param(signal.SIGTERM, 143, id="SIGTERM"), pytest.param(signal.SIGINT, 130, id="SIGINT")],
)
def test_a_signal_persists_every_state_then_a_restart_resumes_from_it(
    workers: WorkerFactory, backend: str, signum: int, code: int
) -> None:
    exit_code, elapsed, start, final = run_and_stop(workers, backend, signum)
    assert exit_code == code
    assert elapsed < TIMEOUT
    assert len(final) == 500
    assert total(final) > total(start)  # the worker did change its states
    assert workers.stored() == final

    # Restarted, it loads exactly what the first run ended with, and goes on from there.
    exit_code, elapsed, start_again, final_again = run_and_stop(workers, backend, signum)
    assert start_again == final
    assert exit_code == code
    assert elapsed < TIMEOUT
    assert workers.stored() == final_again
    assert all(final_again[k]["a"] >= final[k]["a"] for k in final)
    assert total(final_again) > total(final)


def test_a_second_sigint_during_a_slow_persist_ends_the_process_at_once(
    workers: WorkerFactory, backend: str
) -> None:
    worker = workers.start(backend, "--states", "50", "--slow-persist", "60")
    worker.wait_for_line("READY")
    worker.signal(signal.SIGINT)
    worker.wait_for_line("SLOW-PERSIST")
    time.sleep(0.2)
    assert worker.proc.poll() is None  # still persisting: the first SIGINT waits for the listener
    sent = worker.signal(signal.SIGINT)
    assert worker.wait(5) == 130
    assert time.monotonic() - sent < 2.0
    assert "SLOW-PERSIST-DONE" not in worker.lines


def test_a_second_sigterm_is_ignored_and_the_persist_completes(workers: WorkerFactory, backend: str) -> None:
    worker = workers.start(backend, "--states", "500", "--slow-persist", "1.5")
    worker.wait_for_line("READY")
    time.sleep(0.3)
    first = worker.signal(signal.SIGTERM)
    worker.wait_for_line("SLOW-PERSIST")
    worker.signal(signal.SIGTERM)
    time.sleep(0.3)
    assert worker.proc.poll() is None  # not killed by the second SIGTERM
    assert worker.wait(TIMEOUT + 5) == 143
    assert 1.5 <= time.monotonic() - first < TIMEOUT
    assert "SLOW-PERSIST-DONE" in worker.lines
    assert workers.stored() == workers.report("final")
    assert "SIGTERM received again" in worker.stderr()


@pytest.mark.parametrize("hang", ["async", "sync"])
def test_a_listener_hanging_past_the_timeout_does_not_keep_the_process_alive(
    workers: WorkerFactory, backend: str, hang: str
) -> None:
    shutdown_timeout = 1.0
    worker = workers.start(
        backend, "--states", "500", "--hang", hang, RECOVERABLE_STATE_SHUTDOWN_TIMEOUT=str(shutdown_timeout)
    )
    worker.wait_for_line("READY")
    time.sleep(0.3)
    sent = worker.signal(signal.SIGTERM)
    worker.wait_for_line("HANG")
    # A PERSIST_STATE listener did not finish: not every state is known to be saved.
    assert worker.wait(shutdown_timeout + 10) == EXIT_NOT_PERSISTED
    elapsed = time.monotonic() - sent
    # It waited for the listener until the timeout, and was gone a few seconds after it.
    assert shutdown_timeout * 0.9 <= elapsed < shutdown_timeout + 5.0
    log = worker.stderr()
    assert f"hang_{hang}" in log
    assert "did not finish" in log
    assert "not every state was persisted" in log
    # The states themselves were persisted all the same (their listener finished).
    assert workers.stored() == workers.report("final")


def test_work_that_ignores_the_cancellation_is_ended_by_the_watchdog(
    workers: WorkerFactory, backend: str
) -> None:
    shutdown_timeout = 0.5
    worker = workers.start(
        backend, "--states", "100", "--stuck-body", RECOVERABLE_STATE_SHUTDOWN_TIMEOUT=str(shutdown_timeout)
    )
    worker.wait_for_line("READY")
    time.sleep(0.4)
    sent = worker.signal(signal.SIGTERM)
    worker.wait_for_line("STUCK")
    assert worker.wait(shutdown_timeout + 10) == EXIT_NOT_PERSISTED
    # Ended by the watchdog 2 s after the timeout: the last persist never ran...
    assert shutdown_timeout + 1.5 <= time.monotonic() - sent < shutdown_timeout + 5.0
    assert "did not finish in time" in worker.stderr()
    # ...but the timer went on persisting (every 0.2 s) while the work was stuck.
    assert workers.stored() == workers.report("final")
