"""Item 4 of the hostile-input issue: a made-up ``X-API-Key`` must not escape the limiter or a block.

The limiter used to count by whatever key the client sent: a new random key per request got
20 of 20 through a limit of 5, and a blocked address got 200 by adding any key. Since API keys
are verified (issue #10), a made-up key is refused (401) before it is counted, and is never served.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ops.models import RateLimitClient
from ops.ratelimit import REFRESH_SECONDS, ratelimit_client_block, ratelimit_settings_update
from tests.conftest import clear_of_window_edge, unique_key
from tests.hostile.conftest import assert_error
from tests.integration.test_ratelimit import fresh_address

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def limiter(transactional_db: Any) -> Iterator[None]:
    yield
    RateLimitClient.objects.all().delete()
    ratelimit_settings_update(enabled=False, limit=100, window=60, algorithm="fixed", by="tests")
    time.sleep(REFRESH_SECONDS + 0.1)


def made_up_key_headers() -> list[dict[str, str]]:
    return [{"X-API-Key": unique_key("forged")}, {"Authorization": f"Bearer {unique_key('forged')}"}]


def test_rotating_made_up_keys_does_not_escape_the_limit(api, limiter) -> None:
    # given a limit of 5 a minute
    clear_of_window_edge(60)
    ratelimit_settings_update(enabled=True, limit=5, window=60, algorithm="fixed", by="tests")
    time.sleep(REFRESH_SECONDS + 0.1)
    address = fresh_address()
    # when one client sends 20 requests, each with a new made-up key, then 6 without
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10) as http:
        forged = Counter(
            http.get(f"{api.url}/v1/cache/{unique_key('absent')}", headers=made_up_key_headers()[n % 2]).status_code
            for n in range(20)
        )
        plain = [http.get(f"{api.url}/v1/cache/{unique_key('absent')}").status_code for _ in range(6)]
    # then no made-up key is served, and the client is still one client: 5 through, then 429
    assert forged == {401: 20}, forged
    assert plain == [404] * 5 + [429], plain


def test_a_blocked_address_stays_blocked_whatever_key_it_sends(api, limiter) -> None:
    address = fresh_address()
    ratelimit_client_block(client=address)
    time.sleep(REFRESH_SECONDS + 0.1)
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10) as http:
        assert_error(http.get(f"{api.url}/v1/cache/{unique_key('absent')}"), 403, "FORBIDDEN")
        for headers in made_up_key_headers():  # refused before the limiter: never served
            assert_error(http.get(f"{api.url}/v1/cache/{unique_key('absent')}", headers=headers), 401, "UNAUTHORIZED")
