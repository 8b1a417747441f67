"""The OpenAPI 3 document (`GET /v1/schema/`) and its Swagger UI page (`/v1/schema/docs/`), issue #12.

The document validates as OpenAPI 3, names every route and error code of the contract, and the
Swagger UI page loads all its files from this service (it works offline: no CDN). The
schemathesis run of the same document against the live API is tests/integration/test_schemathesis.py.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import orjson
import pytest
import yaml
from django.core.management import call_command
from drf_spectacular.validation import validate_schema

from tests.conftest import wait_published

pytestmark = pytest.mark.django_db(transaction=True)

# The contract's HTTP table (../shared/docs/CONTRACT.md, "HTTP API (v1)"), copied here because CI
# does not necessarily have that file: every route but `GET /`, `/v1/schema/` itself and the
# Prometheus text is an operation of the document. Keep in step with the contract.
CONTRACT_OPERATIONS = {
    ("post", "/v1/cache/{key}"),
    ("put", "/v1/cache/{key}"),
    ("get", "/v1/cache/{key}"),
    ("delete", "/v1/cache/{key}"),
    ("post", "/v1/cache/batch/get"),
    ("post", "/v1/cache/batch/set"),
    ("post", "/v1/cache/batch/delete"),
    ("post", "/v1/cache/{key}/touch"),
    ("get", "/v1/cache"),
    ("get", "/health"),
    ("get", "/metrics"),
    ("post", "/admin/ratelimit"),
}
# The contract's error codes, likewise.
CONTRACT_CODES = {
    "NOT_FOUND",
    "INVALID_REQUEST",
    "PAYLOAD_TOO_LARGE",
    "VERSION_MISMATCH",
    "PRECONDITION_FAILED",
    "RATE_LIMITED",
    "UNAUTHORIZED",
    "FORBIDDEN",
    "SERVICE_UNAVAILABLE",
    "TIMEOUT",
    "INTERNAL_ERROR",
}
# The code each error status carries.
CODE_OF_STATUS = {
    "400": "INVALID_REQUEST",
    "401": "UNAUTHORIZED",
    "403": "FORBIDDEN",
    "404": "NOT_FOUND",
    "408": "TIMEOUT",
    "409": "VERSION_MISMATCH",
    "412": "PRECONDITION_FAILED",
    "413": "PAYLOAD_TOO_LARGE",
    "429": "RATE_LIMITED",
    "503": "SERVICE_UNAVAILABLE",
}
# The statuses each data-plane operation can answer, beside its success (from the routes' code:
# the key and rate-limit middleware, the body reader and the view).
GATE = {"400", "401", "403", "429", "503"}
ERROR_STATUSES = {
    ("get", "/v1/cache/{key}"): GATE | {"404"},
    ("delete", "/v1/cache/{key}"): GATE | {"404"},
    ("post", "/v1/cache/{key}"): GATE | {"408", "409", "412", "413"},
    ("put", "/v1/cache/{key}"): GATE | {"408", "409", "412", "413"},
    ("post", "/v1/cache/batch/get"): GATE | {"408", "413"},
    ("post", "/v1/cache/batch/set"): GATE | {"408", "413"},
    ("post", "/v1/cache/batch/delete"): GATE | {"408", "413"},
    ("post", "/v1/cache/{key}/touch"): GATE | {"404", "408", "409", "413"},
    ("get", "/v1/cache"): GATE,
}


def _schema(api: Any, **params: str) -> dict[str, Any]:
    response = httpx.get(api.url + "/v1/schema/", params=params, timeout=30)
    assert response.status_code == 200, response.text[:500]
    return orjson.loads(response.content)


def _operations(schema: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return {(method, path) for path, item in schema["paths"].items() for method in item if method in methods}


def test_the_served_schema_is_valid_openapi_3(api: Any) -> None:
    schema = _schema(api, format="json")

    validate_schema(schema)  # drf-spectacular's validator: the OpenAPI 3.0 JSON Schema
    assert schema["openapi"].startswith("3.")
    assert schema["info"]["title"] == "Birb Nest"
    assert schema["info"]["version"] == httpx.get(api.url + "/").json()["version"]


def test_yaml_by_default_and_json_by_accept(api: Any) -> None:
    as_yaml = httpx.get(api.url + "/v1/schema/", timeout=30)
    as_json = httpx.get(api.url + "/v1/schema/", headers={"Accept": "application/json"}, timeout=30)

    assert as_yaml.status_code == as_json.status_code == 200
    assert as_yaml.headers["content-type"].startswith("application/vnd.oai.openapi")
    assert "json" in as_json.headers["content-type"]
    assert yaml.safe_load(as_yaml.text) == orjson.loads(as_json.content)


def test_every_route_of_the_contract_is_in_it(api: Any) -> None:
    schema = _schema(api, format="json")

    missing = CONTRACT_OPERATIONS - _operations(schema)

    assert not missing, f"contract routes missing from the schema: {sorted(missing)}"
    # The key route's regex comes out as a plain template with a documented key parameter.
    assert not [path for path in schema["paths"] if "(" in path or "<" in path]
    key = next(p for p in schema["paths"]["/v1/cache/{key}"]["get"]["parameters"] if p["name"] == "key")
    assert key["in"] == "path" and key["required"]
    assert re.fullmatch(key["schema"]["pattern"].strip("^$"), "user:42.a_b-c")


def test_every_error_code_and_error_status(api: Any) -> None:
    schema = _schema(api, format="json")
    components = schema["components"]["schemas"]

    assert set(components["ErrorCode"]["enum"]) == CONTRACT_CODES
    assert set(components["Error"]["required"]) == {"error", "code", "details"}
    for (method, path), statuses in ERROR_STATUSES.items():
        responses = schema["paths"][path][method]["responses"]
        assert statuses <= set(responses), (method, path, sorted(statuses - set(responses)))
        for status in statuses:
            body = responses[status]["content"]["application/json"]["schema"]
            error, narrowed = body["allOf"]
            assert error == {"$ref": "#/components/schemas/Error"}, (method, path, status)
            assert narrowed["properties"]["code"]["enum"] == [CODE_OF_STATUS[status]], (method, path, status)


def test_headers_and_security_schemes(api: Any) -> None:
    schema = _schema(api, format="json")
    get = schema["paths"]["/v1/cache/{key}"]["get"]
    put = schema["paths"]["/v1/cache/{key}"]["put"]

    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        **schema["components"]["securitySchemes"]["bearerAuth"],
        "type": "http",
        "scheme": "bearer",
    }
    assert schema["components"]["securitySchemes"]["apiKeyHeader"]["name"] == "X-API-Key"
    assert get["responses"]["200"]["headers"]["ETag"]["required"]
    assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After"} <= set(
        get["responses"]["429"]["headers"]
    )
    assert "Retry-After" in get["responses"]["503"]["headers"]
    assert "WWW-Authenticate" in get["responses"]["401"]["headers"]
    assert {"If-Match", "If-None-Match"} <= {p["name"] for p in put["parameters"] if p["in"] == "header"}
    # /health and /metrics are open.
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert schema["paths"]["/metrics"]["get"]["security"] == []


def test_the_schema_and_its_page_need_no_api_key(api: Any, make_api_key: Any) -> None:
    # given: a key exists, so every other /v1/ request needs one
    make_api_key()
    wait_published()
    assert httpx.get(api.url + "/v1/cache/anything").status_code == 401

    # then: the schema and the page reveal no data and stay open
    assert httpx.get(api.url + "/v1/schema/?format=json", timeout=30).status_code == 200
    assert httpx.get(api.url + "/v1/schema/docs/", timeout=30).status_code == 200


class _Resources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


def test_swagger_ui_loads_only_from_this_service(api: Any) -> None:
    page = httpx.get(api.url + "/v1/schema/docs/", timeout=30)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")

    # No address of another host anywhere in the page (not in a tag, not in its inline script).
    assert not re.findall(r"https?://[^\s\"'<>]+", page.text)
    parser = _Resources()
    parser.feed(page.text)
    assets = {url for url in parser.urls if not url.startswith("data:")}
    kinds = {Path(urlsplit(url).path).suffix for url in assets}
    assert {".js", ".css"} <= kinds, assets
    for url in assets:
        absolute = urljoin(api.url + "/v1/schema/docs/", url)
        assert urlsplit(absolute).netloc == urlsplit(api.url).netloc, url
        asset = httpx.get(absolute, timeout=30)
        assert asset.status_code == 200, (url, asset.status_code)
        assert len(asset.content) > 100, url
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"], (url, asset.headers["content-type"])
        if url.endswith(".css"):
            assert asset.headers["content-type"].startswith("text/css"), url
    # The page's schema URL is ours.
    assert '"/v1/schema/"' in page.text or "'/v1/schema/'" in page.text


def test_spectacular_command_validates_without_warnings(tmp_path: Path) -> None:
    target = tmp_path / "schema.yaml"

    # --fail-on-warn: any view drf-spectacular cannot describe fails here, not in a client generator.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))

    schema = yaml.safe_load(target.read_text())
    assert _operations(schema) >= CONTRACT_OPERATIONS
