"""Storage URL schemes come from entry points; a URL's query is checked when it is opened.

Third-party schemes are played by a distribution made in a temporary directory
(a `.dist-info` with an `entry_points.txt`), seen by a fresh interpreter whose
path holds it: exactly what `pip install` of a plug-in leaves behind.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from recoverable_state import StorageError
from recoverable_state.storage import (
    ENTRY_POINT_GROUP,
    KeyValueStore,
    MemoryBackend,
    SQLiteBackend,
    _registry,
    open_backend,
    registered_schemes,
)

OWN = {"memory", "sqlite", "file", "redis", "rediss", "postgresql", "postgres"}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "third_party_backend.py"


def run_python(code: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter, with `path` (if any) first on its module path."""
    env = {"PYTHONPATH": str(path)} if path is not None else {}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**_base_env(), **env},
        check=False,
    )


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def plug_in(directory: Path, entry_points_txt: str, modules: dict[str, str]) -> Path:
    """A distribution `plugin-1.0` installed in `directory`: its modules and its entry points."""
    info = directory / "plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points_txt))
    for name, source in modules.items():
        (directory / f"{name}.py").write_text(source)
    return directory


def test_this_package_registers_each_of_its_schemes_as_an_entry_point() -> None:
    declared = {point.name: point.value for point in entry_points(group=ENTRY_POINT_GROUP)}
    assert declared.keys() >= OWN
    assert {name: declared[name] for name in OWN} == {name: _registry._OWN[name] for name in OWN}
    assert set(registered_schemes()) >= OWN


def test_the_built_in_schemes_open_their_backends(tmp_path: Path) -> None:
    assert isinstance(open_backend("memory://"), MemoryBackend)
    assert isinstance(open_backend("MEMORY://"), MemoryBackend)  # schemes are case-blind
    sqlite = open_backend(f"sqlite:///{tmp_path}/a%3Fb.sqlite3")  # a `?` in a path is written %3F
    assert isinstance(sqlite, SQLiteBackend)
    assert sqlite.path == tmp_path / "a?b.sqlite3"


def test_an_unknown_scheme_names_the_registered_ones() -> None:
    with pytest.raises(StorageError) as caught:
        open_backend("s3://user:s3cret@bucket/prefix")
    message = str(caught.value)
    assert "'s3'" in message
    assert all(scheme in message for scheme in OWN)
    assert ENTRY_POINT_GROUP in message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    ("url", "parameter", "accepted"),
    [
        ("redis://127.0.0.1:6379/0?clusters=true", "clusters", "client_name"),
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/?db=1", "db", "client_name"),
        ("redis://:s3cret@127.0.0.1/0?socket_timeout=1&password=s3cret", "socket_timeout", "db"),
        ("rediss://127.0.0.1/0?clustr=1", "clustr", "ssl_ca_certs"),
        ("postgresql://me:s3cret@127.0.0.1/db?sslmode=require&pool=3", "pool", "sslmode"),
        ("postgres://127.0.0.1/db?connect_timeout=3", "connect_timeout", "application_name"),
        ("sqlite:///./state.sqlite3?timeout=5", "timeout", "none"),
        ("file:///tmp/stores?mode=0644", "mode", "none"),
        ("memory://?shared=1", "shared", "none"),
    ],
)
def test_an_unknown_query_parameter_fails_at_open_naming_it_and_the_accepted_ones(
    url: str, parameter: str, accepted: str
) -> None:
    with pytest.raises(StorageError) as caught:
        open_backend(url)
    message = str(caught.value)
    assert f"query parameter {parameter!r}" in message
    assert accepted in message.split("it accepts:", 1)[1]
    assert "s3cret" not in message
    assert "?" not in message.split("'")[1]  # the URL is shown without its query


@pytest.mark.anyio
async def test_accepted_query_parameters_reach_the_driver(redis_url: str, postgres_url: str) -> None:
    for url in (
        f"{redis_url}?client_name=rs-test&health_check_interval=5",
        f"{postgres_url}?application_name=rs-test",
    ):
        async with open_backend(url) as backend:
            kvs = await KeyValueStore.open(name="with-options", storage=backend)
            await kvs.set_value("k", 1)
            assert await kvs.get_value("k") == 1


