"""Running the CLI and the test worker in subprocesses, and reading a storage back."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from recoverable_state.storage import KeyValueStore, StorageBackend, open_backend

WORKER = Path(__file__).resolve().parent / "cli_worker.py"

Records = dict[tuple[str, str], tuple[bytes, str]]
"""Every record of a storage: (store name, key) -> (exact bytes, content type)."""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECOVERABLE_STATE_")}
    env.update(extra)
    return env


class Cli:
    """Runs `recoverable-state` in a subprocess, in the test's directory."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd

    def __call__(
        self,
        *args: str,
        url: str | None,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the command with `--storage-url url` (None: no option) and return its result."""
        return subprocess.run(
            _command(args, url),
            cwd=self.cwd,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=60,
            env=_env(**(env or {})),
            check=False,
        )

    def raw(self, *args: str, url: str) -> bytes:
        """Run a command that must succeed and return its stdout as bytes."""
        done = subprocess.run(
            _command(args, url),
            cwd=self.cwd,
            capture_output=True,
            timeout=60,
            env=_env(),
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout

    def ok(self, *args: str, url: str, input: str | None = None) -> str:
        """Run a command that must succeed and return its stdout."""
        done = self(*args, url=url, input=input)
        assert done.returncode == 0, f"{args} exited {done.returncode}: {done.stderr}"
        assert "Traceback" not in done.stderr
        return done.stdout


def _command(args: tuple[str, ...], url: str | None) -> list[str]:
    head = [sys.executable, "-m", "recoverable_state.cli"]
    return [*head, "--storage-url", url, *args] if url is not None else [*head, *args]


def empty_storage(request: Any, kind: str, tmp_path: Path) -> str:
    """The URL of an empty storage of `kind` (sqlite, file, redis, postgresql) for this test."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/state.sqlite3"
    if kind == "file":
        return f"file://{tmp_path}/files"
    from servers import flush_postgres, flush_redis  # tests/ is on the path (conftest)

    server = request.getfixturevalue("redis_server" if kind == "redis" else "postgres_server")
    url = str(server.url)
    (flush_redis if kind == "redis" else flush_postgres)(url)
    return url


def run_worker(url: str, mode: str, cwd: Path) -> None:
    """Run tests/cli/cli_worker.py to the end (see its docstring for the modes)."""
    subprocess.run([sys.executable, str(WORKER), url, mode], cwd=cwd, env=_env(), check=True, timeout=60)


def run_async(fn: Callable[[StorageBackend], Any], url: str) -> Any:
    """Run `await fn(backend)` on a backend of `url`, closed afterwards."""

    async def main() -> Any:
        backend = open_backend(url)
        try:
            return await fn(backend)
        finally:
            await backend.aclose()

    return anyio.run(main)


def read_all(url: str) -> Records:
    """Every current record of a storage, as the library reads it."""

    async def collect(backend: StorageBackend) -> Records:
        found: Records = {}
        for info in await backend.list_stores():
            kvs = KeyValueStore(info, backend)
            for item in await kvs.list_keys():
                record = await kvs.get_record(item.key)
                assert record is not None
                found[(kvs.label, item.key)] = (record.value, record.content_type)
        return found

    result: Records = run_async(collect, url)
    return result
