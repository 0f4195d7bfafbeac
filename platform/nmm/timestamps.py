"""The one timestamp format nmm writes into Kubernetes objects (RFC 3339 in UTC, as the API
server writes `creationTimestamp`), and reads back."""

from __future__ import annotations

import datetime
import time

FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_MICRO = "%Y-%m-%dT%H:%M:%S.%fZ"


def rfc3339(ts: float | None = None, *, micro: bool = False) -> str:
    """`ts` (seconds since the epoch; default now) in UTC; `micro`: with microseconds (a value
    that must differ from one a moment ago, such as a request annotation)."""
    when = datetime.datetime.fromtimestamp(time.time() if ts is None else ts, datetime.UTC)
    return when.strftime(_MICRO if micro else FORMAT)


def epoch(text: str | None) -> float | None:
    """Seconds since the epoch of a timestamp `rfc3339` wrote (None for none)."""
    if not text:
        return None
    return datetime.datetime.strptime(text, FORMAT).replace(tzinfo=datetime.UTC).timestamp()
