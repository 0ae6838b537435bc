"""The last gaps with Crawlee, closed: written as a Crawlee user would write them.

`use_state(default)` in Crawlee's form, `KeyValueStore.persist_autosaved_values()`,
the service locator's conflicts in Crawlee's words, and a worker ported as it is
(`service_locator.get_event_manager()` entered under `asyncio.run`): SIGTERM
saves every state and exits 143, SIGINT exits 130 without a traceback. On asyncio
and trio where a loop runs; the ported worker with real signals.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from recoverable_state import (
    Configuration,
    EventManager,
    KeyValueStore,
    ServiceConflictError,
    service_locator,
    use_state,
)
from recoverable_state.state import CRAWLEE_STATE_KEY
from recoverable_state.storage import MemoryBackend


@pytest.mark.anyio
async def test_use_state_takes_crawlees_call_and_its_default_key(memory_storage: MemoryBackend) -> None:
    async with EventManager() as manager:
        service_locator.set_event_manager(manager)
        state = await use_state({"runs": 0})  # Crawlee's call: the default, no key
        assert state == {"runs": 0}
        state["runs"] += 1
        assert await use_state({"runs": 0}) is state
        assert await use_state(CRAWLEE_STATE_KEY) is state  # the same record under its key
        with pytest.raises(TypeError, match="default once"):
            await use_state({"runs": 0}, {"runs": 1})
    assert await (await KeyValueStore.open()).get_value("CRAWLEE_STATE") == {"runs": 1}


@pytest.mark.anyio
async def test_persist_autosaved_values_saves_them_now(memory_storage: MemoryBackend) -> None:
    async with EventManager(persist_state_interval=3600) as manager:
        service_locator.set_event_manager(manager)
        kvs = await KeyValueStore.open()
        counts = await kvs.get_auto_saved_value("counts", {"seen": 0})
        other = await (await KeyValueStore.open(name="other")).get_auto_saved_value("counts", {"seen": 0})
        counts["seen"], other["seen"] = 5, 7
        await kvs.persist_autosaved_values()
        assert await kvs.get_value("counts") == {"seen": 5}  # saved now, before any tick
        assert await (await KeyValueStore.open(name="other")).get_value("counts") in (None, {"seen": 0})


@pytest.mark.parametrize(
    ("get", "set_", "make", "name"),
    [
        (service_locator.get_event_manager, service_locator.set_event_manager, EventManager, "EventManager"),
        (service_locator.get_storage, service_locator.set_storage, MemoryBackend, "StorageClient"),
        (
            service_locator.get_configuration,
            service_locator.set_configuration,
            lambda: Configuration(storage_url="memory://"),
            "Configuration",
        ),
    ],
)
def test_a_second_service_is_refused_in_crawlees_words(get: Any, set_: Any, make: Any, name: str) -> None:
    first = make()
    set_(first)
    set_(first)  # the same one again is fine
    with pytest.raises(ServiceConflictError, match=rf"{name} is already in use\."):
        set_(make())  # set, not yet handed out: refused all the same, as in Crawlee
    assert get() is first


PORTED = textwrap.dedent(
    """
    import asyncio

    from pydantic import BaseModel

    from recoverable_state import RecoverableState, service_locator


    class Progress(BaseModel):
        done: int = 0


    async def main() -> None:
        async with service_locator.get_event_manager():  # the Crawlee way: no run()
            async with RecoverableState(
                default_state=Progress(), persist_state_key="p", persistence_enabled=True
            ) as progress:
                print("READY", flush=True)
                while True:
                    progress.done += 1
                    await asyncio.sleep(0.01)


    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_worker_ported_from_crawlee_as_it_is_saves_on_a_signal(
    tmp_path: Path, signum: int, code: int
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(PORTED)
    env = {"PATH": "/usr/bin:/bin", "RECOVERABLE_STATE_STORAGE_URL": f"sqlite:///{tmp_path}/s.sqlite3"}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        restore_signals=True,
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGHUP)],
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    time.sleep(0.3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert "Traceback" not in err

    async def stored() -> Any:
        storage = Configuration(storage_url=env["RECOVERABLE_STATE_STORAGE_URL"])
        service_locator.set_configuration(storage)
        return await (await KeyValueStore.open()).get_value("p")

    saved = anyio.run(stored)
    assert saved is not None and saved["done"] > 0
