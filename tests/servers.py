"""Throwaway Redis and PostgreSQL servers on loopback, for tests and benchmarks.

Each server lives in its own directory on a free port and can be killed and
started again on the same port and data directory (to test crash recovery).
Outside pytest, `running_servers()` starts both and yields their URLs:

    with running_servers() as (redis_url, postgres_url):
        ...

PostgreSQL refuses to run as root, so as root `initdb` and `postgres` run as
the `postgres` user (the data directory is handed to that user).

The servers past one machine (a Redis Cluster, a PostgreSQL primary with a
streaming standby, PgBouncer) are in `fleet_servers.py` beside this file.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

PG_BIN = Path(os.environ.get("RECOVERABLE_STATE_PG_BIN", "/usr/lib/postgresql/15/bin"))
"""Where `initdb` and `postgres` are (PostgreSQL 15 on Debian by default)."""

PG_DATABASE = "rs_test"

REJECTED_ROLE = "rejected"
"""A role that pg_hba.conf refuses, on a PostgresServer started with a password."""


class ServerUnavailable(RuntimeError):
    """A server binary is missing; the message says how to install it."""


class Server(Protocol):
    """What `start_or_skip` needs of a server: a port (or `ports`), start and stop."""

    port: int

    def start(self) -> None: ...

    def stop(self) -> None: ...


TServer = TypeVar("TServer", bound=Server)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))  # held until all are picked, so no port comes twice
            ports.append(int(sock.getsockname()[1]))
        return ports


def postgres_user() -> pwd.struct_passwd | None:
    """The user PostgreSQL's programs (and PgBouncer) run as: `postgres` as root, else None (us).

    Raises ServerUnavailable as root when there is no `postgres` user.
    """
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServerUnavailable(
            "PostgreSQL refuses to run as root and there is no `postgres` user; "
            "create one (`useradd postgres`) or run the tests as another user"
        ) from None


def popen_as(
    user: pwd.struct_passwd | None, args: list[str], cwd: Path, **kwargs: object
) -> subprocess.Popen[bytes]:
    """Start `args` as `user` (None: as we are), in a C.UTF-8 locale."""
    extra: dict[str, object] = {}
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    if user is not None:
        extra = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        env["HOME"] = user.pw_dir
    return subprocess.Popen(args, env=env, cwd=cwd, **extra, **kwargs)  # type: ignore[call-overload,no-any-return]


def give_to(user: pwd.struct_passwd | None, path: Path) -> None:
    """Hand `path` to `user` (nothing to do when None: it is ours)."""
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 10.0) -> None:
    """Send `sig` to the process group of `proc` and wait until it is gone."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class RedisServer:
    """A `redis-server` with an append-only file in its own directory.

    With `password`, the server requires it (`requirepass`) and `url` carries it.
    """

    def __init__(self, directory: Path, port: int | None = None, *, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerUnavailable(
                "redis-server is not on PATH; install it with `apt-get install -y redis-server`"
            )
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        """Start the server (again, on the same port and data) and wait until it listens."""
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the child owns it
        with log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    # Acknowledged means on disk: with "everysec" Redis may postpone
                    # its AOF writes, and a killed server loses acknowledged writes.
                    "--appendfsync",
                    "always",
                    # A primary waits 5 s (by default) for more replicas before it sends a full
                    # copy: the replication tests would wait that long at every resync.
                    "--repl-diskless-sync-delay",
                    "0",
                    "--dir",
                    str(self.directory),
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "no",
                    *(["--requirepass", self.password] if self.password else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for_port(self.port, self.proc, "redis-server", timeout)
        # The port opens before the AOF is loaded; wait until commands are served.
        deadline = time.monotonic() + timeout
        while not self._ping().endswith(b"+PONG"):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.02)

    def _ping(self) -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                auth = f"AUTH {self.password}\r\n".encode() if self.password else b""
                sock.sendall(auth + b"PING\r\n")
                reply = b""
                while reply.count(b"\r\n") < (2 if auth else 1):
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    reply += chunk
                return reply.strip()
        except OSError:
            return b""

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        """Shut the server down."""
        _stop(self.proc, signal.SIGTERM)


class PostgresServer:
    """A PostgreSQL 15 cluster in its own directory, trusting loopback connections.

    With `password`, TCP connections need it instead (scram-sha-256; `url` carries
    it), and pg_hba.conf refuses the role `rejected` outright (`REJECTED_ROLE`).
    The Unix socket stays trusted, for the tests' own setup. `settings` are more
    server settings (`-c name=value`), e.g. `{"wal_receiver_status_interval": "1"}`.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        password: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        for tool in ("initdb", "postgres"):
            if not (PG_BIN / tool).exists():
                raise ServerUnavailable(
                    f"{PG_BIN / tool} is missing; install PostgreSQL 15 with "
                    "`apt-get install -y postgresql-15` (or set RECOVERABLE_STATE_PG_BIN)"
                )
        self.directory = directory
        self.data = directory / "data"
        self.sockets = directory / "sockets"
        self.port = port or free_port()
        self.password = password
        self.settings = dict(settings or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._user = postgres_user()

    @property
    def url(self) -> str:
        return self._dsn(PG_DATABASE)

    def _popen(self, args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return popen_as(self._user, args, self.directory, **kwargs)

    def _give_to_user(self, path: Path) -> None:
        give_to(self._user, path)

    def init(self) -> None:
        """Create the cluster (initdb with trust auth) unless it exists."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._give_to_user(self.directory)
        self.sockets.mkdir(exist_ok=True)
        self._give_to_user(self.sockets)
        if (self.data / "PG_VERSION").exists():
            return
        auth = ["--auth=trust"]
        if self.password:
            pwfile = self.directory / "pwfile"
            pwfile.write_text(self.password + "\n")
            self._give_to_user(pwfile)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        proc = self._popen(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                *auth,
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{out.decode(errors='replace')}")
        if self.password:
            hba = self.data / "pg_hba.conf"
            hba.write_text(f"host all {REJECTED_ROLE} 127.0.0.1/32 reject\n" + hba.read_text())

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (again, on the same port and data) and wait until it serves."""
        self.init()
        log = open(self.directory / "postgres.log", "ab")  # noqa: SIM115 - the child owns it
        with log:
            self.proc = self._popen(
                [
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.sockets),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "shared_buffers=64MB",
                    *(arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}")),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready(timeout)
        self._create_database()

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        assert self.proc is not None
        _wait_for_port(self.port, self.proc, "postgres", timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self._dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                # "the database system is starting up" while crash recovery runs
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def _dsn(self, database: str) -> str:
        auth = f"postgres:{self.password}" if self.password else "postgres"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone()
            if found is None:
                conn.execute(f"CREATE DATABASE {PG_DATABASE}")

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children at once, as a crash of the host would.

        PostgreSQL's children run in their own sessions, so killing the process group
        alone would leave backends serving open connections for a moment.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        children = _children(self.proc.pid)
        for pid in [self.proc.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        """Shut the server down fast (SIGINT: abort transactions, checkpoint, exit)."""
        _stop(self.proc, signal.SIGINT, timeout=30.0)


def start_or_skip(make: Callable[[], TServer], attempts: int = 3) -> TServer:
    """Build and start a server in a test; skip it (fail under CI) when a binary is missing.

    A free port can be taken by another process (another pytest-xdist worker starting
    its servers) before the server binds it: then the server is built again, on a
    port `make` picks anew, up to `attempts` times (a server with several ports
    lists them all in `ports`).
    """
    import pytest

    for attempt in range(attempts):
        try:
            server = make()
        except ServerUnavailable as exc:
            if os.environ.get("CI"):
                pytest.fail(f"{exc} (CI is set, so this is a failure, not a skip)")
            pytest.skip(str(exc))
        try:
            server.start()
        except RuntimeError:
            server.stop()
            ports = getattr(server, "ports", [server.port])
            if attempt == attempts - 1 or all(_port_is_free(port) for port in ports):
                raise
            continue
        return server
    raise AssertionError("unreachable")


def _port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port` (so a failed start was not a port clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def flush_redis(url: str) -> None:
    """Empty a Redis database, so that a test starts from nothing."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def flush_postgres(url: str) -> None:
    """Drop the PostgreSQL backend's tables, so that a test starts from nothing."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS recoverable_state CASCADE")


@contextlib.contextmanager
def _started(make: Callable[[Path], TServer], directory: Path) -> Iterator[TServer]:
    """A running server made in `directory`, stopped on exit."""
    server = make(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_servers(directory: Path | None = None) -> Iterator[tuple[str, str]]:
    """Start Redis and PostgreSQL on free loopback ports; yield `(redis_url, postgres_url)`."""
    with (
        _directory(directory, "rs-servers-") as path,
        _started(RedisServer, path / "redis") as redis,
        _started(PostgresServer, path / "postgres") as postgres,
    ):
        yield redis.url, postgres.url


@contextlib.contextmanager
def _directory(directory: Path | None, prefix: str) -> Iterator[Path]:
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)  # the postgres user must reach its data directory inside
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Also when started in the background, where SIGINT may be ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    with running_servers() as (redis_url, postgres_url):
        print(f"RECOVERABLE_STATE_STORAGE_URL={redis_url}")
        print(f"RECOVERABLE_STATE_STORAGE_URL={postgres_url}", flush=True)
        print("Ctrl-C (or SIGTERM) stops both servers.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
