"""Cache entries in the console: list, search, filters, detail, edit, delete, rehydrate, evict.

Every change goes through the services the HTTP API uses (:mod:`persistence.services`): a new
version, JetStream, Redis at once, PostgreSQL when the worker runs. Nothing here writes the
``cache_entries`` table. Each change that took effect goes into the audit log
(``entry.create``, ``entry.edit``, ``entry.delete``, ``entry.rehydrate``, ``entry.evict``).

The list is built for a million rows:

- no ``COUNT(*)`` over the table: unfiltered, the count is the planner's estimate
  (``pg_class.reltuples``); filtered, it is counted up to :data:`COUNT_CAP` and shown as
  "more than …" beyond;
- search is a key *prefix* (``LIKE 'p%'``, answered from an index); ``*text`` searches anywhere
  in the key, which scans the table;
- the "in Redis" column is one pipelined round trip for the page; the "in Redis" filter cannot
  be a SQL condition, so it walks the current ordering in chunks, checking each against Redis,
  until a page is full or :data:`SCAN_LIMIT` rows were looked at, and offers "next" from there;
- the value and metadata columns are never loaded for the list (``defer``), only their stored
  size (``pg_column_size``).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.contrib.admin.models import LogEntry
from django.contrib.admin.options import ShowFacets
from django.contrib.admin.views.main import ChangeList
from django.core.paginator import EmptyPage, PageNotAnInteger, Paginator
from django.db import connection
from django.db.models import F, Func, IntegerField, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.templatetags.static import static
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html
from redis.exceptions import RedisError

from ops.audit import audit_items, audit_list, audit_record
from persistence import redis_store
from persistence.errors import KeyNotFoundError, PayloadTooLargeError, ServiceUnavailableError, VersionMismatchError
from persistence.keys import KEY_RULE, is_valid_key
from persistence.models import CacheEntry, JSONText
from persistence.redis_store import StoredEntry
from persistence.rehydration import cache_entries_rehydrate
from persistence.selectors import stored_entry_from_row
from persistence.services import MAX_TTL_SECONDS, cache_entry_delete, cache_entry_set

COUNT_CAP = 10_000
SCAN_LIMIT = 10_000
SCAN_CHUNK = 500
SCAN_VAR = "scan"
ACTION_LIMIT = 10_000
# An escaped U+0000 in orjson's output: the API refuses it (cache_api.serializers), so does the console.
_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


# --- Redis state of a page of keys -----------------------------------------------------------


RedisCopy = redis_store.Held


def redis_copies(keys: list[str]) -> dict[str, RedisCopy]:
    """One round trip: what Redis holds for every key (``redis_store`` owns the hash's layout)."""
    return redis_store.held_many(keys)


# --- counting without COUNT(*) over the table ------------------------------------------------


def _estimated_rows(table: str) -> int:
    """The planner's row estimate (-1 when the table was never analysed)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", [table])
        row = cursor.fetchone()
    return int(row[0]) if row else -1


class CacheEntryPaginator(Paginator):
    """Counts the estimate (whole table) or at most COUNT_CAP + 1 rows (filtered); pages are
    sliced without trusting that count, so the last pages of an estimate still work."""

    count_kind = "exact"  # or "estimate", "capped"

    @cached_property
    def count(self) -> int:
        queryset = cast("QuerySet[CacheEntry]", self.object_list)  # the changelist pages a QuerySet
        if not queryset.query.where:
            estimate = _estimated_rows(queryset.model._meta.db_table)
            if estimate > COUNT_CAP:
                self.count_kind = "estimate"
                return estimate
        counted = queryset.order_by()[: COUNT_CAP + 1].count()
        if counted > COUNT_CAP:
            self.count_kind = "capped"
        return counted

    def validate_number(self, number: Any) -> int:
        try:
            number = int(number)
        except (TypeError, ValueError):
            raise PageNotAnInteger("That page number is not an integer") from None
        if number < 1:
            raise EmptyPage("That page number is less than 1")
        return number

    def page(self, number: Any) -> Any:
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        # _get_page: the hook Paginator.page() builds its Page with; django-stubs leaves the private name out.
        return self._get_page(self.object_list[bottom : bottom + self.per_page], number, self)  # type: ignore[attr-defined]


# --- filters ---------------------------------------------------------------------------------


class StateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("live", "live"), ("expired", "expired"), ("deleted", "deleted (tombstone)")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[CacheEntry]) -> QuerySet[CacheEntry]:
        now = timezone.now()
        match self.value():
            case "live":
                return queryset.filter(deleted=False).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
            case "expired":
                return queryset.filter(deleted=False, expires_at__lte=now)
            case "deleted":
                return queryset.filter(deleted=True)
        return queryset


class UpdatedFilter(admin.SimpleListFilter):
    title = "updated"
    parameter_name = "updated"
    PERIODS = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(days=7)}

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("hour", "in the last hour"), ("day", "in the last 24 hours"), ("week", "in the last 7 days")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[CacheEntry]) -> QuerySet[CacheEntry]:
        period = self.PERIODS.get(self.value() or "")
        return queryset.filter(updated_at__gte=timezone.now() - period) if period else queryset


class InRedisFilter(admin.SimpleListFilter):
    """Not a SQL condition: :class:`CacheEntryChangeList` applies it while it builds the page."""

    title = "in Redis"
    parameter_name = "redis"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "not in Redis"), ("yes", "in Redis")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[CacheEntry]) -> QuerySet[CacheEntry]:
        return queryset


# --- the list --------------------------------------------------------------------------------


class CacheEntryChangeList(ChangeList):
    """Loads the page without the values, marks each row with its Redis copy, and applies the
    "in Redis" filter as a bounded scan of the current ordering."""

    scanning = False
    scan_from = 0
    scan_end = 0
    scan_next: int | None = None
    redis_error = ""

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[CacheEntry]:
        return super().get_queryset(request, exclude_parameters).defer("value", "metadata")

    def get_results(self, request: HttpRequest) -> None:
        wanted = self.params.get(InRedisFilter.parameter_name)
        if wanted in ("yes", "no"):
            try:
                self._scan(request, in_redis=wanted == "yes")
                return
            except RedisError as error:
                self.redis_error = str(error)
        super().get_results(request)
        rows = list(self.result_list)
        try:
            copies = redis_copies([row.key for row in rows])
        except RedisError as error:
            self.redis_error, copies = str(error), {}
        for row in rows:
            row.redis_copy = copies.get(row.key)
        self.result_list = rows

    def _scan(self, request: HttpRequest, *, in_redis: bool) -> None:
        start = self.scan_from = max(0, getattr(request, "birb_scan_from", 0))
        found: list[CacheEntry] = []
        position = start
        exhausted = False
        while len(found) < self.list_per_page and position - start < SCAN_LIMIT:
            chunk_start = position
            chunk = list(self.queryset[chunk_start : chunk_start + SCAN_CHUNK])
            copies = redis_copies([row.key for row in chunk])
            for row in chunk:
                position += 1
                row.redis_copy = copies[row.key]
                if row.redis_copy.live == in_redis:
                    found.append(row)
                    if len(found) == self.list_per_page:
                        break
            if len(chunk) < SCAN_CHUNK and position == chunk_start + len(chunk):
                exhausted = True
                break
        self.scanning = True
        self.scan_end = position
        self.scan_next = None if exhausted else position
        self.result_count = len(found)
        self.full_result_count = None
        self.show_full_result_count = False
        self.show_admin_actions = True
        self.can_show_all = False
        self.multi_page = False
        self.paginator = Paginator(found, self.list_per_page)
        self.result_list = found

    @property
    def count_label(self) -> str:
        kind = getattr(self.paginator, "count_kind", "exact")
        if kind == "estimate":
            return f"about {self.result_count:,}"
        if kind == "capped":
            return f"more than {COUNT_CAP:,}"
        return f"{self.result_count:,}"

    @property
    def next_page_url(self) -> str:
        """Past the page links the (estimated or capped) count offers, keep paging."""
        if getattr(self.paginator, "count_kind", "exact") == "exact" or len(self.result_list) < self.list_per_page:
            return ""
        return self.get_query_string({"p": self.page_num + 1})

    @property
    def scan_next_url(self) -> str:
        return self.get_query_string({SCAN_VAR: self.scan_next}) if self.scan_next is not None else ""

    @property
    def scan_first_url(self) -> str:
        return self.get_query_string(remove=[SCAN_VAR])

    @property
    def scan_limit(self) -> int:
        return SCAN_LIMIT


# --- the form --------------------------------------------------------------------------------

_MONO = {"style": "font-family: monospace; width: 90%;", "spellcheck": "false"}


def _pretty(raw: bytes | str | None) -> str:
    """JSON text indented for reading (numbers as the API writes them: 1e20 shows as 1e+20);
    text orjson cannot encode again (nested deeper than 254 levels) is shown as it is."""
    if raw is None:
        return ""
    try:
        return orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return raw.decode() if isinstance(raw, bytes) else raw


def _row_text(value: JSONText | None) -> bytes:
    """A row's value or metadata as the JSON text PostgreSQL keeps."""
    return value.text if isinstance(value, JSONText) else orjson.dumps(value)


def _current(key: str, row: CacheEntry | None) -> StoredEntry | None:
    """The newest live copy: Redis's (it may be ahead of PostgreSQL), else the row's.

    Read without the read-through: opening a page must not put the key back into Redis.
    """
    try:
        cached = redis_store.read(key)
    except RedisError:
        cached = None
    if isinstance(cached, StoredEntry):
        return cached
    if (
        row is not None
        and row.pk
        and not row.deleted
        and row.value is not None
        and (row.expires_at is None or row.expires_at > timezone.now())
    ):
        return stored_entry_from_row(row)
    return None


class CacheEntryForm(forms.ModelForm):
    """Value and metadata as pretty-printed JSON, the TTL in seconds, and the version the
    operator saw (sent as If-Match, so a concurrent write is not silently overwritten)."""

    value_json = forms.CharField(label="Value (JSON)", widget=forms.Textarea(attrs={"rows": 18, **_MONO}), strip=False)
    metadata_json = forms.CharField(
        label="Metadata (JSON object)",
        required=False,
        initial="{}",
        widget=forms.Textarea(attrs={"rows": 5, **_MONO}),
    )
    ttl = forms.IntegerField(
        label="TTL (seconds)",
        required=False,
        min_value=0,
        max_value=MAX_TTL_SECONDS,
        help_text="Seconds from now. 0 = never expires; empty = REDIS_DEFAULT_TTL.",
    )
    if_match = forms.IntegerField(required=False, widget=forms.HiddenInput)

    class Meta:
        model = CacheEntry
        fields = ["key"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adding = self.instance._state.adding and not getattr(self.instance, "redis_only", False)
        if "key" in self.fields:
            self.fields["key"].help_text = KEY_RULE
        if not self.adding:
            current = _current(self.instance.key, self.instance)
            if current is not None:
                self.initial.update(
                    value_json=_pretty(current.value_json),
                    metadata_json=_pretty(current.metadata_json),
                    ttl=current.ttl() or 0,
                    if_match=current.version,
                )

    def clean_key(self) -> str:
        key = self.cleaned_data["key"]
        if not is_valid_key(key):
            raise forms.ValidationError(f"invalid key {key!r}: keys are {KEY_RULE}")
        if self.adding and _current(key, None) is not None:
            raise forms.ValidationError("this key exists already: open it from the list to edit it")
        return key

    def clean_value_json(self) -> bytes:
        return _json_field(self.cleaned_data["value_json"], "value", max_size=settings.BIRB.max_value_size)

    def clean_metadata_json(self) -> bytes:
        raw = self.cleaned_data.get("metadata_json") or "{}"
        encoded = _json_field(raw, "metadata", max_size=None)
        if not encoded.startswith(b"{"):
            raise forms.ValidationError('metadata must be a JSON object, e.g. {"source": "console"}')
        return encoded

    def validate_unique(self) -> None:
        # A deleted or expired key may be written again; clean_key refuses only a live one.
        pass


def _json_field(raw: str, name: str, *, max_size: int | None) -> bytes:
    try:
        encoded = orjson.dumps(orjson.loads(raw))
    except orjson.JSONDecodeError as error:
        raise forms.ValidationError(f"{name} is not valid JSON: {error}") from None
    except orjson.JSONEncodeError as error:
        raise forms.ValidationError(f"{name} cannot be stored: {error}") from None
    if max_size is not None and len(encoded) > max_size:
        raise forms.ValidationError(f"{name} is {len(encoded)} bytes of JSON; the limit (MAX_VALUE_SIZE) is {max_size}")
    if _NUL.search(encoded):
        raise forms.ValidationError(f"{name} contains the character U+0000, which PostgreSQL cannot store")
    return encoded


# --- display helpers -------------------------------------------------------------------------


def _human_bytes(size: int | None) -> str:
    if size is None:
        return "—"
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return ""


def _human_seconds(seconds: float) -> str:
    seconds = math.ceil(seconds)
    if seconds < 120:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def _icon(value: bool | None) -> str:
    name = {True: "yes", False: "no", None: "unknown"}[value]
    return format_html('<img src="{}" alt="{}">', static(f"admin/img/icon-{name}.svg"), name)


def _pre(raw: bytes) -> str:
    return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', _pretty(raw))


def _write_failed(request: HttpRequest, message: str) -> None:
    request.birb_write_error = message  # type: ignore[attr-defined]


def _write_error(request: HttpRequest) -> str:
    return getattr(request, "birb_write_error", "")


# --- the admin -------------------------------------------------------------------------------


@admin.register(CacheEntry)
class CacheEntryAdmin(admin.ModelAdmin):
    form = CacheEntryForm
    list_display = ("key", "version", "size", "ttl_left", "updated_at", "in_redis", "state")
    list_display_links = ("key",)
    list_filter = (StateFilter, InRedisFilter, UpdatedFilter)
    search_fields = ("key",)
    search_help_text = (
        "Key prefix (uses the index): 'user:' finds user:1, user:42 … "
        "Start with * to search anywhere in the key ('*:42'); that scans the whole table."
    )
    ordering = ("key",)
    list_per_page = 100
    list_max_show_all = 200
    show_full_result_count = False
    show_facets = ShowFacets.NEVER
    paginator = CacheEntryPaginator
    actions = ("rehydrate_selected", "rehydrate_selected_force", "evict_selected", "delete_selected")
    readonly_fields = (
        "state",
        "version",
        "redis_state",
        "ttl_left",
        "expires_at",
        "created_at",
        "updated_at",
        "stored_size",
        "value_pretty",
        "metadata_pretty",
    )

    # -- queryset, list, search

    def get_queryset(self, request: HttpRequest) -> QuerySet[CacheEntry]:
        size = Func(F("value"), function="pg_column_size", output_field=IntegerField())
        return super().get_queryset(request).annotate(size=size)

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return CacheEntryChangeList

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        # The scan position of the "in Redis" filter is ours: the ChangeList would take an
        # unknown parameter for a field lookup.
        if SCAN_VAR in request.GET:
            query = request.GET.copy()
            scan_from = query.pop(SCAN_VAR)[-1]
            # django-stubs types request.GET as the immutable QueryDict Django builds; a view may replace it.
            request.GET = query  # type: ignore[assignment]
            try:
                request.birb_scan_from = int(scan_from)  # type: ignore[attr-defined]
            except ValueError:
                request.birb_scan_from = 0  # type: ignore[attr-defined]
        response = super().changelist_view(request, extra_context)
        cl = (getattr(response, "context_data", None) or {}).get("cl")
        if redis_error := getattr(cl, "redis_error", ""):
            messages.warning(
                request, f"Redis did not answer: the 'in Redis' column and filter are not applied ({redis_error})."
            )
        return response

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[CacheEntry], search_term: str
    ) -> tuple[QuerySet[CacheEntry], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        if term.startswith("*"):
            return queryset.filter(key__contains=term.lstrip("*")), False
        return queryset.filter(key__startswith=term), False

    @admin.display(description="size", ordering="size")
    def size(self, obj: CacheEntry) -> str:
        return _human_bytes(getattr(obj, "size", None))

    @admin.display(description="TTL left", ordering="expires_at")
    def ttl_left(self, obj: CacheEntry) -> str:
        if obj.expires_at is None:
            return "never"
        left = (obj.expires_at - timezone.now()).total_seconds()
        return "expired" if left <= 0 else _human_seconds(left)

    @admin.display(description="in Redis")
    def in_redis(self, obj: CacheEntry) -> str:
        copy: RedisCopy | None = getattr(obj, "redis_copy", None)
        if copy is None:
            return _icon(None)
        if copy.live and copy.version is not None and copy.version > obj.version:
            # Written, not yet persisted: Redis is ahead of PostgreSQL (write-behind lag).
            return format_html("{} v{} (newer)", _icon(True), copy.version)
        if copy.tombstone and not obj.deleted:
            return format_html("{} deleted (v{})", _icon(False), copy.version)
        return _icon(copy.live)

    @admin.display(description="state", ordering="deleted")
    def state(self, obj: CacheEntry) -> str:
        if getattr(obj, "redis_only", False):
            return "in Redis only: the worker has not written it to PostgreSQL yet"
        if obj.deleted:
            return "deleted (tombstone)"
        if obj.expires_at is not None and obj.expires_at <= timezone.now():
            return "expired"
        return "live"

    # -- detail

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> CacheEntry | None:
        """The row; else, for a key written but not yet persisted, its Redis copy (unsaved)."""
        obj = super().get_object(request, object_id, from_field)
        if obj is not None or from_field is not None or not is_valid_key(object_id):
            return obj
        current = _current(object_id, None)
        if current is None:
            return None
        obj = CacheEntry(
            key=current.key,
            value=JSONText(current.value_json),
            version=current.version,
            metadata=JSONText(current.metadata_json),
            expires_at=datetime.fromtimestamp(current.expires_at_ms / 1000, tz=UTC) if current.expires_at_ms else None,
            created_at=datetime.fromisoformat(current.created_at),
            updated_at=datetime.fromisoformat(current.updated_at),
        )
        obj.redis_only = True  # type: ignore[attr-defined]
        return obj

    def get_fieldsets(self, request: HttpRequest, obj: CacheEntry | None = None) -> Any:
        write_note = (
            "Saving writes through the API's write path: a new version, made durable in JetStream and "
            "put in Redis at once; the worker writes PostgreSQL shortly after."
        )
        if obj is None:
            return [(None, {"fields": ["key", "value_json", "metadata_json", "ttl"], "description": write_note})]
        if self.has_change_permission(request, obj):
            main = {"fields": ["key", "value_json", "metadata_json", "ttl", "if_match"], "description": write_note}
        else:
            main = {"fields": ["key", "value_pretty", "metadata_pretty"]}
        stored = ["state", "version", "redis_state", "ttl_left", "expires_at", "created_at", "updated_at"]
        return [
            (None, main),
            ("PostgreSQL row and Redis copy", {"fields": [*stored, "stored_size"]}),
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: CacheEntry | None = None) -> Any:
        return ("key", *self.readonly_fields) if obj is not None else ()

    @admin.display(description="Redis copy")
    def redis_state(self, obj: CacheEntry) -> str:
        try:
            cached = redis_store.read(obj.key)
        except RedisError as error:
            return f"unknown: Redis did not answer ({error})"
        if cached is None:
            return "not in Redis (the next read loads it from PostgreSQL)"
        if isinstance(cached, StoredEntry):
            ttl = cached.ttl()
            left = "never expires" if ttl is None else f"TTL {_human_seconds(ttl)}"
            ahead = (
                " — newer than PostgreSQL: the worker has not written it yet" if cached.version > obj.version else ""
            )
            return f"version {cached.version}, {left}{ahead}"
        return "deleted (a tombstone)"

    @admin.display(description="stored size")
    def stored_size(self, obj: CacheEntry) -> str:
        return _human_bytes(getattr(obj, "size", None))

    @admin.display(description="value")
    def value_pretty(self, obj: CacheEntry) -> str:
        current = _current(obj.key, obj)
        text = _pretty(current.value_json if current else _row_text(obj.value))
        return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', text)

    @admin.display(description="metadata")
    def metadata_pretty(self, obj: CacheEntry) -> str:
        current = _current(obj.key, obj)
        text = _pretty(current.metadata_json if current else _row_text(obj.metadata))
        return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', text)

    # -- permissions: writing a key (new or not) is the same service call

    def has_add_permission(self, request: HttpRequest) -> bool:
        return self.has_change_permission(request)

    def has_rehydrate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("persistence.rehydrate_cacheentry")

    def has_evict_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("persistence.evict_cacheentry")

    # -- writes, through the services

    def save_model(self, request: HttpRequest, obj: CacheEntry, form: CacheEntryForm, change: bool) -> None:
        data = form.cleaned_data
        if_match = data.get("if_match") if change else None
        try:
            result = cache_entry_set(
                key=obj.key,
                value_json=data["value_json"],
                ttl=data.get("ttl"),
                metadata_json=data["metadata_json"],
                if_match=if_match,
            )
        except VersionMismatchError as error:
            _write_failed(
                request,
                f"Not saved: “{obj.key}” was changed by someone else (it is at version {error.current}, "
                f"you edited version {error.expected}). Here is the current value; edit it again.",
            )
            return
        except ServiceUnavailableError as error:
            _write_failed(request, f"Not saved: {error.message} ({error.details}). Nothing was changed.")
            return
        except PayloadTooLargeError as error:
            _write_failed(
                request,
                f"Not saved: value and metadata take up to {error.size} bytes as a stream message; the message "
                f"broker accepts {error.limit}. Nothing was changed.",
            )
            return
        audit_record(
            action="entry.edit" if change else "entry.create",
            target=obj.key,
            details={"version": result.entry.version, "ttl": data.get("ttl"), "if_match": if_match},
            request=request,
        )
        messages.info(
            request,
            f"Version {result.entry.version} of “{obj.key}” is durable in JetStream and served from Redis now; "
            "PostgreSQL shows it once the worker has written it (normally within a second).",
        )

    def log_addition(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        return None if _write_error(request) else super().log_addition(request, obj, message)

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        return None if _write_error(request) else super().log_change(request, obj, message)

    def response_add(self, request: HttpRequest, obj: CacheEntry, post_url_continue: str | None = None) -> HttpResponse:
        if error := _write_error(request):
            messages.error(request, error)
            return HttpResponseRedirect(request.path)
        return super().response_add(request, obj, post_url_continue)

    def response_change(self, request: HttpRequest, obj: CacheEntry) -> HttpResponse:
        if error := _write_error(request):
            messages.error(request, error)
            return HttpResponseRedirect(request.path)
        return super().response_change(request, obj)

    def log_deletions(self, request: HttpRequest, queryset: Any) -> list[LogEntry]:
        # Django logs before deleting; ours can fail, so delete_model / the action log after.
        return []

    def delete_model(self, request: HttpRequest, obj: CacheEntry) -> None:
        try:
            version = cache_entry_delete(key=obj.key)
        except KeyNotFoundError:
            _write_failed(request, f"“{obj.key}” is already deleted or expired: nothing to delete.")
            return
        except ServiceUnavailableError as error:
            _write_failed(request, f"Not deleted: {error.message} ({error.details}).")
            return
        # A list, as Django's own delete_view passes; django-stubs asks for a QuerySet.
        super().log_deletions(request, [obj])  # type: ignore[arg-type]
        audit_record(action="entry.delete", target=obj.key, details={"version": version}, request=request)
        messages.info(
            request,
            f"“{obj.key}” is deleted as of version {version}: Redis holds a tombstone now, and the worker "
            "turns the PostgreSQL row into a tombstone shortly (a late, older write can never bring it back).",
        )

    def response_delete(self, request: HttpRequest, obj_display: str, obj_id: Any) -> HttpResponse:
        if error := _write_error(request):
            messages.error(request, error)
            return HttpResponseRedirect(reverse("admin:persistence_cacheentry_change", args=[obj_id]))
        return super().response_delete(request, obj_display, obj_id)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[CacheEntry]) -> None:
        self._delete_keys(request, list(queryset))

    def _delete_keys(self, request: HttpRequest, rows: list[CacheEntry]) -> None:
        deleted: list[CacheEntry] = []
        absent: list[str] = []
        failed: dict[str, str] = {}
        for row in rows:
            try:
                cache_entry_delete(key=row.key)
                deleted.append(row)
            except KeyNotFoundError:
                absent.append(row.key)
            except ServiceUnavailableError as error:
                failed[row.key] = error.message
        if deleted:
            super().log_deletions(request, deleted)  # type: ignore[arg-type]  # a list, as in delete_model
            deleted_keys = [row.key for row in deleted]
            audit_record(
                action="entry.delete",
                target=audit_items(deleted_keys),
                details={"count": len(deleted_keys), "keys": audit_list(deleted_keys)},
                request=request,
            )
            self.message_user(
                request,
                f"Deleted {len(deleted)} entries (tombstones in Redis now; in PostgreSQL once the worker ran).",
                messages.SUCCESS,
            )
        if absent:
            self.message_user(
                request, f"{len(absent)} already deleted or expired: {_listing(absent)}", messages.WARNING
            )
        if failed:
            self.message_user(
                request,
                f"{len(failed)} not deleted: {_listing([f'{k} ({e})' for k, e in failed.items()])}",
                messages.ERROR,
            )

    # -- actions

    def _selected(
        self, request: HttpRequest, queryset: QuerySet[CacheEntry], fields: tuple[str, ...]
    ) -> list[Any] | None:
        rows = list(queryset.order_by().values_list(*fields)[: ACTION_LIMIT + 1])
        if len(rows) > ACTION_LIMIT:
            self.message_user(
                request,
                f"More than {ACTION_LIMIT:,} entries selected: an action works on at most {ACTION_LIMIT:,}. "
                "To rehydrate more, start a rehydration job (all entries or a key prefix) from Rehydration jobs.",
                messages.ERROR,
            )
            return None
        return rows

    @admin.action(description="Rehydrate selected into Redis (keep newer Redis copies)", permissions=["rehydrate"])
    def rehydrate_selected(self, request: HttpRequest, queryset: QuerySet[CacheEntry]) -> None:
        self._rehydrate(request, queryset, force=False)

    @admin.action(
        description="Rehydrate selected into Redis, replacing what Redis has (force)", permissions=["rehydrate"]
    )
    def rehydrate_selected_force(self, request: HttpRequest, queryset: QuerySet[CacheEntry]) -> None:
        self._rehydrate(request, queryset, force=True)

    def _rehydrate(self, request: HttpRequest, queryset: QuerySet[CacheEntry], *, force: bool) -> None:
        rows = self._selected(request, queryset, ("key",))
        if rows is None:
            return
        try:
            result = cache_entries_rehydrate(keys=[key for (key,) in rows], force=force)
        except RedisError as error:
            self.message_user(request, f"Nothing rehydrated: Redis did not answer ({error}).", messages.ERROR)
            return
        keys = [key for (key,) in rows]
        audit_record(
            action="entry.rehydrate",
            target=audit_items(keys),
            details={
                "count": len(keys),
                "keys": audit_list(keys),
                "force": force,
                "loaded": result.loaded,
                "skipped": result.skipped_present,
                "missing": result.missing,
                "failed": result.failed,
            },
            request=request,
        )
        parts = [f"Rehydrated {result.loaded} entries into Redis"]
        if result.skipped_present:
            parts.append(f"{result.skipped_present} left alone: Redis already has them at the same or a newer version")
        if result.missing:
            parts.append(f"{result.missing} not loaded: deleted or expired")
        self.message_user(request, "; ".join(parts) + ".", messages.SUCCESS)
        if result.failed:
            failed = [f"{failure.key} ({failure.reason})" for failure in result.failures]
            self.message_user(
                request, f"{result.failed} could not be loaded into Redis: {_listing(failed)}", messages.ERROR
            )

    @admin.action(description="Evict selected from Redis (PostgreSQL keeps them)", permissions=["evict"])
    def evict_selected(self, request: HttpRequest, queryset: QuerySet[CacheEntry]) -> None:
        rows = self._selected(request, queryset, ("key", "version"))
        if rows is None:
            return
        try:
            copies = redis_copies([key for key, _ in rows])
            # Atomically per key: drop the Redis copy only if it is not newer than the row, so an
            # acknowledged write the worker has not persisted yet is never thrown away.
            evicted = redis_store.evict_stale(
                {key: version + 1 for key, version in rows if copies[key].version}, mark=False
            )
        except RedisError as error:
            self.message_user(request, f"Nothing evicted: Redis did not answer ({error}).", messages.ERROR)
            return
        absent = sum(1 for key, _ in rows if copies[key].version is None)
        kept = len(rows) - absent - evicted
        keys = [key for key, _ in rows]
        audit_record(
            action="entry.evict",
            target=audit_items(keys),
            details={"count": len(keys), "keys": audit_list(keys), "evicted": evicted, "kept": kept, "absent": absent},
            request=request,
        )
        message = f"Evicted {evicted} entries from Redis; PostgreSQL keeps them and the next read loads them back."
        if absent:
            message += f" {absent} were not in Redis."
        if kept:
            message += f" {kept} kept: Redis holds a newer version that the worker has not written to PostgreSQL yet."
        self.message_user(request, message, messages.SUCCESS)

    @admin.action(description="Delete selected cache entries", permissions=["delete"])
    def delete_selected(self, request: HttpRequest, queryset: QuerySet[CacheEntry]) -> HttpResponse | None:
        """Django's confirmation page, then deletes through the service (tombstones)."""
        if self._selected(request, queryset, ("key",)) is None:
            return None
        if request.POST.get("post"):
            self._delete_keys(request, list(queryset.order_by("key")))
            return None
        return django_delete_selected(self, request, queryset)


def _listing(items: list[str], shown: int = 10) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