def test_a_missing_driver_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for driver, module, extra in (("redis", "_redis", "redis"), ("psycopg", "_postgres", "postgres")):
        with monkeypatch.context() as patched:
            patched.setitem(sys.modules, driver, None)  # as if it were not installed
            patched.delitem(sys.modules, f"recoverable_state.storage.{module}", raising=False)
            with pytest.raises(StorageError, match=rf"pip install 'recoverable-state\[{extra}\]'") as caught:
                open_backend(f"{extra}://me:s3cret@127.0.0.1/0".replace("postgres://", "postgresql://"))
            assert "s3cret" not in str(caught.value)


def test_a_backend_module_is_imported_only_when_its_scheme_is_opened() -> None:
    done = run_python(
        """
        import sys
        from recoverable_state.storage import open_backend
        open_backend("sqlite:///./never-made.sqlite3")
        ours = "recoverable_state.storage."
        heavy = ["redis", "psycopg", ours + "_redis", ours + "_postgres"]
        assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]
        open_backend("redis://127.0.0.1:1/0")
        assert "recoverable_state.storage._redis" in sys.modules
        assert "recoverable_state.storage._postgres" not in sys.modules
        """
    )
    assert done.returncode == 0, done.stderr


def test_a_scheme_a_plug_in_registers_is_opened_through_its_entry_point(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "third_party_backend.py")
    plug_in(
        tmp_path, "[recoverable_state.backends]\nsnapshotfile = third_party_backend:open_snapshot_file\n", {}
    )
    done = run_python(
        f"""
        import anyio
        from recoverable_state.storage import KeyValueStore, open_backend, registered_schemes

        assert "snapshotfile" in registered_schemes()

        async def main() -> None:
            async with open_backend("snapshotfile://{tmp_path}/state.db") as backend:
                kvs = await KeyValueStore.open(name="jobs", storage=backend)
                await kvs.set_value("k", {{"page": 3}})
            async with open_backend("snapshotfile://{tmp_path}/state.db") as again:
                kvs = await KeyValueStore.open(name="jobs", storage=again)
                assert await kvs.get_value("k") == {{"page": 3}}
            print(type(again).__name__)

        anyio.run(main)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SnapshotFileBackend"


def test_a_plug_in_that_cannot_be_loaded_is_named(tmp_path: Path) -> None:
    plug_in(
        tmp_path,
        """
        [recoverable_state.backends]
        broken = broken_backend:open_broken
        sqlite = broken_backend:open_broken
        """,
        {"broken_backend": "raise ImportError('its driver is missing')\n"},
    )
    done = run_python(
        """
        from recoverable_state import StorageError
        from recoverable_state.storage import SQLiteBackend, open_backend
        assert isinstance(open_backend("sqlite:///./x.sqlite3"), SQLiteBackend)  # ours wins a clash
        try:
            open_backend("broken://somewhere")
        except StorageError as exc:
            print(exc)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "plugin" in done.stdout
    assert "its driver is missing" in done.stdout
    assert "'sqlite' registered by plugin is ignored" in done.stderr


def test_entry_points_are_read_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = _registry.entry_points

    def counting(*, group: str) -> object:
        calls.append(group)
        return real(group=group)

    monkeypatch.setattr(_registry, "entry_points", counting)
    _registry._registry.cache_clear()
    _registry._factory.cache_clear()
    try:
        for _ in range(3):
            open_backend("memory://")
        registered_schemes()
        assert calls == [ENTRY_POINT_GROUP]
    finally:
        _registry._registry.cache_clear()
        _registry._factory.cache_clear()


# -- what importing the package pulls in -----------------------------------------------

BLOCK_TEST_TOOLS = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pytest", "hypothesis", "_pytest"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocked())
"""


def test_importing_the_package_never_imports_pytest_or_hypothesis() -> None:
    done = run_python(
        """
        import sys
        import recoverable_state, recoverable_state.storage, recoverable_state.testing
        loaded = [m for m in ("pytest", "hypothesis") if m in sys.modules]
        assert not loaded, loaded
        """
    )
    assert done.returncode == 0, done.stderr


def test_the_testing_package_imports_without_pytest_and_hypothesis() -> None:
    done = run_python(
        BLOCK_TEST_TOOLS
        + """
from recoverable_state.testing import FaultInjectingBackend
from recoverable_state.storage import MemoryBackend
FaultInjectingBackend(MemoryBackend())
try:
    from recoverable_state.testing import BackendConformance
except ModuleNotFoundError as exc:
    print("conformance needs", exc.name)
"""
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("conformance needs pytest", "conformance needs hypothesis")
