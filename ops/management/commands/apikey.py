"""`manage.py apikey create|list|revoke|rotate`: API keys from the command line.

``create`` and ``rotate`` print the new key alone on their last line, so that a script can take
it (``KEY=$(manage.py apikey create ci --scopes read | tail -n 1)``); it is never shown again.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from birbnest.env import ConfigError, parse_duration
from ops.access.keys import ApiKeyError, apikey_create, apikey_list, apikey_revoke, apikey_rotate, apikey_state


class Command(BaseCommand):
    help = "Create, list, revoke and rotate API keys (only a hash of each key is stored)."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        create = actions.add_parser("create", help="make a key; prints it alone on the last line")
        create.add_argument("name")
        create.add_argument("--scopes", default="read,write,delete", help="read,write,delete,admin")
        create.add_argument("--prefix", action="append", default=[], help="confine it to keys with this prefix")
        create.add_argument("--expires", help="lifetime, e.g. 30d, 12h (default: never)")
        create.add_argument("--owner", help="username of the key's owner")
        create.add_argument("--rate-limit", type=int, help="requests per window (overrides the global limit)")
        actions.add_parser("list", help="every key: name, public id, scopes, prefixes, state")
        revoke = actions.add_parser("revoke", help="the key stops working")
        revoke.add_argument("name")
        rotate = actions.add_parser("rotate", help="a new secret for the key; prints it on the last line")
        rotate.add_argument("name")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"_{options['action']}")(options)
        except (ApiKeyError, ConfigError) as error:
            raise CommandError(str(error)) from None

    def _create(self, options: dict[str, Any]) -> None:
        expires = timedelta(seconds=parse_duration("--expires", options["expires"])) if options["expires"] else None
        issued = apikey_create(
            name=options["name"],
            scopes=options["scopes"].split(","),
            key_prefixes=options["prefix"],
            expires_in=expires,
            owner=options["owner"],
            rate_limit=options["rate_limit"],
        )
        self._print_issued("created", issued.row, issued.token)

    def _rotate(self, options: dict[str, Any]) -> None:
        issued = apikey_rotate(name=options["name"])
        self._print_issued("rotated (the old key no longer works)", issued.row, issued.token)

    def _print_issued(self, what: str, row: Any, token: str) -> None:
        self.stderr.write(f"{what} {row.name} ({row.public_id}), scopes {','.join(row.scopes)}")
        if row.key_prefixes:
            self.stderr.write(f"confined to keys starting with: {', '.join(row.key_prefixes)}")
        if row.expires_at:
            self.stderr.write(f"expires {row.expires_at.isoformat()}")
        self.stderr.write("the key is shown this once; only a hash of it is stored:")
        self.stdout.write(token)

    def _revoke(self, options: dict[str, Any]) -> None:
        row = apikey_revoke(name=options["name"])
        self.stdout.write(f"revoked {row.name} ({row.public_id})")

    def _list(self, options: dict[str, Any]) -> None:
        rows = list(apikey_list())
        if not rows:
            self.stdout.write("no API keys (create one with `manage.py apikey create NAME`)")
            return
        self.stdout.write(f"{'name':<24} {'public id':<12} {'state':<8} {'scopes':<24} {'prefixes':<20} expires")
        for row in rows:
            self.stdout.write(
                f"{row.name:<24} {row.public_id:<12} {apikey_state(row):<8} {','.join(row.scopes):<24} "
                f"{','.join(row.key_prefixes) or '(all)':<20} {row.expires_at.isoformat() if row.expires_at else '-'}"
            )
