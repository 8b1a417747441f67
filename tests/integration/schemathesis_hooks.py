"""schemathesis hooks for tests/integration/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

Rules the document states in words but OpenAPI 3.0 cannot express are kept here, just before
each request is sent (in every phase), so that a request the schema calls valid is one the
service must accept:

- the keys of a batch write are distinct (a duplicate refuses the whole batch, 400);
- If-Match and If-None-Match are not sent together (400);
- a listing's ``cursor`` is one the service gave out (opaque; anything else is 400).

And one for schemathesis itself: a header filled from a link (If-Match from a response's
integer ``version``) arrives as an int, which requests refuses to send; it is sent as text.

Each rule changes only a part that is valid on its own, so a negative case (which must be
refused) stays invalid.
"""

from __future__ import annotations

import base64
import re
from collections.abc import MutableMapping
from typing import Any

import schemathesis

KEY = re.compile(r"[A-Za-z0-9._:-]{1,255}")
CURSOR = re.compile(r"[A-Za-z0-9_-]{1,340}")
VERSION = re.compile(r"[0-9]{1,19}")


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    path = case.operation.path
    if isinstance(case.headers, MutableMapping):
        for name, value in list(case.headers.items()):
            if isinstance(value, int) and not isinstance(value, bool):
                case.headers[name] = str(value)
        headers = {name.lower(): name for name in case.headers}
        if_match, if_none_match = headers.get("if-match"), headers.get("if-none-match")
        if (
            if_match
            and if_none_match
            and case.headers[if_none_match] == "*"
            and VERSION.fullmatch(str(case.headers[if_match]))
        ):
            del case.headers[if_match]
    if (
        path == "/v1/cache/batch/set"
        and isinstance(case.body, MutableMapping)
        and isinstance(case.body.get("entries"), list)
    ):
        seen: set[str] = set()
        entries = []
        for entry in case.body["entries"]:
            key = entry.get("key") if isinstance(entry, dict) else None
            if isinstance(key, str) and KEY.fullmatch(key):
                if key in seen:
                    continue
                seen.add(key)
            entries.append(entry)
        if entries:
            case.body = {**case.body, "entries": entries}
    if path == "/v1/cache" and isinstance(case.query, MutableMapping):
        cursor = case.query.get("cursor")
        if isinstance(cursor, str) and CURSOR.fullmatch(cursor):
            # A cursor the service could have given: base64url (unpadded) of a key.
            key = re.sub(r"[^A-Za-z0-9._:-]", "", cursor)[:200] or "a"
            case.query = {**case.query, "cursor": base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()}
