"""The console's login is throttled (issue #10, console hardening): lockout after repeated wrong
passwords per user and per address, shown and reset in the admin (django-axes)."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.test import Client

from tests.conftest import unique_key

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "x-Pass-9731-right"
LIMIT = 5


def log_in(client: Client, username: str, password: str, address: str) -> int:
    """Status of a login form post; 302 = logged in (to the admin index)."""
    response = client.post(
        "/admin/login/?next=/admin/", {"username": username, "password": password}, REMOTE_ADDR=address
    )
    return response.status_code


@pytest.fixture
def staff(django_user_model):
    def make() -> str:
        user = django_user_model.objects.create_user(username=unique_key("op"), password=PASSWORD, is_staff=True)
        return user.username

    return make


def test_a_user_is_locked_out_after_repeated_wrong_passwords(staff) -> None:
    username = staff()
    # given five wrong passwords for one user, from different addresses
    statuses = [log_in(Client(), username, "wrong", f"198.51.100.{n}") for n in range(1, LIMIT + 1)]
    assert 429 not in statuses[: LIMIT - 1]
    # then even the right password is refused for that user, from a new address
    assert log_in(Client(), username, PASSWORD, "198.51.100.77") == 429
    # until an operator resets the attempts
    call_command("axes_reset_username", username)
    assert log_in(Client(), username, PASSWORD, "198.51.100.77") == 302


def test_an_address_is_locked_out_after_repeated_failures_whatever_the_usernames(staff) -> None:
    address = "203.0.113.9"
    for _ in range(LIMIT):
        log_in(Client(), unique_key("guess"), "wrong", address)
    # a real user from that address is refused; from another address they log in
    username = staff()
    assert log_in(Client(), username, PASSWORD, address) == 429
    assert log_in(Client(), username, PASSWORD, "203.0.113.10") == 302


def test_attempts_are_listed_in_the_admin_and_a_success_clears_a_users_count(staff, admin_client) -> None:
    username = staff()
    for _ in range(LIMIT - 1):
        log_in(Client(), username, "wrong", "192.0.2.1")
    page = admin_client.get("/admin/axes/accessattempt/")
    assert page.status_code == 200 and username in page.content.decode()
    # the right password before the limit logs in and forgets the failures
    assert log_in(Client(), username, PASSWORD, "192.0.2.1") == 302
    for _ in range(LIMIT - 1):
        log_in(Client(), username, "wrong", "192.0.2.2")
    assert log_in(Client(), username, PASSWORD, "192.0.2.2") == 302
