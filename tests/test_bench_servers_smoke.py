"""`benchmarks/persist.py --store ...`: a smoke run on each store, and its servers gone after Ctrl-C.

The benchmark starts its own PostgreSQL or Redis (`tests/servers.py`); these
check that each store's smoke run succeeds and reports its verdicts, and that
the server stops and its directory is removed when the run ends or is interrupted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import PG_BIN

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PERSIST = ROOT / "benchmarks" / "persist.py"
LISTENING = re.compile(r"server listening on 127\.0\.0\.1:(\d+)")
DIRECTORY = re.compile(r"on loopback in (\S+)")


def need(store: str) -> None:
    missing = {
        "postgres": not (PG_BIN / "postgres").exists(),
        "redis": shutil.which("redis-server") is None,
    }.get(store, False)
    if missing:
        message = f"no {store} server binary on this machine"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)")
        pytest.skip(message)


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_server_gone(stderr: str) -> None:
    port, directory = LISTENING.search(stderr), DIRECTORY.search(stderr)
    assert port is not None and directory is not None, stderr
    assert not listening(int(port.group(1))), "the benchmark's server still listens"
    assert not Path(directory.group(1)).exists(), "the benchmark's directory was left behind"


@pytest.mark.parametrize("store", ["sqlite", "postgres", "redis"])
def test_smoke_run_on_each_store(store: str) -> None:
    need(store)
    done = subprocess.run(
        [sys.executable, str(PERSIST), "--smoke", "--store", store],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout
    if store == "sqlite":
        assert "persist-all <= 1.3x raw" in done.stdout
        return
    raw = {"postgres": "raw psycopg", "redis": "raw redis-py"}[store]
    assert raw in done.stdout
    assert "CPU per state in the worker (us)" in done.stdout
    for target in ("persist-all <= 1.5x raw", "cold start <= 1.5x raw"):
        assert len(re.findall(re.escape(target), done.stdout)) == 2, done.stdout  # asyncio and trio
    assert_server_gone(done.stderr)


@pytest.mark.parametrize("store", ["postgres", "redis"])
def test_interrupt_stops_the_server(store: str) -> None:
    need(store)
    proc = subprocess.Popen(
        [sys.executable, str(PERSIST), "--store", store, "--n", "2000", "--repeat", "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    seen = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 90
        for line in proc.stderr:
            seen.append(line)
            if "rep 2/" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = "".join(seen) + rest
    assert any("rep 2/" in line for line in seen), stderr
    assert proc.returncode == 130, stderr
    assert_server_gone(stderr)
