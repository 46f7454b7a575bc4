"""Channel metadata pass-through: ``repodata.json`` and friends, cached for a short TTL.

Package archives are immutable; channel metadata is not. Metadata files are
kept outside the content-addressed store, under ``<store>/repodata/<upstream>/<path>``
with a ``.meta.json`` sidecar (upstream ``ETag``/``Last-Modified``, content
type, when it was fetched, and whether upstream had it at all). A request
within ``ttl`` seconds of the last fetch is answered from disk; after that the
server revalidates with ``If-None-Match``/``If-Modified-Since`` (a ``304`` from
upstream costs no body). Concurrent requests for one file share one upstream
request. A ``404`` is remembered for the TTL too (rattler probes ``.zst`` and
sharded variants that many channels do not have). If upstream cannot be
reached, a stale copy is served rather than nothing.

Shards (``shards/<sha256>.msgpack.zst``) are named by their content, so they
are kept without revalidation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from pixicache.serve.fill import USER_AGENT
from pixicache.serve.http import HTTPProblem
from pixicache.serve.metrics import Metrics

log = logging.getLogger("pixicache.serve")

METADATA_FILES = frozenset(
    {
        "repodata.json",
        "repodata.json.zst",
        "repodata.json.bz2",
        "repodata.json.gz",
        "repodata.json.jlap",
        "current_repodata.json",
        "current_repodata.json.zst",
        "current_repodata.json.bz2",
        "repodata_from_packages.json",
        "repodata_from_packages.json.zst",
        "repodata_shards.msgpack.zst",
    }
)
"""File names served from a ``{channel}/{subdir}/`` directory as channel metadata."""

_WRITE_BATCH = 1 << 20


def is_metadata(rest: Sequence[str]) -> bool:
    """Whether ``/{upstream}/{rest...}`` names channel metadata (vs. a package or nothing)."""
    if not rest:
        return False
    name = rest[-1]
    if len(rest) == 1:
        return name == "channeldata.json"
    if name in METADATA_FILES:
        return True
    return len(rest) >= 3 and rest[-2] == "shards" and name.endswith(".msgpack.zst")


def is_immutable(rest: Sequence[str]) -> bool:
    """Shards are content-addressed: cached without revalidation."""
    return len(rest) >= 3 and rest[-2] == "shards"


@dataclass
class MetaEntry:
    """What is known about one cached metadata file."""

    url: str
    status: int  # 200: the file is on disk; 404: upstream does not have it
    fetched: float  # time.time() of the last fetch or revalidation
    etag: str | None = None
    last_modified: str | None = None
    content_type: str = "application/octet-stream"
    size: int = 0


class RepodataCache:
    """Fetches, caches and revalidates channel metadata files.

    Args:
        root: where the files are kept (``<store>/repodata``).
        session: returns the aiohttp client session.
        metrics: updated for upstream requests and errors.
        executor: runs the file writes.
        ttl: seconds a file is served without asking upstream.
    """

    def __init__(
        self,
        root: Path,
        session: Callable[[], aiohttp.ClientSession],
        metrics: Metrics,
        executor: Executor,
        ttl: float,
    ) -> None:
        self.root = root
        self._session = session
        self.metrics = metrics
        self.executor = executor
        self.ttl = ttl
        self._flights: dict[str, asyncio.Future[tuple[MetaEntry, str]]] = {}

    def path_for(self, upstream: str, rest: Sequence[str]) -> Path:
        return self.root.joinpath(upstream, *rest)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the file executor."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def get(
        self, upstream: str, rest: Sequence[str], url: str, *, accept: str | None = None
    ) -> tuple[MetaEntry, Path, str]:
        """The entry for ``/{upstream}/{rest}`` (refreshed if older than the TTL), its
        file, and how it was obtained: ``cached``, ``revalidated``, ``fetched``,
        ``coalesced`` (joined another request's refresh) or ``stale``.

        Raises :class:`HTTPProblem` (502/504) if upstream fails and nothing is cached.
        """
        path = self.path_for(upstream, rest)
        entry = _read_meta(path)
        fresh_for = float("inf") if is_immutable(rest) else self.ttl
        if (
            entry is not None
            and time.time() - entry.fetched < fresh_for
            and (entry.status != 200 or path.exists())
        ):
            return entry, path, "cached"
        key = str(path)
        flight = self._flights.get(key)
        joined = flight is not None
        if flight is None:
            flight = asyncio.ensure_future(self._refresh(upstream, url, path, entry, accept))
            self._flights[key] = flight
            flight.add_done_callback(lambda _f: self._flights.pop(key, None))
        got, how = await asyncio.shield(flight)
        return got, path, "coalesced" if joined and how != "stale" else how

    async def _refresh(
        self, upstream: str, url: str, path: Path, entry: MetaEntry | None, accept: str | None
    ) -> tuple[MetaEntry, str]:
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if accept:
            headers["Accept"] = accept
        have_file = entry is not None and entry.status == 200 and path.exists()
        if have_file and entry is not None:
            if entry.etag:
                headers["If-None-Match"] = entry.etag
            if entry.last_modified:
                headers["If-Modified-Since"] = entry.last_modified
        self.metrics.upstream_requests.labels(upstream, "metadata").inc()
        try:
            async with self._session().get(url, headers=headers) as resp:
                if resp.status == 304 and have_file and entry is not None:
                    entry.fetched = time.time()
                    _write_meta(path, entry)
                    return entry, "revalidated"
                if resp.status in (404, 410):
                    new = MetaEntry(url=url, status=404, fetched=time.time())
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _write_meta(path, new)
                    return new, "fetched"
                if resp.status != 200:
                    self.metrics.upstream_errors.labels("status").inc()
                    raise _UpstreamStatus(resp.status)
                size = await self._store_body(resp, path)
                new = MetaEntry(
                    url=url,
                    status=200,
                    fetched=time.time(),
                    etag=resp.headers.get("ETag"),
                    last_modified=resp.headers.get("Last-Modified"),
                    content_type=resp.headers.get("Content-Type", "application/octet-stream"),
                    size=size,
                )
                _write_meta(path, new)
                return new, "fetched"
        except (aiohttp.ClientError, asyncio.TimeoutError, _UpstreamStatus, ConnectionError) as exc:
            if not isinstance(exc, _UpstreamStatus):
                reason = "timeout" if isinstance(exc, asyncio.TimeoutError) else "connection"
                self.metrics.upstream_errors.labels(reason).inc()
            if have_file and entry is not None:
                log.warning(
                    "serving a stale copy of %s: upstream failed (%s)",
                    url,
                    exc or type(exc).__name__,
                )
                return entry, "stale"
            status = 504 if isinstance(exc, asyncio.TimeoutError) else 502
            raise HTTPProblem(
                status, f"upstream failed for {url}: {exc or type(exc).__name__}"
            ) from None

    async def _store_body(self, resp: aiohttp.ClientResponse, path: Path) -> int:
        loop = asyncio.get_running_loop()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(resp):x}.tmp")
        fh = await loop.run_in_executor(self.executor, open, tmp, "wb")
        size = 0
        try:
            batch = bytearray()
            async for chunk in resp.content.iter_any():
                self.metrics.upstream_bytes.inc(len(chunk))
                batch += chunk
                if len(batch) >= _WRITE_BATCH:
                    await loop.run_in_executor(self.executor, fh.write, batch)
                    size += len(batch)
                    batch = bytearray()
            if batch:
                await loop.run_in_executor(self.executor, fh.write, batch)
                size += len(batch)
            await loop.run_in_executor(self.executor, fh.close)
            if resp.content_length is not None and size != resp.content_length:
                raise aiohttp.ClientPayloadError(f"got {size} of {resp.content_length} bytes")
            os.replace(tmp, path)
        except BaseException:
            fh.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return size


class _UpstreamStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def _read_meta(path: Path) -> MetaEntry | None:
    try:
        data: dict[str, Any] = json.loads(_meta_path(path).read_text())
        return MetaEntry(**data)
    except (OSError, ValueError, TypeError):
        return None


def _write_meta(path: Path, entry: MetaEntry) -> None:
    target = _meta_path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    data = asdict(entry)
    tmp.write_text(json.dumps(data))
    os.replace(tmp, target)
