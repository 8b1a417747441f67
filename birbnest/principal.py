"""Who a data-plane request acts for: the API key the access middleware verified.

``ops.access`` verifies the key and leaves a :class:`Principal` on the request; the views confine
it to its key prefixes with :func:`require_keys` (the middleware cannot see a batch's keys). A
request without one (``API_AUTH=off``, or a loopback client while no key exists) may use every key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from birbnest.errors import ApiError

ATTRIBUTE = "birb_principal"


@dataclass(frozen=True)
class Principal:
    """A verified API key, as the data plane needs it (never the secret)."""

    public_id: str
    name: str
    scopes: frozenset[str]
    prefixes: tuple[str, ...]  # empty: every key
    rate_limit: int | None = None

    def may_use(self, key: str) -> bool:
        return not self.prefixes or key.startswith(self.prefixes)


def principal_of(request: Any) -> Principal | None:
    return getattr(request, ATTRIBUTE, None)


def require_keys(request: Any, keys: Iterable[str]) -> None:
    """403 ``FORBIDDEN`` naming the prefixes unless the request's key may use every one of the
    keys (a batch is refused whole: no partial answer tells what lies outside them)."""
    principal = principal_of(request)
    if principal is None or not principal.prefixes:
        return
    outside = [key for key in keys if not principal.may_use(key)]
    if outside:
        prefixes = ", ".join(f"'{prefix}'" for prefix in principal.prefixes)
        raise ApiError(
            403,
            "FORBIDDEN",
            f"API key {principal.public_id} may only use keys starting with {prefixes}; "
            f"'{outside[0]}' does not" + (f" (nor {len(outside) - 1} more)" if len(outside) > 1 else ""),
            {"missing": "key_prefix", "key_prefixes": list(principal.prefixes), "keys": outside[:10]},
        )
