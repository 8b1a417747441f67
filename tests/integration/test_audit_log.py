"""The audit log over real servers: every audited console action and operator command leaves one
entry (who, from where, what, on what), and the console lists it read-only."""

from __future__ import annotations

import getpass
import importlib
import logging
import threading
import uuid
from typing import Any

import orjson
import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.db import transaction
from django.test import Client, RequestFactory

from ops.audit import audit_record, command_actor, request_actor
from ops.console import jobs
from ops.models import AuditEntry, RateLimitClient, RehydrationJob
from persistence import dead_letters, jetstream
from persistence.models import CacheEntry
from persistence.services import cache_entry_set
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ENTRIES = "/admin/persistence/cacheentry/"
JOBS = "/admin/ops/rehydrationjob/"
DLQ = "/admin/deadletters/"
CLIENTS = "/admin/ops/ratelimitclient/"
AUDIT = "/admin/ops/auditentry/"
OPERATOR_ADDRESS = "203.0.113.7"  # documentation range: only ever a REMOTE_ADDR, never contacted


# --- helpers ---------------------------------------------------------------------------------


def console_group(name: str) -> Group:
    """The groups as migrations 0002 and 0004 leave them (a transactional test's flush empties them)."""
    from django.apps import apps

    importlib.import_module("ops.migrations.0002_console_groups").create_groups(apps, None)
    importlib.import_module("ops.migrations.0004_audit_log").grant_view(apps, None)
    return Group.objects.get(name=name)


class Console:
    """A logged-in console user: the test client and the username the audit log should name."""

    def __init__(self, django_user_model: Any, group: str | None = None, superuser: bool = False) -> None:
        self.username = f"{group or 'root'}-{uuid.uuid4().hex[:6]}"
        if superuser:
            user = django_user_model.objects.create_superuser(self.username, password="x")
        else:
            user = django_user_model.objects.create_user(self.username, password="x", is_staff=True)
            user.groups.add(console_group(group or "viewer"))
        self.client = Client(REMOTE_ADDR=OPERATOR_ADDRESS)
        self.client.force_login(user)


@pytest.fixture
def operator(django_user_model: Any) -> Console:
    return Console(django_user_model, "operator")


@pytest.fixture
def viewer(django_user_model: Any) -> Console:
    return Console(django_user_model, "viewer")


@pytest.fixture
def superuser(django_user_model: Any) -> Console:
    return Console(django_user_model, superuser=True)


def put(key: str, value: Any) -> int:
    return cache_entry_set(key=key, value_json=orjson.dumps(value), ttl=None, metadata_json=b"{}").entry.version


def persisted(key: str) -> CacheEntry:
    return wait_for(lambda: CacheEntry.objects.filter(key=key).first(), message=f"{key} persisted")


def action(client: Client, name: str, selected: list[Any], url: str = ENTRIES, **extra: str) -> Any:
    return client.post(url, {"action": name, "_selected_action": selected, "index": "0", **extra}, follow=True)


def only_entry(action: str, **filters: Any) -> AuditEntry:
    """The one audit entry of that action (and filters): exactly one, or the test fails."""
    [entry] = AuditEntry.objects.filter(action=action, **filters)
    return entry


def by_console(entry: AuditEntry, who: Console) -> None:
    assert (entry.actor, entry.address) == (who.username, OPERATOR_ADDRESS)


def by_command(entry: AuditEntry) -> None:
    assert (entry.actor, entry.address) == (f"cli:{getpass.getuser()}", "cli")


def dead_letter() -> dead_letters.DeadLetter:
    """An undecodable persist message, which the running worker dead-letters."""
    text = f"not json {uuid.uuid4().hex}"
    jetstream.publisher().publish(
        jetstream.names().persist_subject("set"), text.encode(), headers={"Nats-Msg-Id": f"x-{uuid.uuid4()}"}, timeout=5
    )

    def find() -> dead_letters.DeadLetter | None:
        return next((d for d in dead_letters.dead_letters_list(limit=1000) if d.payload == text), None)

    return wait_for(find, timeout=30, message=f"dead letter {text!r}")


# --- cache entries in the console ------------------------------------------------------------


