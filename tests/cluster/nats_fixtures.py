"""Session fixture ``nats_cluster``: a three-node NATS cluster with JetStream (tools/nats_cluster.py).

Started once per session, by the first test that asks for it, in a fresh data directory, and
stopped at the end. fsync is off for speed (a SIGKILLed node loses nothing the kernel holds;
only a machine crash would). Tests that kill nodes start them again and call ``wait_healthy``
before the next test uses the cluster.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tools.nats_cluster import NatsCluster, start_nats_cluster
from tools.stack import make_temp_data_dir


@pytest.fixture(scope="session")
def nats_cluster() -> Iterator[NatsCluster]:
    data_dir = make_temp_data_dir("birb-nats-cluster-")
    try:
        cluster = start_nats_cluster(data_dir, nodes=3, fsync=False)
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
