"""Runners: a worker's main function inside an EventManager that handles shutdown.

`run()` for async workers, `run_sync()` for plain functions (the manager's loop
in a background thread). They sit above the states: they build the manager,
make it the default, take the signals and decide the process's exit code.
"""

from ._run import run
from ._sync import run_sync, stop_requested, use_state_sync
from ._sync_runtime import WorkerInterrupted

__all__ = ["WorkerInterrupted", "run", "run_sync", "stop_requested", "use_state_sync"]
