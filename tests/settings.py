"""Settings for the test suite: production settings, with the two things a test run lacks.

The servers' URLs are filled in by tests/conftest.py once the session's servers are up.
"""

import os
import tempfile

# A run of its own: never read the stack.env that `make run` wrote for the developer's servers.
os.environ.setdefault("BIRB_DATA_DIR", tempfile.mkdtemp(prefix="birb-test-data-"))
os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")

from birbnest.settings import *  # noqa: F403
