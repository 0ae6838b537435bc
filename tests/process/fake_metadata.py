"""A cloud instance-metadata service on 127.0.0.1, for the preemption notice tests.

It answers like AWS IMDS (`PUT /latest/api/token`, `GET
/latest/meta-data/spot/instance-action`) and like GCP
(`GET /computeMetadata/v1/instance/preempted` with `Metadata-Flavor: Google`).
Tests flip `notice` to make a notice appear, and read `requests` to see what
the poller asked. The real metadata addresses are never contacted.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

AWS_PATH = "/latest/meta-data/spot/instance-action"
AWS_TOKEN_PATH = "/latest/api/token"
GCP_PATH = "/computeMetadata/v1/instance/preempted"
TOKEN = "fake-imdsv2-token"


class FakeMetadata:
    """What the fake service answers, and what it was asked (method, path, headers)."""

    def __init__(self) -> None:
        self.notice = False
        self.seconds_left = 120
        self.imdsv2: Literal["optional", "required", "unavailable"] = "optional"
        self.failures = 0  # answer this many notice polls with 500 first
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.port = 0

    @property
    def aws_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{AWS_PATH}"

    @property
    def gcp_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{GCP_PATH}"

    def polls(self, path: str) -> list[dict[str, str]]:
        """The headers of each GET of `path` so far."""
        with self.lock:
            return [h for m, p, h in self.requests if m == "GET" and p == path]

    def answer(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        with self.lock:
            self.requests.append((method, path, headers))
            if method == "GET" and path in (AWS_PATH, GCP_PATH) and self.failures > 0:
                self.failures -= 1
                return 500, "internal error"
        if method == "PUT" and path == AWS_TOKEN_PATH:
            if self.imdsv2 == "unavailable":
                return 403, "forbidden"
            if "x-aws-ec2-metadata-token-ttl-seconds" not in headers:
                return 400, "missing ttl"
            return 200, TOKEN
        if method == "GET" and path == AWS_PATH:
            token = headers.get("x-aws-ec2-metadata-token")
            if token is not None and token != TOKEN:
                return 401, "bad token"
            if self.imdsv2 == "required" and token is None:
                return 401, "token required"
            if not self.notice:
                return 404, "not found"
            when = datetime.now(UTC) + timedelta(seconds=self.seconds_left)
            return 200, json.dumps({"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
        if method == "GET" and path == GCP_PATH:
            if headers.get("metadata-flavor") != "Google":
                return 403, "missing Metadata-Flavor: Google"
            return 200, "TRUE" if self.notice else "FALSE"
        return 404, "not found"


@contextmanager
def serve_metadata() -> Iterator[FakeMetadata]:
    """Run a FakeMetadata on a free port of 127.0.0.1 while the block runs."""
    fake = FakeMetadata()

    class Handler(BaseHTTPRequestHandler):
        def _respond(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, body = fake.answer(self.command, self.path, headers)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = _respond  # the names http.server looks for

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
