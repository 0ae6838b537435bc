"""A worker started with SIGHUP ignored (under `nohup`) keeps it ignored: hanging up must not stop it.

`nohup` means "ignore hangups"; a library that installs its own SIGHUP handler
over that disposition turns a closed terminal into a shutdown. These tests use
the process harness (real workers, real signals), which starts each worker with
the signals it is told to ignore and the others at their defaults.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "process"))

from harness import BACKENDS, WorkerFactory, sqlite_url

pytestmark = pytest.mark.slow

NEEDS_THE_RUNNERS_CHANGE = (
    "the library installs its SIGHUP handler even when SIGHUP was ignored at start (nohup); "
    "the signal sources must leave an ignored SIGHUP ignored (see the Crawlee-users report, item 3)"
)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkerFactory]:
    factory = WorkerFactory(tmp_path, sqlite_url(tmp_path))
    yield factory
    factory.close()


def test_a_worker_started_under_nohup_ignores_sighup(workers: WorkerFactory, backend: str) -> None:
    worker = workers.start(backend, "--states", "20", ignored_signals=(signal.SIGHUP,))
    worker.wait_for_line("READY")
    worker.signal(signal.SIGHUP)
    time.sleep(1.0)
    still_running = worker.proc.poll() is None
    worker.signal(signal.SIGTERM)  # a supervisor's stop still saves every state
    assert worker.wait(15) == 143
    assert workers.stored() == workers.report("final")
    assert still_running, "SIGHUP stopped a worker that was started with SIGHUP ignored"


def test_sigterm_still_saves_every_state_under_nohup(workers: WorkerFactory, backend: str) -> None:
    worker = workers.start(backend, "--states", "20", ignored_signals=(signal.SIGHUP,))
    worker.wait_for_line("READY")
    time.sleep(0.3)
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 143
    assert workers.stored() == workers.report("final")


def test_the_harness_starts_workers_with_the_shutdown_signals_at_their_defaults(
    workers: WorkerFactory, backend: str
) -> None:
    """Also when the test run itself ignores them (`nohup pytest`): SIGHUP with handling off kills."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves the test process
    try:
        worker = workers.start(backend, "--states", "20", "--no-sighup")
    finally:
        signal.signal(signal.SIGHUP, previous)
    worker.wait_for_line("READY")
    worker.signal(signal.SIGHUP)
    assert worker.wait(15) == -signal.SIGHUP
