"""A worker without async that survives SIGTERM: a plain loop, its progress saved on its own.

    python examples/sync_worker.py &           # prints its pid, then works through jobs
    kill -TERM <pid>                           # "stop requested at job 57: ..." then exit 143
    python examples/sync_worker.py             # "resuming at job 57 (56 done, ...)"

`recoverable_state.run_sync` runs `main` in the main thread as an ordinary
function, while an event loop in a background thread saves the progress every
RECOVERABLE_STATE_PERSIST_STATE_INTERVAL seconds (60 by default) and once
more when `main` returns. On SIGTERM or Ctrl-C, `stop_requested()` turns
True: the loop finishes its job, returns, and the process exits with 143
(130 for Ctrl-C) with everything saved. A worker that does not check the flag
gets WorkerInterrupted raised into it a few seconds later, never inside a
`with progress.editing():` block. The progress lives in ./storage/state.sqlite3.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

from pydantic import BaseModel

import recoverable_state
from recoverable_state import RecoverableState, stop_requested


class Progress(BaseModel):
    """How far the worker got; `done` and `digest` change together, in one editing() block."""

    next_job: int = 1
    done: int = 0
    digest: str = ""


def handle(job: int, delay: float) -> str:
    time.sleep(delay)  # the real work: a request, a file, a row...
    return hashlib.sha256(str(job).encode()).hexdigest()[:12]


def main(jobs: int | None, delay: float) -> None:
    state = RecoverableState(
        default_state=Progress(), persist_state_key="sync-worker", persistence_enabled=True
    )
    with state as progress:
        if progress.done:
            print(
                f"resuming at job {progress.next_job} ({progress.done} done, last {progress.digest})",
                flush=True,
            )
        else:
            print("starting from scratch", flush=True)
        stop_at = None if jobs is None else progress.next_job + jobs
        while progress.next_job != stop_at:
            if stop_requested():
                print(f"stop requested at job {progress.next_job}: saving and exiting", flush=True)
                return
            result = handle(progress.next_job, delay)
            with state.editing():  # a snapshot never holds one of these changes without the others
                progress.digest = result
                progress.done += 1
                progress.next_job += 1
        print(f"done for now: {progress.done} jobs in total", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=None, help="stop after this many jobs (default: never)")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds each job takes")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    print(f"pid {os.getpid()}", flush=True)
    recoverable_state.run_sync(main, args.jobs, args.delay, backend=args.backend)
