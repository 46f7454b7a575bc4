"""The HTTP client every source of one fetch shares."""

from __future__ import annotations

import httpx

__all__ = ["READ_SIZE", "make_client"]

READ_SIZE = 1 << 20
"""Bytes asked of the socket per read on downloads."""


def make_client(timeout: float = 30.0, max_connections: int = 64) -> httpx.Client:
    """The HTTP client sources share. It honours ``HTTP(S)_PROXY``/``NO_PROXY``
    (httpx's ``trust_env``), follows redirects, and never decodes bodies."""
    # httpcore reads 64 KiB per recv(); 1 MiB halves the CPU spent per byte on
    # large archives (measured: 1.2 s -> 0.65 s of user time for 370 MB).
    import httpcore._sync.http11 as _h11

    if getattr(_h11.HTTP11Connection, "READ_NUM_BYTES", 0) < READ_SIZE:
        _h11.HTTP11Connection.READ_NUM_BYTES = READ_SIZE
    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        follow_redirects=True,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=32),
        headers={"user-agent": f"pixicache/{_version()}", "accept-encoding": "identity"},
        trust_env=True,
    )


def _version() -> str:
    from pixicache import __version__

    return __version__