def test_entry_create_edit_and_delete_are_recorded(operator: Console, worker: Any) -> None:
    key = unique_key("audited")
    # when an operator adds a key, edits it, then deletes it
    added = operator.client.post(f"{ENTRIES}add/", {"key": key, "value_json": '"v1"', "metadata_json": "{}"})
    assert added.status_code == 302
    persisted(key)
    edited = operator.client.post(
        f"{ENTRIES}{key}/change/", {"value_json": '"v2"', "metadata_json": "{}", "ttl": "60", "if_match": "1"}
    )
    assert edited.status_code == 302
    deleted = operator.client.post(f"{ENTRIES}{key}/delete/", {"post": "yes"}, follow=True)
    assert "tombstone" in " ".join(str(m) for m in deleted.context["messages"])

    # then each is one entry naming the operator, the address, the key and the version
    created = only_entry("entry.create", target=key)
    by_console(created, operator)
    assert created.details["version"] == 1
    edit = only_entry("entry.edit", target=key)
    by_console(edit, operator)
    assert edit.details == {"version": 2, "ttl": 60, "if_match": 1}
    removal = only_entry("entry.delete", target=key)
    by_console(removal, operator)
    assert removal.details == {"version": 3}


def test_a_refused_edit_leaves_no_entry(operator: Console) -> None:
    key = unique_key("stale")
    put(key, 1)
    put(key, 2)
    operator.client.post(f"{ENTRIES}{key}/change/", {"value_json": "3", "metadata_json": "{}", "if_match": "1"})
    assert not AuditEntry.objects.filter(target=key).exists()


def test_delete_selected_is_one_entry_listing_the_keys(operator: Console, worker: Any) -> None:
    keys = sorted(unique_key("bulk") for _ in range(3))
    for key in keys:
        put(key, 1)
    for key in keys:
        persisted(key)
    action(operator.client, "delete_selected", keys, post="yes")
    entry = only_entry("entry.delete", target__contains=keys[0])
    by_console(entry, operator)
    assert entry.target == ", ".join(keys) and entry.details == {"count": 3, "keys": keys}


def test_rehydrate_and_evict_selected_are_recorded(operator: Console, worker: Any, flush_redis: Any) -> None:
    keys = sorted(unique_key("hydra") for _ in range(2))
    for key in keys:
        put(key, key)
    for key in keys:
        persisted(key)
    flush_redis()

    action(operator.client, "rehydrate_selected_force", keys)
    rehydrated = only_entry("entry.rehydrate")
    by_console(rehydrated, operator)
    assert sorted(rehydrated.target.split(", ")) == keys and sorted(rehydrated.details["keys"]) == keys
    assert rehydrated.details["loaded"] == 2 and rehydrated.details["force"] is True

    action(operator.client, "evict_selected", keys)
    evicted = only_entry("entry.evict")
    by_console(evicted, operator)
    assert sorted(evicted.target.split(", ")) == keys and evicted.details["evicted"] == 2


# --- dead letters ----------------------------------------------------------------------------


def test_dead_letter_retry_and_purge_are_recorded(operator: Console, worker: Any) -> None:
    letter = dead_letter()
    operator.client.post(DLQ + "action/", {"action": "retry_selected", "ids": [str(letter.id)]})
    retried = only_entry("deadletter.retry", target=str(letter.id))
    by_console(retried, operator)
    assert retried.details == {"retried": 1, "ids": [letter.id], "failed": {}}

    again = dead_letter()
    # the confirmation page is not the action: nothing recorded yet
    operator.client.post(DLQ + "action/", {"action": "purge_selected", "ids": [str(again.id)]})
    assert not AuditEntry.objects.filter(action="deadletter.purge").exists()
    operator.client.post(DLQ + "action/", {"action": "purge_selected", "ids": [str(again.id)], "confirm": "yes"})
    purged = only_entry("deadletter.purge", target=str(again.id))
    by_console(purged, operator)
    assert purged.details == {"purged": 1, "ids": [again.id]}

    dead_letter()
    operator.client.post(DLQ + "action/", {"action": "purge_all", "confirm": "yes"})
    everything = only_entry("deadletter.purge", target="all")
    assert everything.details["purged"] >= 1


# --- rate limits -----------------------------------------------------------------------------


def test_rate_limit_settings_change_is_recorded(operator: Console) -> None:
    assert operator.client.get("/admin/ops/ratelimitsettings/").status_code == 302  # makes the row
    response = operator.client.post(
        "/admin/ops/ratelimitsettings/1/change/", {"limit": "77", "window": "60", "algorithm": "fixed"}
    )
    assert response.status_code == 302, response.content
    entry = only_entry("ratelimit.change", target="settings")
    by_console(entry, operator)
    assert entry.details["changed"] == {"limit": [100, 77]}
    assert entry.details["settings"] == {"enabled": False, "limit": 77, "window": 60, "algorithm": "fixed"}


