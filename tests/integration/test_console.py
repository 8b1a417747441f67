"""The admin console: cache entries, dead letters, rehydration jobs — as a viewer and an operator."""

from __future__ import annotations

import importlib
import signal
import subprocess
import threading
import time
import uuid
from typing import Any

import orjson
import pytest
from django.contrib.auth.models import Group
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from ops.console import jobs
from ops.models import RehydrationJob
from persistence import dead_letters, jetstream, redis_store
from persistence.models import CacheEntry
from persistence.redis_store import StoredEntry
from persistence.services import cache_entry_set
from tests.conftest import manage, service_env, unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

ENTRIES = "/admin/persistence/cacheentry/"
JOBS = "/admin/ops/rehydrationjob/"
DLQ = "/admin/deadletters/"


# --- helpers ---------------------------------------------------------------------------------


def console_group(name: str) -> Group:
    """The group migration ops/0002 creates. A transactional test's flush empties auth_group
    (and may leave permissions missing): recreate both with the migration's own function."""
    from django.apps import apps

    importlib.import_module("ops.migrations.0002_console_groups").create_groups(apps, None)
    return Group.objects.get(name=name)


@pytest.fixture
def console_user(django_user_model: Any) -> Any:
    def make(group: str) -> Client:
        user = django_user_model.objects.create_user(f"{group}-{uuid.uuid4().hex[:6]}", password="x", is_staff=True)
        user.groups.add(console_group(group))
        client = Client()
        client.force_login(user)
        return client

    return make


@pytest.fixture
def viewer(console_user: Any) -> Client:
    return console_user("viewer")


@pytest.fixture
def operator(console_user: Any) -> Client:
    return console_user("operator")


def put(key: str, value: Any, ttl: int | None = None, metadata: dict[str, Any] | None = None) -> int:
    result = cache_entry_set(
        key=key, value_json=orjson.dumps(value), ttl=ttl, metadata_json=orjson.dumps(metadata or {})
    )
    return result.entry.version


def persisted(key: str, version: int = 1) -> CacheEntry:
    return wait_for(
        lambda: CacheEntry.objects.filter(key=key, version__gte=version).first(), message=f"{key} v{version} persisted"
    )


def in_redis(key: str) -> StoredEntry | None:
    cached = redis_store.read(key)
    return cached if isinstance(cached, StoredEntry) else None


