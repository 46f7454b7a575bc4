"""HTTP details the server gets right in one place: safe paths, Range, validators, sending.

* :func:`split_path` turns a raw request target into plain path segments or
  refuses it (absolute URLs, ``..``/``%2e%2e``, backslashes, NULs, encoded
  slashes, double encoding, over-long targets). It works on the *raw* target:
  aiohttp's ``request.path`` is already normalised and would hide ``..``.
* Range and dates are read by :mod:`pixicache.httputil` (multi-range requests
  are answered with the whole body, which RFC 9110 allows).
* :func:`not_modified` / :func:`if_range_allows` evaluate the validators.
* :func:`send_region` sends part of a file by zero-copy ``sendfile(2)``: what the
  socket takes at once, then from one writer callback driven by writability (or
  ``loop.sendfile`` in chunks, for TLS), with a send timeout, so a client that stops
  reading is dropped instead of holding a connection forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import IO, Any, Union
from urllib.parse import unquote

from aiohttp import web

from pixicache.httputil import parse_http_date

SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.+\-!~=,@]+$")
"""What one decoded path segment may hold (conda file names, versions, hex digests)."""

SEND_CHUNK = 4 << 20
"""Bytes per ``sendfile`` call; each must complete within the send timeout."""

IMMUTABLE = "public, max-age=31536000, immutable"
"""``Cache-Control`` of content-addressed responses: any HTTP cache may keep them."""


class HTTPProblem(Exception):
    """A request the server refuses before touching anything: status and reason."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def split_path(raw_target: str, max_len: int = 1024) -> tuple[list[str], str]:
    """A raw request target → (decoded path segments, raw query string).

    Raises :class:`HTTPProblem` (400 or 414) for anything but a plain
    origin-form path of safe segments.

    >>> split_path("/conda-forge/linux-64/x-1.0-0.conda?a=1")
    (['conda-forge', 'linux-64', 'x-1.0-0.conda'], 'a=1')
    >>> split_path("/conda-forge/%2e%2e/etc")
    Traceback (most recent call last):
    ...
    pixicache.serve.http.HTTPProblem: path traversal ('..') is not allowed
    """
    if len(raw_target) > max_len:
        raise HTTPProblem(414, f"request target longer than {max_len} characters")
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise HTTPProblem(400, "only origin-form paths are served (this is not a proxy)")
    path, _, query = raw_target.partition("?")
    if "#" in path:
        raise HTTPProblem(400, "a fragment does not belong in a request")
    if path == "/":
        return [], query
    segments = []
    body = path[1:-1] if path.endswith("/") else path[1:]  # one trailing '/' (index pages)
    for raw in body.split("/"):
        if not raw:
            raise HTTPProblem(400, "empty path segment ('//')")
        try:
            seg = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise HTTPProblem(400, "path is not valid UTF-8") from None
        if seg in (".", ".."):
            raise HTTPProblem(400, "path traversal ('..') is not allowed")
        if "%" in seg:
            raise HTTPProblem(400, "double-encoded path")
        if not SEGMENT_RE.match(seg):
            raise HTTPProblem(400, f"unexpected character in path segment {seg[:80]!r}")
        segments.append(seg)
    return segments, query


def etag_matches(header: str | None, etag: str | None) -> bool:
    """Weak comparison of an ``If-None-Match`` list against ``etag``."""
    if header is None or etag is None:
        return False
    if header.strip() == "*":
        return True
    bare = etag[2:] if etag.startswith("W/") else etag
    for tag in header.split(","):
        t = tag.strip()
        if t.startswith("W/"):
            t = t[2:]
        if t == bare:
            return True
    return False


def not_modified(headers: Mapping[str, str], etag: str | None, mtime: float | None) -> bool:
    """Whether a GET/HEAD with these request headers is answered ``304``."""
    inm = headers.get("If-None-Match")
    if inm is not None:
        return etag_matches(inm, etag)
    since = parse_http_date(headers.get("If-Modified-Since"))
    return since is not None and mtime is not None and int(mtime) <= since


