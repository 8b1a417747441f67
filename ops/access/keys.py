"""API keys: make, verify, revoke, rotate.

A key is ``bn_<8 hex digits>_<secret>``: the first part (``public_id``) names the key in lists,
logs and metrics; the secret is 32 random bytes. Only HMAC-SHA256 of the whole key, keyed by
``SECRET_KEY`` (Django's ``salted_hmac``), is stored: a fast hash is enough for a random token of
that length, and without ``SECRET_KEY`` a copy of the table verifies nothing. Changing
``SECRET_KEY`` therefore invalidates every key (rotate them after).

The API processes check keys against the published copy of this table (``keyring``), not the
table itself; every change here reaches them through the model's signals.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from ops.access.keyring import PUBLIC_PREFIX, key_digest, last_used_sync
from ops.audit import audit_record, audit_record_command
from ops.models import ApiKey

_PUBLIC_ID = re.compile(r"bn_[0-9a-f]{8}")
_NAME = re.compile(r"[A-Za-z0-9._:@-]{1,100}")
_KEY_PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,255}")
DEFAULT_SCOPES = ("read", "write", "delete")


class ApiKeyError(ValueError):
    """A key setting with a value it cannot take, or a key that does not exist."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f"invalid {name}: {value!r} (expected {expected})")


@dataclass(frozen=True)
class IssuedKey:
    """A key just made: the row, and the full key, which is shown this once."""

    row: ApiKey
    token: str


def _new_token() -> tuple[str, str]:
    public_id = PUBLIC_PREFIX + secrets.token_hex(4)
    return public_id, f"{public_id}_{secrets.token_urlsafe(32)}"


def _checked_scopes(scopes: Iterable[str]) -> list[str]:
    chosen = sorted({scope.strip() for scope in scopes if scope.strip()})
    unknown = [scope for scope in chosen if scope not in ApiKey.SCOPES]
    if not chosen or unknown:
        raise ApiKeyError("scopes", ",".join(unknown or chosen), f"one or more of {', '.join(ApiKey.SCOPES)}")
    return chosen


def _checked_prefixes(prefixes: Iterable[str]) -> list[str]:
    chosen = sorted(set(prefixes))
    bad = [prefix for prefix in chosen if not _KEY_PREFIX.fullmatch(prefix)]
    if bad:
        raise ApiKeyError("key prefix", bad[0], "1-255 characters from A-Z a-z 0-9 . _ : -")
    return chosen


def apikey_create(
    *,
    name: str,
    scopes: Iterable[str] = DEFAULT_SCOPES,
    key_prefixes: Iterable[str] = (),
    expires_in: timedelta | None = None,
    owner: str | None = None,
    rate_limit: int | None = None,
    request: Any = None,
) -> IssuedKey:
    """Make a key; the returned token is the only copy of it there will ever be.

    Audited (``apikey.create``) as the request's user, or as the command line without one."""
    if not _NAME.fullmatch(name):
        raise ApiKeyError("name", name, "1-100 characters from A-Z a-z 0-9 . _ : @ -")
    if ApiKey.objects.filter(name=name).exists():
        raise ApiKeyError("name", name, "a name no other key has (rotate or revoke that one)")
    if expires_in is not None and expires_in.total_seconds() <= 0:
        raise ApiKeyError("expiry", expires_in, "a duration after now")
    if rate_limit is not None and rate_limit < 1:
        raise ApiKeyError("rate limit", rate_limit, "a positive number of requests per window")
    user = None
    if owner:
        user = get_user_model().objects.filter(username=owner).first()
        if user is None:
            raise ApiKeyError("owner", owner, "the username of an existing user")
    public_id, token = _new_token()
    fields = {
        "name": name,
        "owner": user,
        "public_id": public_id,
        "key_hash": key_digest(token),
        "scopes": _checked_scopes(scopes),
        "key_prefixes": _checked_prefixes(key_prefixes),
        "rate_limit": rate_limit,
        "expires_at": timezone.now() + expires_in if expires_in is not None else None,
    }
    with transaction.atomic():  # the key and its audit entry commit together
        row = ApiKey.objects.create(**fields)
        _audit("apikey.create", row, request, scopes=row.scopes, key_prefixes=row.key_prefixes)
    return IssuedKey(row, token)


def _live(name: str) -> ApiKey:
    row = ApiKey.objects.filter(name=name, revoked_at__isnull=True).first()
    if row is None:
        raise ApiKeyError("key name", name, "the name of a key that is not revoked (see `apikey list`)")
    return row


def _audit(action: str, row: ApiKey, request: Any, **details: Any) -> None:
    details = {"public_id": row.public_id, **details}  # never the key
    if request is None:
        audit_record_command(action=action, target=row.name, details=details)
    else:
        audit_record(action=action, target=row.name, details=details, request=request)


def apikey_revoke(*, name: str, request: Any = None) -> ApiKey:
    """Revoke a key: from now on it verifies as nothing (audited as ``apikey.revoke``)."""
    with transaction.atomic():
        row = _live(name)
        row.revoked_at = timezone.now()
        row.save(update_fields=["revoked_at"])
        _audit("apikey.revoke", row, request)
    return row


def apikey_rotate(*, name: str, request: Any = None) -> IssuedKey:
    """Give a key a new secret (and public id), keeping its settings; the old one stops working
    (audited as ``apikey.rotate``)."""
    with transaction.atomic():
        row = _live(name)
        old_public_id = row.public_id
        public_id, token = _new_token()
        row.public_id, row.key_hash = public_id, key_digest(token)
        row.save(update_fields=["public_id", "key_hash"])
        _audit("apikey.rotate", row, request, previous_public_id=old_public_id)
    return IssuedKey(row, token)


def apikey_list() -> QuerySet[ApiKey]:
    """Every key, revoked ones too, with last-used times as the API processes last reported them."""
    last_used_sync()
    return ApiKey.objects.select_related("owner").order_by("name")


def apikey_verify(token: str) -> ApiKey | None:
    """The key this token is, if it is one that is neither revoked nor expired (constant-time
    comparison of the hashes); None otherwise."""
    public_id = token[: len(PUBLIC_PREFIX) + 8]
    if not _PUBLIC_ID.fullmatch(public_id) or token[len(public_id) : len(public_id) + 1] != "_":
        return None
    row = ApiKey.objects.filter(public_id=public_id).first()
    if row is None or not hmac.compare_digest(row.key_hash, key_digest(token)):
        return None
    if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= timezone.now()):
        return None
    return row


def apikey_state(row: ApiKey) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= timezone.now():
        return "expired"
    return "active"