def test_rate_limit_client_rules_are_recorded(operator: Console) -> None:
    client = "198.51.100.23"
    # add a rule, change it, block, unblock, clear counters, delete
    assert operator.client.post(f"{CLIENTS}add/", {"client": client, "limit": "5"}).status_code == 302
    rule = RateLimitClient.objects.get(client=client)
    changed = operator.client.post(f"{CLIENTS}{rule.pk}/change/", {"client": client, "limit": "9", "note": "importer"})
    assert changed.status_code == 302
    for name in ("block_selected", "unblock_selected", "clear_counters"):
        action(operator.client, name, [rule.pk], url=CLIENTS)
    action(operator.client, "delete_selected", [rule.pk], url=CLIENTS, post="yes")
    assert not RateLimitClient.objects.filter(client=client).exists()

    entries = list(AuditEntry.objects.filter(target=client).order_by("at", "id"))
    assert [e.action for e in entries] == [
        "ratelimit.client_add",
        "ratelimit.client_change",
        "ratelimit.client_block",
        "ratelimit.client_unblock",
        "ratelimit.client_clear",
        "ratelimit.client_delete",
    ]
    for entry in entries:
        by_console(entry, operator)
    assert entries[1].details["changed"] == {"limit": [5, 9], "note": ["", "importer"]}
    assert entries[2].details == {"changed": True} and entries[3].details == {"changed": True}


# --- rehydration jobs ------------------------------------------------------------------------


def test_job_start_and_cancel_are_recorded(operator: Console) -> None:
    operator.client.post(JOBS + "start/", {"scope": "prefix", "prefix": "user:", "force": "on"})
    job = RehydrationJob.objects.get()
    started = only_entry("job.start", target=f"rehydration job #{job.pk}")
    by_console(started, operator)
    assert started.details == {"job_id": job.pk, "prefix": "user:", "force": True}

    operator.client.post(f"{JOBS}{job.pk}/cancel/")
    cancelled = only_entry("job.cancel", target=f"rehydration job #{job.pk}")
    by_console(cancelled, operator)
    assert cancelled.details == {"job_id": job.pk, "was": "queued"}
    # cancelling a finished job changes nothing: no second entry
    operator.client.post(f"{JOBS}{job.pk}/cancel/")
    assert AuditEntry.objects.filter(action="job.cancel").count() == 1


def test_a_job_that_cannot_start_leaves_no_entry(operator: Console) -> None:
    jobs.rehydration_job_start()
    operator.client.post(JOBS + "start/", {"scope": "all"})
    assert not AuditEntry.objects.filter(action="job.start").exists()


def test_the_warm_up_of_runjobs_is_recorded_as_a_command(flush_redis: Any) -> None:
    flush_redis()
    jobs.runner_run(stop=threading.Event(), warm=True, once=True)
    job = RehydrationJob.objects.get()
    entry = only_entry("job.start", target=f"rehydration job #{job.pk}")
    by_command(entry)
    assert entry.details["warm_up"] is True


# --- operator commands -----------------------------------------------------------------------


def test_rehydrate_command_is_recorded(worker: Any, flush_redis: Any) -> None:
    key = unique_key("cmd")
    put(key, 1)
    persisted(key)
    flush_redis()
    call_command("rehydrate", key, "--no-progress")
    entry = only_entry("entry.rehydrate", target=key)
    by_command(entry)
    assert entry.details["loaded"] == 1 and entry.details["force"] is False

    call_command("rehydrate", "--all", "--force", "--no-progress")
    by_command(only_entry("entry.rehydrate", target="all"))


def test_process_dlq_retry_and_purge_are_recorded(worker: Any) -> None:
    letter = dead_letter()
    call_command("process_dlq", "--retry", str(letter.id))
    retried = only_entry("deadletter.retry", target=str(letter.id))
    by_command(retried)
    assert retried.details["retried"] == 1

    again = dead_letter()
    call_command("process_dlq", "--purge", str(again.id), "--yes")
    purged = only_entry("deadletter.purge", target=str(again.id))
    by_command(purged)
    assert purged.details == {"purged": 1, "ids": [again.id]}


def test_jetstream_ensure_is_recorded() -> None:
    call_command("jetstream", "ensure")
    entry = only_entry("jetstream.ensure")
    by_command(entry)
    assert entry.target == jetstream.names().stream and isinstance(entry.details["created"], list)


# --- the console's pages: read-only, superusers delete -----------------------------------------


