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


@checks.register("birbnest")
def check_https_behind_a_proxy(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """HTTPS_ONLY needs the proxy's word: the API itself only speaks plain HTTP."""
    config = settings.BIRB
    if config.https_only and not config.trust_x_forwarded_proto:
        return [
            checks.Error(
                "HTTPS_ONLY is on but TRUST_X_FORWARDED_PROTO is off",
                hint=(
                    "the API serves plain HTTP, so without the TLS proxy's X-Forwarded-Proto header every "
                    "request looks insecure and is redirected to https:// again and again; set "
                    "TRUST_X_FORWARDED_PROTO=true (with a proxy that sets that header and drops the client's)"
                ),
                id="birbnest.E002",
            )
        ]
    return []


@checks.register(checks.Tags.security, deploy=True)
def check_production_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """`check --deploy`, in the variables' own names (Django's warnings name its settings)."""
    config = settings.BIRB
    warnings: list[checks.CheckMessage] = []
    if "*" in config.allowed_hosts:
        warnings.append(
            checks.Warning(
                "ALLOWED_HOSTS is * (any Host header is accepted)",
                hint="set ALLOWED_HOSTS to the host names clients use, e.g. ALLOWED_HOSTS=birb.example.com",
                id="birbnest.W001",
            )
        )
    if not config.https_only:
        warnings.append(
            checks.Warning(
                "HTTPS_ONLY is off (no secure cookies, no HSTS, no redirect: security.W004, W008, W012, W016)",
                hint="behind a TLS proxy set HTTPS_ONLY=true and TRUST_X_FORWARDED_PROTO=true",
                id="birbnest.W002",
            )
        )
    return warnings
