"""fork() while the Redis Cluster backend is reading the slot map: the children connect on their own.

The parent (tests/storage/fork_worker.py) makes its first call while every node
is stopped (SIGSTOP), so that its client holds the backend's lock and the slot
map's locks, waiting for a reply, when it forks eight children; each child runs
its own event loop on the backend it inherited. The nodes are let go on after
the forks, well inside the cluster's node timeout.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from fleet_servers import RedisClusterServer

sys.path.insert(0, str(Path(__file__).parents[1] / "storage"))
from test_fork import assert_every_child_stored, fork_run


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_children_forked_while_the_parent_reads_the_slot_map_connect_on_their_own(
    cluster: RedisClusterServer, loop: str
) -> None:
    pids = [node.proc.pid for node in cluster.nodes if node.proc is not None]
    try:
        lines = fork_run(cluster.url, "connecting", loop, pause=pids)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert_every_child_stored(cluster.url, lines)
