"""System checks: cross-setting rules that every management command enforces before it starts."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks


@checks.register("birbnest")
def check_server_urls(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The three server URLs must be known: exported, in .env, or recorded by `make run`."""
    errors: list[checks.CheckMessage] = []
    config = settings.BIRB
    for name, value in (
        ("DATABASE_URL", config.database_url),
        ("REDIS_URL", config.redis_url),
        ("NATS_URL", config.nats_url),
    ):
        if not value:
            errors.append(
                checks.Error(
                    f"{name} is not set",
                    hint=(
                        f"start the servers with `make run` (it records their URLs in "
                        f"{config.data_dir / 'stack.env'}) or export {name}"
                    ),
                    id="birbnest.E001",
                )
            )
    return errors
