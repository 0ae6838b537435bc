"""A real Crawlee crawl on CrawleeEventManager: SIGTERM saves both frameworks' states, a restart resumes both.

The crawl runs in a subprocess (crawl_worker.py) against an HTTP server this
test starts on loopback; the signal is a real SIGTERM. Crawlee runs on asyncio
only, so this runs on asyncio only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("crawlee")

PAGES = 300
WORKER = Path(__file__).with_name("crawl_worker.py")
pytestmark = pytest.mark.slow


class _Site(BaseHTTPRequestHandler):
    """Page i links to pages 2i+1 and 2i+2: every page is reachable from page 0, found only by crawling."""

    def do_GET(self) -> None:
        try:
            page = int(self.path.rsplit("/", 1)[1])
        except ValueError:
            page = -1
        if not 0 <= page < PAGES:
            self.send_error(404)
            return
        time.sleep(0.01)  # a crawl of a few seconds: SIGTERM lands in the middle of it
        base = f"http://{self.headers['Host']}/page"
        links = "".join(f'<a href="{base}/{n}">{n}</a>' for n in (2 * page + 1, 2 * page + 2) if n < PAGES)
        body = f"<html><body>{links}</body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Site)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/page/0"
    finally:
        server.shutdown()
        server.server_close()


class Crawl:
    """crawl_worker.py in a subprocess, its stdout lines collected as they come."""

    def __init__(self, start_url: str, cwd: Path, env: dict[str, str], *args: str) -> None:
        self.log = cwd / "crawl.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER), start_url, *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait_until(self, predicate: object, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail(f"crawl: exit {self.proc.poll()}, stdout {self.lines[-5:]}\n{self.stderr()}")
            time.sleep(0.02)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"crawl still running after {timeout} s\n{self.stderr()}")
        self._reader.join(5)
        return code

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def counted(self) -> list[str]:
        return [line.split()[2] for line in self.lines if line.startswith("counted ")]

    def handled(self) -> int:
        return sum(1 for line in self.lines if line.startswith(("counted ", "skipped ")))


def crawlee_statistics(storage: Path) -> dict[str, object]:
    """Crawlee's persisted statistics of the crawler, as its KeyValueStore holds them."""
    store = storage / "key_value_stores" / "default"
    records = [p for p in store.glob("__CRAWLER_STATISTICS_*") if not p.name.endswith("__metadata__.json")]
    assert len(records) == 1, records
    data: dict[str, object] = json.loads(records[0].read_text())
    return data


RUNNERS = [
    pytest.param((), id="manager-entered-by-the-worker"),
    pytest.param(("--under-run",), id="under-run"),
]


@pytest.mark.parametrize("runner", RUNNERS)
def test_sigterm_mid_crawl_saves_both_states_and_a_restart_resumes_both(
    tmp_path: Path, site: str, runner: tuple[str, ...]
) -> None:
    storage = tmp_path / "crawlee-storage"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECOVERABLE_STATE_", "CRAWLEE_"))}
    env.update(
        PYTHONUNBUFFERED="1",
        RECOVERABLE_STATE_STORAGE_URL=f"sqlite:///{tmp_path}/state.sqlite3",
        CRAWLEE_STORAGE_DIR=str(storage),
        CRAWLEE_PURGE_ON_START="0",  # ours is off by default; Crawlee's must be turned off to resume
        NO_PROXY="*",
    )

    first = Crawl(site, tmp_path, env, *runner)
    first.wait_until(lambda: len(first.counted()) >= 40, timeout=60)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(30) == 143, first.stderr()
    counted_first = first.counted()
    assert 40 <= len(counted_first) < PAGES, f"SIGTERM must land mid-crawl\n{first.stderr()}"
    stats_first = crawlee_statistics(storage)
    finished_first = int(stats_first["requestsFinished"])  # type: ignore[call-overload]
    # Saved by the last persist: every page whose handler finished, but those the signal cut off
    # before Crawlee marked them finished (at most the crawler's concurrency).
    assert len(counted_first) - 4 <= finished_first <= len(counted_first), (stats_first, first.stderr())

    second = Crawl(site, tmp_path, env, *runner)
    assert second.wait(120) == 0, second.stderr()
    assert f"resumed {len(counted_first)}" in second.lines, (second.lines[:3], second.stderr())
    assert second.lines[-1] == "done", second.stderr()
    counted_second = second.counted()
    assert not set(counted_first) & set(counted_second), "a page counted before the restart was counted again"
    assert len(counted_first) + len(counted_second) == PAGES
    assert len(set(counted_first) | set(counted_second)) == PAGES
    # Crawlee's statistics went on from what the first run saved.
    finished_second = int(crawlee_statistics(storage)["requestsFinished"])  # type: ignore[call-overload]
    assert finished_second == finished_first + second.handled()
