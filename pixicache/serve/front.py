"""The front path: every connection starts here, and plain hits never reach aiohttp.

A mirror's requests are mostly hits: GETs of blobs it holds. Through aiohttp's
handler a hit costs a request object, a response object, a task and several event
loop turns before ``sendfile(2)`` runs; the file work is a small part of it. So each
accepted connection starts with a :class:`FrontProtocol`, which answers requests
itself while each one is a *plain hit*, and at the first request that is not hands
the connection, with every byte received so far, to aiohttp's handler for good.
aiohttp then does exactly what it does on a connection it accepted itself: the
request is parsed, routed and answered (a miss, a fill, metadata, a 4xx) as before.

A plain hit is a request whose head matches this strict grammar (anything else,
malformed or merely unusual, is aiohttp's to parse and answer)::

    ("GET" | "HEAD") SP "/" *VCHAR SP "HTTP/1.1" CRLF
    *( token ":" *( SP | HTAB | VCHAR ) CRLF )
    CRLF

with a non-empty ``Host`` (without one, HTTP/1.1 makes it a ``400``: aiohttp's to
give), no header twice, at most 100 of them and ``max_header_size`` bytes in all, no
body and nothing that changes the connection (no ``Content-Length``,
``Transfer-Encoding``, ``Expect``, ``Upgrade``; ``Connection`` only ``keep-alive``
or ``close``), not a warm request (``x-pixicache-warm``), and a target that
:meth:`~pixicache.serve.app.ServeApp.ready_hit` vouches for: answered as a hit by
this process before, the client's digest the blob's, the file the very one that was
verified. A target this process has not answered yet is looked up first
(:meth:`~pixicache.serve.app.ServeApp.learn_hit`: the index, the file's recorded
identity; never a hash or a fetch), the request waiting for it, so a restarted
server and every worker of ``serve --workers N`` keep their connections on this path
from the first request on. Its answer is what aiohttp's path sends for the same request (the same
:func:`~pixicache.serve.http.answer_file`: validators, ``Range``, ``HEAD``; the same
headers, metrics and access-log line); bodies up to 64 KiB go out with the headers
in one write, larger ones by ``sendfile(2)`` from a writer callback
(:class:`~pixicache.serve.http.RegionSender`, a slice per turn of the event loop) with
``TCP_CORK`` on until the last byte, as aiohttp's path sends them.

The limits of the aiohttp path hold here too: the connection limit (all connections
are counted here first: beyond it a ``503`` and close), the header timeout (a
connection that has not sent a complete request head within ``header_timeout`` of
opening or of its last answer is closed; a head that trickles in is handed to aiohttp,
whose own timer then runs: at most twice the timeout in all), the send timeout (a client that accepts
nothing of an answer for ``send_timeout`` is dropped), the per-client cap (at the cap
the request is handed to aiohttp, which answers ``429``), and graceful shutdown
(idle connections closed, answers in progress finished within the shutdown timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Union, cast

from pixicache.serve.app import HIT_HEADERS, SMALL_BODY, ServeApp
from pixicache.serve.http import IMMUTABLE, RegionSender, answer_file, selector_writers
from pixicache.serve.metrics import Metrics

__all__ = ["BUSY", "FrontDoor", "FrontProtocol", "parse_head"]

log = logging.getLogger("pixicache.serve")

_BUSY_BODY = b"too many connections; retry later\n"
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)
"""What a connection beyond the limit is sent before it is closed."""

MAX_FIELDS = 100
"""Header lines a plain hit may have (aiohttp's own limit, as the server sets it)."""

MAX_PENDING = 64 << 10
"""Bytes received ahead of the request being answered before reading pauses."""

BATCH = 16
"""Pipelined requests answered in one go before the event loop gets a turn."""

SLOW_HEAD = 4096, 16
"""A request head still incomplete after this many bytes, or pieces received, goes to
aiohttp, whose parser reads incrementally: the front path rescans its buffer at each
piece, which a client trickling its head byte by byte must not turn into quadratic
work."""

_LINES = rb"(GET|HEAD) (/[!-~]*) HTTP/1\.1\r\n((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~]*\r\n)*)"
_HEAD = re.compile(_LINES + rb"\r\n")
_LINES_SO_FAR = re.compile(_LINES)
_LINE_SO_FAR = re.compile(rb"[\t -~]*\r?")
_STARTS = (b"GET /", b"HEAD /")
_HAND_OFF_FIELDS = frozenset(
    ("content-length", "transfer-encoding", "expect", "upgrade", "x-pixicache-warm")
)
_CONNECTION_TOKENS = frozenset(("keep-alive", "close"))
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_CAN_CORK = hasattr(socket, "TCP_CORK")


class _Fields(dict):  # type: ignore[type-arg,unused-ignore]
    """Request header fields by lower-case name, looked up in any case."""

    def get(self, name: str, default: Any = None) -> Any:
        return dict.get(self, name.lower(), default)


Head = tuple[str, str, _Fields, int]
"""A plain request head: method, target, fields, and where the next request starts."""


def parse_head(buf: bytes, max_size: int) -> Union[Head, bool, None]:
    """The plain request head at the start of ``buf`` (see the module doc).

    Returns the :data:`Head`; ``None`` while it may still be one and is incomplete;
    ``False`` when it is not one (the connection goes to aiohttp).

    >>> parse_head(b"GET /a HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n", 8190)[:3]
    ('GET', '/a', {'host': 'x'})
    >>> parse_head(b"GET /a HTTP/1.0\\r\\n\\r\\n", 8190)
    False
    >>> parse_head(b"GET /a HTTP/1.1\\r\\n\\r\\n", 8190)  # no Host
    False
    >>> parse_head(b"GET /a HT", 8190) is None
    True
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None if _may_become_plain(buf, max_size) else False
    end += 4
    if end > max_size:
        return False
    m = _HEAD.match(buf, 0, end)
    if m is None or m.end() != end:
        return False
    fields = _Fields()
    raw = m.group(3)
    if raw:
        lines = raw.split(b"\r\n")
        if len(lines) > MAX_FIELDS + 1:
            return False
        for line in lines[:-1]:
            name, _, value = line.partition(b":")
            key = name.decode("ascii").lower()
            if key in fields or key in _HAND_OFF_FIELDS:
                return False
            fields[key] = value.strip(b" \t").decode("ascii")
        conn = fields.get("connection")
        if conn is not None and not _CONNECTION_TOKENS.issuperset(
            t.strip().lower() for t in conn.split(",")
        ):
            return False
    if not fields.get("host"):  # RFC 9112 3.2: an HTTP/1.1 request without one is a 400
        return False
    return m.group(1).decode("ascii"), m.group(2).decode("ascii"), fields, end


def _may_become_plain(buf: bytes, max_size: int) -> bool:
    """Whether an incomplete head can still be plain: every line so far in the grammar,
    the line being received free of anything a plain head cannot hold. What cannot be
    is handed over at once, so aiohttp answers it as soon as it would have."""
    if len(buf) > max_size:
        return False
    if not buf.startswith(_STARTS):
        return any(s.startswith(buf) for s in _STARTS)
    last = buf.rfind(b"\r\n") + 2
    if last > 1 and not _LINES_SO_FAR.fullmatch(buf, 0, last):
        return False
    return _LINE_SO_FAR.fullmatch(buf, max(last, 0)) is not None


def _top(status: int, headers: dict[str, str], length: int | None) -> bytes:
    """The status line and headers of an answer, up to (without) ``Date``."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append("")
    return "\r\n".join(lines).encode("ascii")


def _wants_close(fields: _Fields) -> bool:
    conn = fields.get("connection")
    return conn is not None and "close" in conn.lower()


class FrontDoor:
    """The protocol factory of the server's listening sockets: a :class:`FrontProtocol`
    per connection, which hands off to ``make_handler()`` (aiohttp's handler).

    Args:
        app: the server's state and handler (hits, metrics, the access log).
        make_handler: a new aiohttp connection handler for a handed-off connection.
        handed_off: how many handed-off connections are open (counted in the limit).
        enabled: answer plain hits here (off: every connection is handed off at once).
    """

    def __init__(
        self,
        app: ServeApp,
        make_handler: Callable[[], asyncio.Protocol],
        handed_off: Callable[[], int],
        *,
        enabled: bool = True,
    ) -> None:
        cfg = app.config
        self.app = app
        self.metrics: Metrics = app.metrics
        self.loop = asyncio.get_running_loop()
        self.make_handler = make_handler
        self._handed_off = handed_off
        self.enabled = enabled and selector_writers(self.loop)
        self.max_connections = cfg.max_connections
        self.header_timeout = cfg.header_timeout
        self.send_timeout = cfg.send_timeout
        self.max_head = cfg.max_header_size
        self.protocols: set[FrontProtocol] = set()
        self.answered = 0  # requests answered here
        self.handed_off = 0  # connections given to aiohttp
        self.closing = False
        self.on_count: Callable[[], None] | None = None  # told whenever count() changes
        self._all_gone: asyncio.Future[None] | None = None
        self._date_at = -1
        self._tails = (b"", b"")
        self._whole: dict[str, tuple[tuple[int, int], bytes]] = {}
        from aiohttp.http import SERVER_SOFTWARE

        self.server_software = SERVER_SOFTWARE
        self.metrics.count_front(lambda: self.answered, lambda: self.handed_off)

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    def count(self) -> int:
        """Open client connections: here and handed off."""
        return len(self.protocols) + self._handed_off()

    def update_gauge(self) -> None:
        """The open connections changed: the gauge, and ``on_count`` (a worker's share)."""
        self.metrics.connections.set(self.count())
        if self.on_count is not None:
            self.on_count()

    def tail(self, close: bool) -> bytes:
        """The end of an answer's head: ``Date`` (made once a second), ``Server``, and
        ``Connection: close`` when the connection ends after it."""
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            common = f"Date: {formatdate(now, usegmt=True)}\r\nServer: {self.server_software}\r\n"
            self._tails = (common + "\r\n").encode("ascii"), (common + "Connection: close\r\n\r\n").encode("ascii")
        return self._tails[close]

    def whole(self, sha: str, st: os.stat_result) -> bytes:
        """The head (up to ``Date``) of a ``200`` with the whole blob ``sha`` whose
        ``fstat`` is ``st``: :func:`answer_file`'s, made once per blob and kept."""
        key = (st.st_size, st.st_mtime_ns)
        known = self._whole.get(sha)
        if known is not None and known[0] == key:
            return known[1]
        status, headers, _, length = answer_file(
            {}, st.st_size, st.st_mtime, etag=f'"{sha}"', cache_control=IMMUTABLE, extra=HIT_HEADERS
        )
        top = _top(status, headers, length)
        if len(self._whole) >= 10_000:
            self._whole.clear()
        self._whole[sha] = (key, top)
        return top

    def gone(self, proto: FrontProtocol) -> None:
        """``proto`` no longer holds its connection (closed or handed off)."""
        self.protocols.discard(proto)
        if self._all_gone is not None and not self.protocols and not self._all_gone.done():
            self._all_gone.set_result(None)

    def close_idle(self) -> None:
        """Shutdown begins: idle connections are closed, busy ones after their answer."""
        self.closing = True
        for proto in list(self.protocols):
            proto.close_when_idle()

    async def shutdown(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for the answers in progress, then drop what is left."""
        self.close_idle()
        if self.protocols:
            self._all_gone = self.loop.create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._all_gone), timeout)
        for proto in list(self.protocols):
            proto.abort()


class FrontProtocol(asyncio.Protocol):
    """One client connection while it is the front path's (see the module doc)."""

    __slots__ = ("_body", "_buf", "_busy", "_close_after", "_corked", "_deadline", "_door", "_eof",
                 "_gone", "_learning", "_out", "_paused", "_peer", "_pieces", "_reading", "_sender",
                 "_timer", "_transport", "_tried")  # fmt: skip

    def __init__(self, door: FrontDoor) -> None:
        self._door = door
        self._transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self._out: socket.socket = None  # type: ignore[assignment]  # the socket, to send with flags
        self._peer: str | None = None
        self._buf = b""
        self._pieces = 0  # reads that added to the request head not yet complete
        self._sender: RegionSender | None = None
        self._body: _Body | None = None  # the large answer being sent
        self._paused = False  # the transport holds bytes (its high-water mark is 0)
        self._reading = True
        self._eof = False
        self._close_after = False
        self._corked = False  # TCP_CORK is on: a large body is being sent
        self._busy = False  # inside _process (a body sent at once must not re-enter it)
        # the look-up of the first request's target (learn_hit), held while it runs
        self._learning: asyncio.Task[bool] | None = None
        self._tried: str | None = None  # the target looked up last, not to be again
        self._gone = False  # handed off, or closed
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        door = self._door
        self._transport = tr = cast(asyncio.Transport, transport)
        door.protocols.add(self)
        if door.count() > door.max_connections:
            door.metrics.refused.labels("connections").inc()
            self._gone = True
            door.gone(self)
            tr.write(BUSY)
            tr.close()
            return
        sock = tr.get_extra_info("socket")
        if not door.enabled or sock is None or tr.get_extra_info("sslcontext") is not None:
            self._hand_off()
            return
        try:  # a duplicate of the socket, closed with the connection: send(MSG_MORE)
            dup = os.dup(sock.fileno())
        except OSError:  # out of file descriptors: aiohttp's path needs none more
            self._hand_off()
            return
        self._out = socket.socket(fileno=dup)
        peer = tr.get_extra_info("peername")
        self._peer = peer[0] if peer else None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # as aiohttp does
        tr.set_write_buffer_limits(high=0)  # pause_writing whenever the socket is full
        self._deadline = door.loop.time() + door.header_timeout
        self._timer = door.loop.call_at(self._deadline, self._check_deadline)
        door.update_gauge()

    def data_received(self, data: bytes) -> None:
        if self._gone:
            return
        if self._buf:
            self._buf += data
            self._pieces += 1
        else:
            self._buf = data
        if self._body is None and not self._paused and not self._learning:
            self._process()
        elif len(self._buf) > MAX_PENDING and self._reading:
            self._reading = False
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        # an answer in progress, or requests still to answer: keep the socket open
        # for them (closed once answered); else close it now
        if not self._gone and (
            self._body is not None or self._paused or self._learning or b"\r\n\r\n" in self._buf
        ):
            return True
        return None

    def pause_writing(self) -> None:
        self._paused = True
        self._deadline = self._door.loop.time() + self._door.send_timeout

    def resume_writing(self) -> None:
        self._paused = False
        if self._gone:
            return
        self._deadline = self._door.loop.time() + self._door.header_timeout
        body = self._body
        if body is not None and self._sender is None:
            self._start_body(body)  # its headers are out now
        elif body is None and not self._learning:
            self._process()

    def connection_lost(self, exc: BaseException | None) -> None:
        was_here = not self._gone
        self._gone = True
        self._cancel_timer()
        if self._body is not None:
            self._end_body(self._body, ConnectionResetError("the client went away"))
        self._close_out()
        if was_here:
            self._door.gone(self)
            self._door.update_gauge()

    # -- requests ----------------------------------------------------------------------------
    def _process(self) -> None:
        """Answer the complete requests received, in order, while they are plain hits;
        then resume reading, or close (after an EOF or ``Connection: close``)."""
        door = self._door
        self._busy = True
        try:
            self._answer_all(door)
        finally:
            self._busy = False
        if not self._reading and len(self._buf) <= MAX_PENDING and not self._gone:
            self._reading = True
            self._transport.resume_reading()
        if (
            (self._eof or self._close_after)
            and self._body is None
            and not self._paused
            and not self._gone
            and b"\r\n\r\n" not in self._buf
        ):
            self._transport.close()

    def _answer_all(self, door: FrontDoor) -> None:
        done = 0
        while self._buf and self._body is None and not self._paused and not self._gone:
            if self._close_after:
                self._buf = b""  # requests after "Connection: close" are not answered
                break
            if done == BATCH:
                door.loop.call_soon(self._resume)
                return
            head = parse_head(self._buf, door.max_head)
            if head is None:  # incomplete: the header timeout bounds the wait
                if len(self._buf) > SLOW_HEAD[0] or self._pieces > SLOW_HEAD[1]:
                    self._hand_off()
                    return
                break
            answered = False if head is False else self._answer(*head)  # type: ignore[misc]
            if answered is None:  # its target is being looked up: _learned goes on
                return
            if not answered:
                self._hand_off()
                return
            self._pieces = 0
            done += 1

    def _resume(self) -> None:
        if not self._gone and self._body is None and not self._paused and not self._learning:
            self._process()

    def _answer(self, method: str, target: str, fields: _Fields, end: int) -> bool | None:
        """Answer one plain request if it is a hit this process can send at once (True);
        False leaves it, unconsumed, to aiohttp; None: a target this process has not
        answered yet is being looked up (:meth:`_learn`), the request waits for it."""
        door = self._door
        app = door.app
        hit = app.ready_hit(target, fields.get("x-expected-sha256"))
        if hit is None:
            return self._learn(target)
        route, sha, fd, st = hit
        client = app.client_of(self._peer, fields.get("x-forwarded-for"))
        if not app.may_start(client):  # aiohttp answers 429 and counts it
            os.close(fd)
            return False
        door.answered += 1
        started = time.monotonic()
        if "range" in fields or "if-none-match" in fields or "if-modified-since" in fields:
            status, headers, start, length = answer_file(
                fields, st.st_size, st.st_mtime, etag=f'"{sha}"', cache_control=IMMUTABLE, extra=HIT_HEADERS
            )
            # no Content-Length on a 304, nor on a HEAD's 416 (as aiohttp answers them)
            no_length = status == 304 or (status == 416 and method == "HEAD")
            top = _top(status, headers, None if no_length else length)
        else:  # the usual answer: 200, the whole blob
            status, start, length = 200, 0, st.st_size
            top = door.whole(sha, st)
        close = _wants_close(fields) or door.closing
        body = length if (method == "GET" and status in (200, 206)) else 0
        head = top + door.tail(close)
        self._buf = self._buf[end:]
        app.touched(sha, st.st_size)
        if not body:
            os.close(fd)
            self._transport.write(head)
            app.client_done(client)
            app.account(method, route, status, 0, client, target, started, "hit")
            self._answered(close)
            return True
        pinned = body > SMALL_BODY  # as on aiohttp's path: a short body is sent at once
        if pinned:
            app.blobs.pin(sha)
        self._body = _Body(method, route, target, sha, fd, start, body, status, client, started, close, pinned)
        if pinned:
            self._cork(True)
        if self._send_head(head):
            self._start_body(self._body)
        return True

    def _learn(self, target: str) -> bool | None:
        """Look ``target`` up (:meth:`ServeApp.learn_hit`), once per request, and go on
        when that is done (None); False: nothing to look up, aiohttp's path answers it.
        Reading goes on meanwhile (pipelined requests wait in the buffer, bounded by
        ``MAX_PENDING``); the header timeout does not run, the send timeout does not
        apply (nothing is being sent)."""
        if target == self._tried:
            return False
        self._tried = target
        lookup = self._door.app.learn_hit(target)
        if lookup is None:
            return False
        self._learning = self._door.loop.create_task(lookup)
        self._learning.add_done_callback(self._learned)
        return None

    def _learned(self, task: asyncio.Task[bool]) -> None:
        self._learning = None
        if not task.cancelled() and task.exception() is not None:
            log.error("looking up a hit failed: %r", task.exception())  # aiohttp's path answers
        if self._gone:
            return
        self._deadline = self._door.loop.time() + self._door.header_timeout
        if not self._paused:  # else resume_writing goes on
            self._process()  # the request again: a hit now, or (tried) handed off

    def _cork(self, on: bool) -> None:
        """``TCP_CORK`` on or off, as aiohttp's path does around a large body
        (:func:`~pixicache.serve.http.cork`; nginx's ``tcp_nopush``): while it is on, the
        kernel sends only full segments, whenever ``sendfile`` happens to return;
        turning it off sends what is left at once. Without it, with 8 connections
        busy, a 3 MB body left in ~75 segments instead of 48, each one more for the
        client to receive and acknowledge (``nstat`` during benchmarks/serve.py's hits)."""
        if self._corked == on or not _CAN_CORK:
            return
        self._corked = on
        with contextlib.suppress(OSError):  # a connection that is gone: the send says so
            self._out.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))

    def _send_head(self, head: bytes) -> bool:
        """Put the headers on the socket, held back (``MSG_MORE``) to leave with the
        body's first bytes; True when they are all on it (the body may follow now).
        What the socket does not take goes to the transport, which pauses writing: the
        body follows when it resumes (:meth:`resume_writing`)."""
        try:
            n = self._out.send(head, socket.MSG_MORE)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            n = 0  # the transport meets the same error and closes the connection
        if n == len(head):
            return True
        self._transport.write(head[n:])
        return not self._paused

    def _answered(self, close: bool) -> None:
        """An answer is complete (written, or handed to the transport)."""
        self._tried = None
        self._deadline = self._door.loop.time() + self._door.header_timeout
        if close:
            self._close_after = True

    def _start_body(self, body: _Body) -> None:
        door = self._door
        self._sender = RegionSender(
            door.loop, self._out.fileno(), body.fd, body.start, body.length,
            door.send_timeout, lambda sent, err: self._end_body(body, err, sent),
        )  # fmt: skip
        self._sender.start()

    def _end_body(self, body: _Body, error: ConnectionResetError | None, sent: int = 0) -> None:
        """The body is sent (``error`` None), or the send failed (the connection is
        dropped: the client sees a short body, never a complete one)."""
        if self._body is not body:
            return
        self._body = None
        if self._sender is not None:
            sent = self._sender.sent
            self._sender.cancel()
            self._sender = None
        if not self._gone:
            self._cork(False)  # the body's last segment leaves now
        app = self._door.app
        os.close(body.fd)
        if body.pinned:
            app.blobs.unpin(body.sha)
        app.client_done(body.client)
        status: int | str = body.status if error is None else f"{body.status}-aborted"
        app.account(body.method, body.route, status, sent, body.client, body.target, body.started, "hit")
        if self._gone:
            return
        if error is not None:
            self.abort()
            return
        self._answered(body.close)
        if not self._busy:  # a send that completed later: go on with the next request
            self._process()

    # -- the connection ----------------------------------------------------------------------
    def _hand_off(self) -> None:
        """Give the connection, and every byte received, to aiohttp's handler for good."""
        door = self._door
        tr = self._transport
        assert tr is not None
        self._gone = True
        self._cancel_timer()
        self._close_out()
        door.gone(self)
        if tr.is_closing():
            return
        door.handed_off += 1
        tr.set_write_buffer_limits()  # aiohttp's handler expects the transport's defaults
        handler = door.make_handler()
        tr.set_protocol(handler)
        handler.connection_made(tr)
        data, self._buf = self._buf, b""
        if data:
            handler.data_received(data)
        if not self._reading:
            tr.resume_reading()
        if self._eof:
            handler.eof_received()

    def close_when_idle(self) -> None:
        """Close now if no answer is in progress, else right after it."""
        if self._learning:  # its answer says "Connection: close" (door.closing)
            return
        self._close_after = True
        if not self._gone and self._body is None and not self._paused:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:  # type: ignore[redundant-expr,unused-ignore]
            self._transport.abort()

    def _check_deadline(self) -> None:
        """The header timeout (idle, or a request head still coming) and, while the
        transport holds bytes the client does not take, the send timeout (a body
        being sent has its own, in its :class:`RegionSender`)."""
        self._timer = None
        if self._gone:
            return
        loop = self._door.loop
        now = loop.time()
        sending = self._sender is not None or self._learning
        if not sending and now >= self._deadline:
            if self._paused or self._body is not None:
                self.abort()  # a client that stopped reading
            else:
                self._transport.close()
            return
        nxt = now + self._door.header_timeout if sending else self._deadline
        self._timer = loop.call_at(max(nxt, now + 0.05), self._check_deadline)

    def _close_out(self) -> None:
        out, self._out = self._out, None  # type: ignore[assignment]
        if out is not None:
            out.close()  # the duplicate only: the transport's socket stays open

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Body:
    """A large answer being sent: the open blob, its span, and what its log line needs."""

    __slots__ = ("client", "close", "fd", "length", "method", "pinned", "route", "sha", "start",
                 "started", "status", "target")  # fmt: skip

    def __init__(
        self, method: str, route: str, target: str, sha: str, fd: int, start: int,
        length: int, status: int, client: str, started: float, close: bool, pinned: bool,
    ) -> None:  # fmt: skip
        self.method, self.route, self.target, self.sha = method, route, target, sha
        self.fd, self.start, self.length, self.status = fd, start, length, status
        self.client, self.started, self.close, self.pinned = client, started, close, pinned
