"""Django's own cache tests (``BaseCacheTests`` of the pinned release's ``tests/cache/``) against
a live Birb Nest, the way Django tests its Redis backend (``RedisCacheTests``).

Every test of ``BaseCacheTests`` runs; the ones skipped say why in one line, and the client's
README lists them.
"""

from __future__ import annotations

import unittest
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from cache.tests import BaseCacheTests, caches_setting_for_tests  # tests/django_cache/conftest.py
from django.core.cache import caches
from django.db import connections
from django.test import TestCase, override_settings

from tests.django_cache.async_routed import run
from tests.django_cache.conftest import remove_namespace

BACKEND = "birbnest_client.django.BirbNestCache"
ASYNC_ROUTED = "tests.django_cache.async_routed.AsyncRoutedBirbNestCache"
NOT_CULLED = "a durable cache does not cull: entries leave by their timeout or delete(), never to make room"

# The URL of the session's API is known once its fixture has run; override_settings keeps this
# very dict, so the module fixture below fills in LOCATION before the class's setUpClass applies it.
CACHES = caches_setting_for_tests(BACKEND=BACKEND, LOCATION="http://not-started.invalid", exclude={"cull", "zero_cull"})
ASYNC_CACHES = caches_setting_for_tests(
    BACKEND=ASYNC_ROUTED, LOCATION="http://not-started.invalid", exclude={"cull", "zero_cull"}
)


@pytest.fixture(scope="module", autouse=True)
def _live_birb_nest(nest_url: str) -> Iterator[None]:
    for params in [*CACHES.values(), *ASYNC_CACHES.values()]:
        params["LOCATION"] = nest_url
    yield
    remove_namespace(nest_url, "django:")


@override_settings(CACHES=CACHES)
class BirbNestCacheTests(BaseCacheTests, TestCase):
    """Django's BaseCacheTests with ``birbnest_client.django.BirbNestCache`` as every cache."""

    def tearDown(self) -> None:
        super().tearDown()
        # The default cache's clear() keeps to its scope ("django::"): the "prefix" cache's keys
        # stay. Each test starts from an empty cache, as after Redis's FLUSHDB in RedisCacheTests:
        # "custom_key" has a KEY_FUNCTION of its own, so its scope is the whole "django:".
        caches["custom_key"].clear()

    @unittest.skip(NOT_CULLED)
    def test_cull(self) -> None: ...

    @unittest.skip(NOT_CULLED)
    def test_zero_cull(self) -> None: ...

    @unittest.skip(NOT_CULLED)
    def test_cull_delete_when_store_empty(self) -> None: ...


@override_settings(CACHES=ASYNC_CACHES)
class BirbNestCacheAsyncApiTests(BirbNestCacheTests):
    """The same tests through the async API: every cache method here runs its ``a…`` twin
    (aget, aset, aadd, aincr, aget_many, aclear, aget_or_set, aincr_version …) on one event loop."""

    @unittest.skip("it patches the sync add(); aget_or_set() calls aadd()")
    def test_get_or_set_racing(self) -> None: ...

    @classmethod
    def tearDownClass(cls) -> None:
        # Pickling a QuerySet ran it in asgiref's sync thread (no request thread here): that
        # thread's database connection would keep the test database from being dropped.
        run(sync_to_async(connections.close_all, thread_sensitive=True)())
        super().tearDownClass()


@pytest.mark.django_db
def test_the_suite_is_djangos_own() -> None:
    """The class under test is the pinned release's BaseCacheTests, with all its tests."""
    import django
    from cache import tests as django_cache_tests

    assert django_cache_tests.__file__.endswith(f"django-cache-suite-{django.__version__}/cache/tests.py")
    names = [name for name in dir(BaseCacheTests) if name.startswith("test_")]
    assert len(names) >= 50, names
    assert all(callable(getattr(BirbNestCacheTests, name)) for name in names)


@pytest.mark.django_db  # ordered with the suite's classes: unmarked, pytest-django runs it last,
# and this module's worker and service fixtures would stay up through every other module's tests
def test_the_readme_lists_every_skip_with_its_reason() -> None:
    readme = (Path(__file__).resolve().parents[2] / "clients" / "python" / "README.md").read_text()
    skips = readme.split("Skipped, and why:", 1)[1].split("\n\n", 2)[1]
    for cls in (BirbNestCacheTests, BirbNestCacheAsyncApiTests):
        for name in dir(cls):
            method = getattr(cls, name)
            if name.startswith("test_") and getattr(method, "__unittest_skip__", False):
                assert f"`{name}`" in skips, name
