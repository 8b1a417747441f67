"""`manage.py jetstream`: the runbook's `nats` CLI commands against the session's real NATS."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from persistence import jetstream
from tests.conftest import free_port, unique_key

pytestmark = pytest.mark.django_db(transaction=True)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()  # drop what came before
    call_command("jetstream", *args)
    return capsys.readouterr().out


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    return json.loads(run(capsys, *args, "--json"))


def write_keys(client: Client, count: int) -> list[str]:
    """Writes through the API: each publishes one persist message (and creates the streams)."""
    keys = [unique_key("jsadmin") for _ in range(count)]
    for key in keys:
        response = client.post(f"/v1/cache/{key}", {"value": 1}, content_type="application/json")
        assert response.status_code == 201, response.content
    return keys


def last_seq(capsys: pytest.CaptureFixture[str], stream: str) -> int:
    streams = {s["name"]: s for s in run_json(capsys, "ls")}
    return streams[stream]["last_seq"] if stream in streams else 0


def test_ls_lists_both_streams_with_their_counts(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    n = jetstream.names()
    write_keys(client, 1)  # the streams exist from here on
    before = last_seq(capsys, n.stream)

    write_keys(client, 3)

    streams = {s["name"]: s for s in run_json(capsys, "ls")}
    assert {n.stream, n.dlq_stream} <= streams.keys()
    ours = streams[n.stream]
    assert ours["last_seq"] >= before + 3
    assert ours["subjects"] == [n.persist_subjects]
    assert streams[n.dlq_stream]["subjects"] == [n.dlq_subjects]
    text = run(capsys, "ls")
    row = next(line for line in text.splitlines() if line.startswith(n.stream + " "))
    assert n.persist_subjects in row
    assert str(ours["last_seq"]) in row.split()
    assert any(line.startswith(n.dlq_stream + " ") for line in text.splitlines())
    assert run(capsys, "report") == text  # the `nats stream report` alias


def test_info_shows_the_message_count(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    n = jetstream.names()
    write_keys(client, 1)
    before = run_json(capsys, "info", n.stream)["state"]

    write_keys(client, 2)

    detail = run_json(capsys, "info", n.stream)
    assert detail["state"]["last_seq"] >= before["last_seq"] + 2
    assert detail["state"]["messages"] >= 2
    assert detail["config"]["retention"] == "limits" and detail["config"]["discard"] == "new"
    text = run(capsys, "info", n.stream)
    assert f"Stream {n.stream}" in text
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in text.splitlines() if ":" in line}
    assert int(lines["Messages"]) >= 2
    assert int(lines["Last sequence"]) >= detail["state"]["last_seq"]
    assert lines["Subjects"] == n.persist_subjects


def test_consumer_info_after_ensure(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    n = jetstream.names()
    write_keys(client, 1)
    ensured = run_json(capsys, "ensure")
    assert (ensured["stream"], ensured["dlq_stream"], ensured["consumer"]) == (n.stream, n.dlq_stream, n.consumer)

    write_keys(client, 3)  # no worker runs in this test: they wait in the consumer

    consumer = run_json(capsys, "consumer-info")  # defaults to our stream and consumer
    assert (consumer["stream"], consumer["name"]) == (n.stream, n.consumer)
    assert consumer["num_pending"] >= 3
    assert consumer["ack_wait"] == jetstream.ACK_WAIT
    assert consumer["max_deliver"] == jetstream.consumer_config(n).max_deliver
    assert consumer["max_ack_pending"] == 20000
    assert run_json(capsys, "consumer-info", n.stream, n.consumer)["name"] == n.consumer
    text = run(capsys, "consumer-info", n.stream, n.consumer)
    assert f"Consumer {n.consumer} on stream {n.stream}" in text
    assert "Pending:" in text and "Ack floor:" in text and "Ack wait:" in text
    report = run(capsys, "consumer-report", n.stream)
    assert any(line.startswith(n.consumer + " ") for line in report.splitlines())
    assert n.consumer in [c["name"] for c in run_json(capsys, "consumer-report")]


def test_view_last_shows_the_newest_messages_with_their_headers(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    n = jetstream.names()
    keys = write_keys(client, 3)

    view = run_json(capsys, "view", n.stream, "--last", "3")

    messages = view["messages"]
    assert [m["data"]["key"] for m in messages] == keys
    assert [m["headers"]["Nats-Msg-Id"] for m in messages] == [f"{key}:1" for key in keys]
    assert {m["subject"] for m in messages} == {n.persist_subject("set")}
    assert [m["seq"] for m in messages] == sorted(m["seq"] for m in messages)
    assert messages[-1]["seq"] == view["last_seq"]
    text = run(capsys, "view", n.stream, "--last", "3")
    for message, key in zip(messages, keys, strict=True):
        assert f"[{message['seq']}]" in text
        assert f"Nats-Msg-Id: {key}:1" in text
        assert f'"key": "{key}"' in text
    assert n.persist_subject("set") in text
    # --from reads forward from a sequence, --limit bounds it
    forward = run_json(capsys, "view", n.stream, "--from", str(messages[1]["seq"]), "--limit", "1")
    assert [m["data"]["key"] for m in forward["messages"]] == [keys[1]]


def test_view_of_the_dead_letter_stream(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    n = jetstream.names()
    write_keys(client, 1)
    reason = unique_key("reason")
    jetstream.publisher().publish(
        n.dlq_subject("poison"), b"not json", headers={"Nats-Msg-Id": reason, "Birb-Reason": reason}, timeout=5
    )

    [message] = run_json(capsys, "view", n.dlq_stream, "--last", "1")["messages"]

    assert (message["encoding"], message["data"]) == ("text", "not json")
    assert message["headers"]["Birb-Reason"] == reason
    assert f"Birb-Reason: {reason}" in run(capsys, "view", n.dlq_stream, "--last", "1")


def test_consumer_rm_removes_the_consumer_and_ensure_brings_it_back(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    n = jetstream.names()
    write_keys(client, 1)
    run(capsys, "ensure")

    # without --yes, and no terminal to ask on, nothing is deleted
    with pytest.raises(CommandError, match="--yes"):
        run(capsys, "consumer-rm", n.stream, n.consumer)
    assert run_json(capsys, "consumer-info")["name"] == n.consumer

    removed = run(capsys, "consumer-rm", n.stream, n.consumer, "--yes")
    assert f"Deleted consumer {n.consumer} from stream {n.stream}" in removed
    assert "Running workers create it again within seconds" in removed
    with pytest.raises(CommandError, match=f"consumer '{n.consumer}' not found on stream '{n.stream}'"):
        run(capsys, "consumer-info")
    assert n.consumer not in [c["name"] for c in run_json(capsys, "consumer-report", n.stream)]

    ensured = run(capsys, "ensure")

    assert f"consumer {n.consumer} on {n.stream}: created" in ensured
    assert f"stream {n.stream}: exists" in ensured
    assert run_json(capsys, "consumer-info")["name"] == n.consumer
    assert "created" not in run(capsys, "ensure")  # idempotent
    # The new consumer starts from the first message: leave the next tests the stream as a
    # drained consumer would (every earlier write is persisted or belongs to no test any more).
    publisher = jetstream.publisher()
    publisher.run(publisher.client().js.purge_stream(n.stream), 5)


def test_account_counts_our_streams(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    write_keys(client, 1)

    account = run_json(capsys, "account")

    assert account["streams"] >= 2
    assert account["server_url"].startswith("nats://")
    text = run(capsys, "account")
    assert "Streams:" in text and jetstream.names().stream in text


def test_an_unknown_stream_is_a_command_error_naming_it(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    write_keys(client, 1)
    missing = "NO_SUCH_STREAM_" + unique_key("x").replace("-", "_").upper()

    for args in (["info", missing], ["view", missing], ["consumer-report", missing], ["consumer-info", missing]):
        with pytest.raises(CommandError, match=f"stream '{missing}' not found") as error:
            run(capsys, *args, "--json")
        assert jetstream.names().stream in str(error.value), "the message lists the streams that do exist"
        assert "jetstream ensure" in str(error.value)


def test_bad_arguments_are_command_errors(capsys: pytest.CaptureFixture[str]) -> None:
    n = jetstream.names()
    with pytest.raises(CommandError, match="not allowed with"):
        run(capsys, "view", n.stream, "--last", "2", "--from", "1")
    with pytest.raises(CommandError, match="1 to 1000 messages"):
        run(capsys, "view", n.stream, "--last", "0")
    with pytest.raises(CommandError, match="invalid stream name"):
        run(capsys, "info", "bad.name")


def test_unreachable_nats_is_a_command_error_naming_the_server(
    settings: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    settings.BIRB = replace(settings.BIRB, nats_url=url)

    with pytest.raises(CommandError, match=f"cannot reach NATS at {url}.*NATS_URL"):
        run(capsys, "ls")
