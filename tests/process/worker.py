"""A worker for the process tests: many RecoverableStates changed without pause.

It runs under `recoverable_state.run` (signals handled, exit 143/130) with the
storage, intervals and timeout from the RECOVERABLE_STATE_* environment. It
writes what it loaded to `<report-dir>/start.json`, prints READY, then changes
its states until it is stopped. When its work is cancelled (by a signal) it
writes the values it ends with to `<report-dir>/final.json` and prints FINAL:
nothing changes them after that, so the store must hold exactly these values
once the process has exited.

Each state is an Item whose fields are written together (`a == b`, `digest` the
hash of `a` and `note`): a torn or mixed record would show.

    python worker.py --backend trio --states 500 --report-dir /tmp/x
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel

import recoverable_state
from recoverable_state import Event, EventManager, EventPersistStateData, RecoverableState, service_locator


class Item(BaseModel):
    a: int = 0
    b: int = 0
    note: str = ""
    digest: str = ""


def digest(a: int, note: str) -> str:
    return hashlib.sha256(f"{a}|{note}".encode()).hexdigest()


def is_whole(item: Item) -> bool:
    """Whether the item is one consistent snapshot (or the untouched default)."""
    if item == Item():
        return True
    return item.a == item.b and item.digest == digest(item.a, item.note)


def key_of(i: int) -> str:
    return f"item-{i:05d}"


def bump(item: Item, note_size: int) -> None:
    item.a += 1
    item.b = item.a
    item.note = (f"{item.a}-" * note_size)[:note_size] if note_size else str(item.a)
    item.digest = digest(item.a, item.note)


def write_report(path: Path, states: list[RecoverableState[Item]]) -> None:
    """Write {key: value} atomically, so that a reader never sees half a report."""
    values = {s.persist_state_key: s.current_value.model_dump(mode="json") for s in states}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values))
    os.replace(tmp, path)


def say(line: str) -> None:
    print(line, flush=True)


def add_test_listeners(opts: argparse.Namespace) -> None:
    manager = service_locator.get_event_manager()
    if opts.slow_persist:

        async def slow(data: EventPersistStateData) -> None:
            if data.is_migrating:
                say("SLOW-PERSIST")
                await anyio.sleep(opts.slow_persist)
                say("SLOW-PERSIST-DONE")

        manager.on(event=Event.PERSIST_STATE, listener=slow)
    if opts.hang == "async":

        async def hang_async(data: EventPersistStateData) -> None:
            if data.is_migrating:
                say("HANG")
                await anyio.sleep_forever()

        manager.on(event=Event.PERSIST_STATE, listener=hang_async)
    elif opts.hang == "sync":
        never = threading.Event()

        def hang_sync(data: EventPersistStateData) -> None:
            if data.is_migrating:
                say("HANG")
                never.wait()  # blocks its thread for good: only the process ending stops it

        manager.on(event=Event.PERSIST_STATE, listener=hang_sync)


async def main(opts: argparse.Namespace) -> None:
    report_dir = Path(opts.report_dir)
    states = [
        RecoverableState(default_state=Item(), persist_state_key=key_of(i), persistence_enabled=True)
        for i in range(opts.states)
    ]
    await RecoverableState.initialize_many(states)
    for s in states:
        if not is_whole(s.current_value):
            raise SystemExit(f"loaded a torn record: {s.persist_state_key} = {s.current_value!r}")
    write_report(report_dir / "start.json", states)
    add_test_listeners(opts)
    if opts.nested_signals:
        # A second signal-handling manager, entered and left: the outer one must keep its handlers.
        async with EventManager(handle_signals=True):
            pass
    rng = random.Random()
    say("READY")
    if opts.busy:
        try:
            busy(states)
        finally:
            write_report(report_dir / "final.json", states)
            say("FINAL")
    if opts.return_after is not None:
        await anyio.sleep(opts.return_after)
        write_report(report_dir / "final.json", states)
        if opts.hang_on_exit:
            never = threading.Event()

            def hang_on_exit() -> None:
                say("HANG")
                never.wait()

            service_locator.get_event_manager().on(event=Event.PERSIST_STATE, listener=hang_on_exit)
        say("RETURN")
        return
    try:
        while True:
            for state in rng.sample(states, min(opts.batch, len(states))):
                bump(state.current_value, opts.note_size)
            if opts.explicit:
                # Persist by hand too, racing the timer's persists of the same states.
                await RecoverableState.persist_many(rng.sample(states, min(opts.explicit, len(states))))
                await rng.choice(states).persist_state()
            await anyio.sleep(opts.pause)
    finally:
        # Cancelled by a signal: these are the values the last persist must store.
        write_report(report_dir / "final.json", states)
        say("FINAL")
        if opts.stuck_body:
            with anyio.CancelScope(shield=True):
                say("STUCK")
                await anyio.sleep_forever()


def busy(states: list[RecoverableState[Item]]) -> None:
    """Work that never awaits: the event loop never gets control back."""
    while True:
        for state in states:
            state.current_value.a += 1
            state.current_value.b = state.current_value.a
            state.current_value.digest = digest(state.current_value.a, state.current_value.note)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["asyncio", "trio"], required=True)
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--states", type=int, default=500)
    parser.add_argument("--batch", type=int, default=50, help="states changed per round")
    parser.add_argument("--pause", type=float, default=0.002, help="seconds between rounds")
    parser.add_argument("--note-size", type=int, default=0, help="characters of filler per state")
    parser.add_argument("--explicit", type=int, default=0, help="states persisted by hand per round")
    parser.add_argument("--slow-persist", type=float, default=0.0, help="a migrating persist listener sleeps")
    parser.add_argument("--hang", choices=["async", "sync"], default=None, help="a listener never returns")
    parser.add_argument("--stuck-body", action="store_true", help="the cancelled work never ends")
    parser.add_argument("--busy", action="store_true", help="the work never awaits")
    parser.add_argument("--nested-signals", action="store_true", help="enter and leave a second manager")
    parser.add_argument("--no-sighup", action="store_true", help="run(handle_sighup=False)")
    parser.add_argument("--return-after", type=float, default=None, help="main returns after this long")
    parser.add_argument(
        "--hang-on-exit", action="store_true", help="a sync listener hangs in the last persist"
    )
    return parser.parse_args(argv)


def run(argv: list[str]) -> Any:
    opts = parse(argv)
    return recoverable_state.run(main, opts, backend=opts.backend, handle_sighup=not opts.no_sighup)


if __name__ == "__main__":
    run(sys.argv[1:])
