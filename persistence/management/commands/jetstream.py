"""`manage.py jetstream <subcommand>`: the runbook's `nats` CLI commands, for machines without it.

Parses options, calls :mod:`persistence.streams_admin` and prints aligned text, or JSON with
``--json``. Stream and consumer names are used as given (``BIRB_CACHE``, ``BIRB_CACHE_DLQ``);
where one may be omitted, this deployment's (``BIRB_STREAM``, ``WORKER_CONSUMER_GROUP``) is used.
``consumer-rm`` and ``ensure`` go into the audit log (``jetstream.consumer_rm``, ``jetstream.ensure``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, DjangoHelpFormatter

from persistence import jetstream, streams_admin
from persistence.operator_actions import command_action_send
from persistence.streams_admin import (
    AccountSummary,
    ClusterSummary,
    ConsumerSummary,
    EnsureReport,
    StreamDetail,
    StreamView,
)

DATA_PREVIEW = 400  # characters of a message body shown in text output; --json shows all

EPILOG = """\
runbook equivalents:
  nats account info                       jetstream account
  nats stream ls | nats stream report     jetstream ls | jetstream report   (with replicas and leader)
  nats stream info BIRB_CACHE             jetstream info BIRB_CACHE         (cluster: leader, replicas, lag)
  nats consumer info BIRB_CACHE birb-worker
                                          jetstream consumer-info BIRB_CACHE birb-worker
  nats consumer report BIRB_CACHE         jetstream consumer-report BIRB_CACHE
  nats stream view BIRB_CACHE_DLQ         jetstream view BIRB_CACHE_DLQ [--last N | --from SEQ]
  nats consumer rm BIRB_CACHE birb-worker jetstream consumer-rm BIRB_CACHE birb-worker
  nats stream add BIRB_CACHE ... (both)   jetstream ensure
"""


class _HelpFormatter(DjangoHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Django's option order, and the epilog's table kept as written."""


