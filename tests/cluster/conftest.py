"""Real local clusters for the session: a Redis Cluster (3 masters + 3 replicas) and a
three-node NATS JetStream, started once from the PyPI wheels (tools/redis_cluster.py,
tools/nats_cluster.py) by the first test that asks for one."""

from tests.cluster.nats_fixtures import nats_cluster  # noqa: F401
from tests.cluster.redis_fixtures import redis_cluster  # noqa: F401
