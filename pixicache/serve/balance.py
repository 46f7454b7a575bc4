"""Spreading connections over ``serve --workers N``: one listening socket, shared by
the worker processes, each accepting only while it holds no more connections than
any other worker (least connections).

Why not ``SO_REUSEPORT``: the kernel then gives each worker a queue of its own and
hashes every connection to one of them, so 8 connections from one client land 4/4
in about half the runs and 3/5, 2/6 or worse in the rest, and a worker holding 5 or 6
busy keep-alive connections is the bottleneck while the other idles
(``benchmarks/serve.py --only hits``). A shared socket alone is no better: every
worker is woken for a new connection and the first to run takes it, and asyncio's own
accept loop takes every connection waiting, so one worker's head start takes them
all. Here each worker publishes its open connections (those it is serving plus those
it has accepted that are still being set up) in memory all workers share, accepts one
connection per turn of its event loop, and leaves a waiting connection to a worker
holding fewer: it stops watching the socket and looks again a millisecond later. The
socket stays readable until some worker accepts, so a connection is never lost; one
that no less-loaded worker has taken within :data:`MAX_DEFER` seconds (that worker
busy or hung) is taken anyway, so balance never costs more than that.

Data flow: :class:`ConnectionShare` (made before ``fork``, one slot per worker) ←
:meth:`BalancedAcceptor.publish` (the worker's count, on every change) →
:meth:`ConnectionShare.least` (another worker's decision).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import socket
from collections.abc import Callable

log = logging.getLogger("pixicache.serve")

#: seconds between looks at a connection left to a worker holding fewer
RETRY = 0.001
#: seconds a connection may wait for a less-loaded worker before this one takes it
MAX_DEFER = 0.02
#: seconds accepting pauses after running out of file descriptors or memory (asyncio's)
ACCEPT_RETRY_DELAY = 1.0
#: a retired worker's count: no other worker waits for it
_RETIRED = 1 << 62
#: the errors of ``accept`` that mean "out of resources" (pause; asyncio does the same)
_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ConnectionShare:
    """The open-connection counts of ``workers`` processes, one 64-bit slot each, in an
    anonymous shared mapping: made in the parent before ``fork``, so every worker sees
    every other's writes. Each worker writes its own slot only (:meth:`publish`); an
    aligned 8-byte store is atomic on every platform Linux runs on, and a stale read
    only costs balance, never a connection."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.workers = workers
        self._map = mmap.mmap(-1, 8 * workers, flags=mmap.MAP_SHARED)
        self._slots = memoryview(self._map).cast("q")

    def publish(self, index: int, count: int) -> None:
        """Worker ``index`` holds ``count`` connections."""
        self._slots[index] = count

    def retire(self, index: int) -> None:
        """Worker ``index`` accepts no more: nobody waits for it."""
        self._slots[index] = _RETIRED

    def least(self, index: int, count: int) -> bool:
        """Whether ``count`` (worker ``index``'s) is no more than any other worker's."""
        slots = self._slots
        return all(slots[other] >= count for other in range(self.workers) if other != index)


class BalancedAcceptor:
    """Accepts connections on a listening socket shared with other workers, one per turn
    of the event loop, while this worker is among the least loaded (see the module
    doc), and gives each to ``protocol_factory`` as asyncio's own server would.

    Args:
        sock: the listening socket (non-blocking; inherited from the parent).
        share: the counts of every worker; ``index`` is this worker's slot.
        count: this worker's open connections, as its server counts them.
        protocol_factory: a protocol per accepted connection.

    Call :meth:`publish` whenever ``count()`` changes; :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        sock: socket.socket,
        share: ConnectionShare,
        index: int,
        count: Callable[[], int],
        protocol_factory: Callable[[], asyncio.Protocol],
    ) -> None:
        self.sock = sock
        self.share = share
        self.index = index
        self._count = count
        self._factory = protocol_factory
        self._loop = asyncio.get_running_loop()
        self._pending = 0  # accepted, transport not yet made
        self._watching = False
        self._timer: asyncio.TimerHandle | None = None
        self._deferred_since = 0.0  # when the wait for a less-loaded worker began
        self._last_look = -MAX_DEFER  # when this worker last left a connection waiting
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopped = True
        self.deferred = 0  # turns a waiting connection was left to another worker

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening socket (as ``asyncio.Server.sockets``)."""
        return [self.sock]

    def start(self) -> None:
        self.stopped = False
        self.publish()
        self._watch()

    def stop(self) -> None:
        """Accept no more (idempotent); the connections accepted so far go on."""
        self.stopped = True
        self._unwatch()
        self._cancel_timer()
        self.share.retire(self.index)

    def close(self) -> None:  # as asyncio.Server.close, for aiohttp's site
        self.stop()

    def publish(self) -> None:
        """Tell the other workers how many connections this one holds."""
        if not self.stopped:
            self.share.publish(self.index, self._count() + self._pending)

    # -- the accept loop -----------------------------------------------------------------
    def _watch(self) -> None:
        if not self._watching and not self.stopped:
            self._loop.add_reader(self.sock.fileno(), self._readable)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self.sock.fileno())
            self._watching = False

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _rewatch(self) -> None:
        self._timer = None
        self._watch()

    def _pause(self, delay: float) -> None:
        self._unwatch()
        self._cancel_timer()
        self._timer = self._loop.call_later(delay, self._rewatch)

    def _readable(self) -> None:
        if self.stopped:
            return
        mine = self._count() + self._pending
        if not self.share.least(self.index, mine):
            now = self._loop.time()
            if now - self._last_look > MAX_DEFER:  # a new wait: the last one ended
                self._deferred_since = now
            self._last_look = now
            if now - self._deferred_since < MAX_DEFER:
                self.deferred += 1
                self._pause(RETRY)
                return
        try:
            conn, _addr = self.sock.accept()
        except (BlockingIOError, InterruptedError):  # another worker took it
            return
        except OSError as exc:
            if exc.errno in _EXHAUSTED:
                log.error("cannot accept a connection (%s); pausing %g s", exc, ACCEPT_RETRY_DELAY)
                self._pause(ACCEPT_RETRY_DELAY)
            # else: the client gave up before it was accepted (ECONNABORTED, ...)
            return
        self._last_look = -MAX_DEFER
        conn.setblocking(False)
        self._pending += 1
        self.publish()
        task = self._loop.create_task(self._connect(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, sock=conn)
        except (OSError, RuntimeError) as exc:  # closed while being set up; the loop stopping
            log.debug("an accepted connection was lost before it started: %s", exc)
            conn.close()
        finally:
            self._pending -= 1
            self.publish()


class SharedListener:
    """What a worker of ``serve --workers N`` inherits from the parent: the listening
    socket, the counts of every worker, and its own slot."""

    def __init__(self, sock: socket.socket, share: ConnectionShare, index: int) -> None:
        self.sock = sock
        self.share = share
        self.index = index

    @classmethod
    def bind(cls, host: str, port: int, workers: int, backlog: int) -> SharedListener:
        """The parent's listening socket (``port`` 0: any free port) and a fresh share;
        :meth:`worker` gives each forked worker its slot."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock, ConnectionShare(workers), -1)

    def worker(self, index: int) -> SharedListener:
        return SharedListener(self.sock, self.share, index)
