"""Changing the rate limits: settings, per-client rules, counters. Every change is published to
every API process (the models' signals, connected in ``OpsConfig.ready()``)."""

from __future__ import annotations

import logging
import math
from typing import Any

from django.db import transaction
from redis.exceptions import RedisError

from ops.models import RateLimitClient, RateLimitSettings
from ops.ratelimit.config import (
    ALGORITHMS,
    SETTINGS_PK,
    RateLimitConfig,
    _warnings,
    current_config,
    ratelimit_config_publish,
    ratelimit_settings_get,
)
from ops.ratelimit.limiter import _now_ms, _window_keys, counter_key_base
from persistence import redis_store

logger = logging.getLogger(__name__)


MAX_INT = 2_147_483_647  # PositiveIntegerField


class RateLimitSettingsError(ValueError):
    """A rate-limit setting with a value it cannot take."""

    def __init__(self, name: str, value: Any, expected: str) -> None:
        self.name = name
        self.value = value
        self.expected = expected
        super().__init__(f"invalid value for {name}: {value!r} (expected {expected})")


def _check_int(name: str, value: Any) -> int:
    if type(value) is not int or not 1 <= value <= MAX_INT:
        raise RateLimitSettingsError(name, value, f"an integer from 1 to {MAX_INT}")
    return value


def ratelimit_settings_update(
    *,
    enabled: bool | None = None,
    limit: int | None = None,
    window: int | None = None,
    algorithm: str | None = None,
    by: str = "",
) -> RateLimitConfig:
    """Change the given settings (None = leave as is), store them and publish them.

    Raises :class:`RateLimitSettingsError` for a bad value, and ``RedisError`` when the change
    is committed in PostgreSQL but could not be published (apply it by saving again).
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise RateLimitSettingsError("enabled", enabled, "true or false")
    if limit is not None:
        _check_int("limit", limit)
    if window is not None:
        _check_int("window", window)
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise RateLimitSettingsError("algorithm", algorithm, " or ".join(ALGORITHMS))
    with transaction.atomic():
        RateLimitSettings.objects.bulk_create([RateLimitSettings(pk=SETTINGS_PK)], ignore_conflicts=True)
        row = RateLimitSettings.objects.select_for_update().get(pk=SETTINGS_PK)
        for name, value in (("enabled", enabled), ("limit", limit), ("window", window), ("algorithm", algorithm)):
            if value is not None:
                setattr(row, name, value)
        row.updated_by = by[:150]
        row.save()  # the post_save signal publishes once the transaction commits
    return ratelimit_settings_get()


def _clean_client(client: str) -> str:
    cleaned = (client or "").strip()
    if not cleaned or len(cleaned) > 255:
        raise RateLimitSettingsError("client", client, "an API key or IP address of 1 to 255 characters")
    return cleaned


def ratelimit_client_block(*, client: str) -> bool:
    """Block a client (creating its rule). Returns False if it was blocked already."""
    client = _clean_client(client)
    with transaction.atomic():
        rule, created = RateLimitClient.objects.select_for_update().get_or_create(
            client=client, defaults={"blocked": True}
        )
        changed = created or not rule.blocked
        if not created:
            # Saved even when already blocked: the save publishes, which repairs a config that
            # an earlier publish failed to store.
            rule.blocked = True
            rule.save(update_fields=["blocked", "updated_at"])
    return changed


def ratelimit_client_unblock(*, client: str) -> bool:
    """Lift a block. Returns False if the client was not blocked."""
    client = _clean_client(client)
    with transaction.atomic():
        rule = RateLimitClient.objects.select_for_update().filter(client=client, blocked=True).first()
        if rule is not None:
            rule.blocked = False
            rule.save(update_fields=["blocked", "updated_at"])
    if rule is None:
        ratelimit_config_publish()  # nothing changed; make sure Redis agrees
        return False
    return True


def ratelimit_client_clear(*, client: str) -> int:
    """Reset a client's counters (it starts the window afresh). Returns the keys deleted.

    Counters are named by client and window number, so the keys that can matter are known:
    the previous, current and next windows of the window length in force (the next one in
    case another host's clock is ahead). No SCAN over the keyspace.
    """
    client = _clean_client(client)
    window = current_config().window
    current, previous, _ = _window_keys(client, window, _now_ms())
    following = f"{counter_key_base(client)}:{window}:{int(current.rsplit(':', 1)[1]) + 1}"
    return int(redis_store.client().delete(previous, current, following))


def ratelimit_client_counts(*, clients: list[str]) -> dict[str, int | None]:
    """Requests each client made in the current window (weighted as the limiter weighs them for
    ``sliding``), in one pipelined read; None for all when Redis is unreachable."""
    if not clients:
        return {}
    config = current_config()
    now_ms = _now_ms()
    window_ms = config.window * 1000
    sliding = config.algorithm == RateLimitSettings.SLIDING
    commands: list[tuple[str, str]] = []
    for client in clients:
        current, previous, _ = _window_keys(client, config.window, now_ms)
        commands.append(("GET", current))
        if sliding:
            commands.append(("GET", previous))
    try:
        # One round trip (on a Redis Cluster, one per node: each client's counters share a slot).
        values = [int(redis_store.checked(value) or 0) for value in redis_store.round_trip(*commands)]
    except RedisError as error:
        _warnings.warning("rate-limit counters not read, Redis unreachable", error=error)
        return dict.fromkeys(clients)
    if not sliding:
        return dict(zip(clients, values, strict=True))
    weight = (window_ms - now_ms % window_ms) / window_ms
    return {client: values[2 * i] + math.floor(values[2 * i + 1] * weight) for i, client in enumerate(clients)}


def publish_on_commit(sender: Any, **kwargs: Any) -> None:
    """Receiver of the models' save and delete signals (connected in ``OpsConfig.ready()``)."""
    # Not robust on purpose: a caller whose change could not be published must hear about it.
    transaction.on_commit(ratelimit_config_publish)
