"""A database created by main before issue #9's moves upgrades with `migrate` and keeps its data.

The moves ("One room per audience", steps 1 and 2) kept the app labels, so they need no data
migration; this test holds them to it. It builds the operator's tables with the migrations of
f2bc21e, the last commit before the moves, writes what an operator would have written through
the models of that state, migrates to the newest migrations and reads it all back through
today's code: the rate-limit settings and client rules, the rehydration jobs, and the "viewer"
and "operator" groups with their permissions, as the admin pages (which moved) check them.
"""

from __future__ import annotations

import datetime
import importlib
from collections.abc import Iterator
from typing import Any

import pytest
from django.apps.registry import Apps
from django.conf import settings
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import RequestFactory

from ops.console import dashboard, deadletters, jobs_admin
from ops.models import RateLimitClient, RateLimitSettings, RehydrationJob
from ops.ratelimit import ratelimit_settings_get
from persistence.models import CacheEntry

pytestmark = pytest.mark.django_db(transaction=True)

# The newest migration of each of our apps at f2bc21e (`git ls-tree f2bc21e ops/migrations
# persistence/migrations`), the last commit before the moves.
BEFORE_THE_MOVES = [("ops", "0002_console_groups"), ("persistence", "0003_value_metadata_json_text")]
JOB_STARTED = datetime.datetime(2026, 11, 1, 12, 0, tzinfo=datetime.UTC)


def migrate(targets: list[tuple[str, str | None]]) -> None:
    """Migrate the test database to ``targets`` (``(app, None)``: unapply all of the app's)."""
    MigrationExecutor(connection).migrate(targets)
    # The migrations may create content types the per-process cache does not know yet.
    ContentType.objects.clear_cache()


def newest() -> list[tuple[str, str | None]]:
    return MigrationExecutor(connection).loader.graph.leaf_nodes()


@pytest.fixture
def database_before_the_moves() -> Iterator[Apps]:
    """The operator's tables as f2bc21e's migrations create them (ops from zero: its tables and the
    groups of ops/0002); the database is migrated to the newest state afterwards, pass or fail."""
    # Backwards in one plan (ops from zero, persistence down to its state then), forwards in
    # another: Django refuses a plan that goes both ways.
    migrate([("ops", None), *[target for target in BEFORE_THE_MOVES if target[0] != "ops"]])
    try:
        migrate(BEFORE_THE_MOVES)
        yield MigrationExecutor(connection).loader.project_state(BEFORE_THE_MOVES).apps
    finally:
        migrate(newest())
        assert not MigrationExecutor(connection).migration_plan(newest()), "left at the newest migrations"


def group_permissions(apps: Apps) -> dict[str, set[tuple[str, str]]]:
    group_model = apps.get_model("auth", "Group")
    return {
        group.name: set(group.permissions.values_list("content_type__app_label", "codename"))
        for group in group_model.objects.filter(name__in=["viewer", "operator"])
    }


def request_by(group: str) -> Any:
    """A console request by a staff user whose only permissions are the group's."""
    user = get_user_model().objects.create_user(f"upgrade-{group}", password="x", is_staff=True)
    user.groups.set([user.groups.model.objects.get(name=group)])
    request = RequestFactory().get("/admin/")
    request.user = get_user_model().objects.get(pk=user.pk)  # a fresh object: no cached permissions
    return request


