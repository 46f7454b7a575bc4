"""HTTP details the server gets right in one place: safe paths, Range, validators, sending.

* :func:`split_path` turns a raw request target into plain path segments or
  refuses it (absolute URLs, ``..``/``%2e%2e``, backslashes, NULs, encoded
  slashes, double encoding, over-long targets). It works on the *raw* target:
  aiohttp's ``request.path`` is already normalised and would hide ``..``.
* Range and dates are read by :mod:`pixicache.httputil` (multi-range requests
  are answered with the whole body, which RFC 9110 allows).
* :func:`not_modified` / :func:`if_range_allows` evaluate the validators, and
  :func:`answer_file` decides a stored file's answer (200, 206, 304, 416, its
  headers and byte span) for both of the server's paths: aiohttp's handler and the
  front path (:mod:`pixicache.serve.front`).
* :class:`RegionSender` sends part of a file by zero-copy ``sendfile(2)``: what the
  socket takes at once, then from one writer callback driven by writability, with a
  send timeout, so a client that stops reading is dropped instead of holding a
  connection forever. :func:`send_region` uses it on an aiohttp connection (or
  ``loop.sendfile`` in chunks, for TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import IO, Any, NamedTuple, Union
from urllib.parse import unquote

from aiohttp import web

from pixicache.httputil import http_date, parse_http_date, parse_range

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


class FileAnswer(NamedTuple):
    """How a stored file answers one GET or HEAD: the status, the response headers
    (without ``Content-Length``, which the sender adds), and the body's span."""

    status: int
    headers: dict[str, str]
    start: int
    length: int


def answer_file(
    request_headers: Mapping[str, str],
    size: int,
    mtime: float,
    *,
    etag: str | None,
    cache_control: str,
    content_type: str = "application/octet-stream",
    extra: Mapping[str, str] | None = None,
) -> FileAnswer:
    """The answer of a file of ``size`` bytes last modified at ``mtime``: validators
    (``304``), a single ``Range`` (``206``, or ``416`` with ``bytes */size``; several
    ranges get the whole body, as RFC 9110 allows), else ``200``. ``request_headers``
    must look names up case-insensitively (aiohttp's headers; the front path's
    fields). A ``304`` and a ``416`` have no body (length 0).

    >>> answer_file({"Range": "bytes=2-"}, 10, 0.0, etag='"x"', cache_control="c")[::2]
    (206, 2)
    """
    last_modified = http_date(mtime)
    headers = {
        "Accept-Ranges": "bytes",
        "Cache-Control": cache_control,
        "Last-Modified": last_modified,
    }
    if etag:
        headers["ETag"] = etag
    if extra:
        headers.update(extra)
    if not_modified(request_headers, etag, mtime):
        return FileAnswer(304, headers, 0, 0)
    headers["Content-Type"] = content_type
    status, start, length = 200, 0, size
    wanted = request_headers.get("Range")
    if wanted and if_range_allows(request_headers, etag, last_modified):
        span = parse_range(wanted, size)
        if span == "unsatisfiable":
            headers["Content-Range"] = f"bytes */{size}"
            return FileAnswer(416, headers, 0, 0)
        if isinstance(span, tuple):
            status, start, length = 206, span[0], span[1] - span[0] + 1
            headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
    return FileAnswer(status, headers, start, length)


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


class SendAborted(ConnectionResetError):
    """A region's send ended early: the client went away or stopped reading (the
    connection is aborted). ``sent``: the region's bytes put on the socket before, which
    the client may well have received (the bytes-served metric counts them)."""

    def __init__(self, message: str, sent: int) -> None:
        super().__init__(message)
        self.sent = sent


