"""The system of record: table ``cache_entries``."""

from __future__ import annotations

from typing import Any

import orjson
from django.db import models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models.lookups import Exact
from psycopg.adapt import Buffer, Loader
from psycopg.types.json import Json


class JSONText:
    """JSON text exactly as PostgreSQL's ``json`` column keeps it (``text``: UTF-8 bytes).

    Never decoded on the way from PostgreSQL to Redis or to a client. It compares equal to the
    Python value it decodes to (``row.value == {"n": 1}`` in a test or a shell) and to another
    ``JSONText`` of the same value; :meth:`load` decodes it.
    """

    __slots__ = ("text",)

    def __init__(self, text: bytes) -> None:
        self.text = text

    def load(self) -> Any:
        return orjson.loads(self.text)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, JSONText):
            return self.text == other.text or self.load() == other.load()
        return bool(self.load() == other)

    __hash__ = None  # type: ignore[assignment]  # equal to mutable values: unhashable, like a dict

    def __repr__(self) -> str:
        return f"JSONText({self.text!r})"

    def __str__(self) -> str:
        return self.text.decode()


def _as_is(text: bytes) -> bytes:
    return text


class JSONTextField(models.Field):
    """A PostgreSQL ``json`` column, read and written as JSON text.

    ``json`` keeps its input text verbatim (``jsonb`` rewrites numbers -- ``1e20`` becomes
    ``100000000000000000000``, ``-0.0`` becomes ``0`` -- and reorders object keys), so the text the
    API wrote is the text a read-through or a rehydration serves. Rows load as :class:`JSONText`
    (the connection's loader for ``json`` hands over the bytes, see :func:`load_json_as_text`).
    A value to store is a ``JSONText`` or ``bytes`` (JSON text, stored as it is) or any other
    Python value (encoded with orjson); ``None`` is SQL NULL. ``exact`` compares by meaning
    (``jsonb`` equality); ``json`` has no ``=`` of its own.
    """

    description = "JSON text, kept verbatim (PostgreSQL json)"

    def db_type(self, connection: BaseDatabaseWrapper) -> str:
        return "json"

    def from_db_value(self, value: Any, expression: Any, connection: BaseDatabaseWrapper) -> JSONText | None:
        return self.to_python(value)

    def to_python(self, value: Any) -> Any:
        if isinstance(value, bytes):
            return JSONText(value)
        if isinstance(value, (bytearray, memoryview)):
            return JSONText(bytes(value))
        return value

    def get_prep_value(self, value: Any) -> bytes | None:
        if value is None:
            return None
        if isinstance(value, JSONText):
            return value.text
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        return orjson.dumps(value)

    def get_db_prep_value(self, value: Any, connection: BaseDatabaseWrapper, prepared: bool = False) -> Any:
        text = value if prepared else self.get_prep_value(value)
        # Sent as a json parameter ('…'::json), its bytes untouched.
        return None if text is None else Json(text, dumps=_as_is)

    def value_to_string(self, obj: models.Model) -> Any:
        # For dumpdata, as JSONField does: the decoded value, which loaddata stores re-encoded.
        value = self.value_from_object(obj)
        return value.load() if isinstance(value, JSONText) else value


@JSONTextField.register_lookup
class JSONTextExact(Exact):
    """``value=…`` in a filter: equal JSON values (compared as jsonb; json has no ``=``)."""

    def as_sql(self, compiler: Any, connection: BaseDatabaseWrapper) -> tuple[str, list[Any]]:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        return f"({lhs})::jsonb = ({rhs})::jsonb", [*lhs_params, *rhs_params]


class _JSONTextLoader(Loader):
    """Loads a ``json`` value as the bytes PostgreSQL sent: its stored text, not decoded."""

    def load(self, data: Buffer) -> bytes:
        return bytes(data)


def load_json_as_text(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    """Receiver of ``connection_created`` (connected in ``PersistenceConfig.ready()``).

    psycopg decodes ``json`` into Python objects by default (Django replaces the loader only
    for ``jsonb``); :class:`JSONTextField` wants the text. Per connection (pooled ones too), so
    no other psycopg connection of the process is changed."""
    if connection.vendor == "postgresql":
        connection.connection.adapters.register_loader("json", _JSONTextLoader)


class CacheEntry(models.Model):
    """One cache entry as the worker last persisted it.

    ``version`` only grows: the worker's upsert never replaces a row with a lower version.
    A delete is stored as a tombstone (``deleted`` = true, value null) that keeps its version, so
    a late write with a lower version cannot bring the key back; tombstones are purged after
    ``TOMBSTONE_RETENTION``. Expired rows (``expires_at`` in the past) count as missing.
    ``value`` and ``metadata`` are the JSON text the API wrote, verbatim (``json`` columns).
    """

    key = models.CharField(max_length=255, primary_key=True)
    value = JSONTextField(null=True)
    version = models.BigIntegerField()
    metadata = JSONTextField(default=dict)
    expires_at = models.DateTimeField(null=True, blank=True)
    deleted = models.BooleanField(default=False, db_default=False)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        db_table = "cache_entries"
        verbose_name = "cache entry"
        verbose_name_plural = "cache entries"
        permissions = [
            ("rehydrate_cacheentry", "Can rehydrate entries into Redis"),
            ("evict_cacheentry", "Can evict entries from Redis"),
        ]
        indexes = [
            models.Index(
                fields=["expires_at"],
                name="cache_entries_expires_idx",
                condition=models.Q(expires_at__isnull=False),
            ),
            models.Index(fields=["updated_at"], name="cache_entries_updated_idx"),
        ]

    def __str__(self) -> str:
        return self.key
