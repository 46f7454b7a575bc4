"""Running the server: in the foreground (the CLI, with graceful SIGTERM) or on a
background thread (tests, ``pixicache demo``, benchmarks).

The HTTP layer is aiohttp's low-level server (``web.Server``): one asyncio
loop, HTTP/1.1 keep-alive, bodies streamed with flat memory
(``StreamResponse``), stored blobs sent with ``sendfile(2)`` (zero-copy, as
nginx does), with the front path (:mod:`pixicache.serve.front`) as every
connection's first stop. On top of it this module adds what a public-facing
mirror needs and aiohttp leaves to the application:

* a bound on open connections, counted at the front (beyond it a connection
  gets a ``503`` and is closed at once);
* a header timeout: aiohttp's keep-alive timer, armed at connect and after
  each response, closes a connection that has not delivered a complete
  request in ``header_timeout`` seconds (slowloris);
* header size limits (``max_field_size``, ``max_headers``);
* graceful shutdown: stop listening, let running responses finish for up to
  ``shutdown_timeout`` seconds, then cancel what is left;
* in a server process of its own (:func:`run_server`), glibc's ``malloc`` set to
  keep freed body buffers for reuse (:func:`keep_buffers_mapped`) and the open-file
  limit raised to fit ``max_connections`` (:func:`raise_fd_limit`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
import threading
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from pixicache.errors import PixicacheError
from pixicache.serve.app import ServeApp
from pixicache.serve.balance import BalancedAcceptor, SharedListener
from pixicache.serve.config import ServeConfig
from pixicache.serve.front import FrontDoor, FrontProtocol
from pixicache.serve.metrics import Metrics
from pixicache.store import Store

access_log = logging.getLogger("pixicache.serve.access")

log = logging.getLogger("pixicache.serve")

#: the listening socket's queue of connections not yet accepted
BACKLOG = 1024
#: open files a server needs besides two per connection (blob directories, blobs being
#: sent, the lock files pins keep open (:data:`~pixicache.serve.blobs.LOCK_FILES`), the
#: index, fills' partial files, upstream connections)
FD_RESERVE = 1024

class _QuietHandler(RequestHandler):
    """aiohttp's connection handler, answering a request its parser rejects with a short
    plain 400 (never echoing the request's bytes back) and one access-log line, not a
    multi-line traceback; the ``refused{reason="bad_request"}`` metric counts them."""

    metrics: Metrics | None = None

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        what = type(exc).__name__ if exc is not None else "bad request"
        first = str(getattr(exc, "message", "") or "").strip().splitlines()
        detail = "".join(c if c.isprintable() else "?" for c in (first[0] if first else ""))[:80]
        access_log.info("%s - - %d %s: %s", request.remote, status, what, detail)
        if self.metrics is not None:
            self.metrics.refused.labels("bad_request").inc()
        resp = web.Response(status=status, text=f"{status} bad request\n")
        resp.force_close()
        return resp


class _LimitedServer(web.Server):
    """aiohttp's low-level server behind the front path (:mod:`pixicache.serve.front`):
    the listening socket's protocol factory is the :class:`FrontDoor`, which counts
    every connection against ``max_connections`` and hands connections to
    :meth:`handler` (aiohttp's, with the quiet 400s)."""

    def __init__(self, handler: Any, *, app: ServeApp, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._metrics = app.metrics
        self.front = FrontDoor(
            app, self.handler, lambda: len(self._connections), enabled=app.config.fast_hits
        )

    def __call__(self) -> FrontProtocol:  # type: ignore[override]
        return self.front()

    def handler(self) -> RequestHandler:
        """aiohttp's handler for a connection the front path hands over."""
        proto = _QuietHandler(self, loop=self._loop, **self._kwargs)
        proto.metrics = self._metrics
        return proto

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.front.update_gauge()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.front.update_gauge()

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        self.front.close_idle()

    async def shutdown(self, timeout: float | None = None) -> None:
        await asyncio.gather(super().shutdown(timeout), self.front.shutdown(timeout))


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class _SharedSite(web.BaseSite):
    """aiohttp's site for a worker of ``serve --workers N``: the parent's listening
    socket, accepted from by a :class:`~pixicache.serve.balance.BalancedAcceptor`."""

    __slots__ = ("_listener",)

    def __init__(self, runner: web.BaseRunner, listener: SharedListener) -> None:
        super().__init__(runner)
        self._listener = listener

    @property
    def name(self) -> str:
        host, port = self._listener.sock.getsockname()[:2]
        return f"http://{_url_host(host)}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert isinstance(server, _LimitedServer)
        lis = self._listener
        acceptor = BalancedAcceptor(lis.sock, lis.share, lis.index, server.front.count, server)
        server.front.on_count = acceptor.publish
        acceptor.start()
        self._server = acceptor  # type: ignore[assignment]  # close() and sockets, as asyncio's


class ServeServer:
    """One server on the running event loop: :meth:`start`, then :meth:`stop`.

    ``listener``: a worker's of ``serve --workers N`` (the socket shared with the other
    workers, :mod:`pixicache.serve.balance`); without it the server binds its own."""

    def __init__(
        self, config: ServeConfig, store: Store | None = None, listener: SharedListener | None = None
    ) -> None:
        self.config = config
        self.listener = listener
        self.app = ServeApp(config, store)
        self.front: FrontDoor | None = None
        self._runner: web.ServerRunner | None = None
        self.port = 0
        self.url = ""

    async def start(self) -> str:
        """Bind and serve; returns the base URL (``http://host:port``)."""
        cfg = self.config
        await self.app.startup()
        server = _LimitedServer(
            self.app.handle,
            app=self.app,
            keepalive_timeout=cfg.header_timeout,
            max_field_size=cfg.max_header_size,
            max_headers=100,
            access_log=None,
            handler_cancellation=False,
        )
        self.front = server.front
        self._runner = web.ServerRunner(server, shutdown_timeout=cfg.shutdown_timeout)
        await self._runner.setup()
        site: web.BaseSite
        if self.listener is not None:
            site = _SharedSite(self._runner, self.listener)
        else:
            site = web.TCPSite(self._runner, cfg.host, cfg.port, backlog=BACKLOG, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            await self.app.shutdown()
            raise
        self.port = int(self._runner.addresses[0][1])
        self.url = f"http://{_url_host(cfg.host)}:{self.port}"
        return self.url

    async def stop(self) -> None:
        """Refuse new connections, finish running responses (up to the shutdown timeout)."""
        self.app.draining = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.app.shutdown()


class ServeHandle:
    """A server running on a background thread; a context manager.

    Attributes:
        url: ``http://127.0.0.1:PORT``.
        port: the bound port.
        app: the :class:`~pixicache.serve.app.ServeApp` (metrics, store, fills).
        front: the :class:`~pixicache.serve.front.FrontDoor` (``answered``,
            ``handed_off``).
    """

    def __init__(
        self, server: ServeServer, loop: asyncio.AbstractEventLoop, thread: threading.Thread
    ) -> None:
        self._server = server
        self._loop = loop
        self._thread = thread
        self.url = server.url
        self.port = server.port
        self.app = server.app
        self.front = server.front
        self.config = server.config

    def call(self, coro: Any, timeout: float | None = 60) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def wait_idle(self, timeout: float = 60) -> None:
        """Block until no upstream download is in progress (every fill committed or failed)."""
        self.call(self.app.fills.wait_idle(), timeout)

    def stop(self, timeout: float | None = 60) -> None:
        """Graceful stop (as on SIGTERM); idempotent."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self.call(self._server.stop(), timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> ServeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_background(
    config: ServeConfig, store: Store | None = None, *, timeout: float = 30
) -> ServeHandle:
    """Start a server on its own thread and event loop; returns once it listens.

    Example::

        cfg = ServeConfig(cache_dir=tmp / "store", port=0,
                          upstreams=[Upstream.make("conda-forge", upstream.channel_url())])
        with start_background(cfg) as srv:
            httpx.get(srv.url + "/conda-forge/linux-64/x-1-0.conda")

    Raises whatever binding or opening the store raised.
    """
    box: dict[str, Any] = {}
    started = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            server = ServeServer(config, store)
            loop.run_until_complete(server.start())
        except BaseException as exc:
            box["error"] = exc
            started.set()
            loop.close()
            return
        box["server"], box["loop"] = server, loop
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name="pixicache-serve", daemon=True)
    thread.start()
    if not started.wait(timeout):
        raise TimeoutError(f"the server did not start within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return ServeHandle(box["server"], box["loop"], thread)


#: glibc's ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_buffers_mapped() -> bool:
    """Make glibc's ``malloc`` keep freed body buffers for reuse (this process only;
    returns whether it could: glibc, ``mallopt`` accepted both settings).

    A fill's buffers are a few MiB each (a receive of up to ``LOW_WATER``, the HTTP
    parser's copy of it), allocated and freed for every batch. By default glibc serves
    blocks that large with a fresh ``mmap`` (until its adaptive threshold has grown) and
    hands freed heap back to the kernel (trim): every batch then faults its pages in
    again, ~60,000 page faults and their zeroing per GiB filled. Blocks up to 8 MiB
    from the heap and a trim threshold of 128 MiB (twice the fills' ``BUFFER_BUDGET``,
    so what the heap keeps is bounded by what fills may hold anyway) reuse the same
    pages instead: ~5,000 faults per GiB, and 0.2 system CPU-s per GiB less
    (``benchmarks/serve.py --only cold``).
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 8 << 20)) & bool(mallopt(_M_TRIM_THRESHOLD, 128 << 20))


def raise_fd_limit(want: int) -> int:
    """Raise this process's soft limit on open files towards ``want`` (at most the hard
    limit, as Go's runtime does at start); returns the soft limit now in force.

    Each connection on the front path holds two descriptors (its socket and the
    duplicate it sends with), and the server keeps blob directories and open blobs
    besides, so the usual soft limit of 1024 would refuse connections (``EMFILE``,
    accepting pauses) long before the default ``max_connections``. The event loop
    uses epoll, so descriptors above 1023 are fine here."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
            return soft
        return target
    return soft


def run_server(config: ServeConfig, listener: SharedListener | None = None) -> None:
    """Serve in the foreground until SIGTERM/SIGINT, then shut down gracefully; with
    ``config.workers`` > 1, in that many processes on one port (:func:`_run_workers`;
    ``listener`` is set in each of them).
    The process's ``malloc`` keeps body buffers for reuse (:func:`keep_buffers_mapped`),
    and its open-file limit fits ``max_connections`` (:func:`raise_fd_limit`)."""
    keep_buffers_mapped()
    if listener is None:  # a worker inherits the limit its parent raised (and warned of)
        need = 2 * config.max_connections + FD_RESERVE
        limit = raise_fd_limit(need)
        if limit < need:
            log.warning(
                "the open-file limit (%d) is below what %d connections need (%d): raise it "
                "(ulimit -n, or LimitNOFILE= in a systemd unit) or lower --max-connections",
                limit, config.max_connections, need,
            )  # fmt: skip
    if config.workers > 1:
        _run_workers(config)
        return

    async def main() -> None:
        server = ServeServer(config, listener=listener)
        await server.start()
        names = ", ".join(f"{u.name}={u.url}" for u in config.upstreams)
        worker = f"; worker pid {os.getpid()}" if listener is not None else ""
        log.info(
            "listening on %s (store %s; upstreams %s%s)",
            server.url, server.app.store.root, names, worker,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info(
            "stopping: no new connections; finishing running responses (up to %g s)",
            config.shutdown_timeout,
        )
        await server.stop()
        log.info("stopped")

    asyncio.run(main())


def _run_workers(config: ServeConfig) -> None:
    """``config.workers`` server processes on one port: the listening socket is made
    here (so ``--port 0`` works and a port in use is one message), each worker is forked
    before any thread or event loop exists, inherits it and takes its share of the
    connections (:mod:`pixicache.serve.balance`), and SIGTERM/SIGINT are passed on; the
    first worker to exit with an error ends all."""
    Store(config.cache_dir)  # a store that cannot be used is one message, here, not N
    shared = SharedListener.bind(config.host, config.port, config.workers, BACKLOG)
    worker_config = config.replace(port=shared.sock.getsockname()[1], workers=1)
    children: list[int] = []
    for index in range(config.workers):
        pid = os.fork()
        if pid == 0:  # a worker
            code = 0
            try:
                run_server(worker_config, shared.worker(index))
            except PixicacheError as exc:  # one line and its documented code, never a traceback
                log.error("worker %d: %s", os.getpid(), exc)
                code = exc.exit_code
            except BaseException:
                log.exception("worker %d failed (internal error)", os.getpid())
                code = 1
            os._exit(code)
        children.append(pid)
    shared.sock.close()  # the workers hold it

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = 0
    while children:
        pid, status = os.wait()
        if pid in children:
            children.remove(pid)
            exit_code = os.waitstatus_to_exitcode(status)
            if exit_code not in (0, -signal.SIGTERM, -signal.SIGINT) and not code:
                code = exit_code if exit_code > 0 else 1  # the first failure's own code
                forward(signal.SIGTERM, None)
    if code:
        raise SystemExit(code)