def if_range_allows(
    headers: Mapping[str, str], etag: str | None, last_modified: str | None
) -> bool:
    """False when an ``If-Range`` validator no longer matches (send the whole body)."""
    value = headers.get("If-Range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"'):
        return etag is not None and value == etag
    return last_modified is not None and value == last_modified


def cork(request: web.BaseRequest, on: bool) -> None:
    """``TCP_CORK`` on or off (Linux; like nginx's ``tcp_nopush``): with it on, the
    headers and the first ``sendfile`` bytes leave in full segments, not as a
    separate small packet; turning it off flushes what is left."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and hasattr(socket, "TCP_CORK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)


Networks = Sequence[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]]


def parse_networks(specs: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``10.0.0.5`` / ``10.0.0.0/8`` / ``::1`` strings as networks."""
    return [ipaddress.ip_network(s, strict=False) for s in specs]


def client_address(remote: str | None, forwarded_for: str | None, trusted: Networks) -> str:
    """Who a request is really from.

    ``remote`` (the peer address) unless it is a trusted proxy; then the
    ``X-Forwarded-For`` list is read from the right (the hop nearest to this
    server) and the first address that is not a trusted proxy is the client.
    Forged entries to the left of it are never reached; a malformed entry
    stops the walk at the last address that was trusted.
    """
    addr = remote or "?"
    if not trusted or not forwarded_for or not _trusted(_ip(addr), trusted):
        return addr
    for hop in reversed(forwarded_for.split(",")):
        ip = _ip(hop.strip())
        if ip is None:
            return addr
        addr = str(ip)
        if not _trusted(ip, trusted):
            return addr
    return addr


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_trusted_proxy(remote: str | None, trusted: Networks) -> bool:
    """Whether the peer ``remote`` is one of the ``trusted`` proxies."""
    return _trusted(_ip(remote or ""), trusted)


def _trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, trusted: Networks) -> bool:
    return ip is not None and any(ip in net for net in trusted)


def abort(request: web.BaseRequest) -> None:
    """Drop the connection at once (the client sees a short body, never a complete one)."""
    transport = request.transport
    if transport is not None:
        transport.abort()


async def send_region(
    request: web.BaseRequest, fobj: IO[bytes], offset: int, count: int, timeout: float
) -> int:
    """Send ``count`` bytes of ``fobj`` from ``offset`` on the request's connection.

    The response must be prepared (headers sent). Uses ``loop.sendfile``
    (``sendfile(2)``, zero-copy) in :data:`SEND_CHUNK` pieces; a piece the
    client does not accept within ``timeout`` seconds aborts the connection.
    Returns the bytes sent; raises :class:`ConnectionResetError` if the client
    went away.
    """
    loop = asyncio.get_running_loop()
    sent = _send_now(request, fobj, offset, count)
    if sent < count:
        sent += await _send_when_writable(request, fobj, offset + sent, count - sent, timeout)
    while sent < count:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        n = min(SEND_CHUNK, count - sent)
        try:
            await _bounded(loop.sendfile(transport, fobj, offset + sent, n), timeout)
        except asyncio.TimeoutError:
            abort(request)
            raise ConnectionResetError(f"client accepted no data for {timeout:g} s") from None
        except (OSError, RuntimeError) as exc:
            abort(request)
            raise ConnectionResetError(str(exc)) from exc
        sent += n
    return sent


