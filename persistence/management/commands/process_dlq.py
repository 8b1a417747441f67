"""`manage.py process_dlq --list | --show ID | --retry [ID… | --all] | --purge (ID… | --all)`.

Retries and purges go into the audit log (``deadletter.retry``, ``deadletter.purge``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from birbnest import tracing
from persistence import dead_letters
from persistence.operator_actions import action_target, command_action_send
from persistence.streams_admin import JetStreamAdminError


class Command(BaseCommand):
    help = "List, show, retry or purge dead letters (stream BIRB_CACHE_DLQ)."

    def add_arguments(self, parser: Any) -> None:
        action = parser.add_mutually_exclusive_group(required=True)
        action.add_argument("--list", action="store_true", help="table of dead letters (oldest first)")
        action.add_argument("--show", type=int, metavar="ID", help="one dead letter: payload, headers, error")
        action.add_argument(
            "--retry",
            nargs="*",
            type=int,
            metavar="ID",
            help="republish to BIRB_CACHE with a fresh message id (no ID or --all: every dead letter)",
        )
        action.add_argument("--purge", nargs="*", type=int, metavar="ID", help="delete dead letters (IDs or --all)")
        parser.add_argument("--all", action="store_true", help="with --retry / --purge: every dead letter")
        parser.add_argument("--yes", action="store_true", help="with --purge: do not ask for confirmation")
        parser.add_argument("--limit", type=int, default=100, help="with --list: at most this many (default 100)")
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            if options["list"]:
                self.list_letters(options)
            elif options["show"] is not None:
                self.show(options["show"], options)
            elif options["retry"] is not None:
                # A replay continues each write's trace (OTEL_TRACES_ENABLED); sent before exit.
                tracing.configure(settings.BIRB, component="cli")
                try:
                    self.retry(options["retry"], options)
                finally:
                    tracing.shutdown()
            else:
                self.purge(options["purge"], options)
        except (JetStreamAdminError, dead_letters.DeadLetterNotFoundError) as error:
            raise CommandError(str(error)) from error

    def list_letters(self, options: dict[str, Any]) -> None:
        letters = dead_letters.dead_letters_list(limit=options["limit"])
        if options["json"]:
            self.stdout.write(json.dumps([_summary(d) for d in letters], indent=2))
            return
        total = dead_letters.dead_letters_count()
        if not letters:
            self.stdout.write("no dead letters")
            return
        rows = [("ID", "KEY", "REASON", "DELIVERIES", "LAST FAILURE", "ERROR")]
        for d in letters:
            rows.append((str(d.id), d.key or "-", d.reason, str(d.deliveries), d.last_failure, _short(d.error)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            self.stdout.write(
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
            )
        if total > len(letters):
            self.stdout.write(f"({len(letters)} of {total} shown; --limit N for more)")

    def show(self, id: int, options: dict[str, Any]) -> None:
        d = dead_letters.dead_letter_get(id=id)
        if options["json"]:
            self.stdout.write(json.dumps({**_summary(d), "headers": d.headers, "payload": d.payload}, indent=2))
            return
        for label, value in _summary(d).items():
            self.stdout.write(f"{label + ':':<18}{value}")
        self.stdout.write("headers:")
        for name, value in sorted(d.headers.items()):
            self.stdout.write(f"  {name}: {value}")
        self.stdout.write(f"payload ({d.encoding}):")
        self.stdout.write(json.dumps(d.payload, indent=2) if d.encoding == "json" else str(d.payload))

    def retry(self, ids: list[int], options: dict[str, Any]) -> None:
        # The runbook's bare `process-dlq --retry` means "everything".
        selected = ids or None if not options["all"] else None
        result = dead_letters.dead_letters_retry(ids=selected)
        command_action_send(
            action="deadletter.retry",
            target="all" if selected is None else action_target(selected),
            details={
                "retried": len(result.retried),
                "ids": result.retried[:100],
                "failed": {str(id): reason for id, reason in list(result.failed.items())[:100]},
            },
        )
        if options["json"]:
            self.stdout.write(json.dumps({"retried": result.retried, "failed": result.failed}))
        else:
            self.stdout.write(f"retried {len(result.retried)} dead letters")
            for id, reason in result.failed.items():
                self.stderr.write(f"dead letter {id} not retried: {reason}")
        if result.failed:
            raise CommandError(f"{len(result.failed)} dead letters not retried")

    def purge(self, ids: list[int], options: dict[str, Any]) -> None:
        if not ids and not options["all"]:
            raise CommandError("give the IDs to purge, or --all")
        what = "ALL dead letters" if options["all"] else f"{len(ids)} dead letters ({', '.join(map(str, ids))})"
        if not options["yes"]:
            if not sys.stdin.isatty():
                raise CommandError(f"refusing to purge {what} without confirmation: add --yes")
            if input(f"Delete {what} for good? [y/N] ").strip().lower() not in ("y", "yes"):
                self.stdout.write("nothing purged")
                return
        removed = dead_letters.dead_letters_purge(ids=None if options["all"] else ids)
        command_action_send(
            action="deadletter.purge",
            target="all" if options["all"] else action_target(ids),
            details={"purged": removed, **({} if options["all"] else {"ids": ids[:100]})},
        )
        self.stdout.write(f"purged {removed} dead letters")


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _summary(d: dead_letters.DeadLetter) -> dict[str, Any]:
    return {
        "id": d.id,
        "key": d.key,
        "reason": d.reason,
        "deliveries": d.deliveries,
        "first_failure": d.first_failure,
        "last_failure": d.last_failure,
        "error": d.error,
        "original_subject": d.original_subject,
        "original_msg_id": d.original_msg_id,
    }
