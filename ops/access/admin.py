"""API keys in the console: listed and revoked here; made and rotated with ``manage.py apikey``
(the new key is printed once, which a form round trip cannot do safely yet)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse

from ops.access.keyring import last_used_sync
from ops.access.keys import apikey_revoke, apikey_state
from ops.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = (
        "name", "public_id", "state", "scopes", "key_prefixes", "owner", "expires_at", "created_at", "last_used_at"
    )  # fmt: skip
    search_fields = ("name", "public_id")
    readonly_fields = [field.name for field in ApiKey._meta.fields if field.name != "key_hash"]
    exclude = ("key_hash",)
    actions = ["revoke_selected"]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        last_used_sync()  # the times the API processes reported to Redis
        return super().changelist_view(request, extra_context)

    @admin.display(description="state")
    def state(self, obj: ApiKey) -> str:
        return apikey_state(obj)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # `manage.py apikey create NAME` prints the key once

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # revoked keys stay listed: who had access, until when

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = [
            apikey_revoke(name=row.name, request=request).name for row in queryset.filter(revoked_at__isnull=True)
        ]
        self.message_user(request, f"revoked {len(revoked)} key(s): {', '.join(revoked) or 'none'}", messages.INFO)
