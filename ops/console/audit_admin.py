"""The audit log in the console: every operator action that changed data or state, newest first,
filtered by action, actor and date, searched by target or actor.

Read-only for everyone (``ops.view_auditentry``, which the "viewer" and "operator" groups have):
no page adds or changes a row; only a superuser may delete rows (to prune an old log), and that
deletion is itself recorded (``audit.delete``, with the count and the time span removed). Rows are
written by :func:`ops.audit.audit_record` alone.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.db.models import Max, Min, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from ops.audit import audit_record
from ops.models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ("at", "actor", "address", "action", "target_short", "details_short")
    list_display_links = ("at",)
    list_filter = ("action", "actor")
    date_hierarchy = "at"
    search_fields = ("target", "actor")
    search_help_text = "Part of the target (a key, an id, a client) or of the actor."
    list_per_page = 100
    fields = ("at", "actor", "address", "action", "target", "details_pretty")
    readonly_fields = fields

    # -- append-only: nobody adds or changes a row here; only a superuser deletes

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_superuser)

    def delete_model(self, request: HttpRequest, obj: AuditEntry) -> None:
        self.delete_queryset(request, AuditEntry.objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[AuditEntry]) -> None:
        # In the admin's transaction: the rows go, and the record that they went stays.
        span = queryset.aggregate(oldest=Min("at"), newest=Max("at"))
        count, _ = queryset.delete()
        audit_record(
            action="audit.delete",
            target=f"{count} audit entries",
            details={
                "count": count,
                "oldest": span["oldest"].isoformat() if span["oldest"] else None,
                "newest": span["newest"].isoformat() if span["newest"] else None,
            },
            request=request,
        )

    # -- columns

    @admin.display(description="target", ordering="target")
    def target_short(self, entry: AuditEntry) -> str:
        return entry.target if len(entry.target) <= 80 else entry.target[:79] + "…"

    @admin.display(description="details")
    def details_short(self, entry: AuditEntry) -> str:
        text = json.dumps(entry.details, ensure_ascii=False, sort_keys=True) if entry.details else ""
        return text if len(text) <= 100 else text[:99] + "…"

    @admin.display(description="details")
    def details_pretty(self, entry: AuditEntry) -> str:
        text = json.dumps(entry.details, indent=2, ensure_ascii=False, sort_keys=True)
        return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', text)
