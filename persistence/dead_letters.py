"""Dead letters: messages the worker could not write, kept on ``BIRB_CACHE_DLQ``.

Plain service functions; `manage.py process_dlq` and the admin console are thin callers.
A dead letter's id is its sequence number in the DLQ stream.

Retrying republishes the original payload to ``BIRB_CACHE`` under a **fresh** ``Nats-Msg-Id``:
JetStream silently drops a message whose id it saw within the duplicate window, so a replay
with the original id would be acknowledged and then never delivered. The dead letter is removed
only after the republish is acknowledged.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from birbnest import tracing
from persistence import jetstream, streams_admin
from persistence.streams_admin import JetStreamRequestError

logger = logging.getLogger(__name__)

# Headers the worker adds when it dead-letters a message; stripped again on retry, except the
# first failure time, which follows the message so a later dead letter still knows it.
DIAGNOSTIC_HEADERS = (
    "Birb-Original-Subject",
    "Birb-Original-Msg-Id",
    "Birb-Original-Seq",
    "Birb-Error",
    "Birb-Reason",
    "Birb-Deliveries",
    "Birb-Last-Failure",
    "Nats-Msg-Id",
)
NOT_FOUND = (streams_admin.NO_MESSAGE_FOUND,)


class DeadLetterNotFoundError(Exception):
    def __init__(self, id: int) -> None:
        self.id = id
        super().__init__(f"no dead letter {id} in the DLQ stream (already retried or purged?)")


@dataclass(frozen=True)
class DeadLetter:
    id: int
    key: str | None
    reason: str
    deliveries: int
    first_failure: str
    last_failure: str
    error: str
    original_subject: str
    original_msg_id: str
    stored_at: datetime | None
    headers: dict[str, str] = field(default_factory=dict)
    payload: Any = None
    encoding: str = "json"


@dataclass
class RetryResult:
    retried: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


def _dead_letter(message: streams_admin.StreamMessage) -> DeadLetter:
    headers = message.headers
    payload = message.data
    key = payload.get("key") if message.encoding == "json" and isinstance(payload, dict) else None
    return DeadLetter(
        id=message.seq,
        key=key if isinstance(key, str) else None,
        reason=headers.get("Birb-Reason") or message.subject.rsplit(".", 1)[-1],
        deliveries=int(headers.get("Birb-Deliveries") or 0),
        first_failure=headers.get("Birb-First-Failure", ""),
        last_failure=headers.get("Birb-Last-Failure", ""),
        error=headers.get("Birb-Error", ""),
        original_subject=headers.get("Birb-Original-Subject", ""),
        original_msg_id=headers.get("Birb-Original-Msg-Id", ""),
        stored_at=message.time,
        headers=headers,
        payload=payload,
        encoding=message.encoding,
    )


def dead_letters_count() -> int:
    return streams_admin.stream_info(name=jetstream.names().dlq_stream).state.messages


def dead_letters_list(*, limit: int = 100, after: int | None = None) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters (after id ``after``, for paging)."""
    n = jetstream.names()
    view = streams_admin.stream_view(name=n.dlq_stream, limit=limit, start_seq=(after + 1) if after else None)
    return [_dead_letter(message) for message in view.messages]


def _all_ids() -> list[int]:
    ids: list[int] = []
    after = None
    while True:
        page = dead_letters_list(limit=streams_admin.VIEW_MAX, after=after)
        if not page:
            return ids
        ids.extend(letter.id for letter in page)
        after = page[-1].id


def dead_letter_get(*, id: int) -> DeadLetter:
    n = jetstream.names()
    view = streams_admin.stream_view(name=n.dlq_stream, limit=1, start_seq=id)
    if not view.messages or view.messages[0].seq != id:
        raise DeadLetterNotFoundError(id)
    return _dead_letter(view.messages[0])


def _replaying(headers: dict[str, str], id: int) -> contextlib.AbstractContextManager[Any]:
    """The span of one replay, in the trace of the write the dead letter came from (its kept
    ``traceparent``). With tracing off here the header goes on unchanged, and the worker
    continues that trace all the same."""
    if not tracing.enabled:
        return contextlib.nullcontext()
    return tracing.span("retry dead letter", context=tracing.extract(headers), attributes={"birb.dead_letter.id": id})


def dead_letters_retry(*, ids: list[int] | None = None) -> RetryResult:
    """Republish the given dead letters (all when ``ids`` is None) to the persist stream with a
    fresh message id; each is removed from the DLQ once JetStream acknowledged its republish."""
    n = jetstream.names()
    result = RetryResult()
    for id in _all_ids() if ids is None else ids:
        try:
            raw = streams_admin.message_get(stream=n.dlq_stream, seq=id)
        except JetStreamRequestError as error:
            result.failed[id] = str(DeadLetterNotFoundError(id)) if error.err_code in NOT_FOUND else str(error)
            continue
        subject = raw.headers.get("Birb-Original-Subject") or n.persist_subject("set")
        headers = {k: v for k, v in raw.headers.items() if k not in DIAGNOSTIC_HEADERS}
        original_id = raw.headers.get("Birb-Original-Msg-Id") or f"dlq-{id}"
        headers["Nats-Msg-Id"] = f"{original_id}:retry:{uuid.uuid4().hex}"
        headers["Birb-Retry-Of"] = str(id)
        with _replaying(raw.headers, id):
            try:
                jetstream.publisher().publish(subject, raw.data, headers=headers, timeout=5)
            except jetstream.PublishError as error:
                result.failed[id] = f"republish not acknowledged: {error}"
                continue
        try:
            streams_admin.message_delete(stream=n.dlq_stream, seq=id)
        except streams_admin.JetStreamAdminError as error:
            # Republished already: a second retry would only replay it again, harmlessly.
            logger.warning("dead letter %d republished but not removed: %s", id, error)
        result.retried.append(id)
        logger.info("dead letter %d republished to %s", id, subject)
    return result


def dead_letters_purge(*, ids: list[int] | None = None) -> int:
    """Delete the given dead letters (all when ``ids`` is None); returns how many went."""
    n = jetstream.names()
    if ids is None:
        count = dead_letters_count()
        streams_admin.stream_purge(name=n.dlq_stream)
        logger.warning("purged all %d dead letters", count)
        return count
    removed = 0
    for id in ids:
        try:
            streams_admin.message_delete(stream=n.dlq_stream, seq=id)
            removed += 1
        except JetStreamRequestError as error:
            if error.err_code not in NOT_FOUND:
                raise
    logger.warning("purged %d dead letters", removed)
    return removed
