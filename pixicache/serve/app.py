"""The request handler of ``pixicache serve``: routes, hits, fills, metadata, admin.

Routes (everything else is a 4xx, answered before anything is touched):

=====================================  ==============================================
``GET|HEAD /{up}/{subdir}/{file}``     a package (``.conda``, ``.tar.bz2``) of upstream
                                       ``up``: a hit by ``x-expected-sha256`` (or by
                                       URL in the index), else a fill verified against
                                       that header (or hashed and indexed by URL)
``GET|HEAD /{up}/{subdir}/repodata*``  channel metadata, cached for ``repodata_ttl``
``GET|HEAD /{pypi}/{project}/``        a PyPI project page of a ``pypi`` upstream
                                       (:mod:`pixicache.serve.pypi`); its files are
                                       artifacts of the upstream they are under
``GET|HEAD /sha256/{hex}``             a blob by digest; a miss is filled from
                                       ``?url=`` / ``x-pixicache-upstream-url`` when
                                       that URL is under an allow-listed upstream
``GET|HEAD /pixi/{version}/{archive}`` a Pixi release archive, verified against the
                                       pin table when pinned
``GET /healthz``, ``GET /metrics``     health (503 while draining), Prometheus text
``POST /admin/gc``, ``GET /admin/fills``  admin (bearer token, or loopback without one)
=====================================  ==============================================

A request carrying ``x-pixicache-warm: 1`` is answered ``204`` once the blob is
in the store (no body): ``pixicache prefetch --to`` uses it to warm a mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

from pixicache import __version__
from pixicache.httputil import parse_http_date, parse_range
from pixicache.model.artifact import CONDA_EXTENSIONS, Artifact, is_sha256
from pixicache.serve.blobs import BlobFiles, KnownHits
from pixicache.serve.config import ServeConfig
from pixicache.serve.fill import USER_AGENT, Fill, FillFailed, FillManager
from pixicache.serve.http import (
    IMMUTABLE,
    HTTPProblem,
    SendAborted,
    abort,
    answer_file,
    client_address,
    cork,
    if_range_allows,
    is_trusted_proxy,
    parse_networks,
    send_region,
    split_path,
    write_chunk,
)
from pixicache.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from pixicache.serve.pypi import PypiPages, is_distribution, normalize_project, project_of
from pixicache.serve.records import ChannelRecords, Record
from pixicache.serve.repodata import RepodataCache, is_metadata
from pixicache.serve.trust import BlobTrust
from pixicache.serve.upstreams import UpstreamMap
from pixicache.store import Store, hash_file
from pixicache.store.files import NotRegular

access_log = logging.getLogger("pixicache.serve.access")
log = logging.getLogger("pixicache.serve")

TOUCH_INTERVAL = 2.0
"""Seconds between batched index updates of hits (last use, for LRU eviction)."""

STATS_INTERVAL = 60.0
"""Seconds between recounts of the store's size (other processes may write to it)."""

TAIL_CHUNK = 1 << 20

SMALL_BODY = 64 << 10
"""Bodies up to this size are read and sent with the headers in one write."""

HIT_HEADERS = {"x-pixicache-cache": "hit"}


class _Ctx:
    """What one request did, for its log line and metrics."""

    __slots__ = ("aborted", "bytes", "cache", "route")

    def __init__(self) -> None:
        self.route = "other"
        self.cache = "-"
        self.bytes = 0
        self.aborted = False


