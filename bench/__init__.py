"""`make bench`: Birb Nest measured beside Redis, Webdis and bare nats-py on the same machine.

Run with ``.venv/bin/python -m bench.run [--smoke] [--duration S]``; see ``bench/run.py`` and
BENCHMARKS.md. A benchmark, not a test: it reports, it never fails on a slow number.
"""
