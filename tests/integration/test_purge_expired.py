"""CONTRACT: expired rows are not served and are purged periodically; tombstones are purged
after TOMBSTONE_RETENTION. Both keep their row (and its version) for TOMBSTONE_RETENTION, so a
late, older write of the key cannot bring it back."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from persistence.models import CacheEntry
from persistence.write_behind import cache_entries_purge
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def make_row(key: str, *, expires_ago: timedelta | None = None, deleted_ago: timedelta | None = None) -> None:
    now = timezone.now()
    CacheEntry.objects.create(
        key=key,
        value=None if deleted_ago is not None else {"n": 1},
        version=3,
        metadata={},
        expires_at=now - expires_ago if expires_ago is not None else None,
        deleted=deleted_ago is not None,
        created_at=now - timedelta(days=30),
        updated_at=now - (deleted_ago or timedelta(0)),
    )


def test_rows_expired_or_deleted_longer_than_the_retention_are_purged_in_batches() -> None:
    # given rows expired or deleted long ago, recently, and live ones
    retention = timedelta(days=7)
    old_expired = [unique_key("old-expired") for _ in range(5)]
    old_deleted = [unique_key("old-deleted") for _ in range(3)]
    kept = {
        unique_key("recently-expired"): {"expires_ago": timedelta(days=1)},
        unique_key("recently-deleted"): {"deleted_ago": timedelta(days=1)},
        unique_key("live"): {},
        unique_key("expires-later"): {"expires_ago": -timedelta(days=1)},
    }
    for key in old_expired:
        make_row(key, expires_ago=retention + timedelta(hours=1))
    for key in old_deleted:
        make_row(key, deleted_ago=retention + timedelta(hours=1))
    for key, age in kept.items():
        make_row(key, **age)
    # when the purge runs with batches smaller than what it has to delete
    purged = cache_entries_purge(before=timezone.now() - retention, batch=2)
    # then exactly the old ones are gone
    assert purged >= 8
    assert not CacheEntry.objects.filter(key__in=old_expired + old_deleted).exists()
    assert set(CacheEntry.objects.filter(key__in=list(kept)).values_list("key", flat=True)) == set(kept)


def test_the_worker_purges_periodically(worker_factory) -> None:
    # given a worker told to keep expired rows and tombstones for 1 s, checking every second
    expired, deleted = unique_key("expired"), unique_key("deleted")
    make_row(expired, expires_ago=timedelta(seconds=5))
    make_row(deleted, deleted_ago=timedelta(seconds=5))
    worker_factory(TOMBSTONE_RETENTION="1s", WORKER_EXPIRED_PURGE_INTERVAL="1s").start()
    # then both rows are purged
    wait_for(
        lambda: not CacheEntry.objects.filter(key__in=[expired, deleted]).exists(),
        timeout=20,
        message="the worker to purge the rows",
    )


def test_the_command_purges_now_with_the_retention_given() -> None:
    from io import StringIO

    from django.core.management import call_command
    from django.core.management.base import CommandError

    # given a row expired an hour ago and one deleted a day ago (both within the default 7d)
    expired, deleted = unique_key("cmd-expired"), unique_key("cmd-deleted")
    make_row(expired, expires_ago=timedelta(hours=1))
    make_row(deleted, deleted_ago=timedelta(days=1))
    # when the default retention applies, both stay
    call_command("purge_expired", stdout=StringIO())
    assert CacheEntry.objects.filter(key__in=[expired, deleted]).count() == 2
    # and with a retention of 0 s both go, and the command says how many rows it deleted
    out = StringIO()
    call_command("purge_expired", "--retention", "0s", stdout=out)
    assert not CacheEntry.objects.filter(key__in=[expired, deleted]).exists()
    assert out.getvalue().startswith("purged ")
    # a retention that is not a duration is refused, naming the option
    with pytest.raises(CommandError, match="--retention"):
        call_command("purge_expired", "--retention", "soon")
