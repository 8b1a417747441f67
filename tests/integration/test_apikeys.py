"""API keys: made, listed, revoked and rotated with `manage.py apikey`, stored as a keyed hash
only, verified in constant time. (What `/v1/` does with them: test_access.py.)"""

from __future__ import annotations

import io
import logging
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from ops.access.keys import apikey_create, apikey_verify
from ops.models import ApiKey
from tests.conftest import unique_key

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("api_keys_removed")]


def apikey(*args: str) -> tuple[str, str]:
    """(stdout, stderr) of `manage.py apikey ARGS`."""
    out, err = io.StringIO(), io.StringIO()
    call_command("apikey", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_create_prints_the_key_alone_on_its_last_line_and_stores_only_a_hash(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    name = unique_key("ci")
    # when a key is made
    out, err = apikey("create", name, "--scopes", "read,write", "--prefix", "billing:", "--expires", "30d")
    token = out.strip().splitlines()[-1]
    # then the last line is the key and nothing else, and the rest says what it is
    assert token.startswith("bn_") and " " not in token and len(token) > 40
    row = ApiKey.objects.get(name=name)
    assert token.startswith(row.public_id + "_")
    assert row.scopes == ["read", "write"] and row.key_prefixes == ["billing:"]
    assert timedelta(days=29, hours=23) < row.expires_at - timezone.now() <= timedelta(days=30)
    assert row.public_id in err and "shown this once" in err
    # only a hash is stored, and the key appears in no log line
    assert token not in row.key_hash and len(row.key_hash) == 64
    assert token not in caplog.text
    assert apikey_verify(token) == row


def test_a_wrong_secret_a_revoked_and_an_expired_key_verify_as_nothing() -> None:
    issued = apikey_create(name=unique_key("k"))
    assert apikey_verify(issued.token) == issued.row
    assert apikey_verify(issued.token[:-1] + ("A" if issued.token[-1] != "A" else "B")) is None
    assert apikey_verify(issued.row.public_id) is None
    assert apikey_verify("not a key") is None
    apikey("revoke", issued.row.name)
    assert apikey_verify(issued.token) is None
    expiring = apikey_create(name=unique_key("k"), expires_in=timedelta(seconds=60))
    ApiKey.objects.filter(pk=expiring.row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert apikey_verify(expiring.token) is None


def test_rotate_gives_a_new_key_and_the_old_one_stops_working() -> None:
    name = unique_key("rotating")
    old = apikey("create", name)[0].strip().splitlines()[-1]
    new = apikey("rotate", name)[0].strip().splitlines()[-1]
    assert new != old
    assert apikey_verify(old) is None
    assert apikey_verify(new) is not None and apikey_verify(new).name == name


def test_list_shows_public_ids_and_states_never_keys() -> None:
    live, revoked = unique_key("live"), unique_key("gone")
    live_token = apikey("create", live)[0].strip().splitlines()[-1]
    apikey("create", revoked)
    apikey("revoke", revoked)
    out, _ = apikey("list")
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "active" in lines[live] and "revoked" in lines[revoked]
    assert ApiKey.objects.get(name=live).public_id in lines[live]
    assert live_token not in out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--scopes", "read,fly"], "scopes"),
        (["--scopes", ""], "scopes"),
        (["--prefix", "bad prefix"], "key prefix"),
        (["--expires", "soon"], "--expires"),
        (["--owner", "nobody-at-all"], "owner"),
        (["--rate-limit", "0"], "rate limit"),
    ],
)
def test_bad_settings_are_refused_naming_them(args: list[str], fragment: str) -> None:
    name = unique_key("bad")
    with pytest.raises(CommandError, match=fragment):
        apikey("create", name, *args)
    assert not ApiKey.objects.filter(name=name).exists()


def test_names_are_unique_and_revoking_an_unknown_key_says_so() -> None:
    name = unique_key("once")
    apikey("create", name)
    with pytest.raises(CommandError, match="name"):
        apikey("create", name)
    with pytest.raises(CommandError, match="apikey list"):
        apikey("revoke", unique_key("never-made"))
