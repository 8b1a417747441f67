"""Settings for the test suite: production settings, with the two things a test run lacks.

The servers' URLs are filled in by tests/conftest.py once the session's servers are up.
"""

import atexit
import os
import shutil
import tempfile

# A run of its own: never read the stack.env that `make run` wrote for the developer's servers.
# Made (and removed at exit) only by the process that sets it; the processes a test starts inherit it.
if not os.environ.get("BIRB_DATA_DIR"):
    os.environ["BIRB_DATA_DIR"] = tempfile.mkdtemp(prefix="birb-test-data-")
    atexit.register(shutil.rmtree, os.environ["BIRB_DATA_DIR"], ignore_errors=True)
os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")

from birbnest.settings import *  # noqa: F403
