"""Dead letters in the console: list, detail, retry (selected / all), purge (selected / all).

The letters live in JetStream (``BIRB_CACHE_DLQ``), not in a table, so these are plain views
inside the admin (``admin.site.admin_view``: staff login, CSRF, no caching), not a ModelAdmin.
Permissions are the unmanaged ``ops.DeadLetter`` model's: ``view_deadletter`` to look,
``retry_deadletter`` and ``purge_deadletter`` to act. Every action calls
:mod:`persistence.dead_letters`; purging, and retrying everything, ask for confirmation first.
What they did goes into the audit log (``deadletter.retry``, ``deadletter.purge``).
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from ops.audit import audit_items, audit_list, audit_record
from persistence import dead_letters
from persistence.streams_admin import JetStreamAdminError

PAGE_SIZE = 50
PAGE_MAX = 500
ERROR_EXCERPT = 120
VIEW = "ops.view_deadletter"
RETRY = "ops.retry_deadletter"
PURGE = "ops.purge_deadletter"

ACTIONS: dict[str, dict[str, Any]] = {
    "retry_selected": {"perm": RETRY, "confirm": False, "verb": "retry", "all": False},
    "retry_all": {"perm": RETRY, "confirm": True, "verb": "retry", "all": True},
    "purge_selected": {"perm": PURGE, "confirm": True, "verb": "purge", "all": False},
    "purge_all": {"perm": PURGE, "confirm": True, "verb": "purge", "all": True},
}


def _require(request: HttpRequest, perm: str) -> None:
    if not request.user.has_perm(perm):
        raise PermissionDenied(f"you need the permission {perm}")


def _context(request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
    return {
        **admin.site.each_context(request),
        "title": title,
        "can_retry": request.user.has_perm(RETRY),
        "can_purge": request.user.has_perm(PURGE),
        **extra,
    }


def _int(raw: str | None, default: int | None = None) -> int | None:
    try:
        return int(raw) if raw else default  # None and "" both mean "not given"
    except ValueError:
        return default


def _excerpt(text: str, width: int = ERROR_EXCERPT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(stamp: str) -> str:
    """``2026-11-30T02:21:31.586301Z`` -> ``2026-11-30 02:21:31Z`` (the detail page shows it all)."""
    return stamp[:19].replace("T", " ") + ("Z" if stamp.endswith("Z") else "") if len(stamp) >= 19 else stamp


def _list_url(after: int | None = None) -> str:
    url = reverse("deadletter-list")
    return f"{url}?after={after}" if after else url


@require_GET
def dead_letter_list_view(request: HttpRequest) -> HttpResponse:
    """The oldest dead letters from ``after`` on (``?after=ID``, ``?limit=N``)."""
    _require(request, VIEW)
    after = _int(request.GET.get("after"))
    limit = min(max(_int(request.GET.get("limit"), PAGE_SIZE) or PAGE_SIZE, 1), PAGE_MAX)
    letters: list[dead_letters.DeadLetter] = []
    total = None
    error = ""
    try:
        letters = dead_letters.dead_letters_list(limit=limit, after=after)
        total = dead_letters.dead_letters_count()
    except JetStreamAdminError as failure:
        error = str(failure)
    rows = [
        {
            "letter": letter,
            "error_excerpt": _excerpt(letter.error),
            "first_failure": _when(letter.first_failure),
            "last_failure": _when(letter.last_failure),
        }
        for letter in letters
    ]
    next_after = letters[-1].id if len(letters) == limit else None
    return render(
        request,
        "admin/deadletters/list.html",
        _context(
            request,
            "Dead letters",
            rows=rows,
            total=total,
            after=after,
            limit=limit,
            next_url=f"{_list_url(next_after)}&limit={limit}" if next_after else "",
            first_url=_list_url() if after else "",
            jetstream_error=error,
        ),
    )


@require_GET
def dead_letter_detail_view(request: HttpRequest, id: int) -> HttpResponse:
    _require(request, VIEW)
    try:
        letter = dead_letters.dead_letter_get(id=id)
    except dead_letters.DeadLetterNotFoundError as missing:
        messages.warning(request, str(missing))
        return HttpResponseRedirect(_list_url())
    except JetStreamAdminError as failure:
        messages.error(request, str(failure))
        return HttpResponseRedirect(_list_url())
    if letter.encoding == "json":
        payload = json.dumps(letter.payload, indent=2, ensure_ascii=False)
    else:
        payload = str(letter.payload)
    entry_url = reverse("admin:persistence_cacheentry_change", args=[quote(letter.key)]) if letter.key else ""
    return render(
        request,
        "admin/deadletters/detail.html",
        _context(
            request,
            f"Dead letter {letter.id}",
            letter=letter,
            payload=payload,
            headers=sorted(letter.headers.items()),
            entry_url=entry_url,
        ),
    )


@require_POST
def dead_letter_action_view(request: HttpRequest) -> HttpResponse:
    """POST ``action`` (retry_selected, retry_all, purge_selected, purge_all) and ``ids``;
    purging and retrying everything first answer with a confirmation page."""
    name = request.POST.get("action", "")
    spec = ACTIONS.get(name)
    if spec is None:
        messages.error(request, f"unknown action {name!r}: expected one of {', '.join(ACTIONS)}")
        return HttpResponseRedirect(_list_url())
    _require(request, spec["perm"])
    back = _list_url(_int(request.POST.get("after")))
    ids = sorted({i for i in (_int(raw) for raw in request.POST.getlist("ids")) if i is not None and i > 0})
    if not spec["all"] and not ids:
        messages.warning(request, "No dead letters selected: tick the ones to act on first.")
        return HttpResponseRedirect(back)
    if spec["confirm"] and request.POST.get("confirm") != "yes":
        return _confirmation(request, name, spec, ids, back)
    try:
        if spec["verb"] == "retry":
            _retry(request, None if spec["all"] else ids)
        else:
            _purge(request, None if spec["all"] else ids)
    except JetStreamAdminError as failure:
        messages.error(request, f"Nothing done: {failure}")
    return HttpResponseRedirect(back)


def _confirmation(request: HttpRequest, name: str, spec: dict[str, Any], ids: list[int], back: str) -> HttpResponse:
    try:
        total = dead_letters.dead_letters_count()
    except JetStreamAdminError as failure:
        messages.error(request, f"Nothing done: {failure}")
        return HttpResponseRedirect(back)
    what = f"all {total} dead letters" if spec["all"] else f"{len(ids)} dead letter{'s' if len(ids) != 1 else ''}"
    if spec["verb"] == "retry":
        consequence = (
            f"Every one of {what} is republished to the persist stream under a fresh message id and removed "
            "from the DLQ once JetStream acknowledged it. Fix the cause first, or they come straight back."
        )
    else:
        consequence = f"{what[0].upper()}{what[1:]} will be deleted from the DLQ for good; their writes are lost."
    return render(
        request,
        "admin/deadletters/confirm.html",
        _context(
            request,
            f"{spec['verb'].capitalize()} {what}?",
            action=name,
            verb=spec["verb"],
            ids=ids,
            what=what,
            consequence=consequence,
            after=request.POST.get("after", ""),
            back=back,
            destructive=spec["verb"] == "purge",
        ),
    )


def _retry(request: HttpRequest, ids: list[int] | None) -> None:
    result = dead_letters.dead_letters_retry(ids=ids)
    audit_record(
        action="deadletter.retry",
        target="all" if ids is None else audit_items(ids),
        details={
            "retried": len(result.retried),
            "ids": audit_list(result.retried),
            "failed": {str(id): reason for id, reason in audit_list(result.failed.items())},
        },
        request=request,
    )
    if result.retried:
        messages.success(
            request,
            f"Retried {len(result.retried)} dead letters: republished to the persist stream; "
            "the worker writes them (or dead-letters them again if the cause is still there).",
        )
    elif not result.failed:
        messages.info(request, "No dead letters to retry.")
    for id, reason in result.failed.items():
        messages.error(request, f"Dead letter {id} not retried: {reason}")


def _purge(request: HttpRequest, ids: list[int] | None) -> None:
    removed = dead_letters.dead_letters_purge(ids=ids)
    audit_record(
        action="deadletter.purge",
        target="all" if ids is None else audit_items(ids),
        details={"purged": removed, **({"ids": audit_list(ids)} if ids is not None else {})},
        request=request,
    )
    messages.success(request, f"Purged {removed} dead letters.")
    if ids is not None and removed < len(ids):
        messages.warning(request, f"{len(ids) - removed} were already gone (retried or purged meanwhile).")
