"""Where a user's source lies: its URI (a glob, a brace range, a folder or one object, on S3/MinIO
or a local disk) turned into the sorted list of objects to read, with their sizes and ETags (what
the curate cache key covers, so changed data is never a cache hit).

    s3://bucket/laion/shard-{000000..000099}.tar    a brace range
    s3://bucket/laion/*.tar                         a glob (matched within the listing of its prefix)
    file:///data/laion/  or  data/laion             a folder: every object under it
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Iterator

from nmm import storage
from nmm.data import kinds
from nmm.storage import ObjectInfo

GLOB_CHARS = "*?["


class SourceError(ValueError):
    """A source names no data: a glob that matches nothing, a folder without images (user input: exit 2)."""


MAX_EXPANDED_URIS = 100_000  # what one brace pattern may name
MAX_RANGE_DIGITS = 18  # a brace range's bounds: an int64, never a 10,000-digit integer to parse
BRACES = re.compile(r"(\{[^{}]*\})")
RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _groups(pattern: str) -> list[range | list[str]]:
    """The one brace parser (the spec's check and the expansion both use it): each part of
    `pattern` as its choices — a range `{000..099}` (its numbers checked), an alternation
    `{a,b}`, or itself. ValueError for a range that runs backwards or has numbers too long."""
    out: list[range | list[str]] = []
    for part in BRACES.split(pattern):
        rng = RANGE.fullmatch(part)
        if rng:
            if max(len(rng[1]), len(rng[2])) > MAX_RANGE_DIGITS:
                raise ValueError(f"brace range {part[:40]} has numbers over {MAX_RANGE_DIGITS} digits")
            lo, hi = int(rng[1]), int(rng[2])
            if hi < lo:
                raise ValueError(f"brace range {part} runs backwards")
            out.append(range(lo, hi + 1))
        elif part.startswith("{") and part.endswith("}") and "," in part:
            out.append(part[1:-1].split(","))
        else:
            out.append([part])
    return out


def brace_count(pattern: str) -> int:
    """How many names `pattern`'s brace groups expand to ({000..099} is 100, {a,b} is 2);
    ValueError past MAX_EXPANDED_URIS (counted, never expanded)."""
    total = 1
    for choices in _groups(pattern):
        total *= len(choices)
        if total > MAX_EXPANDED_URIS:
            raise ValueError(f"brace groups name over {MAX_EXPANDED_URIS:,} objects")
    return total


def expand_braces(pattern: str) -> Iterator[str]:
    """`a{0..2}b{x,y}` → a0bx, a0by, a1bx, … lazily (a range keeps its zero padding); ValueError
    for a pattern brace_count refuses."""
    brace_count(pattern)
    choices = []
    for part, group in zip(BRACES.split(pattern), _groups(pattern)):
        if isinstance(group, range):
            lo = RANGE.fullmatch(part)[1]
            width = len(lo) if lo.startswith("0") else 0
            choices.append([f"{i:0{width}d}" for i in group])
        else:
            choices.append(group)
    return ("".join(c) for c in itertools.product(*choices))


def _prefix(pattern: str, wildcards: str = GLOB_CHARS) -> str:
    """The folder part of a glob before its first wildcard."""
    cut = min((pattern.index(c) for c in wildcards if c in pattern), default=len(pattern))
    return pattern[:cut].rpartition("/")[0]


def source_root(uri: str) -> str:
    """The folder a source's objects must lie in (its readers refuse what resolves outside): a
    folder's own URI, or a glob's or a brace pattern's folder before its first wildcard."""
    full = storage.uri_of(uri)
    if any(c in full for c in GLOB_CHARS + "{"):
        return _prefix(full, GLOB_CHARS + "{")
    last = full.rpartition("/")[2]
    return full.rstrip("/") if full.endswith("/") or "." not in last else full.rpartition("/")[0]


def find(kind: str, name: str, uri: str) -> list[ObjectInfo]:
    """The objects of one source, sorted by URI and deduplicated. Raises SourceError when nothing
    of the format's kind matches, and StorageError (retryable) when the store cannot be listed."""
    info = kinds.kind(kind)
    suffixes = info.suffixes
    found: dict[str, ObjectInfo] = {}
    try:
        patterns = list(expand_braces(storage.uri_of(uri)))  # at most MAX_EXPANDED_URIS names
    except ValueError as exc:
        raise SourceError(f"data.sources[{name}].uri: {exc}") from None
    listings: dict[str, list[ObjectInfo]] = {}
    missing: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in GLOB_CHARS):
            prefix = _prefix(pattern)
            if prefix not in listings:
                listings[prefix] = storage.list_objects(prefix)
            matched = [o for o in listings[prefix] if fnmatch.fnmatchcase(o.uri, pattern)]
        elif len(patterns) > 1 or pattern.lower().endswith(suffixes) and not info.folder:
            one = storage.stat(pattern)
            if one is None and len(patterns) > 1:
                missing.append(pattern)
            matched = [one] if one is not None else []
        else:
            matched = storage.list_objects(pattern)
        found.update((o.uri, o) for o in matched if o.uri.lower().endswith(suffixes))
    if not found:
        raise SourceError(f"data.sources[{name}].uri: {uri!r} matches no {info.objects}{info.hint}")
    if missing:  # a brace range names every object it means: one missing is a typo or lost data, not nothing
        raise SourceError(
            f"data.sources[{name}].uri: {uri!r} names {missing[0]}, which does not exist"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return [found[k] for k in sorted(found)]