def test_an_old_database_upgrades_and_keeps_settings_rules_jobs_and_groups(
    database_before_the_moves: Apps,
) -> None:
    # given: what an operator wrote with the code of f2bc21e, through that state's models
    old = database_before_the_moves
    old_settings = old.get_model("ops", "RateLimitSettings")
    old_client = old.get_model("ops", "RateLimitClient")
    old_job = old.get_model("ops", "RehydrationJob")
    old_user = old.get_model(settings.AUTH_USER_MODEL)
    old_settings.objects.create(pk=1, enabled=True, limit=7, window=30, algorithm="sliding", updated_by="alice")
    old_client.objects.create(client="10.0.0.1", limit=5, note="a batch importer")
    old_client.objects.create(client="10.0.0.2", blocked=True, note="abuse")
    alice = old_user.objects.create(username="alice", is_staff=True)
    old_job.objects.create(
        prefix="user:",
        force=True,
        status="done",
        active=None,
        total=3,
        done=3,
        loaded=2,
        skipped=1,
        started_at=JOB_STARTED,
        finished_at=JOB_STARTED + datetime.timedelta(seconds=4),
        created_by=alice,
    )
    old_job.objects.create(prefix="", status="queued", created_by=alice)
    groups_before = group_permissions(old)
    migration = importlib.import_module("ops.migrations.0002_console_groups")
    assert groups_before == {"viewer": set(migration.VIEWER), "operator": set(migration.OPERATOR)}

    # when
    migrate(newest())

    # then: the rows, read through today's models and services
    row = RateLimitSettings.objects.get(pk=1)
    assert (row.enabled, row.limit, row.window, row.algorithm, row.updated_by) == (True, 7, 30, "sliding", "alice")
    config = ratelimit_settings_get()
    assert config.overrides == {"10.0.0.1": 5}
    assert config.blocked == frozenset({"10.0.0.2"})
    rules = list(RateLimitClient.objects.values_list("client", "limit", "blocked", "note"))
    assert rules == [("10.0.0.1", 5, False, "a batch importer"), ("10.0.0.2", None, True, "abuse")]
    jobs = list(RehydrationJob.objects.order_by("pk"))
    assert [(job.prefix, job.force, job.status, job.active) for job in jobs] == [
        ("user:", True, "done", None),
        ("", False, "queued", True),
    ]
    assert (jobs[0].total, jobs[0].done, jobs[0].loaded, jobs[0].skipped) == (3, 3, 2, 1)
    assert jobs[0].finished_at - jobs[0].started_at == datetime.timedelta(seconds=4)
    assert {job.created_by.username for job in jobs} == {"alice"}

    # then: the groups hold the same permissions (plus what later migrations grant them), and the
    # admin pages that moved grant them
    from django.apps import apps

    audit = importlib.import_module("ops.migrations.0004_audit_log")
    keys = importlib.import_module("ops.migrations.0005_api_key_access")
    granted = {group: {("ops", audit.PERMISSION)} for group in audit.GROUPS}
    granted["viewer"] |= {("ops", codename) for codename in keys.VIEWER}
    granted["operator"] |= {("ops", codename) for codename in keys.OPERATOR}
    assert group_permissions(apps) == {group: perms | granted[group] for group, perms in groups_before.items()}
    viewer, operator = request_by("viewer"), request_by("operator")
    for model in (CacheEntry, RateLimitSettings, RateLimitClient, RehydrationJob):
        model_admin = admin.site._registry[model]
        assert model_admin.has_view_permission(viewer), model
        assert model_admin.has_view_permission(operator), model
    for model in (CacheEntry, RateLimitSettings, RateLimitClient):
        model_admin = admin.site._registry[model]
        assert not model_admin.has_change_permission(viewer), model
        assert model_admin.has_change_permission(operator), model
    assert admin.site._registry[RateLimitClient].has_add_permission(operator)
    assert admin.site._registry[RateLimitClient].has_delete_permission(operator)
    assert not admin.site._registry[RateLimitClient].has_delete_permission(viewer)
    entries_admin = admin.site._registry[CacheEntry]
    assert entries_admin.has_rehydrate_permission(operator) and entries_admin.has_evict_permission(operator)
    assert not entries_admin.has_rehydrate_permission(viewer) and not entries_admin.has_evict_permission(viewer)
    jobs_page = admin.site._registry[RehydrationJob]
    assert isinstance(jobs_page, jobs_admin.RehydrationJobAdmin)
    assert jobs_page.has_run_permission(operator) and not jobs_page.has_run_permission(viewer)
    for perm in (deadletters.VIEW, dashboard.PERMISSION):
        assert viewer.user.has_perm(perm) and operator.user.has_perm(perm), perm
    for perm in (deadletters.RETRY, deadletters.PURGE):
        assert operator.user.has_perm(perm) and not viewer.user.has_perm(perm), perm


def test_todays_models_need_no_migration_the_moves_forgot() -> None:
    # A moved model whose app label, table or options changed would show up here.
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


def test_drf_tokens_are_dropped_and_their_owners_named_when_api_keys_replace_them(capsys: Any) -> None:
    # A database from before issue #10: DRF's authtoken table, with an operator's plain-text token.
    operator = get_user_model().objects.create_user(username="oscar", password="x-Pass-9731")
    migrate([("ops", "0004_audit_log")])
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "CREATE TABLE authtoken_token (key varchar(40) PRIMARY KEY, created timestamptz NOT NULL, "
                "user_id integer NOT NULL UNIQUE)"
            )
            cursor.execute("INSERT INTO authtoken_token VALUES ('0123456789abcdef', now(), %s)", [operator.pk])
            cursor.execute(
                "INSERT INTO django_migrations (app, name, applied) VALUES ('authtoken', '0001_initial', now())"
            )
    finally:
        migrate(newest())
    printed = capsys.readouterr().out
    assert "DRF operator tokens removed (1: oscar)" in printed
    assert "apikey create NAME --scopes admin --owner USERNAME" in printed
    assert "0123456789abcdef" not in printed
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('authtoken_token') IS NULL")
        assert cursor.fetchone()[0]
        cursor.execute("SELECT count(*) FROM django_migrations WHERE app = 'authtoken'")
        assert cursor.fetchone()[0] == 0