def _send_now(request: web.BaseRequest, fobj: IO[bytes], offset: int, count: int) -> int:
    """What the socket takes of the region right now, by ``sendfile(2)`` straight away.

    ``loop.sendfile`` returns to the event loop after every ``sendfile`` call (a writer
    added and removed each time) and pauses and resumes reading around it: for a body
    that fits the socket's send buffer, most of a hit's cost. With nothing queued in
    the transport (the headers are out), the socket is the connection's end and
    writing to it directly keeps the order; what it does not take now is left to
    ``loop.sendfile``.
    """
    transport = request.transport
    if transport is None or transport.is_closing() or transport.get_write_buffer_size():
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        return 0  # TLS (a front-end's job today) must go through its transport
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock.fileno(), fobj.fileno(), offset + sent, count - sent)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            abort(request)
            raise ConnectionResetError(str(exc)) from exc
        if n == 0:  # the file is shorter than it was: loop.sendfile says so
            break
        sent += n
    return sent


async def _send_when_writable(
    request: web.BaseRequest, fobj: IO[bytes], offset: int, count: int, timeout: float
) -> int:
    """The rest of a region by ``sendfile(2)`` from one writer callback: what
    ``loop.sendfile`` does per call (pause reading, register the socket for
    writability, a timeout per chunk, unregister, resume reading), once for the whole
    region, with one watchdog that drops a client that accepts nothing for
    ``timeout`` seconds. Returns the bytes sent (``0``: not possible here, e.g. TLS or
    an event loop without selector writers: the caller sends them another way).

    Raises:
        ConnectionResetError: the client went away or stopped reading (the
            connection is aborted).
    """
    loop = asyncio.get_running_loop()
    transport = request.transport
    add = getattr(loop, "_add_writer", None)  # the selector loop's, minus the "used by a transport" check
    remove = getattr(loop, "_remove_writer", None)
    if (
        add is None
        or remove is None
        or transport is None
        or transport.is_closing()
        or transport.get_write_buffer_size()
        or transport.get_extra_info("sslcontext") is not None
    ):
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    out_fd, in_fd = sock.fileno(), fobj.fileno()
    done: asyncio.Future[None] = loop.create_future()
    sent = 0
    last = loop.time()  # when the client last took some
    timer: asyncio.TimerHandle | None = None

    def writable() -> None:
        nonlocal sent, last
        if done.done():
            return
        try:
            while sent < count:
                n = os.sendfile(out_fd, in_fd, offset + sent, count - sent)
                if n == 0:  # the file is shorter than it was
                    done.set_exception(ConnectionResetError("the file changed while being sent"))
                    return
                sent += n
                last = loop.time()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            done.set_exception(ConnectionResetError(str(exc)))
            return
        done.set_result(None)

    def watchdog() -> None:
        nonlocal timer
        if done.done():
            return
        idle = loop.time() - last
        if idle >= timeout:
            done.set_exception(ConnectionResetError(f"client accepted no data for {timeout:g} s"))
        else:
            timer = loop.call_later(timeout - idle, watchdog)

    reading = transport.is_reading()
    if reading:
        transport.pause_reading()  # an EOF must not close the socket under the writer
    add(out_fd, writable)
    timer = loop.call_later(timeout, watchdog)
    try:
        await done
    except ConnectionResetError:
        abort(request)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        remove(out_fd)
        if reading and not transport.is_closing():
            transport.resume_reading()
    return sent


if sys.version_info >= (3, 11):

    async def _bounded(aw: Awaitable[Any], timeout: float) -> Any:
        """``await aw`` within ``timeout`` (asyncio.timeout: no extra task per call)."""
        async with asyncio.timeout(timeout):
            return await aw

else:  # pragma: no cover

    async def _bounded(aw: Awaitable[Any], timeout: float) -> Any:
        return await asyncio.wait_for(aw, timeout)


async def write_chunk(
    request: web.BaseRequest, resp: web.StreamResponse, data: Any, timeout: float
) -> None:
    """``resp.write(data)`` (with chunked framing if the response is chunked), bounded by ``timeout``."""
    try:
        await _bounded(resp.write(data), timeout)
    except asyncio.TimeoutError:
        abort(request)
        raise ConnectionResetError(f"client accepted no data for {timeout:g} s") from None
