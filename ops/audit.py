"""The audit log: one :class:`~ops.models.AuditEntry` per operator action that changed data or
state — who, when, what, from where.

Call :func:`audit_record` once the action has run — even if it found nothing to change (an
evict of keys Redis did not hold), but not when it was refused or failed outright — from the
console view or the command that ran it::

    audit_record(action="entry.evict", target="user:42", details={"evicted": 1}, request=request)
    audit_record_command(action="entry.rehydrate", target="all", details={"loaded": 10})

- **Who / from where.** With ``request``: the API key the request was verified with
  (``key:<public id>``), else the logged-in user's username, and ``REMOTE_ADDR``. A management
  command: ``cli:<os user>`` and ``cli`` (:func:`audit_record_command`). ``actor`` and
  ``address`` given explicitly win over both.
- **Same transaction.** The row is inserted on the caller's connection, so when the action is a
  database change made inside ``transaction.atomic()``, record inside that block: the action and
  its record commit (or roll back) together.
- **Never fails the action.** The insert runs in a savepoint; if it fails (PostgreSQL down, a
  details value JSON cannot hold), the entry is written to the log at ERROR level with everything
  it would have held, and the caller goes on. An operator's change that already happened in
  Redis or JetStream cannot be undone because its record could not be written, and refusing the
  next action would take the console away exactly when PostgreSQL is in trouble.
- **No secrets.** Never pass a token, key or password in ``target`` or ``details``; as a guard,
  detail fields named like one (:data:`SECRET_FIELDS`) are stored as ``"[redacted]"``.

Action codes are short dotted names, ``<area>.<verb>``: ``entry.edit``, ``deadletter.purge``,
``ratelimit.change``, ``apikey.revoke``, ``job.start`` … (docs/OPERATIONS.md lists them).
"""

from __future__ import annotations

import getpass
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from django.db import transaction

from ops.models import AuditEntry

logger = logging.getLogger(__name__)

CLI_ADDRESS = "cli"
TARGET_MAX = 1000  # characters of ``target`` kept; lists of keys are shortened before that
TARGET_ITEMS = 20  # items named in a target built from a list
DETAIL_ITEMS = 100  # items kept of a list in ``details`` (see audit_items)
SECRET_FIELDS = frozenset({"token", "password", "secret", "api_key", "key_hash", "authorization", "raw_key"})
REDACTED = "[redacted]"
# The request attribute ops.access leaves the verified API key on (birbnest.principal.ATTRIBUTE).
PRINCIPAL_ATTRIBUTE = "birb_principal"


def audit_record(
    *,
    action: str,
    target: str = "",
    details: Mapping[str, Any] | None = None,
    request: Any = None,
    actor: str | None = None,
    address: str | None = None,
) -> AuditEntry | None:
    """Record one operator action; returns the row, or None when it could not be stored.

    ``request`` is a Django ``HttpRequest`` (or a DRF ``Request``): actor and address are taken
    from it unless given. Without a request and without ``actor`` the actor is ``"unknown"``.
    """
    if actor is None:
        actor = request_actor(request) if request is not None else "unknown"
    if address is None:
        address = request_address(request) if request is not None else ""
    entry = AuditEntry(
        actor=actor[:200],
        address=address[:64],
        action=action[:64],
        target=_clip(target),
        details=_redacted(details or {}),
    )
    try:
        # A savepoint inside the caller's transaction: a failed insert leaves that transaction
        # usable, so the audited change can still commit.
        with transaction.atomic():
            entry.save()
    except Exception:  # whatever went wrong, the action it records must not fail because of it
        logger.error(
            "audit entry not stored: %s by %s from %s on %r, details %r",
            entry.action,
            entry.actor,
            entry.address,
            entry.target,
            entry.details,
            exc_info=True,
        )
        return None
    logger.info("audit: %s by %s from %s on %r", entry.action, entry.actor, entry.address, entry.target)
    return entry


def audit_record_command(
    *, action: str, target: str = "", details: Mapping[str, Any] | None = None
) -> AuditEntry | None:
    """:func:`audit_record` for a management command: actor ``cli:<os user>``, address ``cli``."""
    return audit_record(action=action, target=target, details=details, actor=command_actor(), address=CLI_ADDRESS)


def record_command_action(sender: Any, *, action: str, target: str = "", details: Any = None, **kwargs: Any) -> None:
    """Receiver of :data:`persistence.operator_actions.command_action` (connected in
    ``OpsConfig.ready()``): persistence's commands cannot import this app, so they signal."""
    audit_record_command(action=action, target=target, details=details)


def request_actor(request: Any) -> str:
    """``key:<public id>`` for a request made with an API key, else the user's username."""
    principal = getattr(request, PRINCIPAL_ATTRIBUTE, None)
    public_id = getattr(principal, "public_id", None)
    if public_id:
        return f"key:{public_id}"
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return str(user.get_username())
    return "anonymous"


def request_address(request: Any) -> str:
    """The connection's address, as the rate limiter sees it: no header is trusted."""
    return str(request.META.get("REMOTE_ADDR", "") or "")


def command_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no login name and no passwd entry (a bare container): the uid says who
        user = f"uid{os.getuid()}"
    return f"cli:{user}"


def audit_items(items: Iterable[Any], *, shown: int = TARGET_ITEMS) -> str:
    """A target naming several things: ``a, b, c`` or ``a, b, … and 98 more``."""
    names = [str(item) for item in items]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def audit_list(items: Iterable[Any], *, kept: int = DETAIL_ITEMS) -> list[Any]:
    """The first ``kept`` items, for a ``details`` field (keep details small; count separately)."""
    return list(items)[:kept]


def _clip(text: str) -> str:
    return text if len(text) <= TARGET_MAX else text[: TARGET_MAX - 1] + "…"


def _redacted(details: Mapping[str, Any]) -> dict[str, Any]:
    clean = {}
    for name, value in details.items():
        if str(name).lower() in SECRET_FIELDS:
            logger.warning("audit details field %r looks like a secret: stored as %s", name, REDACTED)
            value = REDACTED
        clean[str(name)] = value
    return clean
