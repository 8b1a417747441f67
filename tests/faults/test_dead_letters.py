"""Fault injection, dead letters: a poison message among good ones, and a replayed dead letter.

PostgreSQL is made to refuse one key (a trigger), which the worker must isolate and dead-letter
while every other write persists; `process_dlq --retry` after the trigger is dropped persists it.
A replay within JetStream's 2-minute duplicate window must not be silently de-duplicated.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from django.core.management import call_command

from persistence import dead_letters, jetstream
from persistence.models import CacheEntry
from tests.conftest import wait_for
from tests.faults.harness import SET, FaultWriter, Op, PoisonTrigger, report, settle

pytestmark = [pytest.mark.django_db(transaction=True)]


def _letters_after(seq: int) -> list[dead_letters.DeadLetter]:
    return [d for d in dead_letters.dead_letters_list(limit=1000, after=seq or None) if d.id > seq]


def _write(api_url: str, key: str, value: object) -> Op:
    response = httpx.post(f"{api_url}/v1/cache/{key}", json={"value": value}, timeout=30)
    assert response.status_code in (200, 201), response.text
    return Op(SET, value=value, version=int(response.json()["version"]), status=response.status_code)


def _persisted(key: str, op: Op) -> bool:
    return CacheEntry.objects.filter(key=key, version=op.version, value=op.value, deleted=False).exists()


def test_poison_message_among_good_ones_is_dead_lettered_alone_and_retried(api, worker_factory, scenario) -> None:
    scenario.track(worker_factory().start().wait_ready())
    with FaultWriter(api.url, threads=6) as writer:
        poison = f"{writer.prefix}-poison"
        with PoisonTrigger(poison) as trigger:
            writer.wait_acknowledged(1000)
            op = _write(api.url, poison, {"poison": True})
            garbage_id = f"garbage-{uuid.uuid4().hex}"
            jetstream.publisher().publish(
                jetstream.names().persist_subject("set"), b"not json", headers={"Nats-Msg-Id": garbage_id}, timeout=5
            )
            writer.wait_acknowledged(1500)
            writer.stop_and_join()
            # Every good write persists; the poison key and the garbage wait in the DLQ.
            verdict = settle(writer, fault="poison-message", dlq_before=scenario.dlq_before)
            assert verdict.ok, verdict.summary_line() + "\n" + "\n".join(map(str, verdict.problems[:20]))
            letters = _letters_after(scenario.dlq_before)
            assert sorted((d.reason, d.key or "") for d in letters) == [
                ("rejected_by_database", poison),
                ("undecodable", ""),
            ], [(d.id, d.key, d.reason, d.error) for d in letters]
            poisoned = next(d for d in letters if d.key == poison)
            assert poisoned.original_msg_id == f"{poison}:{op.version}", poisoned.headers
            assert "poison" in poisoned.error, poisoned.error
            garbage = next(d for d in letters if d.reason == "undecodable")
            assert garbage.original_msg_id == garbage_id, garbage.headers
            assert not CacheEntry.objects.filter(key=poison).exists()
            trigger.drop()  # fix the cause
        # The undecodable one can never be written: an operator purges it, then retries the rest.
        call_command("process_dlq", "--purge", str(garbage.id), "--yes")
        others = [d.id for d in dead_letters.dead_letters_list(limit=1000) if d.id != poisoned.id]
        if others:  # dead letters of other tests on a shared server: retry only ours
            call_command("process_dlq", "--retry", str(poisoned.id))
        else:
            call_command("process_dlq", "--retry", "--all")
        wait_for(lambda: _persisted(poison, op), timeout=30, interval=0.2, message="the retried poison key persisted")
        writer.add_acknowledged(poison, op)
        assert poisoned.id not in {d.id for d in dead_letters.dead_letters_list(limit=1000)}
    verdict = settle(writer, fault="poison-message", dlq_before=scenario.dlq_before)
    report(verdict, writer, started=scenario.started)
    assert verdict.dlq == 2, verdict.summary_line()


def test_replayed_dead_letter_is_not_silently_deduplicated(api, worker_factory, scenario) -> None:
    scenario.track(worker_factory().start().wait_ready())
    with FaultWriter(api.url, threads=4) as writer:
        key = f"{writer.prefix}-replayed"
        with PoisonTrigger(key) as trigger:
            writer.wait_acknowledged(500)
            op = _write(api.url, key, {"replayed": True})
            written = time.monotonic()
            first = wait_for(
                lambda: [d for d in _letters_after(scenario.dlq_before) if d.key == key],
                timeout=30,
                interval=0.2,
                message="the write dead-lettered",
            )[0]
            assert first.original_msg_id == f"{key}:{op.version}"

            # The hazard: the original message id is still inside the duplicate window, so
            # republishing under it is acknowledged with the old sequence and never delivered.
            original_seq = int(first.headers["Birb-Original-Seq"])
            again = jetstream.publisher().publish(
                jetstream.names().persist_subject("set"),
                b"{}",
                headers={"Nats-Msg-Id": first.original_msg_id},
                timeout=5,
            )
            assert again == original_seq, "JetStream de-duplicates a republish under the original id"

            # A retry while the cause is still there: delivered again, dead-lettered again.
            call_command("process_dlq", "--retry", str(first.id))
            second = wait_for(
                lambda: [d for d in _letters_after(first.id) if d.key == key],
                timeout=30,
                interval=0.2,
                message="the replayed message delivered and dead-lettered again (not de-duplicated)",
            )[0]
            assert second.original_msg_id != first.original_msg_id
            trigger.drop()
            call_command("process_dlq", "--retry", str(second.id))
            wait_for(lambda: _persisted(key, op), timeout=30, interval=0.2, message="the replayed write persisted")
            assert time.monotonic() - written < jetstream.DUPLICATE_WINDOW, "replayed within the duplicate window"
        writer.add_acknowledged(key, op)
    verdict = settle(writer, fault="dlq-replay", dlq_before=scenario.dlq_before)
    report(verdict, writer, started=scenario.started)
    assert verdict.dlq == 2, verdict.summary_line()