def insert_rows(prefix: str, count: int, **columns: str) -> None:
    """Rows straight into the table (test data only; the console never does this)."""
    values = {
        "value": "jsonb_build_object('n', i)",
        "expires_at": "NULL",
        "deleted": "false",
        "updated_at": "now() - interval '2 days'",
        **columns,
    }
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO cache_entries (key, value, version, metadata, expires_at, deleted, created_at, updated_at)
            SELECT %s || lpad(i::text, 7, '0'), {values["value"]}, 1, '{{}}'::jsonb, {values["expires_at"]},
                   {values["deleted"]}, now() - interval '2 days', {values["updated_at"]}
            FROM generate_series(1, %s) AS i
            """,
            [prefix, count],
        )


def keys_listed(response: Any) -> list[str]:
    return [row.key for row in response.context["cl"].result_list]


def action(client: Client, name: str, keys: list[str], url: str = ENTRIES, **extra: str) -> Any:
    return client.post(url, {"action": name, "_selected_action": keys, "index": "0", **extra}, follow=True)


def texts(response: Any) -> str:
    return " | ".join(str(m) for m in response.context["messages"])


# --- access ----------------------------------------------------------------------------------


def test_the_console_needs_a_staff_login(client: Client) -> None:
    for url in (ENTRIES, DLQ, JOBS, JOBS + "start/", "/admin/"):
        response = client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"], url


def test_a_viewer_sees_everything_and_can_change_nothing(viewer: Client) -> None:
    key = unique_key("seen")
    put(key, {"a": 1})
    # sees the list (no checkboxes: no action is allowed), the entry, the DLQ, the jobs
    listing = viewer.get(ENTRIES, {"q": key})
    assert listing.status_code == 200 and keys_listed(listing) == []  # not persisted: no worker runs
    detail = viewer.get(f"{ENTRIES}{key}/change/")
    assert detail.status_code == 200 and "<textarea" not in detail.content.decode()
    assert "&quot;a&quot;: 1" in detail.content.decode()
    assert viewer.get(DLQ).status_code == 200
    assert viewer.get(JOBS).status_code == 200
    index = viewer.get("/admin/").content.decode()
    assert "Dead letters" in index and "Rehydration jobs" in index and "/admin/dashboard/" in index

    # and can change nothing
    assert viewer.post(f"{ENTRIES}{key}/change/", {"value_json": "2", "metadata_json": "{}"}).status_code == 403
    assert viewer.post(f"{ENTRIES}{key}/delete/", {"post": "yes"}).status_code == 403
    assert viewer.get(f"{ENTRIES}add/").status_code == 403
    assert viewer.post(DLQ + "action/", {"action": "purge_all", "confirm": "yes"}).status_code == 403
    assert viewer.post(DLQ + "action/", {"action": "retry_selected", "ids": ["1"]}).status_code == 403
    assert viewer.post(JOBS + "start/", {"scope": "all"}).status_code == 403
    assert not RehydrationJob.objects.exists()
    assert in_redis(key).version == 1


def test_a_viewer_gets_no_actions_on_the_list(viewer: Client, operator: Client, worker: Any) -> None:
    key = unique_key("act")
    put(key, 1)
    persisted(key)
    as_viewer = viewer.get(ENTRIES)
    assert as_viewer.context["action_form"] is None and 'class="action-select"' not in as_viewer.content.decode()
    choices = {name for name, _ in operator.get(ENTRIES).context["action_form"].fields["action"].choices}
    assert {"rehydrate_selected", "rehydrate_selected_force", "evict_selected", "delete_selected"} <= choices
    # a forged action POST from the viewer does nothing
    redis_store.evict(key)
    action(viewer, "rehydrate_selected", [key])
    assert in_redis(key) is None


# --- the list --------------------------------------------------------------------------------


def test_the_list_is_estimated_not_counted_and_marks_what_redis_holds(operator: Client, worker: Any) -> None:
    # given 20,000 rows (analysed, as autovacuum would) and one key written through the service
    insert_rows("bulk:", 20_000)
    key = "bulk:0000000-live"
    put(key, {"x": 1})
    persisted(key)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE cache_entries")

    # when the list is opened
    with CaptureQueriesContext(connection) as queries:
        started = time.perf_counter()
        response = operator.get(ENTRIES)
        elapsed = time.perf_counter() - started

    # then it shows a page of 100 with an estimated total, and never counts the whole table
    assert response.status_code == 200
    cl = response.context["cl"]
    assert len(cl.result_list) == 100 and cl.count_label.startswith("about ")
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert all("LIMIT" in sql.upper() for sql in counts), counts
    entry_queries = [q["sql"] for q in queries.captured_queries if "cache_entries" in q["sql"]]
    assert len(entry_queries) <= 3, entry_queries
    for sql in entry_queries:  # values are never loaded for the list, only their size
        assert '"cache_entries"."value"' not in sql.replace('pg_column_size("cache_entries"."value")', "")
        assert '"cache_entries"."metadata"' not in sql
    print(f"the list of 20,000 rows took {elapsed:.2f}s")  # speed is the query shape above, not a timer
    rows = {row.key: row for row in cl.result_list}
    assert rows[key].redis_copy.live and not rows["bulk:0000001"].redis_copy.live
    html = response.content.decode()
    assert "icon-yes.svg" in html and "icon-no.svg" in html and '<td class="field-ttl_left">never</td>' in html

    # a filtered list counts at most COUNT_CAP + 1 rows
    with CaptureQueriesContext(connection) as queries:
        filtered = operator.get(ENTRIES, {"state": "live"})
    assert filtered.context["cl"].count_label == "more than 10,000"
    counts = [q["sql"] for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts and all("LIMIT 10001" in sql.upper() for sql in counts), counts
    # pages beyond what the capped count offers (101) still work
    beyond = operator.get(ENTRIES, {"state": "live", "p": "150"})
    assert keys_listed(beyond)[0] == "bulk:0014900" and "p=151" in beyond.context["cl"].next_page_url


def test_search_is_by_key_prefix_and_star_searches_anywhere(operator: Client) -> None:
    insert_rows("user:", 30)
    insert_rows("order:user:", 5)
    found = keys_listed(operator.get(ENTRIES, {"q": "user:000001"}))
    assert found == [f"user:{n:07d}" for n in range(10, 20)]
    assert keys_listed(operator.get(ENTRIES, {"q": "user:0000007"})) == ["user:0000007"]
    assert len(keys_listed(operator.get(ENTRIES, {"q": "user:"}))) == 30
    assert len(keys_listed(operator.get(ENTRIES, {"q": "*user:"}))) == 35
    assert keys_listed(operator.get(ENTRIES, {"q": "ser:"})) == []


def test_filters_state_updated_and_in_redis(operator: Client, worker: Any) -> None:
    insert_rows("old:", 3)
    insert_rows("gone:", 2, deleted="true", value="NULL")
    insert_rows("stale:", 2, expires_at="now() - interval '1 minute'")
    fresh = [unique_key("fresh") for _ in range(3)]
    for key in fresh:
        put(key, key, ttl=600)
    for key in fresh:
        persisted(key)

    def listed(**params: str) -> set[str]:
        return set(keys_listed(operator.get(ENTRIES, params)))

    assert listed(state="deleted") == {"gone:0000001", "gone:0000002"}
    assert listed(state="expired") == {"stale:0000001", "stale:0000002"}
    assert listed(state="live") == {"old:0000001", "old:0000002", "old:0000003", *fresh}
    assert listed(updated="hour") == set(fresh)
    assert listed(redis="yes") == set(fresh)
    assert listed(redis="no", state="live") == {"old:0000001", "old:0000002", "old:0000003"}
    response = operator.get(ENTRIES, {"redis": "no", "o": "1"})
    assert response.status_code == 200 and "end of the list" in response.content.decode()
    assert operator.get(ENTRIES, {"o": "3"}).status_code == 200  # sorted by size
    assert operator.get(ENTRIES, {"o": "-4"}).status_code == 200  # sorted by TTL left


def test_the_in_redis_filter_scans_a_bounded_window_and_continues_from_there(operator: Client) -> None:
    insert_rows("scan:", 600)
    for n in (1, 550):  # only these two are in Redis
        put(f"scan:{n:07d}", n)
    # the first 100 rows not in Redis, and a "next" link that continues after them
    first = operator.get(ENTRIES, {"redis": "no"})
    cl = first.context["cl"]
    assert len(cl.result_list) == 100 and cl.result_list[0].key == "scan:0000002"
    assert cl.scan_next == 101
    nxt = operator.get(ENTRIES, {"redis": "no", "scan": str(cl.scan_next)})
    assert keys_listed(nxt)[0] == "scan:0000102"
    present = operator.get(ENTRIES, {"redis": "yes"})
    assert keys_listed(present) == ["scan:0000001", "scan:0000550"]
    assert present.context["cl"].scan_next is None


# --- detail, edit, add, delete ---------------------------------------------------------------


def test_detail_pretty_prints_and_shows_both_copies(operator: Client, worker: Any) -> None:
    key = unique_key("detail")
    put(key, {"name": "Ada", "tags": [1, 2]}, ttl=3600, metadata={"source": "test"})
    persisted(key)
    html = operator.get(f"{ENTRIES}{key}/change/").content.decode()
    assert "{\n  &quot;name&quot;: &quot;Ada&quot;," in html
    assert "&quot;source&quot;: &quot;test&quot;" in html
    assert "version 1, TTL" in html and "live" in html


def test_a_value_only_postgresql_has_shows_and_edits_with_its_numbers(operator: Client, viewer: Client) -> None:
    # given a row holding numbers beyond 64-bit integers, and no Redis copy
    key = unique_key("numbers")
    insert_rows(f"{key}:", 1, value='\'{"n":1180591620717411303424,"z":-0.0,"e":1e20}\'::json')
    key = f"{key}:0000001"
    assert in_redis(key) is None
    # then the detail page shows them (as the API writes numbers), to a viewer and in the edit form
    shown = viewer.get(f"{ENTRIES}{key}/change/")
    assert shown.status_code == 200
    html = shown.content.decode()
    assert "1.1805916207174113e+21" in html and "-0.0" in html and "1e+20" in html
    form = operator.get(f"{ENTRIES}{key}/change/").context["adminform"].form
    assert orjson.loads(form.initial["value_json"]) == {"n": 2**70, "z": -0.0, "e": 1e20}
    assert form.initial["if_match"] == 1


def test_edit_goes_through_the_write_path(operator: Client, worker: Any) -> None:
    # given a persisted key
    key = unique_key("edit")
    put(key, {"v": 1}, ttl=600)
    persisted(key)
    form = operator.get(f"{ENTRIES}{key}/change/").context["adminform"].form
    assert form.initial["if_match"] == 1 and 590 <= form.initial["ttl"] <= 600

    # when the operator saves a new value
    response = operator.post(
        f"{ENTRIES}{key}/change/",
        {"value_json": '{"v": 2}', "metadata_json": '{"by": "console"}', "ttl": "0", "if_match": "1"},
        follow=True,
    )

    # then Redis has the new version at once, and PostgreSQL once the worker ran
    assert "Version 2 of" in texts(response) and "worker" in texts(response)
    cached = in_redis(key)
    assert cached.version == 2 and orjson.loads(cached.value_json) == {"v": 2} and cached.ttl() is None
    row = persisted(key, 2)
    assert row.value == {"v": 2} and row.metadata == {"by": "console"} and row.expires_at is None


def test_a_stale_edit_is_refused_and_invalid_json_is_a_form_error(operator: Client) -> None:
    key = unique_key("stale")
    put(key, 1)
    put(key, 2)
    response = operator.post(
        f"{ENTRIES}{key}/change/", {"value_json": "3", "metadata_json": "{}", "if_match": "1"}, follow=True
    )
    assert "changed by someone else" in texts(response) and in_redis(key).version == 2
    response = operator.post(f"{ENTRIES}{key}/change/", {"value_json": "{nope", "metadata_json": "[]"})
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "not valid JSON" in str(errors["value_json"]) and "JSON object" in str(errors["metadata_json"])
    assert in_redis(key).version == 2


def test_add_writes_a_new_key_and_refuses_a_live_one(operator: Client, worker: Any) -> None:
    key = unique_key("added")
    response = operator.post(
        f"{ENTRIES}add/", {"key": key, "value_json": '"hello"', "metadata_json": "", "ttl": ""}, follow=True
    )
    assert "Version 1 of" in texts(response)
    assert orjson.loads(in_redis(key).value_json) == "hello"
    assert persisted(key).value == "hello"
    again = operator.post(f"{ENTRIES}add/", {"key": key, "value_json": "1"})
    assert "exists already" in str(again.context["adminform"].form.errors["key"])
    bad = operator.post(f"{ENTRIES}add/", {"key": "no spaces", "value_json": "1"})
    assert "invalid key" in str(bad.context["adminform"].form.errors["key"])


def test_a_key_not_yet_persisted_opens_from_its_redis_copy(operator: Client) -> None:
    key = unique_key("inflight")
    put(key, {"in": "flight"})  # no worker: only Redis and JetStream have it
    response = operator.get(f"{ENTRIES}{key}/change/")
    assert response.status_code == 200
    assert "the worker has not written it to PostgreSQL yet" in response.content.decode()


def test_delete_goes_through_the_write_path_and_leaves_a_tombstone(operator: Client, worker: Any) -> None:
    key = unique_key("doomed")
    put(key, 1)
    persisted(key)
    assert operator.get(f"{ENTRIES}{key}/delete/").status_code == 200  # the confirmation page
    response = operator.post(f"{ENTRIES}{key}/delete/", {"post": "yes"}, follow=True)
    assert "tombstone" in texts(response)
    assert redis_store.read(key) is redis_store.TOMBSTONE
    wait_for(lambda: CacheEntry.objects.filter(key=key, deleted=True, version=2).exists(), message="tombstone row")
    # deleting it again says so instead of pretending
    again = operator.post(f"{ENTRIES}{key}/delete/", {"post": "yes"}, follow=True)
    assert "already deleted" in texts(again)


def test_delete_selected_asks_first_then_deletes_through_the_service(operator: Client, worker: Any) -> None:
    keys = [unique_key("bulkdel") for _ in range(3)]
    for key in keys:
        put(key, 1)
    for key in keys:
        persisted(key)
    confirm = operator.post(ENTRIES, {"action": "delete_selected", "_selected_action": keys, "index": "0"})
    assert confirm.status_code == 200 and "Are you sure" in confirm.content.decode()
    done = action(operator, "delete_selected", keys, post="yes")
    assert "Deleted 3 entries" in texts(done)
    assert all(redis_store.read(key) is redis_store.TOMBSTONE for key in keys)
    wait_for(lambda: CacheEntry.objects.filter(key__in=keys, deleted=True).count() == 3, message="tombstones")


# --- actions: rehydrate, evict ---------------------------------------------------------------


def test_rehydrate_and_evict_selected(operator: Client, worker: Any, flush_redis: Any) -> None:
    keys = [unique_key("hydra") for _ in range(3)]
    for key in keys:
        put(key, key, ttl=900)
    for key in keys:
        persisted(key)
    flush_redis()

    response = action(operator, "rehydrate_selected", keys[:2])
    assert "Rehydrated 2 entries" in texts(response)
    assert in_redis(keys[0]) and in_redis(keys[1]) and not in_redis(keys[2])
    assert 800 < in_redis(keys[0]).ttl() <= 900, "the TTL left, not a fresh one"

    response = action(operator, "evict_selected", keys)
    assert "Evicted 2 entries" in texts(response) and "1 were not in Redis" in texts(response)
    assert not any(in_redis(key) for key in keys)
    assert CacheEntry.objects.filter(key__in=keys, deleted=False).count() == 3, "PostgreSQL keeps them"

    response = action(operator, "rehydrate_selected_force", keys)
    assert "Rehydrated 3 entries" in texts(response)


def test_evict_keeps_a_newer_copy_the_worker_has_not_written(operator: Client, worker_factory: Any) -> None:
    # given v1 persisted, then v2 acknowledged while no worker runs
    key = unique_key("ahead")
    first = worker_factory(WORKER_BATCH_TIMEOUT="100ms").start()
    put(key, "v1")
    persisted(key)
    first.stop()
    put(key, "v2")
    # when evicted
    response = action(operator, "evict_selected", [key])
    # then the acknowledged write stays in Redis
    assert "1 kept" in texts(response) and in_redis(key).version == 2


def test_an_action_on_more_than_the_limit_is_refused(operator: Client, monkeypatch: Any) -> None:
    from ops.console import entries as admin_entries

    monkeypatch.setattr(admin_entries, "ACTION_LIMIT", 5)
    insert_rows("many:", 6)
    response = operator.post(
        ENTRIES, {"action": "rehydrate_selected", "select_across": "1", "index": "0", "_selected_action": ["x"]},
        follow=True,
    )  # fmt: skip
    assert "More than 5 entries selected" in texts(response)
    assert not redis_store.client().exists(*[redis_store.entry_key(f"many:{n:07d}") for n in range(1, 7)])


# --- dead letters ----------------------------------------------------------------------------


def dead_letter(text: str) -> dead_letters.DeadLetter:
    n = jetstream.names()
    jetstream.publisher().publish(
        n.persist_subject("set"), text.encode(), headers={"Nats-Msg-Id": f"x-{uuid.uuid4()}"}, timeout=5
    )

    def find() -> dead_letters.DeadLetter | None:
        return next((d for d in dead_letters.dead_letters_list(limit=1000) if d.payload == text), None)

    return wait_for(find, timeout=30, message=f"dead letter {text!r}")


def test_dead_letters_list_and_detail(viewer: Client, worker: Any) -> None:
    text = f"not json {uuid.uuid4().hex}"
    letter = dead_letter(text)
    listing = viewer.get(DLQ, {"limit": "500"})
    html = listing.content.decode()
    assert listing.status_code == 200 and f"{DLQ}{letter.id}/" in html and "undecodable" in html
    assert 'name="ids"' not in html, "a viewer gets no checkboxes"
    detail = viewer.get(f"{DLQ}{letter.id}/").content.decode()
    assert text in detail and "Birb-Reason" in detail and "not JSON" in detail
    assert viewer.get(f"{DLQ}999999999/", follow=True).status_code == 200  # gone: back to the list


def test_dead_letters_paging_with_after(operator: Client, worker: Any) -> None:
    letters = [dead_letter(f"not json page {i} {uuid.uuid4().hex}") for i in range(3)]
    page = operator.get(DLQ, {"after": str(letters[0].id), "limit": "1"})
    assert [row["letter"].id for row in page.context["rows"]] == [letters[1].id]
    assert f"after={letters[1].id}" in page.context["next_url"]


def test_retry_selected_republishes_and_purge_needs_confirmation(operator: Client, worker: Any) -> None:
    text = f"not json {uuid.uuid4().hex}"
    letter = dead_letter(text)

    # retry: republished (and, being still undecodable, dead-lettered again under a new id)
    response = operator.post(DLQ + "action/", {"action": "retry_selected", "ids": [str(letter.id)]}, follow=True)
    assert "Retried 1 dead letters" in texts(response)
    with pytest.raises(dead_letters.DeadLetterNotFoundError):
        dead_letters.dead_letter_get(id=letter.id)
    again = wait_for(
        lambda: next((d for d in dead_letters.dead_letters_list(limit=1000) if d.payload == text), None),
        timeout=30,
        message="the retried letter back in the DLQ",
    )
    assert again.id != letter.id

    # purge selected: a confirmation page first, nothing purged yet
    confirm = operator.post(DLQ + "action/", {"action": "purge_selected", "ids": [str(again.id)]})
    assert confirm.status_code == 200 and "for good" in confirm.content.decode()
    assert dead_letters.dead_letter_get(id=again.id)
    response = operator.post(
        DLQ + "action/", {"action": "purge_selected", "ids": [str(again.id)], "confirm": "yes"}, follow=True
    )
    assert "Purged 1 dead letters" in texts(response)
    with pytest.raises(dead_letters.DeadLetterNotFoundError):
        dead_letters.dead_letter_get(id=again.id)


def test_retry_all_and_purge_all_ask_first(operator: Client, worker: Any) -> None:
    dead_letter(f"not json {uuid.uuid4().hex}")
    before = dead_letters.dead_letters_count()
    confirm = operator.post(DLQ + "action/", {"action": "retry_all"})
    assert confirm.status_code == 200 and f"all {before} dead letters" in confirm.content.decode()
    confirm = operator.post(DLQ + "action/", {"action": "purge_all"})
    assert confirm.status_code == 200 and dead_letters.dead_letters_count() == before
    response = operator.post(DLQ + "action/", {"action": "purge_all", "confirm": "yes"}, follow=True)
    assert "Purged" in texts(response) and dead_letters.dead_letters_count() == 0
    response = operator.post(DLQ + "action/", {"action": "retry_all", "confirm": "yes"}, follow=True)
    assert "No dead letters to retry" in texts(response)
    nothing = operator.post(DLQ + "action/", {"action": "purge_selected"}, follow=True)
    assert "No dead letters selected" in texts(nothing)


# --- rehydration jobs ------------------------------------------------------------------------


def test_rehydrate_all_from_the_admin_runs_in_the_background(operator: Client, flush_redis: Any) -> None:
    insert_rows("job:", 2_500)
    insert_rows("jobgone:", 3, deleted="true", value="NULL")
    flush_redis()

    # when an operator starts "Rehydrate all"
    response = operator.post(JOBS + "start/", {"scope": "all"}, follow=True)
    job = RehydrationJob.objects.get()
    assert job.status == RehydrationJob.QUEUED and job.active and job.created_by is not None
    assert f"job #{job.pk} queued" in texts(response) and "No job runner is running" in response.content.decode()
    assert not redis_store.client().exists(redis_store.entry_key("job:0000001")), "nothing ran in the request"
    page = operator.get(f"{JOBS}{job.pk}/change/").content.decode()
    assert 'http-equiv="refresh"' in page and "Cancel this job" in page
    listing = operator.get(JOBS).content.decode()
    assert 'http-equiv="refresh"' in listing and f"job #{job.pk}</a> — queued" in listing

    # and a second one while it is active is refused
    refused = operator.post(JOBS + "start/", {"scope": "prefix", "prefix": "job:"}, follow=True)
    assert "Not started" in texts(refused) and "only one rehydration runs at a time" in texts(refused)
    assert RehydrationJob.objects.count() == 1

    # then the runner runs it to the end
    [finished] = jobs.run_pending_jobs()
    assert finished.status == RehydrationJob.DONE and finished.active is None
    assert finished.total == finished.done == finished.loaded == 2_500 and finished.skipped == 0
    assert in_redis("job:0000001") and in_redis("job:0002500") and not in_redis("jobgone:0000001")
    page = operator.get(f"{JOBS}{job.pk}/change/").content.decode()
    assert "2,500 loaded into Redis" in page and 'http-equiv="refresh"' not in page
    assert "entries/s" in operator.get(JOBS).content.decode()


def test_rehydrate_by_prefix_loads_only_that_prefix(operator: Client, flush_redis: Any) -> None:
    form = operator.get(JOBS + "start/").content.decode()
    assert "Rehydrate all" in form and "Rehydrate by prefix" in form
    insert_rows("tenant-a:", 20)
    insert_rows("tenant-b:", 20)
    flush_redis()
    assert "Give the key prefix" in operator.post(JOBS + "start/", {"scope": "prefix", "prefix": ""}).content.decode()
    assert "invalid key prefix" in operator.post(JOBS + "start/", {"scope": "prefix", "prefix": "a b"}).content.decode()
    operator.post(JOBS + "start/", {"scope": "prefix", "prefix": "tenant-a:"})
    [job] = jobs.run_pending_jobs()
    assert (job.prefix, job.total, job.loaded) == ("tenant-a:", 20, 20)
    assert in_redis("tenant-a:0000020") and not in_redis("tenant-b:0000001")


def test_a_job_loads_every_row_it_can_and_lists_those_it_cannot(operator: Client, flush_redis: Any) -> None:
    # given good rows, and rows an operator inserted by hand that cannot be loaded
    insert_rows("jobok:", 5)
    insert_rows("jobbad key ", 1)
    insert_rows("jobforever:", 1, expires_at="'infinity'")
    flush_redis()
    operator.post(JOBS + "start/", {"scope": "all"})
    # when the runner runs the job
    [job] = jobs.run_pending_jobs()
    # then the good rows are in Redis, and the job failed naming each bad row and why
    assert in_redis("jobok:0000001") and in_redis("jobok:0000005")
    assert job.status == RehydrationJob.FAILED and job.active is None
    assert (job.total, job.done, job.loaded, job.skipped) == (7, 7, 5, 0)
    assert job.error.startswith("2 entries could not be loaded into Redis (the others were): ")
    assert "jobbad key 0000001 (not a valid key" in job.error
    assert "jobforever:0000001 (DataError: timestamp too large" in job.error
    assert "2 entries could not be loaded" in operator.get(f"{JOBS}{job.pk}/change/").content.decode()


def test_a_job_can_be_cancelled_and_a_viewer_cannot_start_one(operator: Client, viewer: Client) -> None:
    assert "Rehydrate all / by prefix" not in viewer.get(JOBS).content.decode()
    assert viewer.get(JOBS + "start/").status_code == 403
    operator.post(JOBS + "start/", {"scope": "all"})
    job = RehydrationJob.objects.get()
    assert viewer.post(f"{JOBS}{job.pk}/cancel/").status_code == 403
    response = operator.post(f"{JOBS}{job.pk}/cancel/", follow=True)
    assert "cancelled" in texts(response)
    job.refresh_from_db()
    assert job.status == RehydrationJob.FAILED and job.active is None and "cancelled by" in job.error
    assert jobs.run_pending_jobs() == []
    assert jobs.rehydration_job_start().pk != job.pk, "another may start now"


def test_a_running_job_stops_when_the_runner_stops(monkeypatch: Any) -> None:
    insert_rows("slow:", 3_000)
    monkeypatch.setattr(jobs, "PROGRESS_INTERVAL", 0)
    stop = threading.Event()
    job = jobs.rehydration_job_start()

    # the heartbeat follows each progress write: stop the runner after the first chunk
    [ended] = jobs.run_pending_jobs(stop=stop, heartbeat=stop.set)
    assert ended.pk == job.pk and ended.status == RehydrationJob.FAILED and "runner stopped" in ended.error
    assert 0 < ended.done < 3_000 and ended.active is None


def test_the_runner_fails_jobs_a_dead_runner_left_running(flush_redis: Any) -> None:
    flush_redis()
    stale = RehydrationJob.objects.create(status=RehydrationJob.RUNNING, active=True)
    jobs.runner_run(stop=threading.Event(), once=True)
    stale.refresh_from_db()
    assert stale.status == RehydrationJob.FAILED and stale.active is None and "runner stopped" in stale.error


def test_runjobs_warms_the_cache_and_stops_cleanly_on_sigterm(tmp_path: Any, flush_redis: Any) -> None:
    insert_rows("warm:", 1_000)
    flush_redis()
    log = open(tmp_path / "runjobs.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = manage("runjobs", "--warm", "--poll", "0.2", env=service_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        job = wait_for(
            lambda: RehydrationJob.objects.filter(status=RehydrationJob.DONE).first(), timeout=30, message="warm-up"
        )
        assert job.loaded == 1_000 and in_redis("warm:0000500")
        assert jobs.runner_alive()
        # a second runner waits for the first instead of taking over
        second = manage("runjobs", "--once", env=service_env(), stdout=log, stderr=subprocess.STDOUT)
        assert second.wait(30) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    output = (tmp_path / "runjobs.log").read_text()
    assert "cache warm-up queued" in output and "another job runner holds" in output
    assert not jobs.runner_alive()
