"""Poison messages go to the DLQ and nothing else stops; process_dlq lists, shows, retries, purges."""

from __future__ import annotations

import json
import time
import uuid

import orjson
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client

from persistence import dead_letters, jetstream, streams_admin
from persistence.models import CacheEntry
from tests.conftest import unique_key, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def publish_raw(payload: bytes, op: str = "set") -> None:
    n = jetstream.names()
    jetstream.publisher().publish(
        n.persist_subject(op), payload, headers={"Nats-Msg-Id": f"raw-{uuid.uuid4().hex}"}, timeout=5
    )


def dead_letter_for(predicate) -> dead_letters.DeadLetter:
    def find():
        return next((d for d in dead_letters.dead_letters_list(limit=1000) if predicate(d)), None)

    return wait_for(find, timeout=30, message="the dead letter")


@pytest.fixture
def reject_key():
    """A trigger that makes PostgreSQL refuse one key (the 'cause' an operator later fixes)."""
    keys: list[str] = []

    def install(key: str) -> None:
        keys.append(key)
        with connection.cursor() as cursor:
            cursor.execute(
                """
                CREATE OR REPLACE FUNCTION birb_test_reject() RETURNS trigger AS $$
                BEGIN
                  IF NEW.key = ANY(%s) THEN RAISE EXCEPTION 'birb test: key % refused', NEW.key; END IF;
                  RETURN NEW;
                END $$ LANGUAGE plpgsql
                """.replace("%s", "ARRAY[" + ",".join(f"'{k}'" for k in keys) + "]"),
            )
            cursor.execute("DROP TRIGGER IF EXISTS birb_test_reject ON cache_entries")
            cursor.execute(
                "CREATE TRIGGER birb_test_reject BEFORE INSERT OR UPDATE ON cache_entries "
                "FOR EACH ROW EXECUTE FUNCTION birb_test_reject()"
            )

    def fix() -> None:
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER IF EXISTS birb_test_reject ON cache_entries")
            cursor.execute("DROP FUNCTION IF EXISTS birb_test_reject()")

    install.fix = fix  # type: ignore[attr-defined]
    yield install
    fix()


def test_an_undecodable_message_is_dead_lettered_and_blocks_nothing(client: Client, worker, capsys) -> None:
    before = [unique_key("before") for _ in range(5)]
    after = [unique_key("after") for _ in range(5)]
    for key in before:
        client.post(f"/v1/cache/{key}", {"value": key}, content_type="application/json")
    publish_raw(b"this is not json")
    for key in after:
        client.post(f"/v1/cache/{key}", {"value": key}, content_type="application/json")

    wait_for(lambda: CacheEntry.objects.filter(key__in=before + after).count() == 10, message="neighbours persisted")
    letter = dead_letter_for(lambda d: d.reason == "undecodable" and d.payload == "this is not json")
    assert letter.original_subject == jetstream.names().persist_subject("set")
    assert letter.deliveries == 1 and letter.first_failure and letter.last_failure
    assert "not JSON" in letter.error

    call_command("process_dlq", "--list", "--limit", "1000")
    listing = capsys.readouterr().out
    assert f"{letter.id}  " in listing and "undecodable" in listing
    call_command("process_dlq", "--show", str(letter.id), "--json")
    shown = json.loads(capsys.readouterr().out)
    assert shown["payload"] == "this is not json" and shown["headers"]["Birb-Reason"] == "undecodable"

    call_command("process_dlq", "--purge", str(letter.id), "--yes")
    assert "purged 1" in capsys.readouterr().out
    with pytest.raises(CommandError, match="no dead letter"):
        call_command("process_dlq", "--show", str(letter.id))


def test_a_row_postgresql_rejects_is_isolated_and_retried_after_the_fix(client: Client, worker, reject_key) -> None:
    # given PostgreSQL refuses one key
    poison = unique_key("poison")
    reject_key(poison)
    good = [unique_key("good") for _ in range(20)]
    # when it is written among good ones
    for i, key in enumerate(good):
        client.post(f"/v1/cache/{key}", {"value": i}, content_type="application/json")
        if i == 10:
            assert (
                client.post(f"/v1/cache/{poison}", {"value": "p"}, content_type="application/json").status_code == 201
            )
    # then exactly that one is a dead letter, and the others are persisted
    wait_for(lambda: CacheEntry.objects.filter(key__in=good).count() == 20, message="good keys persisted")
    letter = dead_letter_for(lambda d: d.key == poison)
    assert letter.reason == "rejected_by_database" and "refused" in letter.error
    assert letter.original_msg_id == f"{poison}:1"
    assert not [d for d in dead_letters.dead_letters_list(limit=1000) if d.key in good]
    assert not CacheEntry.objects.filter(key=poison).exists()

    # when the cause is fixed and the dead letter retried (well inside the duplicate window)
    reject_key.fix()
    call_command("process_dlq", "--retry", str(letter.id))

    # then it is persisted with its version, and gone from the DLQ
    row = wait_for(lambda: CacheEntry.objects.filter(key=poison).first(), message="retried write persisted")
    assert row.version == 1 and row.value == "p"
    with pytest.raises(dead_letters.DeadLetterNotFoundError):
        dead_letters.dead_letter_get(id=letter.id)