def test_the_log_is_listed_and_filtered(viewer: Console) -> None:
    audit_record(action="entry.edit", target="user:1", actor="ada", address="192.0.2.1")
    audit_record(action="deadletter.purge", target="all", actor="bob", address="192.0.2.2")
    audit_record(action="entry.evict", target="user:2", actor="ada", address="192.0.2.1")

    def listed(**params: str) -> list[str]:
        response = viewer.client.get(AUDIT, params)
        assert response.status_code == 200, response.content
        return [entry.target for entry in response.context["cl"].result_list]

    assert listed() == ["user:2", "all", "user:1"], "newest first"
    assert listed(action="entry.edit") == ["user:1"]
    assert listed(actor="ada") == ["user:2", "user:1"]
    assert listed(q="user:") == ["user:2", "user:1"]
    assert listed(q="bob") == ["all"]
    today = AuditEntry.objects.first().at
    assert len(listed(at__year=str(today.year), at__month=str(today.month), at__day=str(today.day))) == 3
    page = viewer.client.get(AUDIT).content.decode()
    assert "By action" in page and "By actor" in page


def test_the_log_is_read_only_for_staff_and_a_superuser_deletes(
    viewer: Console, operator: Console, superuser: Console
) -> None:
    entry = audit_record(action="entry.edit", target="user:9", actor="ada", address="192.0.2.1")
    assert entry is not None
    for staff in (viewer, operator):
        assert staff.client.get(f"{AUDIT}{entry.pk}/change/").status_code == 200, "they may read it"
        assert staff.client.get(f"{AUDIT}add/").status_code == 403
        assert staff.client.post(f"{AUDIT}{entry.pk}/delete/", {"post": "yes"}).status_code == 403
        changed = staff.client.post(f"{AUDIT}{entry.pk}/change/", {"target": "nothing to see"})
        assert changed.status_code == 403
        listing = staff.client.get(AUDIT).content.decode()
        assert "delete_selected" not in listing, "no delete action offered"
        action(staff.client, "delete_selected", [entry.pk], url=AUDIT, post="yes")
    entry.refresh_from_db()
    assert entry.target == "user:9"

    # a superuser may delete (to prune an old log), and may still not change a row
    assert superuser.client.post(f"{AUDIT}{entry.pk}/change/", {"target": "x"}).status_code == 403
    response = superuser.client.post(f"{AUDIT}{entry.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not AuditEntry.objects.filter(pk=entry.pk).exists()
    # and the pruning itself stays on record
    pruned = only_entry("audit.delete")
    by_console(pruned, superuser)
    assert pruned.details["count"] == 1 and pruned.details["oldest"] == entry.at.isoformat()


# --- the recording function ------------------------------------------------------------------


def test_an_api_key_request_is_recorded_as_the_key_and_a_command_as_its_user() -> None:
    request = RequestFactory().post("/admin/ratelimit", REMOTE_ADDR="192.0.2.44")
    request.birb_principal = type("Principal", (), {"public_id": "bn_0123abcd"})()
    entry = audit_record(action="ratelimit.change", target="settings", request=request)
    assert entry is not None and (entry.actor, entry.address) == ("key:bn_0123abcd", "192.0.2.44")
    assert request_actor(RequestFactory().get("/")) == "anonymous"
    assert command_actor() == f"cli:{getpass.getuser()}"


def test_the_record_and_the_change_commit_or_roll_back_together() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        RateLimitClient.objects.create(client="192.0.2.50")
        audit_record(action="ratelimit.client_add", target="192.0.2.50", actor="ada")
        raise RuntimeError("the change failed after it was recorded")
    assert not AuditEntry.objects.filter(target="192.0.2.50").exists()


def test_a_record_that_cannot_be_stored_does_not_fail_the_action(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="ops.audit")
    with transaction.atomic():
        RateLimitClient.objects.create(client="192.0.2.51")
        # PostgreSQL refuses U+0000 in jsonb: the insert fails, inside its own savepoint
        assert audit_record(action="ratelimit.client_add", target="192.0.2.51", details={"x": "\u0000"}) is None
        RateLimitClient.objects.create(client="192.0.2.52")  # the transaction is still usable
    assert RateLimitClient.objects.filter(client__in=["192.0.2.51", "192.0.2.52"]).count() == 2
    assert "audit entry not stored: ratelimit.client_add" in caplog.text and "192.0.2.51" in caplog.text


def test_a_secret_in_details_is_not_stored() -> None:
    entry = audit_record(action="apikey.create", target="bn_0123abcd", details={"token": "bn_0123abcd_s3cr3t"})
    assert entry is not None
    entry.refresh_from_db()
    assert entry.details == {"token": "[redacted]"}
    assert "s3cr3t" not in str(AuditEntry.objects.values_list("details", flat=True)[0])
