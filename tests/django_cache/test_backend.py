"""What the Django cache backend does beyond Django's own tests: how it stores (readable JSON,
pickles the console can tell apart), key mapping, the scope of clear(), timeouts, counters under
concurrency, configuration errors, API keys, and the async API, against the session's live API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import pickle
import re
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from birbnest_client import Client, errors
from birbnest_client.django import MAX_TTL_SECONDS, BirbNestCache
from django.core.cache import CacheKeyWarning
from django.core.exceptions import ImproperlyConfigured

from tests.conftest import unique_key, wait_published

pytestmark = pytest.mark.django_db  # the session's API needs the test database set up

BACKEND = "birbnest_client.django.BirbNestCache"


@pytest.fixture
def raw(nest_url: str) -> Iterator[Client]:
    """A plain client on the same service: what the console and other programs see."""
    with Client(base_url=nest_url) as client:
        yield client


@pytest.fixture
def make_cache(nest_url: str) -> Iterator[Any]:
    """``make_cache(KEY_PREFIX=…, OPTIONS=…)``: a backend on the live API in its own namespace;
    what it stored is deleted afterwards."""
    made: list[BirbNestCache] = []

    def make(**params: Any) -> BirbNestCache:
        params.setdefault("OPTIONS", {}).setdefault("NAMESPACE", f"t{unique_key('')[1:9]}:")
        cache = BirbNestCache(params.pop("LOCATION", nest_url), params)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        with contextlib.suppress(errors.BirbNestError):  # a test's own API key is gone already
            cache.clear()


# --- storage: JSON stays JSON, anything else is a pickle the console can tell ------------------


JSON_VALUES = [
    "text",
    "Iñtërnâtiônàlizætiøn ✓",
    0,
    -(2**63),
    2**63 - 1,
    1.5,
    -0.0,
    1e300,
    True,
    False,
    None,
    [],
    {},
    [1, "two", 3.0, None, [True, {"x": []}]],
    {"a": 1, "b": [1, 2], "c": {"d": None}},
]


@pytest.mark.parametrize("value", JSON_VALUES, ids=repr)
def test_json_values_are_stored_as_json(make_cache: Any, raw: Client, value: Any) -> None:
    cache = make_cache()
    cache.set("v", value)
    entry = raw.get(cache.nest_key("v"))
    assert entry is not None
    assert entry.value == value and type(entry.value) is type(value)
    assert entry.metadata == {}
    got = cache.get("v", "missing")
    assert got == value and type(got) is type(value)


class Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x


OTHER_VALUES = [
    (1, 2),
    b"\x00\xffbytes",
    {1: "int key"},
    {"a": (1,)},
    [1, {2, 3}],
    2**63,
    -(2**63) - 1,
    float("inf"),
    Decimal("1.10"),
    datetime.datetime(2026, 12, 1, 3, 4, 5, tzinfo=datetime.UTC),
    "nul \x00 inside",
    "lone \ud800 surrogate",
    Point(3),
    frozenset({1}),
]


@pytest.mark.parametrize("value", OTHER_VALUES, ids=lambda v: type(v).__name__)
def test_other_values_are_pickled_and_marked_as_such(make_cache: Any, raw: Client, value: Any) -> None:
    cache = make_cache()
    cache.set("v", value)
    entry = raw.get(cache.nest_key("v"))
    assert entry is not None
    marker = entry.metadata["django"]
    assert marker["encoding"] == "pickle"
    assert marker["protocol"] == pickle.DEFAULT_PROTOCOL
    assert marker["type"] == f"{type(value).__module__}.{type(value).__qualname__}"
    assert pickle.loads(base64.b64decode(entry.value)) == value
    assert cache.get("v") == value


def test_deep_json_is_pickled_where_the_service_could_not_encode_it(make_cache: Any, raw: Client) -> None:
    value: Any = "bottom"
    for _ in range(300):  # the service encodes at most 254 levels
        value = [value]
    cache = make_cache()
    cache.set("deep", value)
    entry = raw.get(cache.nest_key("deep"))
    assert entry is not None and entry.metadata["django"]["encoding"] == "pickle"
    assert cache.get("deep") == value


def test_a_json_string_that_looks_like_base64_stays_a_string(make_cache: Any) -> None:
    # The metadata decides what is a pickle, never the text.
    cache = make_cache()
    text = base64.b64encode(pickle.dumps((1, 2))).decode()
    cache.set("s", text)
    assert cache.get("s") == text


def test_pickle_protocol_option(make_cache: Any, raw: Client) -> None:
    cache = make_cache(OPTIONS={"PICKLE_PROTOCOL": 2})
    cache.set("t", (1, 2))
    entry = raw.get(cache.nest_key("t"))
    assert entry is not None and entry.metadata["django"]["protocol"] == 2
    assert base64.b64decode(entry.value)[:2] == b"\x80\x02"
    assert cache.get("t") == (1, 2)


def test_a_value_over_the_size_limit_raises(make_cache: Any) -> None:
    cache = make_cache()
    with pytest.raises(errors.PayloadTooLarge):
        cache.set("big", "x" * (2 * 1024 * 1024))
    assert cache.get("big") is None


# --- keys --------------------------------------------------------------------------------------


def test_keys_are_namespace_then_djangos_key(make_cache: Any, raw: Client) -> None:
    cache = make_cache(KEY_PREFIX="site1", VERSION=3)
    namespace = cache._namespace
    assert cache.nest_key("user.42") == f"{namespace}site1:3:user.42"
    cache.set("user.42", {"name": "Ada"})
    assert raw.get(f"{namespace}site1:3:user.42") is not None


def test_keys_outside_the_alphabet_or_too_long_are_hashed_inside_the_scope(make_cache: Any, raw: Client) -> None:
    cache = make_cache(KEY_PREFIX="p")
    scope = f"{cache._namespace}p:"
    hashed = re.compile(re.escape(scope) + r"h\.[0-9a-f]{64}")
    for key in ("clé", "with space", "a/b", "x" * 300):
        with pytest.warns(CacheKeyWarning) if " " in key or len(key) > 250 else contextlib.nullcontext():
            nest_key, again = cache.nest_key(key), cache.nest_key(key)
        assert hashed.fullmatch(nest_key), nest_key
        assert nest_key == again  # deterministic
    cache.set("clé", "value")
    assert cache.get("clé") == "value"
    assert [k for k in raw.scan(scope)] == [cache.nest_key("clé")]
    assert cache.nest_key("clé") != cache.nest_key("cle")


def test_clear_deletes_its_scope_only(make_cache: Any, raw: Client) -> None:
    # given: two caches whose KEY_PREFIX is a prefix of the other's, and a key outside both
    namespace = f"t{unique_key('')[1:9]}:"
    short = make_cache(KEY_PREFIX="a", OPTIONS={"NAMESPACE": namespace})
    longer = make_cache(KEY_PREFIX="ab", OPTIONS={"NAMESPACE": namespace})
    short.set_many({"k1": 1, "k2": 2, "clé": 3})
    longer.set("k1", "kept")
    outside = unique_key("outside")
    raw.set(outside, "kept", ttl=60)
    # when
    short.clear()
    # then
    assert short.get_many(["k1", "k2", "clé"]) == {}
    assert longer.get("k1") == "kept"
    assert raw.get(outside) is not None
    raw.delete(outside)


def test_clear_pages_through_more_keys_than_a_page(make_cache: Any) -> None:
    cache = make_cache()
    data = {f"k{i}": i for i in range(1234)}
    assert cache.set_many(data) == []
    cache.clear()
    assert cache.get_many(list(data)) == {}


def test_get_many_and_delete_many_past_a_batch(make_cache: Any) -> None:
    cache = make_cache()
    data = {f"k{i}": i for i in range(250)}
    cache.set_many(data, timeout=None)
    assert cache.get_many([*data, "missing", "k1"]) == data
    cache.delete_many(list(data)[:200])
    assert cache.get_many(list(data)) == {f"k{i}": i for i in range(200, 250)}


# --- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeout", "ttl"),
    [(None, 0), (0, -1), (-5, -1), (0.2, 1), (1, 1), (100.2, 101), (10**12, MAX_TTL_SECONDS)],
)
def test_djangos_timeouts_as_ttls(make_cache: Any, timeout: Any, ttl: int) -> None:
    assert make_cache().get_backend_timeout(timeout) == ttl


def test_default_timeout_is_the_settings(make_cache: Any, raw: Client) -> None:
    cache = make_cache(TIMEOUT=120)
    cache.set("k", 1)
    entry = raw.get(cache.nest_key("k"))
    assert entry is not None and entry.ttl is not None and 110 < entry.ttl <= 120


def test_none_never_expires_and_touch_changes_it(make_cache: Any, raw: Client) -> None:
    cache = make_cache()
    cache.set("k", 1, timeout=None)
    entry = raw.get(cache.nest_key("k"))
    assert entry is not None and entry.ttl is None
    assert cache.touch("k", 50) is True
    entry = raw.get(cache.nest_key("k"))
    assert entry is not None and entry.ttl is not None and 40 < entry.ttl <= 50
    assert cache.touch("k", None) is True
    entry = raw.get(cache.nest_key("k"))
    assert entry is not None and entry.ttl is None


def test_zero_timeout_removes_an_existing_value(make_cache: Any) -> None:
    cache = make_cache()
    cache.set("k", "old", timeout=None)
    cache.set("k", "new", timeout=0)
    assert cache.get("k") is None
    cache.set_many({"a": 1, "b": 2})
    assert cache.set_many({"a": 3, "b": 4}, timeout=-1) == []
    assert cache.get_many(["a", "b"]) == {}
    assert cache.add("c", 1, timeout=0) is True
    assert cache.get("c") is None


# --- counters ----------------------------------------------------------------------------------


def test_incr_keeps_the_ttl_left(make_cache: Any, raw: Client) -> None:
    cache = make_cache()
    cache.set("n", 1, timeout=100)
    assert cache.incr("n", 5) == 6
    entry = raw.get(cache.nest_key("n"))
    assert entry is not None and entry.ttl is not None and 90 < entry.ttl <= 100
    cache.set("forever", 1, timeout=None)
    cache.decr("forever")
    entry = raw.get(cache.nest_key("forever"))
    assert entry is not None and entry.value == 0 and entry.ttl is None


def test_incr_from_many_threads_loses_no_increment(make_cache: Any) -> None:
    cache = make_cache()
    cache.set("n", 0, timeout=None)
    threads, each = 4, 10

    def work() -> None:
        for _ in range(each):
            cache.incr("n")

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(60)
    assert cache.get("n") == threads * each


def test_incr_of_a_pickled_number(make_cache: Any, raw: Client) -> None:
    cache = make_cache()
    cache.set("big", 2**63 - 1)
    assert cache.incr("big") == 2**63
    entry = raw.get(cache.nest_key("big"))
    assert entry is not None and entry.metadata["django"]["encoding"] == "pickle"
    assert cache.decr("big") == 2**63 - 1
    entry = raw.get(cache.nest_key("big"))
    assert entry is not None and entry.value == 2**63 - 1 and entry.metadata == {}


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "params", "message"),
    [
        ("", {}, "LOCATION must be"),
        (["http://a", "http://b"], {}, "LOCATION is one base URL"),
        ("http://x", {"OPTIONS": {"MAX_ENTRIES": 10}}, "does not cull"),
        ("http://x", {"OPTIONS": {"SERIALIZER": "json"}}, "unknown BirbNestCache OPTIONS SERIALIZER"),
        ("http://x", {"KEY_PREFIX": "my site"}, "NAMESPACE + KEY_PREFIX"),
        ("http://x", {"OPTIONS": {"NAMESPACE": "n" * 200}}, "NAMESPACE + KEY_PREFIX"),
        ("http://x", {"OPTIONS": {"NAMESPACE": ""}, "KEY_FUNCTION": lambda k, p, v: k}, "both empty"),
    ],
)
def test_bad_configuration_is_refused(location: Any, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=re.escape(message)):
        BirbNestCache(location, params)


def test_caches_of_one_configuration_share_one_client(nest_url: str) -> None:
    one = BirbNestCache(nest_url, {"OPTIONS": {"NAMESPACE": "a:"}})
    two = BirbNestCache(nest_url, {"KEY_PREFIX": "x", "OPTIONS": {"NAMESPACE": "b:"}})
    other = BirbNestCache(nest_url, {"OPTIONS": {"HTTP_TIMEOUT": 9}})
    assert one._client is two._client
    assert one._client is not other._client
    one.close()  # Django closes caches after every request: the shared pool stays open
    assert one.get("anything") is None


@pytest.mark.django_db(transaction=True)
def test_an_api_key_confined_to_the_namespace_is_enough(make_cache: Any, make_api_key: Any) -> None:
    # given: a key with the three scopes the backend needs, confined to the cache's namespace
    namespace = f"t{unique_key('')[1:9]}:"
    token = make_api_key(scopes=["read", "write", "delete"], key_prefixes=[namespace])
    wait_published()
    cache = make_cache(OPTIONS={"API_KEY": token, "NAMESPACE": namespace})
    # then: every kind of call works inside it
    cache.set("k", "v")
    assert cache.add("a", (1,)) is True
    assert cache.set_many({"x": 1, "y": 2}) == []
    assert cache.incr("x") == 2
    assert cache.touch("y", None) is True
    assert cache.get_many(["k", "a", "x", "y"]) == {"k": "v", "a": (1,), "x": 2, "y": 2}
    cache.delete_many(["x"])
    assert cache.delete("y") is True
    cache.clear()
    assert cache.get_many(["k", "a"]) == {}
    # and without the key the service refuses (keys exist now, so loopback is no longer enough)
    with pytest.raises(errors.Unauthorized):
        make_cache(OPTIONS={"NAMESPACE": namespace}).get("k")
    # and the key cannot reach outside its namespace
    with pytest.raises(errors.Forbidden):
        make_cache(OPTIONS={"API_KEY": token}).get("k")


# --- the async API -----------------------------------------------------------------------------


def test_the_async_api(make_cache: Any, raw: Client) -> None:
    cache = make_cache()

    async def scenario() -> None:
        assert await cache.aget("k", "default") == "default"
        await cache.aset("k", (1, 2), timeout=None)
        assert await cache.aget("k") == (1, 2)
        assert await cache.aadd("k", "other") is False
        assert await cache.aadd("new", {"a": 1}) is True
        assert await cache.ahas_key("new") is True
        assert await cache.atouch("new", 30) is True
        assert await cache.atouch("absent") is False
        await cache.aset("n", 10)
        assert await cache.aincr("n", 5) == 15
        assert await cache.adecr("n") == 14
        with pytest.raises(ValueError):
            await cache.aincr("absent")
        assert await cache.aset_many({"x": 1, "y": [2]}) == []
        assert await cache.aget_many(["x", "y", "absent"]) == {"x": 1, "y": [2]}
        await cache.adelete_many(["x"])
        assert await cache.aget_many(["x", "y"]) == {"y": [2]}
        assert await cache.adelete("y") is True
        assert await cache.adelete("y") is False
        assert await cache.aget_or_set("g", lambda: "made") == "made"
        assert await cache.aincr_version("g") == 2
        assert await cache.aget("g", version=2) == "made"
        await cache.aclear()
        assert await cache.aget_many(["k", "new", "n", "g"], version=None) == {}

    asyncio.run(scenario())
    asyncio.run(scenario())  # a second event loop gets its own client
    assert not list(raw.scan(cache._scope))


# --- the console -------------------------------------------------------------------------------


def test_the_console_shows_json_as_json_and_pickles_as_such(make_cache: Any, admin_client: Any) -> None:
    from django.contrib.admin.utils import quote

    cache = make_cache()
    cache.set("json", {"text": "hello"})
    cache.set("pickled", (1, 2))
    page = "/admin/persistence/cacheentry/{}/change/"
    json_page = admin_client.get(page.format(quote(cache.nest_key("json")))).content.decode()
    assert "&quot;text&quot;: &quot;hello&quot;" in json_page
    pickle_page = admin_client.get(page.format(quote(cache.nest_key("pickled")))).content.decode()
    assert "&quot;encoding&quot;: &quot;pickle&quot;" in pickle_page
    assert "builtins.tuple" in pickle_page
