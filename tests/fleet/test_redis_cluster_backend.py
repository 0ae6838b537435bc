"""The Redis Cluster backend (`redis+cluster://`) on the real 6-node cluster of tests/fleet_servers.py.

The shipped conformance suite runs against it as against every store; the checks
after it are the cluster's own: records of one store spread over every master,
one batch answered per slot (a master that refuses its share fails only those
records), a dropped store leaving nothing behind, and the URL's spellings.
"""

from __future__ import annotations

import pytest

from fleet_servers import RedisClusterServer
from recoverable_state.storage import StorageBackend, open_backend
from recoverable_state.testing import BackendConformance
from recoverable_state.testing.conformance import MakeBackend, check_random_batches


class TestRedisCluster(BackendConformance):
    @pytest.fixture
    def make_backend(self, cluster: RedisClusterServer) -> MakeBackend:
        return lambda: open_backend(cluster.url)

    @pytest.mark.anyio
    async def test_random_batches_cut_into_many_calls_answer_as_the_planner(
        self, backend: StorageBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from recoverable_state.storage import _contract

        monkeypatch.setattr(_contract, "BATCH_BYTES", 3000)
        await check_random_batches(backend, "cluster-cut", keeps_history=True)
