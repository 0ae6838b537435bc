"""A worker without async for the process tests: run under `recoverable_state.run_sync`.

It keeps a Pair (`a == b` must hold in every stored snapshot) and a Tally, and
changes them in the main thread. It prints `START <a> <tally>` after loading,
and, when it stops on its own (it polls `stop_requested()`), `FINAL <a>
<tally>` with the values that nothing changes afterwards: the store must hold
exactly these once the process has exited.

Modes: `poll` returns when a stop is requested; `ignore` never polls (it is
interrupted with WorkerInterrupted and prints INTERRUPTED <a>); `stubborn`
swallows every exception and never returns (only the watchdog ends it).
A WorkerInterrupted is raised as an editing() block ends, never inside it.
`--hold` seconds: each change holds `state.editing()` that long between
setting `a` and setting `b`, across the 0.05 s persist timer. `--long-hold`
seconds: the fourth change alone holds it that long (it prints HOLDING first).

    python sync_worker.py --backend trio --mode poll
"""

from __future__ import annotations

import argparse
import time

from pydantic import BaseModel

import recoverable_state
from recoverable_state import RecoverableState, WorkerInterrupted, stop_requested


class Pair(BaseModel):
    a: int = 0
    b: int = 0


class Tally(BaseModel):
    count: int = 0


def work(mode: str, hold: float, limit: int, long_hold: float = 0.0) -> None:
    pair = RecoverableState(
        default_state=Pair(), persist_state_key="pair", persistence_enabled=True, history=500
    )
    tally = RecoverableState(default_state=Tally(), persist_state_key="tally", persistence_enabled=True)
    with pair as p, tally as t:
        print(f"START {p.a} {t.count}", flush=True)
        done = 0
        try:
            while done < limit:
                if mode == "poll" and stop_requested():
                    break
                try:
                    if long_hold and done == 3:
                        time.sleep(0.3)  # the timer saves the pair as it is, then the long hold
                    with pair.editing():
                        p.a += 1
                        if long_hold and done == 3:
                            print("HOLDING", flush=True)
                            time.sleep(long_hold)
                        time.sleep(hold)
                        p.b += 1
                        t.count += 1
                    done += 1
                    if done == 3:
                        print("WORKING", flush=True)
                    time.sleep(0.002)
                except BaseException:
                    if mode != "stubborn":
                        raise
                    # A worker that never returns: WorkerInterrupted is swallowed.
        except WorkerInterrupted:
            print(f"INTERRUPTED {p.a} {t.count}", flush=True)
            raise
        print(f"FINAL {p.a} {t.count}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="asyncio")
    parser.add_argument("--mode", choices=["poll", "ignore", "stubborn"], default="poll")
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=10**9)
    parser.add_argument("--long-hold", type=float, default=0.0)
    parser.add_argument("--stop-grace", type=float, default=None)
    parser.add_argument("--report-dir", default=None)  # given by the harness; unused
    args = parser.parse_args()
    recoverable_state.run_sync(
        work,
        args.mode,
        args.hold,
        args.limit,
        args.long_hold,
        backend=args.backend,
        stop_grace=args.stop_grace,
    )


if __name__ == "__main__":
    main()
