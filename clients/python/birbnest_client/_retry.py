"""When a failed request is tried again, and after how long: the one policy both clients use.

Why not tenacity or httpx's transport retries: httpx retries only connection failures and
honours no ``Retry-After``; tenacity would carry the waits but not the decision, which depends
on what kind of call it is and on *how* the attempt failed (was anything sent? did the service
say nothing was done?), and a sync and an async client have to share it. So the decision is this
small state machine (:class:`Attempts`), unit-tested on its own, and each client runs it in a
plain loop.

The rule, per kind of call (:class:`Safety`):

* ``READ`` (get, batch get, key listing): no effect on the service, so retried on any transport
  failure, on 503 and on 502/504 (a proxy between the client and the service).
* ``CONDITIONAL`` (a write with ``If-Match`` or ``If-None-Match: *``): it can never be applied
  twice nor overwrite someone else's write (a second attempt after a first that was applied finds
  the version moved: 409, or the key there: 412). Retried like a read. When an attempt whose
  outcome is unknown (the answer was lost) is followed by a 409/412, the client cannot tell
  whether its own first attempt or another writer moved the key, so it raises the first
  attempt's error (``request_sent=True``) instead of reporting a conflict that may be its own.
* ``WRITE`` (a plain set, touch, delete, batch set/delete): retried only when the service
  certainly did not apply it: the connection was never made (``ConnectError``,
  ``ConnectTimeout``, ``PoolTimeout``), or the service answered 503 (on a write: not made
  durable, nothing visible) or 429 (refused before anything). Never after a read timeout or a
  dropped connection once the request was sent: it may have been applied, and a blind second
  attempt could overwrite a write another client made in between.

Every kind is retried on 429 (the rate limiter refuses before the request is handled) and on
408 (the service did not read the body: none of its request threads was free to read it in time,
or it did not arrive in time; the request was never handled, and the answer says "retry"). The wait
is exponential backoff with full jitter (``backoff * 2**n``, at most ``max_backoff``); an answer's
``Retry-After`` is honoured (the wait is at least that long) when it is at most
``max_retry_after`` seconds; a longer one is not waited for: the error is raised at once with its
``retry_after`` so the caller decides.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from birbnest_client import errors


class Safety(enum.Enum):
    READ = "read"
    CONDITIONAL = "conditional"
    WRITE = "write"


#: Transport failures raised before anything was sent: the request certainly did nothing.
NOT_SENT: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: Configuration errors: retrying cannot help.
_FATAL: tuple[type[Exception], ...] = (
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
    httpx.ProxyError,
    httpx.DecodingError,
    httpx.TooManyRedirects,
)


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` further attempts at most (0 = none); backoff and ``Retry-After`` bounds in seconds."""

    retries: int = 3
    backoff: float = 0.1
    max_backoff: float = 2.0
    max_retry_after: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError(f"retry settings must not be negative: {self}")

    def delay(self, retry_number: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry_number`` (0 for the first retry)."""
        cap = min(self.max_backoff, self.backoff * 2**retry_number)
        jittered = random.uniform(0, cap)  # full jitter: clients that failed together spread out
        if retry_after is not None:
            return retry_after + min(jittered, 1.0)
        return jittered


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def transport_error(error: Exception) -> errors.BirbNestError:
    """The client's exception for an httpx transport failure."""
    sent = not isinstance(error, NOT_SENT)
    detail = f"{type(error).__name__}: {error}"
    if isinstance(error, httpx.TimeoutException):
        what = "the request may have reached the service" if sent else "nothing was sent"
        return errors.Timeout(f"timed out ({what}): {detail}", status=None, request_sent=sent)
    what = "the request may have reached the service" if sent else "the connection could not be made"
    return errors.ConnectionFailed(f"no answer from the service ({what}): {detail}", request_sent=sent)


@dataclass
class Attempts:
    """The retry state of one logical call: feed it each attempt's outcome, it says wait or stop."""

    policy: RetryPolicy
    safety: Safety
    retried: int = 0
    #: The first attempt whose outcome is unknown (sent, answer lost), for CONDITIONAL calls.
    unknown_outcome: errors.BirbNestError | None = field(default=None)

    def _retry(self, retry_after: float | None = None) -> float | None:
        if self.retried >= self.policy.retries:
            return None
        if retry_after is not None and retry_after > self.policy.max_retry_after:
            return None
        delay = self.policy.delay(self.retried, retry_after)
        self.retried += 1
        return delay

    def on_transport_error(self, error: Exception) -> float:
        """Seconds to wait before the next attempt; raises the client's error when there is none."""
        mapped = transport_error(error)
        if isinstance(error, _FATAL):
            raise mapped from error
        sent = not isinstance(error, NOT_SENT)
        if sent and self.safety is Safety.WRITE:
            raise mapped from error
        if sent and self.safety is Safety.CONDITIONAL and self.unknown_outcome is None:
            self.unknown_outcome = mapped
        delay = self._retry()
        if delay is None:
            # Giving up: an earlier attempt that may have been applied says more than this one.
            raise (self.unknown_outcome or mapped) from error
        return delay

    def on_response(self, response: httpx.Response) -> float | None:
        """Seconds to wait before the next attempt, or None: this answer is the call's answer.

        Raises instead when a CONDITIONAL call ends in a refusal (409, 412, or 408/429/502/503/504
        with no retry left) after an attempt that may have been applied: that is the answer then.
        """
        status = response.status_code
        unknown = self.unknown_outcome if self.safety is Safety.CONDITIONAL else None
        if status in (409, 412) and unknown is not None:
            raise unknown
        delay: float | None = None
        if status in (408, 429, 503):
            delay = self._retry(parse_retry_after(response.headers.get("Retry-After")))
        elif status in (502, 504):
            if self.safety is Safety.WRITE:
                return None
            if self.safety is Safety.CONDITIONAL and self.unknown_outcome is None:
                self.unknown_outcome = errors.ConnectionFailed(
                    f"HTTP {status} from a gateway: the answer was lost, the write may have been applied",
                    status=status,
                    request_sent=True,
                )
            delay = self._retry()
        else:
            return None
        if delay is None and self.safety is Safety.CONDITIONAL and self.unknown_outcome is not None:
            raise self.unknown_outcome
        return delay
