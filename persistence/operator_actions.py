"""What an operator's command of this app changed, for whoever keeps an audit log.

``persistence`` imports no other app of ours (the layering contract), so its management commands
(``rehydrate``, ``process_dlq``, ``jetstream``) cannot call ``ops.audit`` themselves: they send
:data:`command_action` once an action has taken effect, and ``ops`` connects its audit log to it
in ``OpsConfig.ready()``. Only commands send it: the console records its own actions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.dispatch import Signal

# Sent with: action (a dotted code such as "entry.rehydrate"), target (str), details (a small dict).
command_action = Signal()


def command_action_send(*, action: str, target: str = "", details: dict[str, Any] | None = None) -> None:
    """Report an action a management command made (never with a secret in target or details)."""
    command_action.send(sender=None, action=action, target=target, details=details or {})


def action_target(items: Iterable[Any], *, shown: int = 20) -> str:
    """A target naming several things: ``a, b, c`` or ``a, b, … and 98 more``."""
    names = [str(item) for item in items]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
