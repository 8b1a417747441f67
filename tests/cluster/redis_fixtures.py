"""Session fixture ``redis_cluster``: a Redis Cluster of 3 masters + 3 replicas (tools/redis_cluster.py),
started once per session in a temporary directory by the first test that asks for it, stopped at
the end. Persistence is off (no test here restarts a whole node set and expects its data back);
``cluster-node-timeout`` is 2 s, so a killed master is replaced within about 4 s.

A test that kills or stops nodes brings them back and waits for :meth:`RedisCluster.wait_healthy`
before it ends (see ``restored`` below), so the next test finds every master with its replica.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tools.redis_cluster import RedisCluster, start_redis_cluster
from tools.stack import make_temp_data_dir


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    data_dir = make_temp_data_dir("birb-redis-cluster-")
    cluster = start_redis_cluster(data_dir, persistence=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def restored(cluster: RedisCluster, timeout: float = 60) -> None:
    """Every node running again and the cluster healthy (the end of a test that killed nodes)."""
    for node in cluster.nodes:
        cluster.start(node.port)
    cluster.wait_healthy(timeout=timeout)
