"""The API keys every API process checks requests against, without a database query.

The ``ApiKey`` table is compiled to one JSON document in Redis, ``<prefix>access:keys``: for each
key that is not revoked, its public id, name, keyed hash, scopes, key prefixes, rate limit and
expiry; plus whether any key row exists at all (``API_AUTH=auto`` serves loopback clients without
a key only while none does). Every change to the table (``manage.py apikey``, the admin, any
``save()``) publishes it again once its transaction commits, and each API process re-reads it at
most every half second (:mod:`ops.published`), so a revocation applies everywhere within a second.

Checking a key is then in-process work: split off its public id, look it up, compare HMAC-SHA256
of the presented key with the stored one in constant time, check expiry.

**Last used**: a process notes the time a key was used in memory; a background thread sends what
it noted to Redis every couple of seconds (one ``HSET`` on ``<prefix>access:last_used``); the
``last_used_at`` column is brought up to date from there when keys are listed (the admin,
``apikey list``). No request writes to the database or waits for Redis over it.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from django.conf import settings
from django.db import transaction
from redis.exceptions import RedisError

from birbnest.principal import Principal
from ops.models import ApiKey
from ops.published import PublishedDocument
from persistence import redis_store
from persistence.keys import redis_key

PUBLIC_PREFIX = "bn_"
PUBLIC_ID_LENGTH = len(PUBLIC_PREFIX) + 8
KEYRING_KEY_PARTS = ("access", "keys")
LAST_USED_KEY_PARTS = ("access", "last_used")
_HMAC_SALT = b"birbnest.apikey"


_derived: tuple[str, bytes] | None = None


def key_digest(token: str) -> str:
    """HMAC-SHA256 of a key, keyed by ``SECRET_KEY`` (the same value as Django's
    ``salted_hmac("birbnest.apikey", token, algorithm="sha256")``, with the derived key kept)."""
    global _derived
    secret = settings.SECRET_KEY
    if _derived is None or _derived[0] != secret:
        _derived = (secret, hashlib.sha256(_HMAC_SALT + secret.encode()).digest())
    return hmac.new(_derived[1], token.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    principal: Principal
    digest: str
    expires_at: float | None  # epoch seconds


@dataclass(frozen=True)
class Keyring:
    keys: dict[str, KeyRecord]
    any_key: bool  # a key row exists (revoked and expired ones count): no more open loopback

    def verify(self, token: str) -> Principal | None:
        """The key's principal if the token is a key that exists, is not revoked and has not
        expired; None otherwise."""
        record = self.keys.get(token[:PUBLIC_ID_LENGTH])
        if record is None or token[PUBLIC_ID_LENGTH : PUBLIC_ID_LENGTH + 1] != "_":
            return None
        if not hmac.compare_digest(record.digest, key_digest(token)):
            return None
        if record.expires_at is not None and record.expires_at <= time.time():
            return None
        return record.principal


def _parse(raw: bytes | str) -> Keyring:
    data = orjson.loads(raw)
    keys = {}
    for public_id, item in data["keys"].items():
        principal = Principal(
            public_id=public_id,
            name=str(item["name"]),
            scopes=frozenset(item["scopes"]),
            prefixes=tuple(item["prefixes"]),
            rate_limit=item.get("rate_limit"),
        )
        keys[public_id] = KeyRecord(principal, str(item["hash"]), item.get("expires_at"))
    return Keyring(keys=keys, any_key=bool(data["any_key"]))


def _compile() -> bytes:
    rows = ApiKey.objects.filter(revoked_at__isnull=True).values_list(
        "public_id", "name", "key_hash", "scopes", "key_prefixes", "rate_limit", "expires_at"
    )
    keys = {
        public_id: {
            "name": name,
            "hash": key_hash,
            "scopes": sorted(scopes),
            "prefixes": sorted(prefixes),
            "rate_limit": rate_limit,
            "expires_at": expires_at.timestamp() if expires_at is not None else None,
        }
        for public_id, name, key_hash, scopes, prefixes, rate_limit, expires_at in rows
    }
    return orjson.dumps({"keys": keys, "any_key": bool(keys) or ApiKey.objects.exists()})


# --- last used --------------------------------------------------------------------------------------

LAST_USED_FLUSH_SECONDS = 2.0
_used: dict[str, float] = {}
_flusher: threading.Thread | None = None
_flusher_lock = threading.Lock()


def note_used(public_id: str) -> None:
    _used[public_id] = time.time()  # one dict store: no lock, no I/O on the request path
    if _flusher is None:
        _start_flusher()


def last_used_key() -> str:
    return redis_key(*LAST_USED_KEY_PARTS)


def _start_flusher() -> None:
    global _flusher
    with _flusher_lock:
        if _flusher is None:
            _flusher = threading.Thread(target=_flush_forever, name="apikey-last-used", daemon=True)
            _flusher.start()


def _flush_forever() -> None:
    while True:
        time.sleep(LAST_USED_FLUSH_SECONDS)
        flush_used()


def flush_used() -> None:
    """Send the times this process noted to Redis (every couple of seconds, off the request path)."""
    global _used
    if not _used:
        return
    noted, _used = _used, {}
    try:
        redis_store.client().hset(last_used_key(), mapping={public_id: int(at) for public_id, at in noted.items()})
    except RedisError:
        for public_id, at in noted.items():  # next time; a newer use wins
            _used.setdefault(public_id, at)


def last_used_sync() -> None:
    """Copy the last-used times the API processes reported into ``ApiKey.last_used_at``."""
    try:
        reported = redis_store.client().hgetall(last_used_key())
    except RedisError:
        return  # the column keeps what it had
    for public_id, stamp in reported.items():
        at = datetime.fromtimestamp(int(stamp), tz=UTC)
        public_id = public_id.decode() if isinstance(public_id, bytes) else public_id
        ApiKey.objects.filter(public_id=public_id).exclude(last_used_at__gte=at).update(last_used_at=at)


# --- this process's copy ------------------------------------------------------------------------------

_keyring: PublishedDocument[Keyring | None] = PublishedDocument(
    name="API keys",
    key_parts=KEYRING_KEY_PARTS,
    parse=_parse,
    compile=_compile,
    default=None,  # not known yet: requests that need it get 503 until it is
)


def current_keyring() -> Keyring | None:
    """The keys this process checks against (None while it could read them from neither Redis
    nor PostgreSQL)."""
    return _keyring.get()


def keyring_publish() -> Keyring | None:
    """Compile the keys from PostgreSQL into Redis; every API process applies them within a second."""
    return _keyring.publish()


def publish_on_commit(sender: Any, **kwargs: Any) -> None:
    """Receiver of ``ApiKey``'s save and delete signals (connected in ``OpsConfig.ready()``)."""
    transaction.on_commit(keyring_publish)
