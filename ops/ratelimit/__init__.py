"""Rate limiting of the data plane (moved from ``ops/ratelimit.py``; split into modules next)."""

from ops.ratelimit.services import *  # noqa: F403
from ops.ratelimit.services import REFRESH_SECONDS, _ConfigCache, ratelimit_middleware  # noqa: F401
