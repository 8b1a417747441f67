"""Real local clusters for the session — a Redis Cluster (3 masters + 3 replicas) and a
three-node NATS JetStream, started once from the PyPI wheels (tools/redis_cluster.py,
tools/nats_cluster.py) by the first test that asks for one. The fixtures are defined in
redis_fixtures.py and nats_fixtures.py and made visible to every directory by tests/conftest.py
(the fault suite in tests/faults/ uses them too), so each cluster starts at most once a session."""
