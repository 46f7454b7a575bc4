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
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from pixicache.serve.fetching import UpstreamRefused, upstream_get
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


KNOWN_SUBDIRS = frozenset(
    {
        "noarch", "linux-32", "linux-64", "linux-aarch64", "linux-armv6l", "linux-armv7l",
        "linux-ppc64", "linux-ppc64le", "linux-riscv64", "linux-s390x", "osx-64", "osx-arm64",
        "win-32", "win-64", "win-arm64", "freebsd-64", "emscripten-wasm32", "wasi-wasm32",
        "zos-z",
    }
)  # fmt: skip
"""The channel subdirs (conda's list): metadata is served only from one of these."""

_SHARD_RE = re.compile(r"^[0-9a-f]{64}\.msgpack\.zst$")
_FILE_LIKE = (".json", ".zst", ".bz2", ".gz", ".jlap", ".conda", ".msgpack", ".whl", ".html")


def is_metadata(rest: Sequence[str]) -> bool:
    """Whether ``/{upstream}/{rest...}`` names channel metadata (vs. a package or nothing):
    ``channeldata.json``, ``[<label path>/]<subdir>/<metadata file>`` or
    ``.../<subdir>/shards/<sha256>.msgpack.zst``, ``<subdir>`` one of
    :data:`KNOWN_SUBDIRS`. No directory of such a path may look like a file
    (``linux-64/repodata.json/repodata.json`` is nothing): a request can never make a
    directory where a real file must go."""
    if not rest:
        return False
    name = rest[-1]
    if len(rest) == 1:
        return name == "channeldata.json"
    if any(seg.endswith(_FILE_LIKE) or seg in METADATA_FILES for seg in rest[:-1]):
        return False
    if name in METADATA_FILES:
        return rest[-2] in KNOWN_SUBDIRS
    return (
        len(rest) >= 3 and rest[-2] == "shards" and rest[-3] in KNOWN_SUBDIRS
        and bool(_SHARD_RE.match(name))
    )  # fmt: skip


def is_immutable(rest: Sequence[str]) -> bool:
    """Shards are content-addressed: cached without revalidation."""
    return len(rest) >= 3 and rest[-2] == "shards"


NEGATIVE_ENTRIES = 10_000
"""How many "upstream has no such file" answers are remembered (in memory, for the TTL)."""


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
        may_redirect: Callable[[str, str], bool] | None = None,
        make_dir: Callable[[Path], Any] | None = None,
    ) -> None:
        self.may_redirect = may_redirect or (lambda _upstream, _url: False)
        self._make_dir = make_dir or (lambda p: p.mkdir(parents=True, exist_ok=True))
        self.root = root
        self._session = session
        self.metrics = metrics
        self.executor = executor
        self.ttl = ttl
        self._flights: dict[str, asyncio.Future[tuple[MetaEntry, str]]] = {}
        # path -> the 404 upstream gave: kept in memory only (bounded, for the TTL), so
        # that requests for files nobody has never create files or directories here
        self._missing: OrderedDict[str, MetaEntry] = OrderedDict()

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
        missing = self._missing.get(str(path))
        if missing is not None:
            if time.time() - missing.fetched < self.ttl:
                return missing, path, "cached"
            del self._missing[str(path)]
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
            follow = lambda target: self.may_redirect(upstream, target)  # noqa: E731
            async with upstream_get(self._session(), url, headers, follow) as resp:
                if resp.status == 304 and have_file and entry is not None:
                    entry.fetched = time.time()
                    _write_meta(path, entry)
                    return entry, "revalidated"
                if resp.status in (404, 410):
                    new = MetaEntry(url=url, status=404, fetched=time.time())
                    self._missing[str(path)] = new
                    self._missing.move_to_end(str(path))
                    while len(self._missing) > NEGATIVE_ENTRIES:
                        self._missing.popitem(last=False)
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
        except (
            aiohttp.ClientError, asyncio.TimeoutError, _UpstreamStatus, ConnectionError, UpstreamRefused,
        ) as exc:  # fmt: skip
            if isinstance(exc, UpstreamRefused):
                self.metrics.upstream_errors.labels(exc.reason).inc()
            elif not isinstance(exc, _UpstreamStatus):
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
        self._make_dir(path.parent)
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
