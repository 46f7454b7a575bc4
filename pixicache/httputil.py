"""HTTP header helpers shared by the mirror, the sources and the test server
(RFC 9110); standard library only.

* :func:`parse_range` reads a single ``bytes=`` range; :func:`content_range_start`
  the first byte of a ``206``'s ``Content-Range``;
* :func:`parse_retry_after` reads ``Retry-After`` (seconds or a date);
* :func:`http_date` / :func:`parse_http_date` write and read IMF-fixdates.
"""

from __future__ import annotations

import datetime
import email.utils
import functools
import re
from typing import Union

# RFC 9110 14.1.2: "bytes" "=" first-pos "-" [ last-pos ] / "-" suffix-length, DIGITs only
# (no sign, no "_", no spaces inside numbers); at most 19 digits (an int64)
_RANGE = re.compile(r"\A[Bb][Yy][Tt][Ee][Ss][ \t]*=[ \t]*([0-9]{0,19})-([0-9]{0,19})[ \t]*\Z")
_CONTENT_RANGE = re.compile(r"\A[ \t]*bytes[ \t]+([0-9]{1,19})-[0-9]{1,19}/(?:[0-9]{1,19}|\*)[ \t]*\Z", re.I)

__all__ = [
    "Span",
    "content_range_start",
    "http_date",
    "parse_http_date",
    "parse_range",
    "parse_retry_after",
]


Span = Union[tuple[int, int], str, None]


def parse_range(header: str | None, size: int) -> Span:
    """A single ``bytes=`` range → ``(first, last)`` (inclusive), ``"unsatisfiable"``,
    or ``None`` to ignore the header (absent, malformed, other unit, several ranges).

    >>> parse_range("bytes=0-9", 100), parse_range("bytes=-10", 100), parse_range("bytes=90-", 100)
    ((0, 9), (90, 99), (90, 99))
    >>> parse_range("bytes=100-", 100)
    'unsatisfiable'
    """
    if not header:
        return None
    m = _RANGE.match(header)
    if m is None:
        return None  # malformed, another unit, several ranges: ignored (RFC 9110 14.2)
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        n = int(last)
        if n <= 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    a = int(first)
    b = int(last) if last else size - 1
    if last and b < a:
        return None
    if a >= size:
        return "unsatisfiable"
    return a, min(b, size - 1)


def content_range_start(value: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes 100-199/200`` (``100``), or ``None``.

    >>> content_range_start("bytes 100-199/200"), content_range_start("items 1-2/3")
    (100, None)
    """
    m = _CONTENT_RANGE.match(value or "")
    return int(m.group(1)) if m else None


def http_date(timestamp: float) -> str:
    """An IMF-fixdate (``Last-Modified`` format), of the whole second (cached: a hit's
    ``Last-Modified`` is formatted once per blob, not per request)."""
    return _http_date(int(timestamp))


@functools.lru_cache(maxsize=65536)
def _http_date(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


def parse_http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an
    HTTP date), or ``None`` if absent or unreadable; never negative."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())