class ServeApp:
    """The server's state and its request handler (one per event loop).

    Args:
        config: the settings.
        store: the store to serve (default: ``Store(config.cache_dir)``).
    """

    def __init__(self, config: ServeConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or Store(config.cache_dir)
        self.metrics = Metrics()
        self.upstreams = UpstreamMap(config.upstreams)
        self.executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="pixicache-serve-io")
        self._session: aiohttp.ClientSession | None = None
        self.fills = FillManager(
            self.store, self.metrics, self.executor, self.session, self._committed,
            self.upstreams.may_redirect,
        )  # fmt: skip
        self.repodata = RepodataCache(
            # this server's own area of the store (a shared node store's other users
            # cannot reach it): metadata is plain files, written and read by path
            self.store.user_dir / "repodata",
            self.session,
            self.metrics,
            self.executor,
            config.repodata_ttl,
            self.upstreams.may_redirect,
            self.store.private_dir,
        )
        self.pypi = PypiPages(self.repodata, self.upstreams)
        self.records = ChannelRecords(self.repodata, self._in_thread)
        self.blobs = BlobFiles(self.store)
        self.known_hits = KnownHits()  # what the front path may answer (ready_hit)
        self._hits = self.metrics.cache.labels("hit")
        self._request_counters: dict[tuple[str, str, str], Any] = {}
        self.trust = BlobTrust(
            self.store, self._in_thread, lambda sha, why: self.metrics.refused.labels("bad_blob").inc()
        )
        self.draining = False
        self.started = time.time()
        self.store_bytes = 0
        self.store_blobs = 0
        self._per_client: dict[str, int] = {}
        self._trusted_proxies = parse_networks(config.trusted_proxies)
        self._url_index: dict[str, str] = {}
        self._agent_digest: tuple[tuple[int, int], str] | None = None
        self._touches: dict[str, tuple[int, str | None]] = {}
        self._background: list[asyncio.Task[None]] = []
        self._gc_task: asyncio.Future[dict[str, int]] | None = None

    # -- life cycle ----------------------------------------------------------------------------
    def session(self) -> aiohttp.ClientSession:
        """The client session for upstream requests (created by :meth:`startup`)."""
        assert self._session is not None, "ServeApp.startup() was not awaited"
        return self._session

    async def startup(self) -> None:
        cfg = self.config
        connector = aiohttp.TCPConnector(
            limit=cfg.upstream_connections, limit_per_host=cfg.upstream_connections
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=cfg.upstream_connect_timeout,
                sock_read=cfg.upstream_read_timeout,
            ),
            auto_decompress=False,
            read_bufsize=1 << 20,  # per upstream connection (aiohttp holds up to 2x)
            trust_env=cfg.trust_env,
            headers={"User-Agent": f"{USER_AGENT}/{__version__}"},
        )
        await self._recount()
        self._background.append(asyncio.ensure_future(self._periodic()))

    async def shutdown(self) -> None:
        """Stop background work, cancel fills nobody waits for, close the client."""
        self.draining = True
        for task in self._background:
            task.cancel()
        await self.fills.close()
        if self._gc_task is not None:
            with contextlib.suppress(BaseException):
                await self._gc_task
        with contextlib.suppress(Exception):
            await self._flush_touches()
        if self._session is not None:
            await self._session.close()
        self.executor.shutdown(wait=True)
        self.blobs.close()

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _periodic(self) -> None:
        last_count = time.monotonic()
        while True:
            await asyncio.sleep(TOUCH_INTERVAL)
            with contextlib.suppress(Exception):
                await self._flush_touches()
            if time.monotonic() - last_count > STATS_INTERVAL:
                last_count = time.monotonic()
                with contextlib.suppress(Exception):
                    await self._recount()

    async def _recount(self) -> None:
        def count() -> tuple[int, int]:
            n = total = 0
            for _, _, st in self.store.iter_blobs():
                n += 1
                total += st.st_size
            return n, total

        self.store_blobs, self.store_bytes = await self._in_thread(count)
        self.metrics.store_blobs.set(self.store_blobs)
        self.metrics.store_bytes.set(self.store_bytes)

    async def _flush_touches(self) -> None:
        if not self._touches:
            return
        batch, self._touches = self._touches, {}
        arts = [
            Artifact(url=url or "", sha256=sha, size=size, filename="")
            for sha, (size, url) in batch.items()
        ]
        await self._in_thread(self.store.touch, arts)

    def _committed(self, digest: str, size: int) -> None:
        self.store_blobs += 1
        self.store_bytes += size
        self.metrics.store_blobs.set(self.store_blobs)
        self.metrics.store_bytes.set(self.store_bytes)
        limit = self.config.max_size
        if (
            limit is not None
            and self.store_bytes > limit
            and (self._gc_task is None or self._gc_task.done())
        ):
            self._gc_task = asyncio.ensure_future(self._gc(limit))

    async def _gc(self, limit: int) -> dict[str, int]:
        report = await self._in_thread(self.store.gc, limit)
        self.metrics.evicted.inc(report.removed)
        if report.freed:
            self.fills.full_until = 0.0  # space was freed: accept misses again
        if report.removed:
            log.info(
                "evicted %d blobs (%d bytes) to stay within %d bytes",
                report.removed,
                report.freed,
                limit,
            )
        self._url_index.clear()
        self.known_hits.clear()
        await self._recount()
        return {
            "removed": report.removed,
            "freed": report.freed,
            "kept_in_use": report.kept_in_use,
            "size_after": report.size_after,
        }

    # -- the handler ---------------------------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request; logs one line and updates the metrics."""
        t0 = time.monotonic()
        ctx = _Ctx()
        client = self.client_of(request.remote, request.headers.get("X-Forwarded-For"))
        status: int | str = 500
        counted = False
        try:
            if not self.may_start(client):
                self.metrics.refused.labels("per_client").inc()
                resp: web.StreamResponse = _problem(
                    429,
                    f"more than {self.config.per_client} concurrent requests from {client}",
                    {"Retry-After": "1"},
                )
            else:
                counted = True
                try:
                    resp = await self._dispatch(request, ctx)
                except HTTPProblem as problem:
                    resp = _problem(problem.status, problem.message, problem.headers)
                    if problem.status in (400, 414):
                        self.metrics.refused.labels("path").inc()
                        resp.force_close()  # a malformed request: do not keep talking
            status = resp.status
            if ctx.aborted:
                status = f"{status}-aborted"
            return resp
        except (ConnectionError, asyncio.CancelledError):
            status = "aborted"
            raise
        finally:
            if counted:
                self.client_done(client)
            self.account(
                request.method, ctx.route, status, ctx.bytes, client, request.raw_path, t0, ctx.cache
            )

    def client_done(self, client: str) -> None:
        """One request of ``client`` ended (the per-client cap's count)."""
        left = self._per_client[client] - 1
        if left:
            self._per_client[client] = left
        else:
            del self._per_client[client]

    def account(
        self,
        method: str,
        route: str,
        status: int | str,
        nbytes: int,
        client: str,
        target: str,
        started: float,
        cache: str,
    ) -> None:
        """A request is answered: its metrics, and its access-log line (``started``: its
        ``time.monotonic()``); the same for both paths (aiohttp's and the front's)."""
        key = (method, route, str(status))
        counter = self._request_counters.get(key)
        if counter is None:
            if len(self._request_counters) > 10_000:
                self._request_counters.clear()
            counter = self._request_counters[key] = self.metrics.requests.labels(*key)
        counter.inc()
        self.metrics.bytes_served.inc(nbytes)
        if self.config.log_requests:
            access_log.info(
                "%s %s %s %s %dB %.1fms %s",
                client,
                method,
                _printable(target),
                status,
                nbytes,
                (time.monotonic() - started) * 1000,
                cache,
            )

    def client_of(self, peer: str | None, forwarded_for: str | None) -> str:
        """Who a request is from (the client behind a trusted proxy)."""
        return client_address(peer, forwarded_for, self._trusted_proxies)

    def may_start(self, client: str) -> bool:
        """Count a request of ``client`` in, unless it has ``per_client`` running
        (then False, and it is answered ``429``); see :meth:`client_done`."""
        cap = self.config.per_client
        running = self._per_client.get(client, 0)
        if cap and running >= cap:
            return False
        self._per_client[client] = running + 1
        return True

    def ready_hit(
        self, target: str, expected: str | None
    ) -> tuple[str, str, int, os.stat_result] | None:
        """The blob a plain GET or HEAD of ``target`` would be sent as a hit, when this
        process can tell at once: ``(route, sha256, fd, fstat)``, the blob open.

        Only for a target answered as a hit before (:class:`KnownHits`), whose
        client digest (``x-expected-sha256``, if sent) is the blob's, whose upstream
        URL (a channel path) the index still maps to the blob, and whose file is the
        very one this process verified (:meth:`BlobTrust.known`). Anything else is
        ``None``: the full handler decides (a fill, a hash first, a 4xx).
        """
        known = self.known_hits.get(target)
        if known is None:
            return None
        sha = known.sha256
        if expected is not None and expected.strip().lower() != sha:
            return None
        if known.url is not None and self._url_index.get(known.url) != sha:
            return None
        try:
            fd, st = self.blobs.open(sha)
        except OSError:
            return None
        if not self.trust.known(sha, st):
            os.close(fd)
            return None
        return known.route, sha, fd, st

    def learn_hit(self, target: str) -> Coroutine[Any, Any, bool] | None:
        """Teach :meth:`ready_hit` a target this process has not answered yet, if a plain
        GET of it is a hit now: the front path's way to keep a connection
        (:mod:`pixicache.serve.front`) instead of handing it to aiohttp for good at its
        first such request (a restarted server; each worker of ``serve --workers N``).

        ``None`` (no I/O was needed to tell): not an artifact path of an upstream nor
        ``/sha256/<digest>``. Else a coroutine: True when the target is known now (an
        artifact path the index maps to a committed blob, or the digest of one, and the
        blob vouched for without hashing: :meth:`BlobTrust.vouched`); False for anything
        else (a miss, a blob to hash first, a bad one: aiohttp's path answers it and does
        all that it does). Nothing is sent, fetched, hashed, counted or quarantined here.
        """
        try:
            segments, _query = split_path(target, self.config.max_path)
        except HTTPProblem:
            return None
        head = segments[0] if segments else ""
        if head == "sha256":
            if len(segments) != 2 or not is_sha256(segments[1].lower()):
                return None
            return self._learn_hit(target, "sha256", segments[1].lower(), None, "")
        # the other routes _dispatch takes before the upstreams' (conservatively: any length)
        if head in ("admin", "healthz", "metrics", "agent", "pixi") or self.upstreams.get(head) is None:
            return None
        rest = segments[1:]
        url = self.upstreams.channel_url(head, rest)
        if url is None or len(rest) < 2:
            return None
        if not (rest[-1].endswith(CONDA_EXTENSIONS) or is_distribution(rest[-1])):
            return None
        return self._learn_hit(target, "artifact", None, url, head)

    async def _learn_hit(
        self, target: str, route: str, sha: str | None, url: str | None, upstream: str
    ) -> bool:
        if sha is None:
            assert url is not None
            sha = await self._known_sha(url, upstream)
            if sha is None:
                return False
        try:
            fd, st = self.blobs.open(sha)
        except OSError:  # not there, or not a regular file: aiohttp's path deals with it
            return False
        os.close(fd)
        if not await self.trust.vouched(sha, st):
            return False
        self.known_hits.learn(target, route, sha, url)
        return True

    async def _dispatch(self, request: web.BaseRequest, ctx: _Ctx) -> web.StreamResponse:
        segments, query = split_path(request.raw_path, self.config.max_path)
        method = request.method
        head = segments[0] if segments else ""
        if head == "admin":
            ctx.route = "admin"
            return await self._admin(request, segments[1:], query)
        if method not in ("GET", "HEAD"):
            raise HTTPProblem(405, f"method {method} not allowed", {"Allow": "GET, HEAD"})
        if not segments:
            return self._index()
        if head == "healthz" and len(segments) == 1:
            ctx.route = "health"
            return self._health()
        if head == "metrics" and len(segments) == 1:
            ctx.route = "metrics"
            return web.Response(
                body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )
        if head == "agent" and len(segments) == 2:
            ctx.route = "agent"
            return await self._agent_route(request, ctx, segments[1])
        if head == "sha256":
            ctx.route = "sha256"
            return await self._digest_route(request, ctx, segments, query)
        if head == "pixi" and len(segments) == 3 and self.upstreams.get("pixi") is not None:
            ctx.route = "pixi"
            return await self._pixi_route(request, ctx, segments[1], segments[2])
        upstream = self.upstreams.get(head)
        if upstream is None:
            raise HTTPProblem(
                404,
                f"no upstream named {head!r} here (this mirror serves: {', '.join(self.upstreams.names)})",
            )
        rest = segments[1:]
        url = self.upstreams.channel_url(head, rest)
        if url is None or not rest:
            raise HTTPProblem(404, "not found")
        if len(rest) >= 2 and (rest[-1].endswith(CONDA_EXTENSIONS) or is_distribution(rest[-1])):
            ctx.route = "artifact"
            expected = _expected_header(request)
            record = None
            if expected is None:
                expected, record = await self._vouched_digest(head, rest, url)
            return await self._artifact(
                request, ctx, url, expected, head, by_url=True, record=record
            )
        if upstream.kind == "pypi":
            project = project_of(rest)
            if project is None:
                raise HTTPProblem(404, f"{'/'.join(rest)} is neither a project page nor a file")
            ctx.route = "pypi"
            return await self._project_page(request, ctx, head, upstream.url, project)
        if is_metadata(rest):
            ctx.route = "repodata"
            return await self._metadata(request, ctx, head, rest, url)
        raise HTTPProblem(404, f"{'/'.join(rest)} is neither a package nor channel metadata")

    # -- artifacts -----------------------------------------------------------------------------
    async def _digest_route(
        self, request: web.BaseRequest, ctx: _Ctx, segments: list[str], query: str
    ) -> web.StreamResponse:
        if len(segments) != 2 or not is_sha256(segments[1].lower()):
            raise HTTPProblem(404, "use /sha256/<64 hex digits>")
        sha = segments[1].lower()
        header = _expected_header(request)
        if header is not None and header != sha:
            raise HTTPProblem(400, "x-expected-sha256 contradicts the digest in the path")
        warm = _is_warm(request)
        if warm:
            self._require_token(request, admin=False)
        if self.store.has(sha):
            resp = await self._serve_hit(request, ctx, sha, None, warm=warm)
            if resp is not None:
                return resp
        given = parse_qs(query).get("url", [None])[0] or request.headers.get(
            "x-pixicache-upstream-url"
        )
        if not given:
            raise HTTPProblem(
                404, f"{sha} is not in this mirror; add ?url=<upstream URL> to fetch it"
            )
        target = self.upstreams.resolve(given)
        if target is None:
            self.metrics.refused.labels("not_allowed").inc()
            raise HTTPProblem(
                403,
                f"{given[:300]} is not under an upstream of this mirror "
                f"({', '.join(self.upstreams.names)}); nothing was fetched",
            )
        name = next((u.name for u in self.config.upstreams if target.startswith(u.url + "/")), "?")
        return await self._artifact(request, ctx, target, sha, name)

    async def _pixi_route(
        self, request: web.BaseRequest, ctx: _Ctx, version: str, archive: str
    ) -> web.StreamResponse:
        version = version[1:] if version.startswith("v") else version
        url = self.upstreams.pixi_url(version, archive)
        assert url is not None
        expected = _expected_header(request)
        pin_sha = _pinned_sha256(version, archive)
        if pin_sha is not None:
            if expected is not None and expected != pin_sha:
                raise HTTPProblem(
                    409,
                    f"x-expected-sha256 differs from the pinned digest of pixi {version} {archive}",
                )
            expected = pin_sha
        if expected is None:
            raise HTTPProblem(
                404,
                f"pixi {version} {archive} is not pinned here and the request names no "
                "digest (x-expected-sha256): nothing says what its bytes must be, so it is "
                "not fetched; add a pin (`pixicache pixi pins`) or send the digest",
            )
        return await self._artifact(request, ctx, url, expected, "pixi")

    async def _artifact(
        self,
        request: web.BaseRequest,
        ctx: _Ctx,
        url: str,
        expected: str | None,
        upstream: str,
        *,
        by_url: bool = False,
        record: Record | None = None,
    ) -> web.StreamResponse:
        """Serve the artifact at upstream ``url`` (a hit, or a fill verified against
        ``expected``). ``by_url``: a channel path, whose answer the URL alone decides:
        the blob the index maps it to; a client's ``x-expected-sha256`` that disagrees is
        a 409, and one the index cannot confirm makes a fill, never a hit."""
        warm = _is_warm(request)
        if warm:
            self._require_token(request, admin=False)
        if expected is None:  # a PyPI file: the digest its index page gave, if one did
            expected = self.pypi.expected_sha256(url)
        if by_url:
            known = await self._known_sha(url, upstream)
            if expected is not None and known is not None and known != expected:
                self.metrics.refused.labels("digest_conflict").inc()
                raise HTTPProblem(
                    409,
                    f"x-expected-sha256 {expected} is not what this mirror holds for {url} "
                    f"({known}): check the lock, or the channel changed the file",
                )
            sha = known
        else:
            sha = expected or self._lookup_url(url)
        if sha is not None:  # a hit if the blob is there (no lstat first: the open says)
            resp = await self._serve_hit(request, ctx, sha, url, warm=warm)
            if resp is not None:
                return resp
        fill = self.fills.find(url, expected)
        if fill is None:
            bad = self.fills.recent_mismatch(url, expected)
            if bad is not None:
                raise HTTPProblem(bad.status, bad.message, {"x-pixicache-error": bad.reason})
            full = self.fills.store_full()
            if full:
                self.metrics.refused.labels("store_full").inc()
                raise HTTPProblem(507, full)
            fill = self.fills.start(
                url, expected, upstream,
                by_url=self.upstreams.variants(url, upstream) if by_url else None,
                limit=_size_limit(request, self.config.max_artifact_size),
                size=record.size if record else None,
                md5=record.md5 if record and not record.sha256 else None,
            )  # fmt: skip
            ctx.cache = "miss"
        else:
            ctx.cache = "coalesced"
        self.metrics.cache.labels(ctx.cache).inc()
        return await self._serve_fill(request, ctx, fill, expected, warm)

    async def _vouched_digest(
        self, upstream: str, rest: list[str], url: str
    ) -> tuple[str | None, Record | None]:
        """For a request without ``x-expected-sha256``: the digest something else vouches
        for. A URL this mirror filled (verified) before; a PyPI file's index page; a
        conda package's record in its channel's ``repodata.json``. Nothing: an
        :class:`HTTPProblem` (a fill nothing can verify is never made)."""
        known = await self._known_sha(url, upstream)
        if known is not None and self.store.has(known):
            return known, None
        if is_distribution(rest[-1]) and not rest[-1].endswith(CONDA_EXTENSIONS):
            learned = self.pypi.expected_sha256(url) or await self._learn_pypi(rest[-1], url)
            if learned is None:
                raise HTTPProblem(
                    404,
                    f"{rest[-1]} was asked for without x-expected-sha256 and no index page of "
                    "this mirror lists it with a digest: nothing says what its bytes must be, "
                    "so it is not fetched",
                )
            return learned, None
        rec = await self.records.record(
            upstream, rest, self.upstreams.channel_url(upstream, [*rest[:-1], "repodata.json"]) or ""
        )
        return rec.sha256, rec

    async def _learn_pypi(self, filename: str, url: str) -> str | None:
        """Read the project page of ``filename`` on each PyPI upstream, for its digest."""
        from pixicache.store.view import project_of_file

        project = project_of_file(filename)
        for up in self.config.upstreams:
            if up.kind != "pypi":
                continue
            with contextlib.suppress(HTTPProblem):
                await self.pypi.page(up.name, up.url, project)
            found = self.pypi.expected_sha256(url)
            if found is not None:
                return found
        return None

    async def _known_sha(self, url: str, upstream: str) -> str | None:
        """The digest the index maps ``url`` to, also under the upstream's aliases (an
        agent on this node records the lock's URL, e.g. conda-forge's public one)."""
        sha = self._url_index.get(url)
        if sha is not None:
            return sha
        for candidate in self.upstreams.variants(url, upstream):
            sha = await self._in_thread(self.store.lookup_url, candidate)
            if sha is not None:
                if len(self._url_index) > 100_000:
                    self._url_index.clear()
                self._url_index[url] = sha
                return sha
        return None

    def _lookup_url(self, url: str) -> str | None:
        sha = self._url_index.get(url)
        if sha is None:
            sha = self.store.lookup_url(url)
            if sha is not None:
                if len(self._url_index) > 100_000:
                    self._url_index.clear()
                self._url_index[url] = sha
        return sha

    async def _serve_hit(
        self, request: web.BaseRequest, ctx: _Ctx, sha: str, url: str | None, *, warm: bool = False
    ) -> web.StreamResponse | None:
        """Send a committed blob (``None``: it vanished meanwhile (evicted), or it is not
        the digest's bytes any more, or something else stands at its path: a miss)."""
        try:
            fd, st = self.blobs.open(sha)
        except (FileNotFoundError, NotADirectoryError):
            self._url_index.pop(url or "", None)
            return None
        except NotRegular as exc:  # a planted link or special file: never followed
            log.error("%s; quarantined, not served", exc)
            self.metrics.refused.labels("bad_blob").inc()
            with contextlib.suppress(Exception):
                await self._in_thread(self.store.verify, [sha])
            return None
        if not await self.trust.sendable(sha, fd, st):
            os.close(fd)
            self._url_index.pop(url or "", None)
            return None
        # a long send: gc skips pinned blobs (a small one is read at once)
        pinned = st.st_size > SMALL_BODY
        if pinned:
            self.blobs.pin(sha)
        try:
            with os.fdopen(fd, "rb", buffering=0) as fobj:
                ctx.cache = "hit"
                self.touched(sha, st.st_size)
                if warm:
                    return web.Response(
                        status=204, headers={"ETag": f'"{sha}"', "x-pixicache-cache": "hit"}
                    )
                if ctx.route in ("artifact", "sha256"):  # the front path may answer it now
                    self.known_hits.learn(
                        request.raw_path, ctx.route, sha, url if ctx.route == "artifact" else None
                    )
                return await self._send_file(
                    request,
                    ctx,
                    fobj,
                    st.st_size,
                    st.st_mtime,
                    etag=f'"{sha}"',
                    cache_control=IMMUTABLE,
                    extra=HIT_HEADERS,
                )
        finally:
            if pinned:
                self.blobs.unpin(sha)

    def touched(self, sha: str, size: int) -> None:
        """A hit of ``sha`` is sent: counted, and its last use noted for LRU eviction
        (never its URL: a client's x-expected-sha256 must not teach the index what a URL
        holds; only verified fills do)."""
        self._hits.inc()
        self._touches[sha] = (size, None)

    async def _send_file(
        self,
        request: web.BaseRequest,
        ctx: _Ctx,
        fobj: IO[bytes],
        size: int,
        mtime: float,
        *,
        etag: str | None,
        cache_control: str,
        content_type: str = "application/octet-stream",
        extra: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        """A file with validators, conditional GET, a single Range, HEAD; body by sendfile."""
        status, headers, start, length = answer_file(
            request.headers, size, mtime, etag=etag, cache_control=cache_control,
            content_type=content_type, extra=extra,
        )  # fmt: skip
        if status in (304, 416):
            return web.Response(status=status, headers=headers)
        if length <= SMALL_BODY and request.method != "HEAD":
            # small: headers and body in one write, no sendfile round trip
            body = os.pread(fobj.fileno(), length, start)
            if len(body) != length:
                raise HTTPProblem(503, "the file changed while being read; retry")
            ctx.bytes += length
            return web.Response(status=status, headers=headers, body=body)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = length
        if request.method == "HEAD" or length == 0:
            await resp.prepare(request)
            return resp
        cork(request, True)
        try:
            await resp.prepare(request)
            ctx.bytes += await send_region(request, fobj, start, length, self.config.send_timeout)
        except ConnectionResetError as exc:
            ctx.aborted = True
            ctx.bytes += exc.sent if isinstance(exc, SendAborted) else 0
        finally:
            cork(request, False)
        return resp

    async def _serve_fill(
        self, request: web.BaseRequest, ctx: _Ctx, fill: Fill, expected: str | None, warm: bool
    ) -> web.StreamResponse:
        """Stream a fill to this client as it arrives (see :mod:`pixicache.serve.fill`)."""
        fill.acquire()
        try:
            await fill.wait_ready()
            if warm or fill.state == "present":
                await fill.wait_committed()
            if fill.failed:
                return _fill_problem(fill)
            if fill.state == "present" or fill.read_fd is None:
                assert fill.digest is not None
                if warm:
                    return web.Response(status=204, headers={"ETag": f'"{fill.digest}"'})
                resp = await self._serve_hit(request, ctx, fill.digest, fill.url)
                if resp is None:
                    raise HTTPProblem(
                        503, "the artifact was evicted right after it was stored; retry"
                    )
                return resp
            if warm:
                if expected is not None and fill.digest != expected:
                    raise HTTPProblem(
                        502, f"upstream's {fill.url} does not have SHA-256 {expected}"
                    )
                return web.Response(status=204, headers={"ETag": f'"{fill.digest}"'})
            return await self._stream_fill(request, ctx, fill, expected)
        finally:
            fill.release()

    async def _stream_fill(
        self, request: web.BaseRequest, ctx: _Ctx, fill: Fill, expected: str | None
    ) -> web.StreamResponse:
        digest = expected or fill.expected
        etag = f'"{digest}"' if digest else None
        headers = {
            "Accept-Ranges": "bytes",
            "Cache-Control": IMMUTABLE,
            "Content-Type": "application/octet-stream",
            "x-pixicache-cache": ctx.cache,
        }
        if etag:
            headers["ETag"] = etag
        total = fill.total
        status, start, end = 200, 0, total
        if request.headers.get("Range") and if_range_allows(request.headers, etag, None):
            if total is None:
                # no size announced: answer the Range from the store once the fill is done
                await fill.wait_committed()
                if fill.failed or fill.digest is None:
                    return _fill_problem(fill)
                resp = await self._serve_hit(request, ctx, fill.digest, fill.url)
                if resp is None:
                    raise HTTPProblem(
                        503, "the artifact was evicted right after it was stored; retry"
                    )
                return resp
            span = parse_range(request.headers["Range"], total)
            if span == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{total}"
                return web.Response(status=416, headers=headers)
            if isinstance(span, tuple):
                status, start, end = 206, span[0], span[1] + 1
                headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{total}"
        if request.method != "HEAD":
            # headers go out with the first body bytes: a fill that fails before
            # writing anything (upstream reset, disk full) is answered with its status
            while not (fill.failed or fill.ok or fill.offset > 0):
                await fill.wait_change()
            if fill.failed:
                return _fill_problem(fill)
        resp = web.StreamResponse(status=status, headers=headers)
        if end is not None:
            resp.content_length = end - start
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        complete = await self._tail(request, resp, ctx, fill, start, end, expected)
        if not complete and not ctx.aborted:
            ctx.aborted = True
            abort(request)
        return resp

    async def _tail(
        self,
        request: web.BaseRequest,
        resp: web.StreamResponse,
        ctx: _Ctx,
        fill: Fill,
        start: int,
        end: int | None,
        expected: str | None,
    ) -> bool:
        """Send bytes [start, end) of the fill as they arrive; False if it must be aborted.

        The last byte goes out only once the fill's digest is verified (and
        matches ``expected``), so a failed fill never looks complete.
        """
        timeout = self.config.send_timeout
        pos = start
        fobj = fill.reader()
        try:
            while True:
                if fill.failed:
                    return False
                final = fill.ok
                avail = fill.offset
                if end is None:  # chunked: the terminating chunk is what is held back
                    if pos < avail:
                        n = min(avail - pos, TAIL_CHUNK)
                        data = os.pread(fobj.fileno(), n, pos)
                        await write_chunk(request, resp, data, timeout)
                        pos += len(data)
                        ctx.bytes += len(data)
                        continue
                    if final:
                        return expected is None or fill.digest == expected
                else:
                    stop = min(avail, end)
                    if not final:
                        stop = min(stop, end - 1)
                    if pos < stop:
                        sent = await send_region(request, fobj, pos, stop - pos, timeout)
                        pos += sent
                        ctx.bytes += sent
                        continue
                    if final and pos >= end:
                        return expected is None or fill.digest == expected
                await fill.wait_change()
        except ConnectionResetError as exc:
            ctx.aborted = True
            ctx.bytes += exc.sent if isinstance(exc, SendAborted) else 0
            return True
        finally:
            fobj.close()

    # -- PyPI project pages --------------------------------------------------------------------
    async def _project_page(
        self, request: web.BaseRequest, ctx: _Ctx, upstream: str, index_url: str, project: str
    ) -> web.StreamResponse:
        name = normalize_project(project)
        if name != project:  # PEP 503: the normalized name is the page's one URL
            raise HTTPProblem(301, f"see /{upstream}/{name}/", {"Location": f"/{upstream}/{name}/"})
        page, how = await self.pypi.page(upstream, index_url, name)
        ctx.cache = how
        accept = request.headers.get("Accept")
        body, ctype, unmirrored, etag = self.pypi.render(page, accept)
        headers = {
            "Content-Type": ctype,
            "Cache-Control": f"public, max-age={int(self.repodata.ttl)}",
            "Vary": "Accept",
            "ETag": etag,
            "x-pixicache-cache": how,
        }
        if unmirrored:
            headers["x-pixicache-unmirrored"] = str(unmirrored)
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers={k: v for k, v in headers.items() if k != "Content-Type"})
        ctx.bytes = len(body)
        return web.Response(status=200, body=b"" if request.method == "HEAD" else body, headers=headers)

    # -- metadata ------------------------------------------------------------------------------
    async def _metadata(
        self, request: web.BaseRequest, ctx: _Ctx, upstream: str, rest: list[str], url: str
    ) -> web.StreamResponse:
        entry, path, how = await self.repodata.get(upstream, rest, url)
        ctx.cache = how
        max_age = f"public, max-age={int(self.repodata.ttl)}"
        if entry.status != 200:
            raise HTTPProblem(404, f"upstream has no {url}", {"Cache-Control": max_age})
        try:
            fobj = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise HTTPProblem(503, f"{url} was being replaced; retry") from None
        with fobj:
            st = os.fstat(fobj.fileno())
            extra = {"x-pixicache-cache": how}
            if how == "stale":
                extra["Warning"] = '110 - "Response is Stale"'
            return await self._send_file(
                request,
                ctx,
                fobj,
                st.st_size,
                parse_http_date(entry.last_modified) or st.st_mtime,
                etag=entry.etag,
                cache_control=max_age,
                content_type=entry.content_type,
                extra=extra,
            )

    # -- operations ----------------------------------------------------------------------------
    def _index(self) -> web.Response:
        lines = [f"pixicache serve {__version__}: a pull-through conda and PyPI mirror", "", "upstreams:"]
        lines += [
            f"  /{u.name}/...  ->  {u.url}/...{'  (PyPI simple index)' if u.kind == 'pypi' else ''}"
            for u in self.config.upstreams
        ]
        lines += [
            "",
            "also: /sha256/<hex>?url=<upstream URL>, /pixi/<version>/<archive>, /healthz, /metrics",
        ]
        return web.Response(text="\n".join(lines) + "\n")

    async def _agent_route(self, request: web.BaseRequest, ctx: _Ctx, name: str) -> web.StreamResponse:
        """The single-file agent (``--agent FILE``): what ``bootstrap.sh`` downloads.

        Its ETag is its SHA-256, which jobs check against the digest pinned in
        the submit file (``PIXICACHE_AGENT_SHA256``).
        """
        agent = self.config.agent_file
        if agent is None or name != agent.name:
            raise HTTPProblem(404, "no agent is served here (start the mirror with --agent FILE)")
        try:
            fobj = open(agent, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise HTTPProblem(404, f"the agent file cannot be read: {exc.strerror}") from None
        with fobj:
            st = os.fstat(fobj.fileno())
            key = (st.st_size, st.st_mtime_ns)
            if self._agent_digest is None or self._agent_digest[0] != key:
                loop = asyncio.get_running_loop()
                digest = await loop.run_in_executor(None, hash_file, str(agent))
                self._agent_digest = (key, digest)
            etag = f'"{self._agent_digest[1]}"'
            return await self._send_file(
                request, ctx, fobj, st.st_size, st.st_mtime, etag=etag, cache_control="public, max-age=60"
            )

    def _health(self) -> web.Response:
        body = {
            "status": "draining" if self.draining else "ok",
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "fills_in_flight": len(self.fills.in_flight),
            "store_blobs": self.store_blobs,
            "store_bytes": self.store_bytes,
            "store_full": bool(self.fills.store_full()),
        }
        return web.json_response(body, status=503 if self.draining else 200)

    def _require_token(self, request: web.BaseRequest, *, admin: bool) -> None:
        token = self.config.token
        if token is None:
            if admin and not self._is_local(request):
                raise HTTPProblem(
                    403, "admin endpoints need --token (PIXICACHE_SERVE_TOKEN) off loopback"
                )
            return
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            raise HTTPProblem(
                401,
                "a valid 'Authorization: Bearer <token>' is required",
                {"WWW-Authenticate": "Bearer"},
            )

    def _is_local(self, request: web.BaseRequest) -> bool:
        """A request from this host itself: the client the server reports (the one behind
        a trusted proxy, from ``X-Forwarded-For``) is loopback; a request a trusted proxy
        forwards without saying for whom is not local."""
        peer = request.remote
        forwarded = request.headers.get("X-Forwarded-For")
        if not forwarded and is_trusted_proxy(peer, self._trusted_proxies):
            return False
        client = client_address(peer, forwarded, self._trusted_proxies)
        return _is_loopback(client) and _is_loopback(peer)

    async def _admin(
        self, request: web.BaseRequest, segments: list[str], query: str
    ) -> web.StreamResponse:
        self._require_token(request, admin=True)
        what = "/".join(segments)
        if what == "gc":
            if request.method != "POST":
                raise HTTPProblem(405, "POST /admin/gc", {"Allow": "POST"})
            from pixicache.config import parse_size
            from pixicache.errors import ConfigError

            raw = parse_qs(query).get("max_size", [None])[0]
            try:
                limit = parse_size(raw) if raw is not None else self.config.max_size
            except ConfigError as exc:
                raise HTTPProblem(400, str(exc)) from None
            if limit is None:
                raise HTTPProblem(400, "no --max-size configured: give ?max_size=SIZE")
            return web.json_response(await self._gc(limit))
        if what == "fills" and request.method in ("GET", "HEAD"):
            return web.json_response([f.to_json() for f in self.fills.in_flight])
        raise HTTPProblem(404, "admin endpoints: POST /admin/gc[?max_size=SIZE], GET /admin/fills")


def _problem(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(status=status, text=message + "\n", headers=headers)
    resp.headers.setdefault("Cache-Control", "no-store")
    return resp


def _fill_problem(fill: Fill) -> web.Response:
    err = fill.error or FillFailed(502, f"fetching {fill.url} failed")
    # the reason, machine-readable: a pixicache client tells bad bytes ("digest") apart
    return _problem(err.status, err.message, {"x-pixicache-error": err.reason})


def _expected_header(request: web.BaseRequest) -> str | None:
    value = request.headers.get("x-expected-sha256")
    if value is None:
        return None
    value = value.strip().lower()
    if not is_sha256(value):
        raise HTTPProblem(400, "x-expected-sha256 must be 64 hex digits")
    return value


def _size_limit(request: web.BaseRequest, default: int) -> int:
    """The most bytes a fill's body may have: the size a pixicache client says the lock
    records (``x-pixicache-expected-size``), else the configured maximum."""
    value = request.headers.get("x-pixicache-expected-size", "")
    if value.isdigit() and len(value) <= 18:
        return min(int(value), default)
    return default


def _is_warm(request: web.BaseRequest) -> bool:
    return request.headers.get("x-pixicache-warm", "").strip().lower() in ("1", "true", "yes")


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def _printable(text: str, limit: int = 300) -> str:
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


def _pinned_sha256(version: str, archive: str) -> str | None:
    """The pinned digest of a Pixi release archive, if the pin table has it."""
    try:
        from pixicache.backends.pixi.pins import find_pin
    except ImportError:  # pragma: no cover - the pin table module is optional here
        return None
    try:
        pin = find_pin(version=version, archive=archive)
    except Exception as exc:  # a broken site pin table must not take the mirror down
        log.warning("cannot read the Pixi pin table: %s", exc)
        return None
    return pin.sha256 if pin is not None else None
