"""Items 6 and 8 of the hostile-input issue: input that deserves a 400 and used to get a 500, and
the smaller ones (a key with a newline, null for a field, OPTIONS, what a 503 tells a client).
"""

from __future__ import annotations

import httpx
import pytest

from cache_api.serializers import MAX_VERSION
from persistence.services import MAX_TTL_SECONDS
from tests.conftest import free_port, unique_key
from tests.hostile.conftest import assert_error, assert_healthy, assert_not_stored

pytestmark = pytest.mark.django_db(transaction=True)


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


def nested_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"value": 1, "ttl": 9223372036854775807}', "ttl"),  # lands past the year 9999
        (b'{"value": 1, "ttl": %d}' % (MAX_TTL_SECONDS + 1), "ttl"),
        (b'{"value": 1, "ttl": 1e300}', "ttl"),
        (b'{"value": 1, "ttl": null}', "ttl"),
        (b'{"value": 1, "metadata": null}', "metadata"),
        (b'{"value": ' + nested(255) + b"}", "value"),
        (b'{"value": ' + nested(1023) + b"}", "value"),
        (b'{"value": 1, "metadata": ' + nested_object(255) + b"}", "metadata"),
    ],
    ids=["ttl-2**63", "ttl-over-max", "ttl-float", "ttl-null", "metadata-null", "depth-255", "depth-1023", "meta-255"],
)
@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_a_field_that_cannot_be_stored_is_400_naming_it(api, method: str, body: bytes, field: str) -> None:
    key = unique_key("bad")
    response = httpx.request(method, f"{api.url}/v1/cache/{key}", content=body, timeout=10)
    error = assert_error(response, 400, "INVALID_REQUEST")
    assert error["details"]["field"] == field, error
    assert field in error["error"]
    assert_not_stored(api.url, key)
    assert_healthy(api.url)


def test_the_longest_ttl_and_the_deepest_value_are_stored(api) -> None:
    key = unique_key("edge")
    body = b'{"value": ' + nested(254) + b', "ttl": %d}' % MAX_TTL_SECONDS
    response = httpx.post(f"{api.url}/v1/cache/{key}", content=body, timeout=10)
    assert response.status_code == 201, response.content
    # (a new key's first write may wait a few seconds for the backlog when Redis was emptied)
    assert MAX_TTL_SECONDS - 30 <= response.json()["ttl"] <= MAX_TTL_SECONDS


@pytest.mark.parametrize("header", ["99999999999999999999", str(MAX_VERSION + 1), "-1", "abc", '"1.5"'])
def test_an_if_match_that_is_not_a_version_is_400(api, header: str) -> None:
    key = unique_key("ifmatch")
    created = httpx.post(f"{api.url}/v1/cache/{key}", json={"value": 1}, timeout=20)
    assert created.status_code == 201
    response = httpx.put(f"{api.url}/v1/cache/{key}", json={"value": 2}, headers={"If-Match": header})
    assert_error(response, 400, "INVALID_REQUEST")
    assert httpx.get(f"{api.url}/v1/cache/{key}").json()["version"] == created.json()["version"]
    # the largest version there can be is a version: it just does not match
    response = httpx.put(f"{api.url}/v1/cache/{key}", json={"value": 2}, headers={"If-Match": str(MAX_VERSION)})
    assert_error(response, 409, "VERSION_MISMATCH")


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_a_key_with_a_newline_is_400_not_404(api, method: str) -> None:
    response = httpx.request(method, f"{api.url}/v1/cache/a%0Ab", json={"value": 1})
    error = assert_error(response, 400, "INVALID_REQUEST")
    assert "invalid key" in error["error"]


def test_options_answers_the_allowed_methods_and_nothing_else(api) -> None:
    response = httpx.options(f"{api.url}/v1/cache/{unique_key()}")
    assert response.status_code == 204 and response.content == b""
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST", "PUT", "DELETE"}
    batch = httpx.options(f"{api.url}/v1/cache/batch/get")
    assert batch.status_code == 204 and "POST" in batch.headers["allow"]


def test_a_503_names_the_dependency_and_a_stable_reason_only(api_factory) -> None:
    # given an API whose NATS is not there
    api = api_factory(NATS_URL=f"nats://127.0.0.1:{free_port()}").start()
    key = unique_key("down")
    # when a write comes
    response = httpx.post(f"{api.url}/v1/cache/{key}", json={"value": 1}, timeout=20)
    # then the client learns what is down and a reason word, not the client library's message
    error = assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert error["details"] == {"dependency": "nats", "reason": "unreachable"}, error
    assert response.headers["retry-after"] == "1"
