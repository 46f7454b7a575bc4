"""Fetching artifacts through the source chain into the store.

For each artifact, :class:`Fetcher` does, in order:

1. take the artifact's store lock (so one process per node downloads it; the
   others wait here and then find it present);
2. if the store has it: a hit, done;
3. else try each source in order: stream into a :class:`~pixicache.store.BlobWriter`
   (resuming a partial file with HTTP Range), retrying transient failures with
   exponential backoff, and falling through to the next source on "not found",
   an unreachable host or a digest mismatch (the bad bytes are discarded);
4. commit (verify + fsync + rename) or report every attempt that failed.

What to do after a failure is decided by its type (:mod:`pixicache.errors`), never
by its text, so third-party sources take part like the built-in ones:
:class:`~pixicache.errors.IntegrityError` (bad bytes: next source),
:class:`~pixicache.errors.SourceUnavailable` with ``transient`` (retry) and
``unreachable`` (this source is skipped for the rest of the run).

Artifacts are fetched in parallel by a bounded thread pool, largest first. An
exception a worker thread did not expect — a full store (:class:`StoreFull`),
a bug — stops the pool and is raised again on the caller's thread, whatever
``jobs`` is.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import httpx

from pixicache.config import DEFAULT_JOBS
from pixicache.errors import FetchError, IntegrityError, SourceUnavailable, StoreError
from pixicache.fetch.client import make_client
from pixicache.fetch.results import FetchReport, FetchResult, NullProgress, ProgressSink
from pixicache.model.artifact import Artifact
from pixicache.sources.base import FetchContext, Source
from pixicache.store import BlobWriter, Store
from pixicache.store.locking import LockTimeout

__all__ = ["Fetcher"]


class Fetcher:
    """Fetches artifacts into a store through an ordered list of sources.

    Args:
        store: the content-addressed store to fill.
        sources: tried in order for each artifact not already in the store.
        jobs: artifacts fetched in parallel.
        retries: extra attempts per source for transient failures.
        backoff: first retry delay in seconds (doubles each time, capped at 8 s);
            a source's ``Retry-After`` lengthens a delay, never shortens it.
        max_retry_after: a source that asks to wait longer than this (seconds)
            is not waited for: the next source is tried at once.
        client: an httpx client to use (one is made and closed otherwise).
        progress: receives progress events.
        sleep: the function used to wait between retries (tests pass a fake).
    """

    def __init__(
        self,
        store: Store,
        sources: list[Source],
        *,
        jobs: int = DEFAULT_JOBS,
        retries: int = 3,
        backoff: float = 0.25,
        max_retry_after: float = 30.0,
        client: httpx.Client | None = None,
        progress: ProgressSink | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.sources = list(sources)
        self.jobs = max(1, jobs)
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_retry_after = max_retry_after
        self._client = client
        self.progress: ProgressSink = progress or NullProgress()
        self.sleep = sleep
        self._dead: dict[int, str] = {}  # id(source) -> why it was given up on
        self._dead_lock = threading.Lock()
        self._stats = SourceStats()

    def fetch(self, artifacts: Iterable[Artifact]) -> FetchReport:
        """Make every artifact present and verified in the store (or report why not).

        Raises:
            StoreError: the store cannot take the bytes (full: :class:`StoreFull`).
        """
        unique: dict[str, Artifact] = {}
        for a in artifacts:
            unique.setdefault(a.key, a)
        todo = sorted(unique.values(), key=lambda a: -(a.size or 0))
        start = time.monotonic()
        self.progress.begin(len(todo), sum(a.size or 0 for a in todo))
        own_client = self._client is None
        client = self._client or make_client(max_connections=max(64, self.jobs * 2))
        ctx = FetchContext(client=client)
        try:
            results = self._run_pool(todo, ctx)
        finally:
            if own_client:
                client.close()
        hits = [r.artifact for r in results if r.tier == "store"]
        if hits:
            self.store.touch(hits)
        down = {s.label: self._dead[id(s)] for s in self.sources if id(s) in self._dead}
        report = FetchReport(
            results=results,
            seconds=time.monotonic() - start,
            sources=self._stats.snapshot(),
            down=down,
        )
        self.progress.end(report)
        return report

    def fetch_one(self, artifact: Artifact) -> FetchResult:
        """Fetch a single artifact; raises the :class:`FetchError` on failure."""
        report = self.fetch([artifact])
        result = report.results[0]
        if result.error is not None:
            raise result.error
        return result

    # -- the pool ---------------------------------------------------------
    def _run_pool(self, todo: list[Artifact], ctx: FetchContext) -> list[FetchResult]:
        """Fetch ``todo`` with ``jobs`` threads.

        An artifact whose lock another process holds (it is downloading it) is
        put aside and the thread moves on; put-aside artifacts are waited for
        last, when they are most likely done. So N processes fetching the same
        lock into one store split the work instead of queueing behind each other.

        The first exception a worker raises stops every worker (each finishes
        the artifact it holds) and is raised here.
        """
        pending = deque(todo)
        deferred: deque[Artifact] = deque()
        results: dict[str, FetchResult] = {}
        failure: list[BaseException] = []
        guard = threading.Lock()

        def next_item() -> tuple[Artifact, bool] | None:
            with guard:
                if failure:
                    return None
                if pending:
                    return pending.popleft(), False
                if deferred:
                    return deferred.popleft(), True
                return None

        def worker() -> None:
            while (item := next_item()) is not None:
                art, wait = item
                try:
                    res = self._fetch_one(art, ctx, wait=wait)
                except BaseException as exc:  # re-raised on the caller's thread
                    with guard:
                        failure.append(exc)
                    return
                with guard:
                    if res is None:
                        deferred.append(art)
                    else:
                        results[art.key] = res

        nthreads = min(self.jobs, len(todo))
        if nthreads <= 1:
            worker()
        else:
            threads = [
                threading.Thread(target=worker, name=f"pixicache-fetch-{i}", daemon=True)
                for i in range(nthreads)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if failure:
            raise failure[0]
        return [results[a.key] for a in todo]

    # -- one artifact -----------------------------------------------------
    def _fetch_one(
        self, artifact: Artifact, ctx: FetchContext, *, wait: bool = True
    ) -> FetchResult | None:
        """Fetch one artifact; ``None`` if ``wait`` is false and another process holds it."""
        result = FetchResult(artifact=artifact)
        t0 = time.monotonic()
        store = self.store
        if store.has_artifact(artifact):  # fast path: no lock needed
            result.tier = "store"
            result.seconds = time.monotonic() - t0
            self.progress.advance(artifact.size or 0)
            self.progress.artifact_done(result)
            return result
        lock = store.lock(artifact.key, timeout=None if wait else 0)
        try:
            lock.acquire()
        except LockTimeout:
            return None
        result.waited = time.monotonic() - t0
        try:
            if store.has_artifact(artifact):  # another process fetched it
                result.tier = "store"
                self.progress.advance(artifact.size or 0)
            else:
                self._from_sources(artifact, ctx, result)
        finally:
            lock.release()
            result.seconds = time.monotonic() - t0
        self.progress.artifact_done(result)
        return result

    def _from_sources(self, artifact: Artifact, ctx: FetchContext, result: FetchResult) -> None:
        writer = self.store.writer(artifact)
        writer.on_write = self.progress.advance
        self.progress.advance(writer.offset)
        result.resumed_from = writer.offset
        failures: list[Exception] = []
        usable = [s for s in self.sources if s.location(artifact) is not None]
        try:
            for i, source in enumerate(usable):
                dead = self._dead.get(id(source))
                if dead is not None:
                    result.attempts.append(f"{source.label}: skipped ({dead})")
                    continue
                last = all(id(s) in self._dead for s in usable[i + 1 :])
                if self._try_source(source, artifact, writer, ctx, result, failures, last=last):
                    return
        finally:
            writer.close()
            result.bytes = writer.written
        tried = ", ".join(s.label for s in self.sources) or "no sources configured"
        message = (
            f"could not fetch {artifact.filename} ({artifact.pin}) from any source "
            f"({tried})"
        )
        # bad bytes seen anywhere, good bytes nowhere: an integrity failure (exit 4), even
        # when other sources were merely down: the lock's artifact was seen tampered with
        if any(isinstance(f, IntegrityError) for f in failures):
            result.error = IntegrityError(message, expected=artifact.key)
            result.error.attempts = list(result.attempts)
        else:
            result.error = FetchError(message, attempts=result.attempts)

    def _try_source(
        self,
        source: Source,
        artifact: Artifact,
        writer: BlobWriter,
        ctx: FetchContext,
        result: FetchResult,
        failures: list[Exception],
        *,
        last: bool,
    ) -> bool:
        """Attempts of one source (retries included); True once the blob is committed.

        A source that cannot be reached (refused, does not resolve) is left at
        once for the next one; only the last source left keeps retrying, as it
        may be restarting.
        """
        delay = self.backoff
        clean_retry = True
        attempt = 0
        stats = self._stats
        while True:
            inherited = writer.offset  # bytes from an earlier run or an earlier source
            before = writer.written
            stats.add(source.label, "requests")
            try:
                source.fetch(artifact, writer, ctx)
                writer.commit()
                result.tier = source.tier
                result.source = source.label
                stats.add(source.label, "served")
                stats.add(source.label, "bytes", writer.written - before)
                return True
            except StoreError:
                raise
            except IntegrityError as exc:
                stats.add(source.label, "integrity_failures")
                writer.reopen()  # the bad bytes are discarded
                if inherited and clean_retry:
                    # the fault may lie in bytes resumed from elsewhere: this
                    # source gets one more try with all bytes its own
                    clean_retry = False
                    result.attempts.append(f"{source.label}: {exc} (resumed bytes; retrying from zero)")
                    continue
                failures.append(exc)
                result.attempts.append(f"{source.label}: {exc}")
                return False
            except SourceUnavailable as exc:
                stats.add(source.label, "errors")
                wait = None if (exc.unreachable and not last) else self._retry_delay(exc, attempt, delay)
                if wait is None:
                    failures.append(exc)
                    result.attempts.append(f"{source.label}: {exc}{self._give_up_note(exc, attempt)}")
                    if exc.unreachable:
                        with self._dead_lock:
                            self._dead.setdefault(id(source), str(exc))
                    return False
                attempt += 1
                stats.add(source.label, "retries")
                self.sleep(wait)
                delay = min(delay * 2, 8.0)

    def _retry_delay(self, exc: SourceUnavailable, attempt: int, delay: float) -> float | None:
        """How long to wait before asking the same source again; ``None``: move on."""
        asked = exc.retry_after
        if not exc.transient or attempt == self.retries:
            return None
        if asked is not None and asked > self.max_retry_after:
            return None
        return max(delay, asked or 0.0)

    def _give_up_note(self, exc: SourceUnavailable, attempt: int) -> str:
        if exc.retry_after is not None and exc.retry_after > self.max_retry_after:
            return f" (more than the {self.max_retry_after:g} s a fetch waits)"
        if exc.unreachable and attempt == 0:
            return " (not retried: the next source was tried at once)"
        return f" (after {attempt + 1} attempts)" if exc.transient else ""


class SourceStats:
    """Counters per source label, like a server's ``/metrics`` (thread-safe):
    ``requests``, ``served``, ``bytes``, ``errors``, ``retries``, ``integrity_failures``."""

    KEYS = ("requests", "served", "bytes", "errors", "retries", "integrity_failures")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}

    def add(self, label: str, key: str, n: int = 1) -> None:
        with self._lock:
            slot = self._counts.setdefault(label, dict.fromkeys(self.KEYS, 0))
            slot[key] += n

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {label: dict(slot) for label, slot in self._counts.items()}
