"""Console: rate-limit settings (one row) and per-client rules (limit override, block, counters).

Every save goes through the services of :mod:`ops.ratelimit` or the model signals, so the
compiled config is published to Redis when the admin's transaction commits, and every API
process applies it within a second. If Redis is down at that moment the change is kept in
PostgreSQL and the operator is told to save again, instead of getting an error page.

Every change made here goes into the audit log in the same transaction as the change
(``ratelimit.change``; ``ratelimit.client_add``/``_change``/``_delete``/``_block``/``_unblock``/
``_clear``). ``POST /admin/ratelimit`` records its changes in ``ops/ratelimit/api.py``, not here.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from redis.exceptions import RedisError

from ops.audit import audit_record
from ops.models import RateLimitClient, RateLimitSettings
from ops.ratelimit import (
    ratelimit_client_block,
    ratelimit_client_clear,
    ratelimit_client_counts,
    ratelimit_client_unblock,
    ratelimit_config_live,
    ratelimit_settings_row,
    ratelimit_settings_update,
)


class _ReportsUnpublished(admin.ModelAdmin):
    """Turns "saved, but Redis could not take the new config" into a message, not a 500."""

    def _changelist_url(self) -> str:
        opts = self.model._meta
        return reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist", current_app=self.admin_site.name)

    def _unpublished(self, request: HttpRequest, error: RedisError) -> HttpResponse:
        self.message_user(
            request,
            f"Saved in PostgreSQL, but not applied: Redis is unreachable ({error}). "
            "Save again (or repeat the action) once Redis is back.",
            messages.ERROR,
        )
        return HttpResponseRedirect(self._changelist_url())

    def changeform_view(
        self, request: HttpRequest, object_id: str | None = None, form_url: str = "", extra_context: Any = None
    ) -> HttpResponse:
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except RedisError as error:
            return self._unpublished(request, error)

    def delete_view(self, request: HttpRequest, object_id: str, extra_context: Any = None) -> HttpResponse:
        try:
            return super().delete_view(request, object_id, extra_context)
        except RedisError as error:
            return self._unpublished(request, error)


@admin.register(RateLimitSettings)
class RateLimitSettingsAdmin(_ReportsUnpublished):
    """The single settings row: no list, no add, no delete; the list opens the row."""

    fields = ("enabled", "limit", "window", "algorithm", "in_effect", "updated_at", "updated_by")
    readonly_fields = ("in_effect", "updated_at", "updated_by")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        try:
            row = ratelimit_settings_row()
        except RedisError as error:  # the row was created (with the defaults) but not published
            self.message_user(request, f"Redis is unreachable ({error}); changes will not apply yet.", messages.ERROR)
            row = ratelimit_settings_row()
        opts = self.model._meta
        return HttpResponseRedirect(
            reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[row.pk], current_app=self.admin_site.name)
        )

    def save_model(self, request: HttpRequest, obj: RateLimitSettings, form: Any, change: bool) -> None:
        # The same write path as POST /admin/ratelimit.
        ratelimit_settings_update(
            enabled=obj.enabled,
            limit=obj.limit,
            window=obj.window,
            algorithm=obj.algorithm,
            by=request.user.get_username(),
        )
        # In the admin's transaction, with the change (the publish waits for the commit).
        audit_record(
            action="ratelimit.change",
            target="settings",
            details={
                "changed": _changes(form),
                "settings": {
                    "enabled": obj.enabled,
                    "limit": obj.limit,
                    "window": obj.window,
                    "algorithm": obj.algorithm,
                },
            },
            request=request,
        )

    @admin.display(description="applied by the API processes")
    def in_effect(self, obj: RateLimitSettings) -> str:
        try:
            live = ratelimit_config_live()
        except RedisError as error:
            return f"unknown: Redis is unreachable ({error})"
        if live is None:
            return "not in Redis yet (the next API request rebuilds it from these settings)"
        state = "on" if live.enabled else "off"
        text = f"rate limiting {state}: {live.limit} per {live.window}s ({live.algorithm})"
        if live.overrides:
            text += f"; {len(live.overrides)} client override(s)"
        if live.blocked:
            text += f"; {len(live.blocked)} blocked client(s)"
        return text


@admin.register(RateLimitClient)
class RateLimitClientAdmin(_ReportsUnpublished):
    """Per-client rules; the list shows each client's count in the current window."""

    list_display = ("client", "limit", "blocked", "current_count", "note", "updated_at")
    list_filter = ("blocked",)
    search_fields = ("client", "note")
    fields = ("client", "limit", "blocked", "note")
    actions = ["block_selected", "unblock_selected", "clear_counters"]

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        # One pipelined Redis read for the page; the template reuses these same instances.
        rows = list(changelist.result_list)
        counts = ratelimit_client_counts(clients=[row.client for row in rows])
        for row in rows:
            row.ratelimit_count = counts.get(row.client)
        return changelist

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        try:
            return super().changelist_view(request, extra_context)
        except RedisError as error:  # delete_selected publishes when it commits
            return self._unpublished(request, error)

    # -- writes: the change form and delete (in the admin's transaction), and the actions

    def save_model(self, request: HttpRequest, obj: RateLimitClient, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit_record(
            action="ratelimit.client_change" if change else "ratelimit.client_add",
            target=obj.client,
            details={"changed": _changes(form), "limit": obj.limit, "blocked": obj.blocked},
            request=request,
        )

    def delete_model(self, request: HttpRequest, obj: RateLimitClient) -> None:
        super().delete_model(request, obj)
        audit_record(action="ratelimit.client_delete", target=obj.client, request=request)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[RateLimitClient]) -> None:
        clients = list(queryset.values_list("client", flat=True))
        super().delete_queryset(request, queryset)
        for client in clients:
            audit_record(action="ratelimit.client_delete", target=client, request=request)

    @admin.display(description="requests in this window")
    def current_count(self, obj: RateLimitClient) -> str:
        count = getattr(obj, "ratelimit_count", None)
        return "—" if count is None else str(count)

    def _run(
        self, request: HttpRequest, queryset: QuerySet[RateLimitClient], service: Any, action: str, outcome: str
    ) -> list[Any] | None:
        """Run ``service`` for each selected client; ``outcome`` names its result in the audit entry."""
        clients = list(queryset.values_list("client", flat=True))
        results = []
        try:
            for client in clients:
                with transaction.atomic():  # the change and its audit entry commit together
                    result = service(client=client)
                    audit_record(action=action, target=client, details={outcome: result}, request=request)
                results.append(result)
        except RedisError as error:
            self.message_user(request, f"Stopped: Redis is unreachable ({error}). Repeat the action.", messages.ERROR)
            return None
        return results

    @admin.action(description="Block selected clients", permissions=["change"])
    def block_selected(self, request: HttpRequest, queryset: QuerySet[RateLimitClient]) -> None:
        results = self._run(request, queryset, ratelimit_client_block, "ratelimit.client_block", "changed")
        if results is not None:
            unchanged = len(results) - sum(results)
            self.message_user(request, f"Blocked {sum(results)} client(s); {unchanged} already were.")

    @admin.action(description="Unblock selected clients", permissions=["change"])
    def unblock_selected(self, request: HttpRequest, queryset: QuerySet[RateLimitClient]) -> None:
        results = self._run(request, queryset, ratelimit_client_unblock, "ratelimit.client_unblock", "changed")
        if results is not None:
            unchanged = len(results) - sum(results)
            self.message_user(request, f"Unblocked {sum(results)} client(s); {unchanged} were not blocked.")

    @admin.action(description="Clear the request counters of selected clients", permissions=["change"])
    def clear_counters(self, request: HttpRequest, queryset: QuerySet[RateLimitClient]) -> None:
        results = self._run(request, queryset, ratelimit_client_clear, "ratelimit.client_clear", "counters_deleted")
        if results is not None:
            active = sum(1 for deleted in results if deleted)
            self.message_user(
                request,
                f"Cleared the counters of {len(results)} client(s) ({active} had requests in the current window).",
            )


def _changes(form: Any) -> dict[str, list[Any]]:
    """The fields the operator changed in the form: ``{name: [before, after]}``."""
    return {name: [form.initial.get(name), form.cleaned_data.get(name)] for name in form.changed_data}
