"""What the operator console stores: rate-limit settings, per-client rules, rehydration jobs,
API keys and the audit log of operator actions.

Dead letters live in JetStream, not here; :class:`DeadLetter` and :class:`Console` are
unmanaged models that exist only to carry the permissions the admin checks.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class RateLimitSettings(models.Model):
    """The one row of rate-limit settings (pk = 1), applied by every API process within 1 s."""

    FIXED = "fixed"
    SLIDING = "sliding"
    ALGORITHMS = [(FIXED, "fixed window"), (SLIDING, "sliding window")]

    enabled = models.BooleanField(default=False)
    limit = models.PositiveIntegerField(default=100, help_text="requests per window and client")
    window = models.PositiveIntegerField(default=60, help_text="seconds")
    algorithm = models.CharField(max_length=16, choices=ALGORITHMS, default=FIXED)
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.CharField(max_length=150, blank=True)

    class Meta:
        verbose_name = "rate-limit settings"
        verbose_name_plural = "rate-limit settings"

    def __str__(self) -> str:
        state = "on" if self.enabled else "off"
        return f"rate limiting {state}: {self.limit} per {self.window}s ({self.algorithm})"


class RateLimitClient(models.Model):
    """A client (its IP address) with its own limit, or blocked."""

    client = models.CharField(
        max_length=255, unique=True, help_text="an API key's public id (bn_...) or a client IP address"
    )
    limit = models.PositiveIntegerField(null=True, blank=True, help_text="overrides the default limit")
    blocked = models.BooleanField(default=False)
    note = models.CharField(max_length=255, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "rate-limit client rule"
        ordering = ["client"]

    def __str__(self) -> str:
        return self.client


class RehydrationJob(models.Model):
    """A background rehydration (all entries, or a key prefix) started from the console.

    ``active`` is True while the job is queued or running and NULL afterwards; its unique
    constraint lets only one job be active at a time.
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STATUSES = [(QUEUED, "queued"), (RUNNING, "running"), (DONE, "done"), (FAILED, "failed")]

    prefix = models.CharField(max_length=255, blank=True, help_text="empty = every live entry")
    force = models.BooleanField(default=False, help_text="overwrite what Redis has")
    status = models.CharField(max_length=16, choices=STATUSES, default=QUEUED)
    active = models.BooleanField(null=True, default=True, unique=True, editable=False)
    total = models.PositiveBigIntegerField(default=0)
    done = models.PositiveBigIntegerField(default=0)
    loaded = models.PositiveBigIntegerField(default=0)
    skipped = models.PositiveBigIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("run_rehydrationjob", "Can start a rehydration")]

    def __str__(self) -> str:
        what = f"prefix {self.prefix!r}" if self.prefix else "all entries"
        return f"rehydrate {what} ({self.status})"


class DeadLetter(models.Model):
    """Permissions for the dead-letter pages (the letters themselves are in BIRB_CACHE_DLQ)."""

    class Meta:
        managed = False
        default_permissions = ("view",)
        permissions = [("retry_deadletter", "Can retry dead letters"), ("purge_deadletter", "Can purge dead letters")]


class Console(models.Model):
    """Permissions for console pages that have no model of their own."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [("view_dashboard", "Can view the live dashboard")]


class ApiKey(models.Model):
    """A key for ``/v1/`` and ``/admin/ratelimit``: only its keyed hash is stored.

    The full key (``<public_id>_<secret>``) is shown once, when it is made. ``public_id``
    (``bn_`` and 8 hex digits) names it in lists, logs and metrics; it is not a secret.
    """

    SCOPES = ("read", "write", "delete", "admin")

    name = models.CharField(max_length=100, unique=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    public_id = models.CharField(max_length=16, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    scopes = models.JSONField(default=list, help_text="read, write, delete, admin")
    key_prefixes = models.JSONField(default=list, blank=True, help_text="cache-key prefixes it is confined to")
    rate_limit = models.PositiveIntegerField(null=True, blank=True, help_text="overrides the global limit")
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.public_id})"


class AuditEntry(models.Model):
    """One operator action that changed data or state: who, when, what, from where.

    Written only by :func:`ops.audit.audit_record`. Append-only: no console page or command
    edits a row; the admin lets only a superuser delete them. ``actor`` is a username,
    ``cli:<os user>`` for a management command, or ``key:<public id>`` for an API key;
    ``address`` the client's address (``REMOTE_ADDR``) or ``cli``. Never holds a secret.
    """

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(max_length=200, db_index=True)
    address = models.CharField(max_length=64, blank=True)
    action = models.CharField(max_length=64, db_index=True, help_text="e.g. entry.edit, deadletter.purge")
    target = models.TextField(blank=True, help_text="what it acted on: a key, ids, a client")
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name = "audit entry"
        verbose_name_plural = "audit log"
        # Only "view" is a permission anyone can be given; deleting is for superusers (the admin
        # checks is_superuser), and no one adds or changes a row.
        default_permissions = ("view",)

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.target}".rstrip()