def test_a_retry_gets_a_fresh_message_id_so_jetstream_does_not_drop_it(worker, reject_key) -> None:
    key = unique_key("replay")
    reject_key(key)
    n = jetstream.names()
    body = {"op": "set", "key": key, "version": 7, "value": 1, "metadata": {}, "expires_at": None,
            "created_at": "2026-11-30T00:00:00Z", "updated_at": "2026-11-30T00:00:00Z"}  # fmt: skip
    jetstream.publisher().publish(
        n.persist_subject("set"), orjson.dumps(body), headers={"Nats-Msg-Id": f"{key}:7"}, timeout=5
    )
    letter = dead_letter_for(lambda d: d.key == key)
    reject_key.fix()
    last_seq = streams_admin.stream_info(name=n.stream).state.last_seq

    # A replay under the original id inside the duplicate window is acknowledged but dropped:
    jetstream.publisher().publish(
        n.persist_subject("set"), orjson.dumps(body), headers={"Nats-Msg-Id": f"{key}:7"}, timeout=5
    )
    assert streams_admin.stream_info(name=n.stream).state.last_seq == last_seq, "JetStream de-duplicated it"

    result = dead_letters.dead_letters_retry(ids=[letter.id])
    assert result.retried == [letter.id] and not result.failed
    replayed = streams_admin.message_get(stream=n.stream, seq=last_seq + 1)
    assert replayed.headers["Nats-Msg-Id"].startswith(f"{key}:7:retry:")
    assert replayed.headers["Birb-Retry-Of"] == str(letter.id)
    assert "Birb-Error" not in replayed.headers
    wait_for(lambda: CacheEntry.objects.filter(key=key, version=7).exists(), message="replayed write persisted")


def test_a_message_jetstream_gave_up_on_is_dead_lettered(worker) -> None:
    worker.wait_ready()
    time.sleep(0.5)  # the advisory subscription follows the "consuming" line
    # given a stored message, and the server's max-deliveries advisory about it
    key = unique_key("gaveup")
    n = jetstream.names()
    body = orjson.dumps({"op": "set", "key": key, "version": 1, "value": 1, "metadata": {}, "expires_at": None,
                         "created_at": "2026-11-30T00:00:00Z", "updated_at": "2026-11-30T00:00:00Z"})  # fmt: skip
    ack = jetstream.publisher().run(
        jetstream.publisher().client().js.publish(n.persist_subject("set"), body, headers={"Nats-Msg-Id": key}), 5
    )
    advisory = {"type": "io.nats.jetstream.advisory.v1.max_deliver", "stream": n.stream, "consumer": n.consumer,
                "stream_seq": ack.seq, "deliveries": 5}  # fmt: skip
    client = jetstream.publisher().client()
    jetstream.publisher().run(
        client.nc.publish(jetstream.max_deliveries_advisory_subject(n), orjson.dumps(advisory)), 5
    )
    # then it is kept, in the DLQ
    letter = dead_letter_for(
        lambda d: d.reason == "max_deliveries" and d.headers.get("Birb-Original-Seq") == str(ack.seq)
    )
    assert letter.deliveries == 5


def test_purge_all_needs_confirmation_and_empties_the_dlq(worker, capsys) -> None:
    publish_raw(b"garbage one")
    dead_letter_for(lambda d: d.payload == "garbage one")
    with pytest.raises(CommandError, match="without confirmation"):
        call_command("process_dlq", "--purge", "--all")
    with pytest.raises(CommandError, match="IDs to purge"):
        call_command("process_dlq", "--purge")
    call_command("process_dlq", "--purge", "--all", "--yes")
    assert dead_letters.dead_letters_count() == 0
    call_command("process_dlq", "--list")
    assert "no dead letters" in capsys.readouterr().out


def test_a_value_postgresql_cannot_store_is_refused_at_the_door(client: Client) -> None:
    response = client.post(f"/v1/cache/{unique_key()}", b'{"value": "a\\u0000b"}', content_type="application/json")
    assert response.status_code == 400 and "U+0000" in response.json()["error"]
    ok = client.post(f"/v1/cache/{unique_key()}", b'{"value": "a\\\\u0000b"}', content_type="application/json")
    assert ok.status_code == 201, "an escaped backslash followed by u0000 is ordinary text"
