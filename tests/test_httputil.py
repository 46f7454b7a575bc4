"""The shared HTTP header helpers (Range, Retry-After, dates)."""

from __future__ import annotations

import doctest
import email.utils
import time

import pytest

from pixicache import httputil
from pixicache.httputil import parse_range, parse_retry_after


def test_doctests() -> None:
    assert doctest.testmod(httputil).failed == 0


@pytest.mark.parametrize(
    ("header", "size", "span"),
    [
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=5-100", 10, (5, 9)),
        ("bytes=-100", 10, (0, 9)),
        ("bytes=10-", 10, "unsatisfiable"),
        ("bytes=-0", 10, "unsatisfiable"),
        ("bytes=0-", 0, "unsatisfiable"),
        ("bytes=5-4", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("items=0-1", 10, None),
        ("bytes=a-b", 10, None),
        ("bytes=5", 10, None),
        (None, 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, span: object) -> None:
    assert parse_range(header, size) == span


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    later = parse_retry_after(email.utils.formatdate(time.time() + 60, usegmt=True))
    assert later is not None and 55 <= later <= 61
