"""Bad requests get the contract's error body and change nothing."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest
from django.test import Client

from persistence import redis_store
from persistence.keys import version_key
from tests.conftest import unique_key

pytestmark = pytest.mark.django_db(transaction=True)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = orjson.loads(response.content)
    assert set(body) == {"error", "code", "details"}
    assert body["code"] == code
    assert isinstance(body["error"], str) and body["error"]
    return body


def assert_untouched(key: str, redis_client) -> None:
    assert redis_store.read(key) is None
    assert not redis_client.exists(version_key(key))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "JSON object"),
        (b'{"ttl": 5}', 'missing field "value"'),
        (b'{"value": 1, "ttl": -1}', "ttl"),
        (b'{"value": 1, "ttl": 1.5}', "ttl"),
        (b'{"value": 1, "ttl": "10"}', "ttl"),
        (b'{"value": 1, "ttl": true}', "ttl"),
        (b'{"value": 1, "metadata": [1]}', "metadata"),
        (b'{"value": 1, "colour": "red"}', "unknown field"),
    ],
)
@pytest.mark.parametrize("method", ["post", "put"])
def test_invalid_write_bodies_are_400_and_change_nothing(
    client: Client, redis_client, method: str, body: bytes, fragment: str
) -> None:
    key = unique_key()
    response = getattr(client, method)(f"/v1/cache/{key}", body, content_type="application/json")
    error = assert_error(response, 400, "INVALID_REQUEST")
    assert fragment in error["error"]
    assert_untouched(key, redis_client)


@pytest.mark.parametrize("key", ["a b", "a/b", "ключ", "a" * 256, "semi;colon", "a%2Fb"])
def test_illegal_or_over_long_keys_are_400(client: Client, key: str) -> None:
    for response in (
        client.get(f"/v1/cache/{key}"),
        client.post(f"/v1/cache/{key}", {"value": 1}, content_type="application/json"),
        client.delete(f"/v1/cache/{key}"),
    ):
        error = assert_error(response, 400, "INVALID_REQUEST")
        assert "keys are 1-255 characters" in error["error"]


def test_the_longest_legal_key_is_accepted(client: Client) -> None:
    key = ("K" * 255 + unique_key(""))[-255:]
    assert len(key) == 255
    assert client.post(f"/v1/cache/{key}", {"value": 1}, content_type="application/json").status_code == 201


def test_an_oversize_value_is_413(client: Client, redis_client, settings) -> None:
    key = unique_key()
    settings.BIRB = replace(settings.BIRB, max_value_size=100)
    response = client.post(f"/v1/cache/{key}", {"value": "x" * 200}, content_type="application/json")
    fits = client.post(f"/v1/cache/{key}", {"value": "x" * 90}, content_type="application/json")
    body = assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    assert body["details"]["max_value_size"] == 100
    assert fits.status_code == 201
    assert redis_store.read(key).version == 1


def test_a_body_beyond_the_upload_limit_is_413(client: Client, redis_client, settings) -> None:
    key = unique_key()
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = client.post(f"/v1/cache/{key}", {"value": "x" * 5000}, content_type="application/json")
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    assert_untouched(key, redis_client)


def test_batch_get_rejects_too_many_keys_and_bad_bodies(client: Client) -> None:
    too_many = {"keys": [f"k{i}" for i in range(101)]}
    error = assert_error(
        client.post("/v1/cache/batch/get", too_many, content_type="application/json"), 400, "INVALID_REQUEST"
    )
    assert "too many keys" in error["error"]
    for body in ({"keys": []}, {"keys": "k"}, {"nope": 1}, {"keys": ["ok", "not ok"]}, {"keys": [1]}):
        assert_error(client.post("/v1/cache/batch/get", body, content_type="application/json"), 400, "INVALID_REQUEST")


def test_unsupported_methods_are_405_in_the_same_form(client: Client) -> None:
    response = client.patch(f"/v1/cache/{unique_key()}", {"value": 1}, content_type="application/json")
    assert_error(response, 405, "INVALID_REQUEST")
    assert "PUT" in response["Allow"]
    assert_error(client.get("/v1/cache/batch/get"), 405, "INVALID_REQUEST")
    assert_error(client.post("/health"), 405, "INVALID_REQUEST")


def test_unknown_paths_are_404_in_the_same_form(client: Client) -> None:
    for path in ("/nope", "/v2/cache/x", "/v1/cache/"):  # /v1/cache is the key listing (issue #12)
        body = assert_error(client.get(path), 404, "NOT_FOUND")
        assert body["details"] == {"path": path}
    assert_error(client.post("/nope", {}, content_type="application/json"), 404, "NOT_FOUND")


def test_a_stale_if_match_is_409_and_changes_nothing(client: Client) -> None:
    key = unique_key()
    client.post(f"/v1/cache/{key}", {"value": 1}, content_type="application/json")
    stale = client.put(f"/v1/cache/{key}", {"value": 2}, content_type="application/json", headers={"If-Match": "0"})
    body = assert_error(stale, 409, "VERSION_MISMATCH")
    assert body["details"]["current_version"] == 1
    fresh = client.put(f"/v1/cache/{key}", {"value": 3}, content_type="application/json", headers={"If-Match": '"1"'})
    assert fresh.status_code == 200 and fresh.json()["version"] == 2
    assert client.get(f"/v1/cache/{key}").json()["value"] == 3
    bad = client.put(f"/v1/cache/{key}", {"value": 4}, content_type="application/json", headers={"If-Match": "abc"})
    assert_error(bad, 400, "INVALID_REQUEST")


def test_missing_key_is_404_for_get_and_delete(client: Client) -> None:
    key = unique_key()
    assert assert_error(client.get(f"/v1/cache/{key}"), 404, "NOT_FOUND")["details"] == {"key": key}
    assert_error(client.delete(f"/v1/cache/{key}"), 404, "NOT_FOUND")