class Command(BaseCommand):
    help = "Inspect and repair JetStream streams and consumers (the runbook's `nats` CLI commands)."

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> Any:
        return super().create_parser(prog_name, subcommand, epilog=EPILOG, formatter_class=_HelpFormatter, **kwargs)

    def add_arguments(self, parser: Any) -> None:
        json_option = argparse.ArgumentParser(add_help=False)
        json_option.add_argument("--json", action="store_true", help="print JSON instead of a table")
        subcommands = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")

        def add(name: str, run: Callable[[dict[str, Any]], None], help: str, **kwargs: Any) -> Any:
            sub = subcommands.add_parser(name, parents=[json_option], help=help, description=help, **kwargs)
            sub.set_defaults(run=run)
            return sub

        add("account", self.account, "JetStream usage and limits of the account (nats account info)")
        add("ls", self.ls, "every stream with its message counts (nats stream ls / report)", aliases=["report"])
        info = add("info", self.info, "a stream's configuration and state (nats stream info)")
        info.add_argument("stream", nargs="?", metavar="STREAM", help="default: this deployment's BIRB_STREAM")
        consumer = add("consumer-info", self.consumer_info, "a consumer's delivery state (nats consumer info)")
        consumer.add_argument("stream", nargs="?", metavar="STREAM", help="default: BIRB_STREAM")
        consumer.add_argument("consumer", nargs="?", metavar="CONSUMER", help="default: WORKER_CONSUMER_GROUP")
        report = add("consumer-report", self.consumer_report, "every consumer of a stream (nats consumer report)")
        report.add_argument("stream", nargs="?", metavar="STREAM", help="default: BIRB_STREAM")
        view = add("view", self.view, "messages stored in a stream, read without a consumer (nats stream view)")
        view.add_argument("stream", metavar="STREAM")
        where = view.add_mutually_exclusive_group()
        where.add_argument("--last", type=int, metavar="N", help="the last N messages")
        where.add_argument("--from", dest="start_seq", type=int, metavar="SEQ", help="start at sequence SEQ")
        view.add_argument("--limit", type=int, default=20, metavar="N", help="at most N messages (default 20)")
        remove = add(
            "consumer-rm",
            self.consumer_rm,
            "delete a consumer (nats consumer rm); running workers recreate ours within seconds",
        )
        remove.add_argument("stream", metavar="STREAM")
        remove.add_argument("consumer", metavar="CONSUMER")
        remove.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
        add("ensure", self.ensure, "create our streams and the worker's consumer if missing (nats stream add)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            options["run"](options)
        except streams_admin.JetStreamAdminError as error:
            raise CommandError(str(error)) from error
        except ValueError as error:  # a bad --last/--limit/--from, or a name JetStream cannot hold
            raise CommandError(f"invalid argument: {error}") from error

    # --- subcommands --------------------------------------------------------------------------

    def account(self, options: dict[str, Any]) -> None:
        account = streams_admin.account_info()
        if self._json(options, account):
            return
        self._print_account(account)

    def ls(self, options: dict[str, Any]) -> None:
        streams = streams_admin.streams_report()
        if self._json(options, streams):
            return
        if not streams:
            self.stdout.write("No streams. Create ours with `manage.py jetstream ensure`.")
            return
        self.stdout.write(f"Streams ({len(streams)}):")
        self.stdout.write("")
        self._table(
            ["STREAM", "SUBJECTS", "MESSAGES", "BYTES", "FIRST SEQ", "LAST SEQ", "DELETED", "CONSUMERS", "REPLICAS",
             "LEADER", "OTHER REPLICAS"],
            [
                [s.name, ", ".join(s.subjects), s.messages, _bytes(s.bytes), s.first_seq, s.last_seq, s.deleted,
                 s.consumers, s.replicas, _leader(s.cluster), _peers(s.cluster)]
                for s in streams
            ],
        )  # fmt: skip
        if any(s.replicas > 1 for s in streams):
            self.stdout.write("\n(LEADER none: the replicas are electing one; a peer marked ! is offline, ~ behind)")

    def info(self, options: dict[str, Any]) -> None:
        detail = streams_admin.stream_info(name=options["stream"] or jetstream.names().stream)
        if self._json(options, detail):
            return
        self._print_stream(detail)

    def consumer_info(self, options: dict[str, Any]) -> None:
        n = jetstream.names()
        consumer = streams_admin.consumer_info(
            stream=options["stream"] or n.stream, consumer=options["consumer"] or n.consumer
        )
        if self._json(options, consumer):
            return
        self._print_consumer(consumer)

    def consumer_report(self, options: dict[str, Any]) -> None:
        stream = options["stream"] or jetstream.names().stream
        consumers = streams_admin.consumers_report(stream=stream)
        if self._json(options, consumers):
            return
        if not consumers:
            self.stdout.write(f"Stream {stream} has no consumers. Workers create theirs when they start.")
            return
        self.stdout.write(f"Consumers of {stream} ({len(consumers)}):")
        self.stdout.write("")
        self._table(
            ["CONSUMER", "PENDING", "ACK PENDING", "REDELIVERED", "WAITING", "DELIVERED SEQ", "ACK FLOOR SEQ",
             "LAST ACTIVE", "REPLICAS", "LEADER"],
            [
                [c.name, c.num_pending, c.num_ack_pending, c.num_redelivered, c.num_waiting, c.delivered_stream_seq,
                 c.ack_floor_stream_seq, _time(c.last_active), c.replicas, _leader(c.cluster)]
                for c in consumers
            ],
        )  # fmt: skip

    def view(self, options: dict[str, Any]) -> None:
        view = streams_admin.stream_view(
            name=options["stream"], last=options["last"], limit=options["limit"], start_seq=options["start_seq"]
        )
        if self._json(options, view):
            return
        self._print_view(view)

    def consumer_rm(self, options: dict[str, Any]) -> None:
        stream, name = options["stream"], options["consumer"]
        if not options["yes"]:
            consumer = streams_admin.consumer_info(stream=stream, consumer=name)  # it exists, or a clear error
            self._confirm(
                f"Delete consumer {name} from stream {stream}? It has {consumer.num_pending} messages pending and "
                f"{consumer.num_ack_pending} awaiting acknowledgement. Running workers create it again within "
                "seconds, and deliver every message still in the stream again. [y/N] "
            )
        streams_admin.consumer_delete(stream=stream, consumer=name)
        command_action_send(action="jetstream.consumer_rm", target=f"{stream} {name}")
        if self._json(options, {"deleted": True, "stream": stream, "consumer": name}):
            return
        self.stdout.write(
            f"Deleted consumer {name} from stream {stream}.\n"
            "Running workers create it again within seconds, no restart needed (a worker that is not running "
            "does at start; or run `manage.py jetstream ensure`). "
            "The new consumer delivers every message still in the stream again; "
            "the worker's version check makes the repeats harmless."
        )

    def ensure(self, options: dict[str, Any]) -> None:
        report = streams_admin.streams_ensure()
        command_action_send(action="jetstream.ensure", target=report.stream, details={"created": report.created})
        if self._json(options, report):
            return
        self._print_ensure(report)

    # --- text output --------------------------------------------------------------------------

    def _print_account(self, a: AccountSummary) -> None:
        n = jetstream.names()
        self._pairs(
            [
                ("Server", f"{a.server_url} (nats-server {a.server_version})"),
                ("Domain", a.domain or "-"),
                ("Streams", f"{a.streams} of {_limit(a.max_streams)}"),
                ("Consumers", f"{a.consumers} of {_limit(a.max_consumers)}"),
                ("File storage", f"{_bytes(a.storage)} of {_limit(a.max_storage, _bytes)}"),
                ("Memory storage", f"{_bytes(a.memory)} of {_limit(a.max_memory, _bytes)}"),
                ("API requests", f"{a.api_requests} ({a.api_errors} errors)"),
                ("Ours", f"stream {n.stream}, consumer {n.consumer}, dead letters {n.dlq_stream}"),
            ]
        )

    def _print_stream(self, d: StreamDetail) -> None:
        s, c = d.state, d.config
        self.stdout.write(f"Stream {s.name}" + (f" (created {_time(d.created)})" if d.created else ""))
        self.stdout.write("")
        self.stdout.write("Configuration:")
        self._pairs(
            [
                ("Subjects", ", ".join(s.subjects)),
                ("Retention", c.retention),
                ("Storage", c.storage),
                ("Discard", c.discard),
                ("Max messages", _limit(c.max_msgs)),
                ("Max bytes", _limit(c.max_bytes, _bytes)),
                ("Max age", _duration(c.max_age) if c.max_age else "unlimited"),
                ("Max message size", _limit(c.max_msg_size, _bytes)),
                ("Duplicate window", _duration(c.duplicate_window)),
                ("Replicas", c.replicas),
            ],
            indent=2,
        )
        self.stdout.write("\nState:")
        self._pairs(
            [
                ("Messages", s.messages),
                ("Bytes", _bytes(s.bytes)),
                ("First sequence", s.first_seq),
                ("Last sequence", s.last_seq),
                ("Deleted", s.deleted),
                ("Consumers", s.consumers),
            ],
            indent=2,
        )
        self._print_cluster(s.cluster, c.replicas)

    def _print_consumer(self, c: ConsumerSummary) -> None:
        created = f" (created {_time(c.created)})" if c.created else ""
        self.stdout.write(f"Consumer {c.name} on stream {c.stream}{created}")
        self.stdout.write("")
        self.stdout.write("Configuration:")
        self._pairs(
            [
                ("Filter subject", c.filter_subject or "-"),
                ("Ack policy", c.ack_policy),
                ("Deliver policy", c.deliver_policy),
                ("Ack wait", _duration(c.ack_wait) if c.ack_wait else "-"),
                ("Max deliver", _limit(c.max_deliver if c.max_deliver is not None else -1)),
                ("Max ack pending", _limit(c.max_ack_pending if c.max_ack_pending is not None else -1)),
            ],
            indent=2,
        )
        self.stdout.write("\nState:")
        self._pairs(
            [
                ("Pending", f"{c.num_pending} (not yet delivered)"),
                ("Ack pending", f"{c.num_ack_pending} (delivered, not yet acknowledged)"),
                ("Redelivered", c.num_redelivered),
                ("Waiting pulls", c.num_waiting),
                ("Last delivered", f"stream seq {c.delivered_stream_seq}, consumer seq {c.delivered_consumer_seq}"),
                ("Ack floor", f"stream seq {c.ack_floor_stream_seq}, consumer seq {c.ack_floor_consumer_seq}"),
                ("Last active", _time(c.last_active)),
            ],
            indent=2,
        )
        self._print_cluster(c.cluster, c.replicas)

    def _print_cluster(self, cluster: ClusterSummary | None, replicas: int) -> None:
        """Where the stream or consumer lives: `nats stream info`'s "Cluster Information"."""
        if cluster is None:
            return
        self.stdout.write("\nCluster:")
        since = f" (since {_time(cluster.leader_since)})" if cluster.leader and cluster.leader_since else ""
        pairs: list[tuple[str, Any]] = [
            ("Name", cluster.name or "- (a single server)"),
            ("Replicas", replicas),
            ("Leader", (cluster.leader + since) if cluster.leader else "none: the replicas are electing one"),
        ]
        for peer in cluster.replicas:
            state = ["offline" if peer.offline else "current" if peer.current else "catching up"]
            if peer.active is not None:
                state.append(f"seen {peer.active:.2f}s ago")
            if peer.lag:
                state.append(f"{peer.lag} operations behind")
            pairs.append(("Replica", f"{peer.name}: {', '.join(state)}"))
        self._pairs(pairs, indent=2)

    def _print_view(self, v: StreamView) -> None:
        stored = f"sequences {v.first_seq}..{v.last_seq}" if v.last_seq else "nothing stored yet"
        if not v.messages:
            self.stdout.write(f"{v.stream}: {stored}; no messages to show.")
            return
        shown = f"{len(v.messages)} message{'s' if len(v.messages) != 1 else ''}"
        self.stdout.write(f"{v.stream}: {stored}; showing {shown}, seq {v.messages[0].seq}..{v.messages[-1].seq}")
        for m in v.messages:
            self.stdout.write(f"\n[{m.seq}] {_time(m.time)}  {m.subject}  ({_bytes(m.size)})")
            for name, value in m.headers.items():
                self.stdout.write(f"  {name}: {value}")
            body = json.dumps(m.data, ensure_ascii=False) if m.encoding == "json" else str(m.data)
            if len(body) > DATA_PREVIEW:
                body = body[:DATA_PREVIEW] + f"… ({len(body)} characters; --json shows all)"
            label = "" if m.encoding == "json" else f"[{m.encoding}] "
            self.stdout.write(f"  {label}{body}")

    def _print_ensure(self, r: EnsureReport) -> None:
        created = set(r.created)
        for what in (f"stream {r.stream}", f"stream {r.dlq_stream}", f"consumer {r.consumer} on {r.stream}"):
            self.stdout.write(f"{what}: {'created' if what in created else 'exists'}")

    # --- helpers ------------------------------------------------------------------------------

    def _json(self, options: dict[str, Any], value: Any) -> bool:
        """Print ``value`` as JSON if --json was given; True if it was."""
        if not options["json"]:
            return False
        self.stdout.write(json.dumps(_plain(value), indent=2, ensure_ascii=False, default=_json_default))
        return True

    def _table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        cells = [[str(cell) for cell in row] for row in rows]
        numeric = [all(isinstance(row[i], int) for row in rows) for i in range(len(headers))]
        widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]

        def line(values: Sequence[str]) -> str:
            parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
            return "  ".join(parts).rstrip()

        self.stdout.write(line(headers))
        for row in cells:
            self.stdout.write(line(row))

    def _pairs(self, pairs: Sequence[tuple[str, Any]], indent: int = 0) -> None:
        width = max(len(label) for label, _ in pairs) + 1
        for label, value in pairs:
            self.stdout.write(f"{' ' * indent}{label + ':':<{width}}  {value}")

    def _confirm(self, prompt: str) -> None:
        if not sys.stdin or not sys.stdin.isatty():
            raise CommandError(f"{prompt.removesuffix(' [y/N] ')}\nNot a terminal, so nothing was deleted: add --yes.")
        if input(prompt).strip().lower() not in ("y", "yes"):
            raise CommandError("Nothing deleted.")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _limit(n: int, fmt: Callable[[int], str] = str) -> str:
    return "unlimited" if n < 0 else fmt(n)


def _duration(seconds: float) -> str:
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if v]
    if seconds != total:
        return f"{seconds:g}s"
    return "".join(parts) or "0s"


def _leader(cluster: ClusterSummary | None) -> str:
    if cluster is None:
        return "-"
    return cluster.leader or "none"


def _peers(cluster: ClusterSummary | None) -> str:
    """The other replicas, ``!`` after one that is offline, ``~`` after one not caught up."""
    if cluster is None or not cluster.replicas:
        return "-"
    return ", ".join(peer.name + ("!" if peer.offline else "" if peer.current else "~") for peer in cluster.replicas)


def _time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
