"""Single-flight fills: one upstream download per missing artifact, streamed to every waiter.

A :class:`Fill` is one upstream transfer into the store. The first request
for a missing artifact starts it (a *miss*); requests for the same artifact
while it runs join it (*coalesced*). The fill writes a partial file; each
waiter tails that file up to the fill's current offset (``sendfile`` from the
page cache), waking when the fill advances, so waiters get bytes as they
arrive and a waiter that joins late starts from the first byte. Memory stays
flat: at most two batches (:data:`BATCH`) per fill, and :data:`BUFFER_BUDGET`
bytes for all fills together, wait between the network and the disk.

Nothing unverified looks complete: a waiter holds back the last byte of what
it sends until the fill's digest is verified; if the fill fails, the waiter's
connection is aborted (or it gets a 502/504/507 if no body byte was sent).
Fills run as their own tasks: a waiter that disconnects never cancels one.

The fill holds the store's per-artifact ``flock`` (taken in a worker thread),
so agents sharing the server's store coordinate with it: if one is already
downloading the artifact the fill waits for it and then serves the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import aiohttp

from pixicache.errors import StoreError, StoreFull
from pixicache.httputil import content_range_start
from pixicache.serve.fetching import UpstreamRefused, upstream_get
from pixicache.serve.metrics import Metrics
from pixicache.serve.writer import FillWriter, fill_lock
from pixicache.store import Store
from pixicache.store.locking import FileLock, LockTimeout

log = logging.getLogger("pixicache.serve")

BATCH = 2 << 20
"""The most body bytes handed to the write-and-hash lane at once."""

LOW_WATER = 2 << 20
"""Bytes the kernel gathers on an upstream socket before the event loop is woken."""

FLUSH_S = 0.02
"""A batch waits at most this long for more bytes before it is handed on (streaming)."""

BUFFER_BUDGET = 64 << 20
"""Bytes all fills together hold in memory before they stop reading (flat RSS under a herd)."""

DISK_RESERVE = 16 << 20
"""Free space kept on the store's file system beyond a fill's announced size."""

USER_AGENT = "pixicache-serve"


MISMATCH_MEMORY = 60.0
"""Seconds a digest mismatch of (URL, expected digest) is remembered and answered."""


class FillFailed(Exception):
    """Why a fill did not produce a verified blob: the status waiters answer with.

    ``keep_partial`` says whether the partial bytes are worth resuming (an
    interrupted transfer of a known digest) or must go (bad bytes).
    """

    def __init__(
        self, status: int, message: str, *, reason: str = "", keep_partial: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason or str(status)
        self.keep_partial = keep_partial


class Fill:
    """One upstream transfer that requests wait on; all methods run on the event loop.

    ``state`` goes ``waiting`` → ``streaming`` → ``verified`` → ``committed``,
    or ends in ``failed``; ``present`` means another process committed the
    blob while this fill waited for the lock (waiters serve it as a hit).
    """

    def __init__(
        self, url: str, expected: str | None, upstream: str, *, by_url: list[str] | None = None
    ) -> None:
        self.url = url
        self.expected = expected
        self.upstream = upstream
        # a channel-path request: the blob of ``expected`` stands for ``url`` only if the
        # index maps the URL (or one of these variants: its aliases) to it; else
        # upstream's bytes for the URL are fetched and must have that digest (a client's
        # header never decides what a URL holds)
        self.by_url = by_url
        self.key = fill_key(url, expected)
        self.state = "waiting"
        self.total: int | None = None  # full size, when upstream announced it
        self.limit: int | None = None  # the most bytes the body may have (a known size)
        self.size: int | None = None  # the exact size the body must have, when known
        self.md5: str | None = None  # the MD5 it must have (a channel that pins no SHA-256)
        self.offset = 0  # bytes readable in the partial file
        self.digest: str | None = None
        self.error: FillFailed | None = None
        self.blob_path: Path | None = None
        self.read_fd: int | None = None
        self.readers = 0
        self.finished = False
        self.started = time.monotonic()
        self._ready = asyncio.Event()
        self._done = asyncio.Event()
        self._committed = asyncio.Event()
        self._progress = asyncio.Event()

    # -- state seen by waiters -------------------------------------------------------------
    @property
    def ok(self) -> bool:
        """The digest is verified (the bytes may be sent in full)."""
        return self.state in ("verified", "committed", "present")

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    async def wait_ready(self) -> None:
        """Until the body starts streaming, or the fill ended."""
        await self._ready.wait()

    async def wait_done(self) -> None:
        """Until the digest is verified, or the fill failed."""
        await self._done.wait()

    async def wait_committed(self) -> None:
        """Until the blob is in the store, or the fill failed."""
        await self._committed.wait()

    async def wait_change(self) -> None:
        """Until the fill advances or changes state (call right after checking it)."""
        await self._progress.wait()

    def acquire(self) -> None:
        """A waiter starts using the fill (keeps the partial file's fd open)."""
        self.readers += 1

    def release(self) -> None:
        self.readers -= 1
        self._close_if_unused()

    def reader(self) -> IO[bytes]:
        """A file object on the bytes so far (its own fd; valid after commit and eviction)."""
        assert self.read_fd is not None
        return os.fdopen(os.dup(self.read_fd), "rb", buffering=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "expected_sha256": self.expected,
            "state": self.state,
            "bytes": self.offset,
            "total": self.total,
            "waiters": self.readers,
            "seconds": round(time.monotonic() - self.started, 3),
        }

    # -- driven by the manager -------------------------------------------------------------
    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _advanced(self, future: asyncio.Future[int]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.offset = max(self.offset, future.result())
            self._notify()

    def _set_state(self, state: str) -> None:
        self.state = state
        if state != "waiting":
            self._ready.set()
        if state in ("verified", "committed", "present", "failed"):
            self._done.set()
        if state in ("committed", "present", "failed"):
            self._committed.set()
        self._notify()

    def _close_if_unused(self) -> None:
        if self.finished and self.readers <= 0 and self.read_fd is not None:
            fd, self.read_fd = self.read_fd, None
            os.close(fd)


def fill_key(url: str, expected: str | None) -> str:
    return f"sha256:{expected}" if expected else f"url:{url}"


def _buffered_before_error(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body bytes that arrived before the error that broke the body off (a
    connection closed short of Content-Length, a reset).

    aiohttp raises a body's error before it hands out what it had buffered ahead of
    it (the whole rest of the body when both came in one read, which a raised
    ``SO_RCVLOWAT`` makes likely). Those bytes are the body's, in order: kept, they
    let the resume start where the upstream stopped; the final digest check judges
    them with the rest. Read through the reader's own unchecked read (no public one
    exists); an aiohttp without it loses them, which only costs a longer resume.
    """
    read = getattr(content, "_read_nowait", None)
    if read is None:
        return b""
    try:
        return bytes(read(limit))
    except Exception:  # a reader in a state it cannot read from: nothing kept
        return b""


class _LowWater:
    """Ask the kernel to report the upstream socket readable only once enough bytes are
    there (``SO_RCVLOWAT``): what the link delivers in :data:`FLUSH_S` at the rate seen
    so far, between 64 KiB and :data:`LOW_WATER`. A link that delivers a few KB at a
    time then wakes the event loop once per batch, not once per packet train, and a
    slow one still streams (the first bytes are never held back long). Never more than
    what remains of a body of known length, so the last bytes of a keep-alive response
    are never waited for."""

    def __init__(self, resp: aiohttp.ClientResponse, total: int | None, start: int) -> None:
        self.sock = None
        self.total, self.start, self.set_to = total, start, 1
        self.t0 = time.monotonic()
        if total is None or not hasattr(socket, "SO_RCVLOWAT"):
            return
        transport = resp.connection.transport if resp.connection is not None else None
        self.sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is not None and isinstance(getattr(transport, "max_size", None), int):
            # asyncio reads at most 256 KiB per readiness: with the low-water mark at
            # 1 MiB that is four wake-ups per batch (and a receive window kept small)
            transport.max_size = max(transport.max_size, LOW_WATER)  # type: ignore[attr-defined]

    def update(self, content: aiohttp.StreamReader) -> None:
        if self.sock is None or self.total is None:
            return
        got = content.total_bytes
        left = self.total - self.start - got  # still in the kernel or on the wire
        rate = got / max(time.monotonic() - self.t0, 1e-3)
        want = max(1, min(LOW_WATER, max(64 << 10, int(rate * FLUSH_S)), left))
        if want != self.set_to:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                self.set_to = want
            except OSError:
                self.sock = None


class FillManager:
    """Starts fills, finds the one in progress for an artifact, and tracks them.

    Args:
        store: the store fills commit into.
        metrics: updated as fills progress.
        executor: runs the blocking store calls (write, hash, fsync, rename); a
            contended store lock is waited for in a pool of its own.
        session: returns the aiohttp client session for upstream requests.
        on_commit: called on the loop with (digest, size) after each commit.
        may_redirect: ``(upstream name, URL)`` → whether a redirect may be followed
            there (:func:`pixicache.serve.fetching.upstream_get`); default: never.
    """

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        executor: Executor,
        session: Callable[[], aiohttp.ClientSession],
        on_commit: Callable[[str, int], None] | None = None,
        may_redirect: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.store = store
        self.may_redirect = may_redirect or (lambda _upstream, _url: False)
        self.metrics = metrics
        self.executor = executor
        self._session = session
        self.on_commit = on_commit
        self.buffered = 0  # bytes read from upstreams, not yet written and hashed
        self._budget_room: asyncio.Event | None = None
        self._lock_pool = ThreadPoolExecutor(
            max_workers=32, thread_name_prefix="pixicache-serve-lock"
        )
        self._fills: dict[str, Fill] = {}
        self._by_url: dict[str, Fill] = {}
        # (url, expected) -> (when, how many times in a row, failure): upstream sent
        # bytes that contradict the digest (see recent_mismatch)
        self._bad: OrderedDict[str, tuple[float, int, FillFailed]] = OrderedDict()
        self._tasks: dict[asyncio.Task[None], Fill] = {}  # each running fill task and its fill
        self._idle: asyncio.Event | None = None
        self.full_until = 0.0  # monotonic time until which misses are refused (store full)
        self.full_backoff = 5.0
        self.full_message = ""

    # -- lookup ------------------------------------------------------------------------------
    def recent_mismatch(self, url: str, expected: str | None) -> FillFailed | None:
        """The digest failure of (``url``, ``expected``) when upstream sent wrong bytes for
        it twice in a row, the last time less than :data:`MISMATCH_MEMORY` seconds ago: a
        client whose stream was cut short asks again and is told why, and upstream is not
        asked again meanwhile. Once is not enough (a transient fault gets its retry)."""
        if not expected:
            return None
        key = fill_key(url, expected)
        hit = self._bad.get(key)
        if hit is None or hit[1] < 2:
            return None
        if time.monotonic() - hit[0] > MISMATCH_MEMORY:
            del self._bad[key]
            return None
        return hit[2]

    def find(self, url: str, expected: str | None) -> Fill | None:
        """The fill in progress that serves (``url``, ``expected``), if any.

        A request with an expected digest also joins a fill of the same URL
        started without one (its waiters check the final digest).
        """
        if expected:
            fill = self._fills.get(fill_key(url, expected))
            if fill is not None:
                return fill
        fill = self._by_url.get(url)
        if fill is not None and (expected is None or fill.expected in (None, expected)):
            return fill
        return None

    @property
    def in_flight(self) -> list[Fill]:
        return list(self._fills.values())

    def store_full(self) -> str | None:
        """Why misses are refused right now (the store filled up recently), or ``None``."""
        if time.monotonic() < self.full_until:
            return self.full_message
        return None

    def start(
        self,
        url: str,
        expected: str | None,
        upstream: str,
        *,
        by_url: list[str] | None = None,
        limit: int | None = None,
        size: int | None = None,
        md5: str | None = None,
    ) -> Fill:
        """Start filling (``url``, ``expected``) in a task of its own (``by_url``: see
        :class:`Fill`; ``limit``: the most bytes its body may have; ``size``, ``md5``:
        what the channel's record says the body is)."""
        fill = Fill(url, expected, upstream, by_url=by_url)
        fill.limit = min(limit, size) if (limit is not None and size is not None) else (size or limit)
        fill.size, fill.md5 = size, md5
        self._fills[fill.key] = fill
        self._by_url[url] = fill
        if self._idle is not None:
            self._idle.clear()
        self.metrics.fills_in_flight.inc()
        task = asyncio.get_running_loop().create_task(self._run(fill))
        self._tasks[task] = fill
        task.add_done_callback(self._forget_task)
        return fill

    def _forget_task(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task, None)

    async def wait_idle(self) -> None:
        """Until no fill is in progress."""
        if self._idle is None:
            self._idle = asyncio.Event()
        if not self._fills:
            self._idle.set()
        await self._idle.wait()

    async def close(self, grace: float = 10.0) -> None:
        """Cancel the fills still downloading (shutdown); one whose bytes are all in and
        verified finishes its commit first (up to ``grace`` seconds): a client may
        already have every byte of it, and a restart should not fetch it again."""
        finishing = [task for task, fill in self._tasks.items() if fill.ok]
        if finishing:
            await asyncio.wait(finishing, timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self._lock_pool.shutdown(wait=True)

    def _budget(self) -> asyncio.Event:
        if self._budget_room is None:
            self._budget_room = asyncio.Event()
            self._budget_room.set()
        return self._budget_room

    async def _take(self, lock: FileLock) -> None:
        """Take a fill's store lock: at once if free, else in a thread (an agent on this
        node is downloading the same artifact), polling so that shutdown never hangs."""
        lock.timeout = 0
        try:
            lock.acquire()
            return
        except LockTimeout:
            pass
        stop = threading.Event()

        def wait() -> None:
            lock.timeout = 0.5
            while True:
                try:
                    lock.acquire()
                    return
                except LockTimeout:
                    if stop.is_set():
                        raise

        fut = asyncio.get_running_loop().run_in_executor(self._lock_pool, wait)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            stop.set()
            fut.add_done_callback(lambda f: lock.release() if not f.exception() else None)
            raise

    # -- one fill ----------------------------------------------------------------------------
    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _bad_bytes(self, what: str) -> FillFailed:
        """The failure of a body that is not what it must be (counted as ``digest``)."""
        self.metrics.upstream_errors.labels("digest").inc()
        return FillFailed(
            502, f"{what}: the bytes were discarded and nothing was stored", reason="digest"
        )

    def _check_record(self, fill: Fill, writer: FillWriter) -> None:
        """The size and MD5 the channel's record gives (when the fill has them)."""
        if fill.size is not None and writer.offset != fill.size:
            raise self._bad_bytes(
                f"upstream sent {writer.offset} bytes for {fill.url}, the channel's record "
                f"says {fill.size}"
            )
        got = writer.md5_hexdigest()
        if fill.md5 is not None and got != fill.md5:
            raise self._bad_bytes(
                f"upstream sent {fill.url} with MD5 {got}, the channel's record says {fill.md5}"
            )

    def _maps_to(self, fill: Fill) -> bool:
        assert fill.by_url is not None
        return any(self.store.lookup_url(u) == fill.expected for u in fill.by_url)

    async def _run(self, fill: Fill) -> None:
        lock = fill_lock(self.store, fill.expected, fill.url)
        writer: FillWriter | None = None
        try:
            await self._take(lock)
            if (
                fill.expected
                and self.store.has(fill.expected)
                and (fill.by_url is None or await self._in_thread(self._maps_to, fill))
            ):
                fill.blob_path = self.store.path_for(fill.expected)
                fill.digest = fill.expected
                fill._set_state("present")
                return
            writer = await self._in_thread(FillWriter, self.store, fill.url, fill.expected)
            if fill.md5 is not None:
                writer.want_md5()
            await self._download(fill, writer)
            digest = writer.hexdigest()
            self._check_record(fill, writer)
            if fill.expected and digest != fill.expected:
                raise self._bad_bytes(
                    f"upstream sent {fill.url} with SHA-256 {digest}, expected {fill.expected}"
                )
            fill.digest = digest
            fill._set_state("verified")
            size = writer.offset
            fill.blob_path = await self._in_thread(writer.commit, digest)
            if fill.md5 is not None:  # so an agent with an md5-only lock entry finds it
                with contextlib.suppress(StoreError):
                    await self._in_thread(self.store.index.record_md5, fill.md5, size, digest)
            writer = None
            fill._set_state("committed")
            self._bad.pop(fill.key, None)
            if self.on_commit is not None:
                self.on_commit(digest, fill.offset)
        except FillFailed as exc:
            self._fail(fill, exc)
        except asyncio.CancelledError:
            self._fail(
                fill,
                FillFailed(
                    503, "the server is shutting down", reason="shutdown", keep_partial=True
                ),
            )
            raise
        except BaseException as exc:
            self._fail(fill, self._describe(fill, exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            if writer is not None:
                keep = (
                    fill.error is not None and fill.error.keep_partial and fill.expected is not None
                )
                with contextlib.suppress(OSError):
                    if keep:
                        writer.close()
                    else:
                        writer.discard()
            lock.release()  # a no-op if it was never taken
            self._finish(fill)

    def _describe(self, fill: Fill, exc: BaseException) -> FillFailed:
        host = fill.url.split("/")[2] if "://" in fill.url else fill.url
        if isinstance(exc, StoreFull) or (
            isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        ):
            self.full_until = time.monotonic() + self.full_backoff
            self.full_message = (
                f"the mirror's store is full ({exc}); only cached artifacts are served"
            )
            return FillFailed(507, self.full_message, reason="store_full")
        if isinstance(exc, StoreError):
            return FillFailed(503, f"the mirror's store cannot be written: {exc}", reason="store")
        if isinstance(exc, UpstreamRefused):
            self.metrics.upstream_errors.labels(exc.reason).inc()
            return FillFailed(502, str(exc), reason=exc.reason)
        if isinstance(exc, asyncio.TimeoutError):
            self.metrics.upstream_errors.labels("timeout").inc()
            return FillFailed(
                504,
                f"upstream {host} timed out sending {fill.url}",
                reason="timeout",
                keep_partial=True,
            )
        if isinstance(exc, aiohttp.ClientPayloadError):
            self.metrics.upstream_errors.labels("truncated").inc()
            return FillFailed(
                502,
                f"upstream {host} ended {fill.url} early ({fill.offset} of "
                f"{fill.total if fill.total is not None else '?'} bytes): {exc}",
                reason="truncated",
                keep_partial=True,
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            self.metrics.upstream_errors.labels("connect").inc()
            return FillFailed(
                502, f"cannot connect to upstream {host}: {exc.os_error or exc}", reason="connect"
            )
        if isinstance(exc, (aiohttp.ClientError, ConnectionError)):
            self.metrics.upstream_errors.labels("connection").inc()
            return FillFailed(
                502,
                f"upstream {host} failed while sending {fill.url}: {exc}",
                reason="connection",
                keep_partial=True,
            )
        log.exception("fill of %s failed unexpectedly", fill.url, exc_info=exc)
        return FillFailed(
            500, f"internal error while fetching {fill.url}: {exc!r}", reason="internal"
        )

    def _fail(self, fill: Fill, failure: FillFailed) -> None:
        if failure.status != 503 or failure.reason != "shutdown":
            log.warning("fill failed (%s): %s", failure.status, failure.message)
        fill.error = failure
        fill._set_state("failed")
        if failure.reason == "digest" and fill.expected:
            before = self._bad.get(fill.key)
            times = before[1] + 1 if before and time.monotonic() - before[0] <= MISMATCH_MEMORY else 1
            self._bad[fill.key] = (time.monotonic(), times, failure)
            self._bad.move_to_end(fill.key)
            while len(self._bad) > 10_000:
                self._bad.popitem(last=False)

    def _finish(self, fill: Fill) -> None:
        fill.finished = True
        if self._fills.get(fill.key) is fill:
            del self._fills[fill.key]
        if self._by_url.get(fill.url) is fill:
            del self._by_url[fill.url]
        fill._close_if_unused()
        self.metrics.fills_in_flight.dec()
        if not fill._ready.is_set():  # ended before any state change
            fill._set_state("failed")
        if not self._fills and self._idle is not None:
            self._idle.set()

    async def _download(self, fill: Fill, writer: FillWriter) -> None:
        """GET the body (resuming a partial file of a known digest) into ``writer``."""
        if fill.expected and writer.offset and writer.hexdigest() == fill.expected:
            # a complete partial file (a crash between verify and rename)
            fill.total = writer.offset
            self._start_streaming(fill, writer)
            return
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if fill.expected:
            headers["x-expected-sha256"] = fill.expected
        for _attempt in range(3):
            req_headers = dict(headers)
            if writer.offset:
                req_headers["Range"] = f"bytes={writer.offset}-"
            self.metrics.upstream_requests.labels(fill.upstream, "artifact").inc()
            follow = lambda target: self.may_redirect(fill.upstream, target)  # noqa: E731
            async with upstream_get(self._session(), fill.url, req_headers, follow) as resp:
                if not await self._accept(fill, writer, resp):
                    continue
                length = resp.content_length
                if resp.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    length = None
                fill.total = writer.offset + length if length is not None else None
                if fill.total is not None:  # announced longer than it can be: not even started
                    self._check_limit(fill, fill.total)
                if length is not None:
                    self._check_space(length)
                self._start_streaming(fill, writer)
                await self._pump(fill, writer, resp)
                break
        else:
            raise FillFailed(
                502, f"upstream did not honour a Range request for {fill.url}", reason="status"
            )
        if fill.total is not None and writer.offset != fill.total:
            self.metrics.upstream_errors.labels("truncated").inc()
            raise FillFailed(
                502,
                f"upstream ended {fill.url} after {writer.offset} of {fill.total} bytes",
                reason="truncated",
                keep_partial=True,
            )

    async def _accept(self, fill: Fill, writer: FillWriter, resp: aiohttp.ClientResponse) -> bool:
        """Check the upstream status; False means: retry from zero."""
        status = resp.status
        if writer.offset and status == 416:
            await self._in_thread(writer.restart)
            return False
        if writer.offset and status == 206:
            start = content_range_start(resp.headers.get("Content-Range"))
            if start != writer.offset:
                await self._in_thread(writer.restart)
                return False
            return True
        if status == 200:
            if writer.offset:
                await self._in_thread(writer.restart)
            return True
        self.metrics.upstream_errors.labels("status").inc()
        if status in (404, 410):
            raise FillFailed(404, f"upstream has no {fill.url} (HTTP {status})", reason="status")
        raise FillFailed(
            504 if status == 504 else 502,
            f"upstream answered HTTP {status} for {fill.url}",
            reason="status",
            keep_partial=True,
        )

    def _check_space(self, length: int) -> None:
        try:
            st = os.statvfs(self.store.partial_dir)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if length + DISK_RESERVE > free:
            raise StoreFull(f"{length} bytes announced, {free} bytes free in {self.store.root}")

    def _start_streaming(self, fill: Fill, writer: FillWriter) -> None:
        fill.read_fd = writer.open_reader()
        fill.offset = writer.offset
        fill._set_state("streaming")

    def _check_limit(self, fill: Fill, received: int) -> None:
        """Refuse a body longer than the size the fill knows it has."""
        if fill.limit is not None and received > fill.limit:
            self.metrics.upstream_errors.labels("oversize").inc()
            raise FillFailed(
                502,
                f"upstream's body for {fill.url} is longer than the {fill.limit} bytes it has: "
                "refused, nothing stored",
                reason="oversize",
            )

    async def _pump(self, fill: Fill, writer: FillWriter, resp: aiohttp.ClientResponse) -> None:
        """Copy the body into the partial file while reading the next bytes.

        The body is read in batches of up to :data:`BATCH` bytes (what has arrived,
        gathered without copying; a batch is handed on at the latest :data:`FLUSH_S`
        after its first byte, so a slow link still streams). One lane, in a worker
        thread, writes each batch (``pwritev``) and hashes the same buffers, then the
        fill advances and its waiters are woken: one thread hop and one wake-up per
        batch, not per network chunk. While the lane works the next batch is read;
        beyond one batch in flight and one being read, reading waits (TCP
        backpressure to upstream), and all fills together hold at most
        :data:`BUFFER_BUDGET` bytes.
        """
        loop = asyncio.get_running_loop()
        content = resp.content
        received = writer.offset
        lane: asyncio.Future[int] | None = None
        lowat = _LowWater(resp, fill.total, writer.offset)
        try:
            while True:
                lowat.update(content)
                parts, size, broken = await self._batch(content, loop)
                if not size:
                    if broken is not None:
                        raise broken
                    break
                received += size
                self._check_limit(fill, received)
                if lane is not None:  # one batch in flight at a time (raises a lane's error)
                    await lane
                    lane = None
                while self.buffered >= BUFFER_BUDGET:
                    budget = self._budget()
                    budget.clear()
                    await budget.wait()
                self.buffered += size
                lane = loop.run_in_executor(self.executor, writer.write_batch, parts)
                lane.add_done_callback(functools.partial(self._advance, fill, size))
                if broken is not None:  # what arrived before the break is kept (a resume)
                    await lane
                    raise broken
        finally:
            # let the lane finish what it has (every byte that arrived is kept, so a
            # later fill can resume after it); never close the writer under it
            if lane is not None:
                await asyncio.shield(asyncio.gather(lane, return_exceptions=True))
        if lane is not None:
            lane.result()
        fill.offset = writer.offset
        fill._notify()

    async def _batch(
        self, content: aiohttp.StreamReader, loop: asyncio.AbstractEventLoop
    ) -> tuple[list[bytes], int, BaseException | None]:
        """The next batch of the body: chunks as they arrived, up to :data:`BATCH` bytes,
        no later than :data:`FLUSH_S` after the first (``([], 0, None)`` at the end), and
        the error that broke the body off after them, if one did (the caller keeps
        the bytes, then raises it)."""
        try:
            first = await content.readany()
        except (aiohttp.ClientError, ConnectionError) as exc:
            rest = _buffered_before_error(content, BATCH)
            return ([rest] if rest else []), len(rest), exc
        if not first:
            return [], 0, None
        parts, size = [first], len(first)
        deadline = loop.time() + FLUSH_S
        while size < BATCH:
            try:
                more = content.read_nowait(BATCH - size)  # what is buffered already
                if not more:
                    if content.at_eof() or loop.time() >= deadline:
                        break
                    more = await asyncio.wait_for(
                        content.readany(), max(0.0, deadline - loop.time())
                    )
                    if not more:
                        break
            except asyncio.TimeoutError:
                break
            except (aiohttp.ClientError, ConnectionError) as exc:
                rest = _buffered_before_error(content, BATCH - size)
                if rest:
                    parts.append(rest)
                return parts, size + len(rest), exc
            parts.append(more)
            size += len(more)
        return parts, size, None

    def _advance(self, fill: Fill, size: int, lane: asyncio.Future[int]) -> None:
        """A batch is on disk and hashed: the waiters may read it (a lane's error is
        raised where the pump awaits the lane)."""
        self.buffered -= size
        if self.buffered < BUFFER_BUDGET // 2:
            self._budget().set()
        if lane.cancelled() or lane.exception() is not None:
            return
        self.metrics.upstream_bytes.inc(size)
        fill.offset = max(fill.offset, lane.result())
        fill._notify()
