"""Rehydration jobs in the console: start one (all entries, or a key prefix), watch it, cancel it.

The admin only queues the job (:func:`ops.console.jobs.rehydration_job_start`); ``manage.py runjobs``
runs it outside any web request and writes its progress to the row, which these pages show
(refreshing every 2 s while a job is active). Starting and cancelling need
``ops.run_rehydrationjob``; the job rows themselves are read-only. A start or a cancel and its
audit entry (``job.start``, ``job.cancel``) are committed together.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.views.decorators.http import require_POST

from ops.audit import audit_record
from ops.console.jobs import (
    InvalidPrefixError,
    JobAlreadyRunningError,
    job_progress,
    job_target,
    rehydration_job_active,
    rehydration_job_cancel,
    rehydration_job_start,
    runner_alive,
)
from ops.models import RehydrationJob
from persistence.keys import KEY_RULE

RUN = "ops.run_rehydrationjob"
NO_RUNNER = (
    "No job runner is running, so queued jobs wait: start one with `.venv/bin/python manage.py runjobs` "
    "(`make run` starts one)."
)


class StartForm(forms.Form):
    # Named like BaseForm.prefix (the HTML name prefix, None here): Django's form metaclass takes
    # declared fields off the class, so the two never meet; mypy sees one attribute with two types.
    prefix = forms.CharField(  # type: ignore[assignment]
        required=False,
        max_length=255,
        help_text=f"Only keys starting with this ({KEY_RULE}); e.g. user: — ignored by “Rehydrate all”.",
    )
    force = forms.BooleanField(
        required=False,
        label="Replace what Redis has (force)",
        help_text="Without it, an entry Redis holds at the same or a newer version is left alone.",
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


@admin.register(RehydrationJob)
class RehydrationJobAdmin(admin.ModelAdmin):
    list_display = ("id", "what", "force", "status", "progress", "rate", "result", "created_by", "created_at")
    list_display_links = ("id", "what")
    list_filter = ("status",)
    list_select_related = ("created_by",)
    list_per_page = 50
    fields = (
        "what",
        "force",
        "status",
        "progress",
        "rate",
        "elapsed",
        "result",
        "error",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
    )
    readonly_fields = fields

    # -- read-only rows: jobs are started and cancelled through the views below

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_run_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(RUN)

    # -- columns

    @admin.display(description="what")
    def what(self, job: RehydrationJob) -> str:
        return f"keys starting with {job.prefix!r}" if job.prefix else "all entries"

    @admin.display(description="progress")
    def progress(self, job: RehydrationJob) -> str:
        p = job_progress(job)
        if job.status == RehydrationJob.QUEUED:
            return "waiting for the job runner"
        percent = f" ({p.percent:.1f}%)" if p.percent is not None else ""
        bar = format_html(
            '<progress max="{}" value="{}" style="width: 8em; vertical-align: middle"></progress> ',
            max(p.total, 1),
            min(p.done, max(p.total, 1)),
        )
        return format_html("{}{} / {}{}", bar, f"{p.done:,}", f"{p.total:,}", percent)

    @admin.display(description="rate")
    def rate(self, job: RehydrationJob) -> str:
        p = job_progress(job)
        if p.rate is None:
            return "—"
        left = f", about {_duration(p.remaining.total_seconds())} left" if p.remaining else ""
        return f"{p.rate:,.0f} entries/s{left}"

    @admin.display(description="elapsed")
    def elapsed(self, job: RehydrationJob) -> str:
        p = job_progress(job)
        return _duration(p.elapsed.total_seconds()) if p.elapsed is not None else "—"

    @admin.display(description="result")
    def result(self, job: RehydrationJob) -> str:
        if job.status == RehydrationJob.DONE:
            return f"{job.loaded:,} loaded into Redis, {job.skipped:,} already there at the same or a newer version"
        if job.status == RehydrationJob.FAILED:
            got = f" after {job.done:,} of {job.total:,}" if job.started_at else ""
            return f"failed{got}: {job.error}"
        if job.status == RehydrationJob.RUNNING:
            return f"running: {job.loaded:,} loaded, {job.skipped:,} already in Redis"
        return "queued"

    # -- pages

    def get_urls(self) -> list[Any]:
        base = f"{self.opts.app_label}_{self.opts.model_name}"
        return [
            path("start/", self.admin_site.admin_view(self.start_view), name=f"{base}_start"),
            path("<path:object_id>/cancel/", self.admin_site.admin_view(self.cancel_view), name=f"{base}_cancel"),
            *super().get_urls(),
        ]

    def _console_context(self, request: HttpRequest) -> dict[str, Any]:
        active = rehydration_job_active()
        return {
            "active_job": active,
            "active_progress": self.progress(active) if active else "",
            "active_rate": self.rate(active) if active else "",
            "can_run": self.has_run_permission(request),
            "runner_alive": runner_alive(),
            "no_runner_message": NO_RUNNER,
        }

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        return super().changelist_view(request, {**self._console_context(request), **(extra_context or {})})

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return super().change_view(
            request, object_id, form_url, {**self._console_context(request), **(extra_context or {})}
        )

    def start_view(self, request: HttpRequest) -> HttpResponse:
        """ "Rehydrate all" / "Rehydrate by prefix": queue a job, then show it."""
        if not self.has_run_permission(request):
            raise PermissionDenied(f"you need the permission {RUN}")
        form = StartForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            scope = request.POST.get("scope", "all")
            prefix = form.cleaned_data["prefix"].strip() if scope == "prefix" else ""
            if scope == "prefix" and not prefix:
                form.add_error("prefix", "Give the key prefix to rehydrate (or use “Rehydrate all”).")
            else:
                force = form.cleaned_data["force"]
                try:
                    with transaction.atomic():
                        job = rehydration_job_start(prefix=prefix, force=force, user=request.user)
                        audit_record(
                            action="job.start",
                            target=job_target(job),
                            details={"job_id": job.pk, "prefix": prefix, "force": force},
                            request=request,
                        )
                except InvalidPrefixError as error:
                    form.add_error("prefix", str(error))
                except JobAlreadyRunningError as error:
                    messages.error(request, f"Not started: {error}.")
                    target = error.active.pk if error.active is not None else None
                    return HttpResponseRedirect(self._job_url(target))
                else:
                    messages.success(request, f"Rehydration job #{job.pk} queued ({self.what(job)}).")
                    return HttpResponseRedirect(self._job_url(job.pk))
        context = {
            **self.admin_site.each_context(request),
            **self._console_context(request),
            "title": "Start a rehydration",
            "opts": self.opts,
            "form": form,
        }
        return TemplateResponse(request, "admin/ops/rehydrationjob/start.html", context)

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return require_POST(self._cancel)(request, object_id)

    def _cancel(self, request: HttpRequest, object_id: str) -> HttpResponse:
        if not self.has_run_permission(request):
            raise PermissionDenied(f"you need the permission {RUN}")
        job = self.get_object(request, object_id)
        if job is None:
            messages.error(request, f"No rehydration job {object_id}.")
            return HttpResponseRedirect(self._job_url(None))
        with transaction.atomic():
            cancelled = rehydration_job_cancel(job=job, user=request.user)
            if cancelled:
                audit_record(
                    action="job.cancel",
                    target=job_target(job),
                    details={"job_id": job.pk, "was": job.status},
                    request=request,
                )
        if cancelled:
            messages.success(request, f"Rehydration job #{job.pk} cancelled; a running job stops within a second.")
        else:
            messages.warning(request, f"Rehydration job #{job.pk} had already finished.")
        return HttpResponseRedirect(self._job_url(job.pk))

    def _job_url(self, pk: int | None) -> str:
        if pk is None:
            return reverse("admin:ops_rehydrationjob_changelist")
        return reverse("admin:ops_rehydrationjob_change", args=[pk])
