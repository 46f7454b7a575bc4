"""A real HTTP/1.1 file server on 127.0.0.1 that counts what it serves and injects faults.

It stands in for conda-forge (or any mirror) in tests, demos and benchmarks.
Files under ``root`` are served at the same relative path under the server's
URL (``GET /conda-forge/linux-64/x.conda`` -> ``root/conda-forge/linux-64/x.conda``),
optionally below a ``url_prefix``. It speaks HTTP/1.1 with keep-alive and
handles many clients at once (a thread per connection), and supports ``GET``,
``HEAD``, single byte ``Range`` requests (``206``, ``416``), ``If-Range``,
``If-None-Match`` (``304``), ``Content-Length``, ``ETag`` and ``Last-Modified``.
Whole files are sent with ``sendfile(2)``.

Every request is logged (:class:`RequestRecord`): method, path, status, body
bytes sent, the ``Range`` asked for, the fault applied and the request headers.
Body bytes are counted *before* they are written, so once a client has read a
response, :attr:`UpstreamServer.bytes_sent` and the log already include it.

Faults (:meth:`UpstreamServer.fault`) are set at run time for the paths that
match a glob pattern, optionally for a number of requests only:

=============  ======================================================================
kind           effect (parameters)
=============  ======================================================================
``status``     answer with another status, e.g. 500/503/404 (``code=500``, ``headers``)
``delay``      wait before answering, then answer normally (``seconds``)
``reset``      reset the TCP connection (RST): before the response (``after=None``)
               or after the headers and ``after`` bytes of the body
``truncate``   send the full ``Content-Length``, then close after ``after`` body bytes
               (default: half the body)
``wrong_bytes`` send the right length with ``nbytes`` bytes flipped (XOR 0xFF) from
               offset ``at`` of the body (default: its middle)
``slow``       throttle the body to ``rate`` bytes per second
``stall``      send ``after`` body bytes, send nothing for ``seconds``, then the rest
=============  ======================================================================

``truncate``, ``wrong_bytes``, ``slow`` and ``stall`` act on (and are used up by) ``GET``
requests that have a body to send (200/206); ``status``, ``delay`` and
``reset`` act on any request that matches. Only the first matching fault that
has uses left applies to a request.

Example::

    with UpstreamServer(channel_root) as srv:
        srv.fault("*/hello-*.conda", "truncate", after=100, times=1)
        httpx.get(srv.url + "/conda-forge/noarch/repodata.json")
        assert srv.count("/conda-forge/noarch/repodata.json") == 1

Command line (for benchmarks)::

    python -m pixicache.testing.server ROOT [--port P] [--host H] [--prefix /mirror]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import email.utils
import fnmatch
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from pixicache.httputil import parse_range

__all__ = ["FAULT_KINDS", "Fault", "RequestRecord", "UpstreamServer", "main"]

FAULT_KINDS = ("status", "delay", "reset", "truncate", "wrong_bytes", "slow", "stall")
"""The fault kinds :meth:`UpstreamServer.fault` accepts."""

_BODY_FAULTS = frozenset({"truncate", "wrong_bytes", "slow", "stall"})
_FAULT_PARAMS: dict[str, frozenset[str]] = {
    "status": frozenset({"code", "headers", "body"}),
    "delay": frozenset({"seconds"}),
    "reset": frozenset({"after"}),
    "truncate": frozenset({"after"}),
    "wrong_bytes": frozenset({"at", "nbytes"}),
    "slow": frozenset({"rate"}),
    "stall": frozenset({"after", "seconds"}),
}
_SENDFILE_CHUNK = 16 << 20
_COPY_CHUNK = 1 << 20


@dataclass
class Fault:
    """A fault registered with :meth:`UpstreamServer.fault`.

    Attributes:
        pattern: glob matched against the request path (``fnmatch`` rules, so
            ``*`` also matches ``/``).
        kind: one of :data:`FAULT_KINDS`.
        params: the kind's parameters.
        times: how many requests it applies to (``None``: all of them).
        methods: the methods it applies to (``None``: see the module doc).
        applied: how many requests it has been applied to so far.
    """

    pattern: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    times: int | None = None
    methods: frozenset[str] | None = None
    applied: int = 0

    @property
    def exhausted(self) -> bool:
        """True once it has been applied ``times`` times."""
        return self.times is not None and self.applied >= self.times

    def matches(self, method: str, path: str, has_body: bool) -> bool:
        """Whether this fault applies to a request (ignoring its remaining uses)."""
        if self.methods is not None:
            if method not in self.methods:
                return False
        elif self.kind in _BODY_FAULTS and method != "GET":
            return False
        if self.kind in _BODY_FAULTS and not has_body:
            return False
        return fnmatch.fnmatchcase(path, self.pattern)


@dataclass
class RequestRecord:
    """One request as the server saw it.

    Attributes:
        method: ``GET``, ``HEAD``...
        path: the URL path (percent-decoded, without query string).
        status: the status sent (``None`` if the connection was reset first).
        bytes_sent: body bytes written (headers not counted).
        range: the ``Range`` header, if any.
        fault: the kind of fault applied, if any.
        headers: the request headers (names in lower case).
        started: ``time.time()`` when the request line was read.
        finished: ``time.time()`` when the response ended (``None`` while running).
        complete: True if the whole response body was sent.
    """

    method: str
    path: str
    status: int | None = None
    bytes_sent: int = 0
    range: str | None = None
    fault: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    started: float = 0.0
    finished: float | None = None
    complete: bool = False


class _Abort(Exception):
    """Ends the handling of a connection without a response (after a reset/truncate)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, addr: tuple[str, int], owner: UpstreamServer) -> None:
        self.owner = owner
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Client disconnects are expected in fault tests; report anything else.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, _Abort, TimeoutError, OSError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pixicache-test-upstream/1"
    timeout = 120
    server: _Server

    # -- plumbing ----------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.owner._track(self.connection, add=False)

    def handle(self) -> None:
        with contextlib.suppress(_Abort, ConnectionError, TimeoutError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.owner.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    # -- request handling --------------------------------------------------------------------

    def _serve(self, head: bool) -> None:
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path)
        rec = owner._begin(
            self.command, path, dict((k.lower(), v) for k, v in self.headers.items())
        )
        try:
            self._respond(rec, path, head)
        finally:
            owner._end(rec)

    def _respond(self, rec: RequestRecord, path: str, head: bool) -> None:
        owner = self.server.owner
        file = owner._resolve(path, self.headers.get("Accept"))
        st = file.stat() if file is not None else None
        fault = owner._take_fault(self.command, path, has_body=st is not None and not head)
        if fault is not None:
            rec.fault = fault.kind
            if fault.kind == "delay":
                owner._stopping.wait(float(fault.params["seconds"]))
            elif fault.kind == "status":
                self._send_status(rec, fault)
                return
            elif fault.kind == "reset" and (
                fault.params.get("after") is None or st is None or head
            ):
                self._reset()
        if st is None or file is None:
            self._send_simple(rec, HTTPStatus.NOT_FOUND, b"not found\n")
            return
        size = st.st_size
        etag = f'"{st.st_mtime_ns:x}-{size:x}"'
        last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
        if self.headers.get("If-None-Match") == etag:
            rec.status = 304
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        range_header = self.headers.get("Range")
        rec.range = range_header
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range not in (etag, last_modified):
            range_header = None
        span = parse_range(range_header, size)
        if span == "unsatisfiable":
            rec.status = 416
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = span if isinstance(span, tuple) else (0, size - 1)
        length = end - start + 1 if size else 0
        rec.status = 206 if isinstance(span, tuple) else 200
        self.send_response(rec.status)
        self.send_header("Content-Type", _content_type(str(file)))
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", last_modified)
        if rec.status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            rec.complete = True
            return
        with open(file, "rb") as fh:
            if fault is None or fault.kind == "delay":
                self._sendfile(rec, fh, start, length)
                rec.complete = True
                return
            self._send_faulty(rec, fh, start, length, fault)

    def _send_faulty(
        self, rec: RequestRecord, fh: IO[bytes], start: int, length: int, fault: Fault
    ) -> None:
        kind = fault.kind
        if kind in ("truncate", "reset"):
            after = fault.params.get("after")
            limit = min(length, length // 2 if after is None else int(after))
            self._copy(rec, fh, start, limit)
            if kind == "reset":
                self._reset()
            self.close_connection = True
            raise _Abort
        if kind == "slow":
            self._copy(rec, fh, start, length, rate=float(fault.params["rate"]))
        elif kind == "stall":
            after = min(length, int(fault.params["after"]))
            self._copy(rec, fh, start, after)
            if self.server.owner._stopping.wait(float(fault.params["seconds"])):
                raise _Abort
            self._copy(rec, fh, start + after, length - after)
        else:  # wrong_bytes
            at = fault.params.get("at")
            at = length // 2 if at is None else int(at)
            nbytes = int(fault.params.get("nbytes", 1))
            self._copy(rec, fh, start, length, flip=(at, at + nbytes))
        rec.complete = True

    # -- writing -----------------------------------------------------------------------------

    def _send_status(self, rec: RequestRecord, fault: Fault) -> None:
        code = int(fault.params.get("code", 500))
        body = fault.params.get("body")
        if body is None:
            body = f"injected fault: {code}\n".encode()
        elif isinstance(body, str):
            body = body.encode()
        self._send_simple(rec, code, body, extra=fault.params.get("headers") or {})

    def _send_simple(
        self, rec: RequestRecord, code: int, body: bytes, extra: dict[str, str] | None = None
    ) -> None:
        rec.status = int(code)
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, str(value))
        self.end_headers()
        if self.command != "HEAD":
            self._write(rec, body)
        rec.complete = True

    def _write(self, rec: RequestRecord, data: bytes) -> None:
        owner = self.server.owner
        owner._account(rec, len(data))
        try:
            self.connection.sendall(data)
        except OSError:
            owner._account(rec, -len(data))
            raise

    def _sendfile(self, rec: RequestRecord, fh: IO[bytes], start: int, length: int) -> None:
        owner = self.server.owner
        offset, end = start, start + length
        while offset < end:
            count = min(_SENDFILE_CHUNK, end - offset)
            owner._account(rec, count)
            sent = 0
            try:
                sent = self.connection.sendfile(fh, offset, count)
            finally:
                if sent != count:
                    owner._account(rec, sent - count)
            if sent == 0:
                raise ConnectionError("client went away")
            offset += sent

    def _copy(
        self,
        rec: RequestRecord,
        fh: IO[bytes],
        start: int,
        length: int,
        rate: float | None = None,
        flip: tuple[int, int] | None = None,
    ) -> None:
        """Send ``length`` bytes from ``start``: optionally throttled or with bytes flipped."""
        fh.seek(start)
        chunk = _COPY_CHUNK if rate is None else max(1, min(_COPY_CHUNK, int(rate / 20)))
        began = time.monotonic()
        done = 0
        while done < length:
            data = fh.read(min(chunk, length - done))
            if not data:
                raise ConnectionError("file shrank while serving it")
            if flip is not None:
                data = _flip(data, done, flip)
            if rate is not None:
                wait = began + done / rate - time.monotonic()
                if wait > 0 and self.server.owner._stopping.wait(wait):
                    raise _Abort
            self._write(rec, data)
            done += len(data)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0, then close)."""
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            sock.close()
        self.close_connection = True
        raise _Abort


def _flip(data: bytes, offset: int, span: tuple[int, int]) -> bytes:
    lo, hi = max(span[0], offset), min(span[1], offset + len(data))
    if lo >= hi:
        return data
    buf = bytearray(data)
    for i in range(lo - offset, hi - offset):
        buf[i] ^= 0xFF
    return bytes(buf)


PEP691 = "application/vnd.pypi.simple.v1+json"


def _content_type(path: str) -> str:
    if path.endswith("index.json"):
        return PEP691
    if path.endswith(".json"):
        return "application/json"
    if path.endswith(".html"):
        return "text/html; charset=utf-8"
    return "application/octet-stream"


class UpstreamServer:
    """Serve a directory over HTTP on 127.0.0.1 in a background thread.

    Args:
        root: the directory to serve.
        host: the address to bind (default ``127.0.0.1``).
        port: the port (default 0: an ephemeral port; see :attr:`port`).
        url_prefix: a path the files are served under (``"/mirror"`` serves
            ``root/x`` at ``/mirror/x``); default ``""``.
        verbose: log each request to stderr.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        url_prefix: str = "",
        verbose: bool = False,
    ) -> None:
        self.root = Path(root).resolve()
        self.host = host
        self._port = port
        self.url_prefix = "/" + url_prefix.strip("/") if url_prefix.strip("/") else ""
        self.verbose = verbose
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._faults: list[Fault] = []
        self._log: list[RequestRecord] = []
        self._bytes = 0
        self._in_flight = 0
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> UpstreamServer:
        """Bind and start serving; returns ``self``."""
        if self._httpd is not None:
            return self
        if not self.root.is_dir():
            raise FileNotFoundError(f"cannot serve {self.root}: not a directory")
        self._stopping.clear()
        self._httpd = _Server((self.host, self._port), self)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"upstream-server-{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open connections (running responses end)."""
        httpd = self._httpd
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> UpstreamServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port (known once started)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` plus the URL prefix, without a trailing slash."""
        return f"http://{self.host}:{self._port}{self.url_prefix}"

    def channel_url(self, name: str = "conda-forge") -> str:
        """The URL of a channel directory under the root (``<url>/<name>``)."""
        return f"{self.url}/{name.strip('/')}"

    # -- faults ------------------------------------------------------------------------------

    def fault(
        self,
        pattern: str,
        kind: str,
        *,
        times: int | None = None,
        methods: Iterable[str] | None = None,
        **params: Any,
    ) -> Fault:
        """Inject a fault into the requests whose path matches ``pattern``.

        Args:
            pattern: a glob on the URL path, e.g. ``"*/hello-*.conda"``.
            kind: one of :data:`FAULT_KINDS` (see the module doc for each one's parameters).
            times: apply it to this many requests, then stop (``None``: always).
            methods: restrict to these methods (default: ``GET`` for body faults,
                every method for the others).
            **params: the kind's parameters (``code``, ``seconds``, ``after``,
                ``at``, ``nbytes``, ``rate``, ``headers``, ``body``).

        Returns:
            The :class:`Fault`; its ``applied`` attribute counts its uses.

        Raises:
            ValueError: for an unknown kind, an unknown or missing parameter.
        """
        if kind not in _FAULT_PARAMS:
            raise ValueError(f"unknown fault kind {kind!r}; choose one of {', '.join(FAULT_KINDS)}")
        unknown = set(params) - _FAULT_PARAMS[kind]
        if unknown:
            raise ValueError(f"fault {kind!r} takes no parameter(s) {sorted(unknown)}")
        if kind == "slow" and float(params.get("rate", 0)) <= 0:
            raise ValueError("fault 'slow' needs rate=<bytes per second> > 0")
        if kind == "delay" and "seconds" not in params:
            raise ValueError("fault 'delay' needs seconds=<float>")
        if kind == "stall" and not {"after", "seconds"} <= set(params):
            raise ValueError("fault 'stall' needs after=<bytes> and seconds=<float>")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 (or None for always)")
        meths = frozenset(m.upper() for m in methods) if methods is not None else None
        fault = Fault(pattern, kind, dict(params), times, meths)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        """The registered faults (including exhausted ones), in order."""
        with self._lock:
            return list(self._faults)

    # -- the log -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the request log, oldest first."""
        with self._lock:
            return [copy.copy(r) for r in self._log]

    def count(
        self, path: str = "*", *, method: str | None = None, status: int | None = None
    ) -> int:
        """How many logged requests have this path (exact, or a glob), method and status."""
        return sum(1 for _ in self._select(path, method, status))

    def counts(self, *, method: str | None = None) -> dict[str, int]:
        """Requests per path (optionally of one method), as a dict."""
        out: dict[str, int] = {}
        for r in self._select("*", method, None):
            out[r.path] = out.get(r.path, 0) + 1
        return out

    def bytes_for(self, path: str = "*", *, method: str | None = None) -> int:
        """Body bytes sent for the requests matching ``path`` (exact or glob)."""
        return sum(r.bytes_sent for r in self._select(path, method, None))

    @property
    def bytes_sent(self) -> int:
        """Body bytes sent since start (or :meth:`reset_log`), all requests together."""
        with self._lock:
            return self._bytes

    def reset_log(self) -> None:
        """Forget the logged requests and byte counts (faults stay)."""
        with self._lock:
            self._log.clear()
            self._bytes = 0

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no request is being handled; False if ``timeout`` passed first.

        Use it before reading the log when a client may have given up on a
        response that the server is still writing (after a fault, say).
        """
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _select(self, path: str, method: str | None, status: int | None) -> Iterator[RequestRecord]:
        with self._lock:
            records = list(self._log)
        for r in records:
            if method is not None and r.method != method.upper():
                continue
            if status is not None and r.status != status:
                continue
            if r.path == path or fnmatch.fnmatchcase(r.path, path):
                yield r

    # -- used by the handler -----------------------------------------------------------------

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _begin(self, method: str, path: str, headers: dict[str, str]) -> RequestRecord:
        rec = RequestRecord(method, path, headers=headers, started=time.time())
        with self._lock:
            self._log.append(rec)
            self._in_flight += 1
        return rec

    def _end(self, rec: RequestRecord) -> None:
        with self._idle:
            rec.finished = time.time()
            self._in_flight -= 1
            self._idle.notify_all()
        if self.verbose:
            print(
                f"{rec.method} {rec.path} {rec.status} {rec.bytes_sent}"
                + (f" range={rec.range}" if rec.range else "")
                + (f" fault={rec.fault}" if rec.fault else ""),
                file=sys.stderr,
                flush=True,
            )

    def _account(self, rec: RequestRecord, nbytes: int) -> None:
        with self._lock:
            rec.bytes_sent += nbytes
            self._bytes += nbytes

    def _take_fault(self, method: str, path: str, has_body: bool) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if not fault.exhausted and fault.matches(method, path, has_body):
                    fault.applied += 1
                    return fault
        return None

    def _resolve(self, path: str, accept: str | None = None) -> Path | None:
        """The file a URL path names, or None (outside the prefix, a directory, missing)."""
        if self.url_prefix:
            if not path.startswith(self.url_prefix + "/"):
                return None
            path = path[len(self.url_prefix) :]
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") or "\\" in p for p in parts):
            return None
        candidate = self.root.joinpath(*parts)
        if candidate.is_dir() and path.endswith("/"):
            # a directory index (a PEP 503/691 project page): JSON when asked for
            wants_json = PEP691 in (accept or "")
            page = candidate / ("index.json" if wants_json else "index.html")
            return page if page.is_file() else None
        return candidate if candidate.is_file() else None


def main(argv: list[str] | None = None) -> int:
    """``python -m pixicache.testing.server ROOT [--port P]``: serve until SIGINT/SIGTERM.

    Prints the server's URL on the first line of stdout, and a summary
    (requests, bytes) on stderr when stopped.
    """
    parser = argparse.ArgumentParser(
        prog="python -m pixicache.testing.server",
        description="Serve a directory (e.g. a conda channel tree) over HTTP/1.1 with Range support.",
    )
    parser.add_argument("root", type=Path, help="directory to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: an ephemeral one)")
    parser.add_argument("--prefix", default="", help="URL path to serve the root under")
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        srv = UpstreamServer(
            args.root, host=args.host, port=args.port, url_prefix=args.prefix, verbose=args.verbose
        ).start()
    except (OSError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(srv.url, flush=True)
    try:
        stop.wait()
    finally:
        srv.stop()
        print(
            f"served {len(srv.requests)} requests, {srv.bytes_sent} body bytes",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


@contextlib.contextmanager
def mirrored_upstream(
    root: Path, cache_dir: Path, channel: str = "conda-forge"
) -> Iterator[tuple[str, UpstreamServer]]:
    """A counting upstream serving ``root`` with a real ``pixicache serve`` mirror in front
    (cold, its store at ``cache_dir``): yields ``(mirror URL, upstream)``."""
    from pixicache.serve import ServeConfig, Upstream, start_background

    with UpstreamServer(root) as upstream:
        cfg = ServeConfig(
            cache_dir=cache_dir,
            port=0,
            upstreams=[Upstream.make(channel, f"{upstream.url}/{channel}")],
            log_requests=False,
        )
        with start_background(cfg) as srv:
            yield srv.url.rstrip("/"), upstream