async def send_region(
    request: web.BaseRequest, fobj: IO[bytes], offset: int, count: int, timeout: float
) -> int:
    """Send ``count`` bytes of ``fobj`` from ``offset`` on the request's connection.

    The response must be prepared (headers sent). Sends by zero-copy ``sendfile(2)``
    (:func:`_send_when_writable`), or where that cannot be used (TLS, an event loop
    without selector writers) by ``loop.sendfile`` in :data:`SEND_CHUNK` pieces; a
    client that accepts nothing for ``timeout`` seconds is dropped (the connection
    aborted). Returns the bytes sent; raises :class:`SendAborted` (a
    :class:`ConnectionResetError`, with the bytes sent before) if the client went away.
    """
    loop = asyncio.get_running_loop()
    sent = await _send_when_writable(request, fobj, offset, count, timeout)
    while sent < count:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise SendAborted("the client closed the connection", sent)
        n = min(SEND_CHUNK, count - sent)
        try:
            await _bounded(loop.sendfile(transport, fobj, offset + sent, n), timeout)
        except asyncio.TimeoutError:
            abort(request)
            raise SendAborted(f"client accepted no data for {timeout:g} s", sent) from None
        except (OSError, RuntimeError) as exc:
            abort(request)
            raise SendAborted(str(exc), sent) from exc
        sent += n
    return sent


