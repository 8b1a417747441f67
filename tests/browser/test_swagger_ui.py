"""The Swagger UI page (`/v1/schema/docs/`, issue #12) in a real headless Chromium, offline: every
request to another host is refused, and the page still renders every operation of the document."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.browser.conftest import shot


def test_swagger_ui_renders_the_api_offline(page: Any, api: Any) -> None:
    # given: a browser that may only reach this service
    ours = urlsplit(api.url).netloc
    elsewhere: list[str] = []

    def only_ours(route: Any) -> None:
        url = route.request.url
        if urlsplit(url).netloc == ours:
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    page.route("**/*", only_ours)
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    # when
    page.goto(api.url + "/v1/schema/docs/")
    page.wait_for_selector(".opblock", state="attached")

    # then: every operation of the document is there, from our own files alone
    schema = httpx.get(api.url + "/v1/schema/", params={"format": "json"}, timeout=30).json()
    methods = {"get", "put", "post", "delete", "patch"}
    expected = sum(method in methods for item in schema["paths"].values() for method in item)
    assert page.locator(".opblock").count() == expected
    assert page.locator(".opblock-summary-path", has_text="/v1/cache/{key}/touch").count() == 1
    assert "Birb Nest" in page.locator(".info .title").inner_text()
    shot(page, "swagger-ui")
    assert elsewhere == [], f"the page asked for other hosts: {elsewhere}"
    assert failed == [] and errors == [], (failed, errors)
