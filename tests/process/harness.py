"""Helpers of the process tests: start worker.py for real, read its reports and its store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from recoverable_state import KeyValueStore, open_backend

WORKER = Path(__file__).with_name("worker.py")
BACKENDS = ["asyncio", "trio"]
SHUTDOWN_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
"""The signals whose handling the tests check: each worker starts with them at their defaults."""


def signal_dispositions(ignored: tuple[signal.Signals, ...] = ()) -> Any:
    """A preexec_fn that sets the shutdown signals to their defaults in the child, but `ignored`.

    A child inherits ignored signals through exec: under `nohup` (SIGHUP
    ignored) or a shell that ignores SIGINT for background jobs, a worker would
    not start as it does under a supervisor, and the tests of those signals
    would test the runner's environment instead of the library.
    """

    def reset() -> None:  # runs in the child between fork and exec: signal.signal takes no lock
        for signum in SHUTDOWN_SIGNALS:
            signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)

    return reset


class Worker:
    """worker.py in a subprocess: its stdout lines are collected as they come."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: Path,
        log: Path,
        *,
        ignored_signals: tuple[signal.Signals, ...] = (),
    ) -> None:
        self.log_path = log
        # The worker's stderr (the library's log lines), kept for a failure's report; closed in close().
        self._log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            preexec_fn=signal_dispositions(ignored_signals),
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.strip())
                self._changed.notify_all()

    def wait_for_line(self, line: str, timeout: float = 20.0) -> None:
        """Wait until the worker prints `line`; fail (with its log) if it does not."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while line not in self.lines:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    pytest.fail(
                        f"worker did not print {line!r} (exit {self.proc.poll()}); "
                        f"stdout {self.lines[-5:]}; stderr:\n{self.stderr()[-3000:]}"
                    )
                self._changed.wait(min(left, 0.1))

    def signal(self, signum: int) -> float:
        """Send `signum`; return when it was sent (time.monotonic())."""
        sent = time.monotonic()
        self.proc.send_signal(signum)
        return sent

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"worker still running after {timeout} s; stderr:\n{self.stderr()[-3000:]}")

    def stderr(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        self._log.close()


class WorkerFactory:
    """Starts workers that share one store and report directory under tmp_path."""

    def __init__(self, tmp_path: Path, storage_url: str) -> None:
        self.tmp_path = tmp_path
        self.storage_url = storage_url
        self.report_dir = tmp_path / "reports"
        self.report_dir.mkdir(exist_ok=True)
        self.env: dict[str, str] = {
            k: v for k, v in os.environ.items() if not k.startswith("RECOVERABLE_STATE_")
        }
        self.env.update(
            RECOVERABLE_STATE_STORAGE_URL=storage_url,
            RECOVERABLE_STATE_PERSIST_STATE_INTERVAL="0.2",
            RECOVERABLE_STATE_SHUTDOWN_TIMEOUT="10",
            PYTHONUNBUFFERED="1",
        )
        self.started: list[Worker] = []

    def start(
        self, backend: str, *args: str, ignored_signals: tuple[signal.Signals, ...] = (), **env: str
    ) -> Worker:
        """Start worker.py; the shutdown signals at their defaults in it, but `ignored_signals`."""
        (self.report_dir / "final.json").unlink(missing_ok=True)
        worker = Worker(
            ["--backend", backend, "--report-dir", str(self.report_dir), *args],
            {**self.env, **env},
            self.tmp_path,
            self.tmp_path / f"worker-{len(self.started)}.log",
            ignored_signals=ignored_signals,
        )
        self.started.append(worker)
        return worker

    def report(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.report_dir / f"{name}.json").read_text())
        return data

    def stored(self) -> dict[str, Any]:
        return load_store(self.storage_url)

    def close(self) -> None:
        for worker in self.started:
            worker.close()


def load_store(storage_url: str) -> dict[str, Any]:
    """Every record of the default store, decoded, read with the library."""

    async def load() -> dict[str, Any]:
        backend = open_backend(storage_url)
        try:
            kvs = await KeyValueStore.open(storage=backend)
            return {info.key: await kvs.get_value(info.key) for info in await kvs.list_keys()}
        finally:
            await backend.aclose()

    return anyio.run(load)


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.sqlite3'}"


def file_url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'files'}"