def selector_writers(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` lets :class:`RegionSender` watch a socket for writability (the
    selector event loops do; others, such as uvloop's, do not)."""
    return hasattr(loop, "_add_writer") and hasattr(loop, "_remove_writer")


SEND_SLICE = 512 << 10
"""The most :class:`RegionSender` puts on one socket before the event loop takes a turn
(nginx's ``sendfile_max_chunk``, 2 MiB by default, is the same bound): a client on a fast
link cannot keep the loop to itself, and connections take turns.

Why 512 KiB: ``benchmarks/send_slice.py`` (hits, 121 artifacts, wrk with 2 threads and
8 connections, the servers measured in turn, the order rotating each round; medians of
the per-round ratios to nginx with as many workers; ranges over 2-6 runs on the 2-core
build machine) finds that larger slices trade one worker against two. With 2 workers,
512 KiB gave 0.91-0.95x nginx, 1 MiB 0.90-0.97x, 4 MiB 0.95-1.00x, no limit (until the
socket is full) 0.95-1.00x, the workers' CPU per request falling by 0.14-0.27 ms. With
1 worker, 512 KiB gave 0.99-1.06x, 1 MiB 1.00-1.03x, 2 MiB 0.93-1.00x, no limit
0.86-0.94x, wrk's CPU per request rising by 0.20-0.40 ms. A budget per turn of the loop
shared by the connections being sent to (6 or 8 MiB, at least 512 KiB each) made the
same trade: 0.94-0.97x with 2 workers, 0.92-0.99x with 1 (10 rounds each, wrk and the
Python client). The client shares the server's two cores there, which is not how a site
runs a mirror; the slice stays where the one-worker rate holds."""


_DONE, _FULL, _SLICED = object(), object(), object()  # what RegionSender._pump ended with


class RegionSender:
    """Sends ``count`` bytes of the file ``file_fd`` from ``offset`` on the non-blocking
    socket ``sock_fd`` by ``sendfile(2)``: what the socket takes at once, up to
    :data:`SEND_SLICE`, then the rest a slice per turn of the event loop: from a
    ``call_soon`` while the socket takes more, from a writer callback once it was full. A client that accepts
    nothing for ``timeout`` seconds is given up. ``done(sent, error)`` is called exactly
    once, unless :meth:`cancel` came first; ``error`` is a
    :class:`ConnectionResetError` (the client went away or stalled, or the file became
    shorter) or ``None``.

    The socket must be the connection's end: nothing queued in its transport, and
    the transport must not close it while this sends (an EOF from the client is the
    caller's to hold). Needs :func:`selector_writers`.
    """

    __slots__ = ("_add", "_done", "_file_fd", "_last", "_loop", "_remove", "_sock_fd", "_soon",
                 "_timeout", "_timer", "_watching", "count", "offset", "sent")  # fmt: skip

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock_fd: int,
        file_fd: int,
        offset: int,
        count: int,
        timeout: float,
        done: Callable[[int, ConnectionResetError | None], None],
    ) -> None:
        self._loop = loop
        # the selector loop's own, minus its "used by a transport" check
        self._add = loop._add_writer  # type: ignore[attr-defined]
        self._remove = loop._remove_writer  # type: ignore[attr-defined]
        self._sock_fd, self._file_fd = sock_fd, file_fd
        self.offset, self.count, self.sent = offset, count, 0
        self._timeout = timeout
        self._done: Callable[[int, ConnectionResetError | None], None] | None = done
        self._watching = False
        self._soon: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0

    def start(self) -> None:
        """Send what the socket takes now; the rest from later turns of the loop."""
        state = self._pump()
        if state is _DONE:
            return
        self._last = self._loop.time()
        self._timer = self._loop.call_at(self._last + self._timeout, self._watchdog)
        self._wait(state)

    def cancel(self) -> None:
        """Stop sending; ``done`` is not called."""
        self._done = None
        self._stop()

    def _pump(self) -> object:
        """One ``sendfile`` of up to a slice: the region is out (:data:`_DONE`, also
        after an error), the socket took less than asked (:data:`_FULL`: it is full, as
        nginx takes a short send; if it is not, the writer callback runs on the next
        turn), or it took the slice (:data:`_SLICED`). A second call after a short one
        would almost always meet ``EAGAIN``: a system call for nothing, per socket
        filled."""
        try:
            want = min(SEND_SLICE, self.count - self.sent)
            n = os.sendfile(self._sock_fd, self._file_fd, self.offset + self.sent, want)
            if n == 0:  # the file is shorter than it was
                self._finish(ConnectionResetError("the file changed while being sent"))
                return _DONE
            self.sent += n
            if self.sent < self.count:
                return _SLICED if n == want else _FULL  # the next slice after other work
        except (BlockingIOError, InterruptedError):
            return _FULL
        except OSError as exc:
            self._finish(ConnectionResetError(str(exc)))
            return _DONE
        self._finish(None)
        return _DONE

    def _wait(self, state: object) -> None:
        """The next slice: on the next turn while the socket takes more (no selector
        change), when it is writable again once it is full (watched until the end)."""
        if state is _FULL:
            if not self._watching:
                self._add(self._sock_fd, self._writable)
                self._watching = True
        elif not self._watching:
            self._soon = self._loop.call_soon(self._writable)

    def _writable(self) -> None:
        self._soon = None
        if self._done is None:
            return
        before = self.sent
        state = self._pump()
        if state is not _DONE:
            if self.sent != before:
                self._last = self._loop.time()
            self._wait(state)

    def _watchdog(self) -> None:
        self._timer = None
        if self._done is None:
            return
        idle = self._loop.time() - self._last
        if idle >= self._timeout:
            self._finish(ConnectionResetError(f"client accepted no data for {self._timeout:g} s"))
        else:
            self._timer = self._loop.call_later(self._timeout - idle, self._watchdog)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        if self._watching:
            self._watching = False
            self._remove(self._sock_fd)

    def _finish(self, error: ConnectionResetError | None) -> None:
        self._stop()
        done, self._done = self._done, None
        if done is not None:
            done(self.sent, error)


async def _send_when_writable(
    request: web.BaseRequest, fobj: IO[bytes], offset: int, count: int, timeout: float
) -> int:
    """A region on an aiohttp connection by :class:`RegionSender`: what ``loop.sendfile``
    does per call (pause reading, register the socket for writability, a timeout per
    chunk, unregister, resume reading), once for the whole region. Returns the bytes
    sent (``0``: not possible here, e.g. TLS, bytes queued in the transport, or an event
    loop without selector writers: the caller sends them another way).

    Raises:
        SendAborted: the client went away or stopped reading (the connection is
            aborted).
    """
    loop = asyncio.get_running_loop()
    transport = request.transport
    if (
        not selector_writers(loop)
        or transport is None
        or transport.is_closing()
        or transport.get_write_buffer_size()
        or transport.get_extra_info("sslcontext") is not None
    ):
        return 0
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    done: asyncio.Future[int] = loop.create_future()

    def finished(sent: int, error: ConnectionResetError | None) -> None:
        if not done.done():
            if error is None:
                done.set_result(sent)
            else:
                done.set_exception(SendAborted(str(error), sent))

    sender = RegionSender(loop, sock.fileno(), fobj.fileno(), offset, count, timeout, finished)
    reading = transport.is_reading()
    if reading:
        transport.pause_reading()  # an EOF must not close the socket under the writer
    try:
        sender.start()
        return await done
    except ConnectionResetError:
        abort(request)
        raise
    finally:
        sender.cancel()
        if reading and not transport.is_closing():
            transport.resume_reading()


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
