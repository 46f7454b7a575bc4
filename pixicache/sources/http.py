"""HTTP(S) sources: a mirror (conda channel layout or digest endpoint) and upstream.

* ``mirror=URL`` — a conda mirror: ``URL/<channel path>/<subdir>/<file>``, as
  pixi's ``mirrors`` setting maps channels. Every request carries
  ``x-expected-sha256`` (as rattler does), so a pixicache mirror can verify
  a fill. Artifacts that are not conda packages go to ``URL/sha256/<hex>``.
* ``digest=URL`` — a pixicache mirror addressed by digest only:
  ``URL/sha256/<hex>?url=<upstream URL>`` (the mirror fills a miss from that
  URL if it is under one of its allow-listed upstreams).
* ``upstream`` — the artifact's own URL, as the lock records it.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit

import httpx

from pixicache.errors import IntegrityError, SourceNotFound, SourceUnavailable
from pixicache.httputil import content_range_start, parse_retry_after
from pixicache.sources.paths import channel_path, copy_file, digest_url, path_from_file_url

if TYPE_CHECKING:
    from pixicache.model.artifact import Artifact
    from pixicache.sources.base import FetchContext
    from pixicache.store import BlobWriter

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
"""Statuses worth another try of the same source (after a pause). 507 (a
mirror whose disk is full) is not among them: the next source is tried at once."""


def transport_failure(url: str, exc: Exception) -> SourceUnavailable:
    """The :class:`SourceUnavailable` for an httpx transport error, with a reason a user
    can act on.

    A host that does not resolve is unreachable and not transient (it does not
    exist from here); a refused or failed connection is unreachable and transient;
    resets and timeouts are transient.
    """
    host = urlsplit(url).netloc or url
    proxy = proxy_for(url)
    if proxy:
        host = f"{host} (through the proxy {proxy})"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            return SourceUnavailable(
                f"cannot resolve host {host} ({cause.strerror or cause})", unreachable=True
            )
        if isinstance(cause, ConnectionRefusedError) or (
            isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED
        ):
            return SourceUnavailable(
                f"connection to {host} refused (nothing listens there)",
                transient=True,
                unreachable=True,
            )
        cause = cause.__cause__ or cause.__context__
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if "name or service not known" in lowered or "name resolution" in lowered or "nodename" in lowered:
        return SourceUnavailable(f"cannot resolve host {host} ({text})", unreachable=True)
    if isinstance(exc, httpx.ConnectError):
        return SourceUnavailable(
            f"cannot connect to {host}: {text}", transient=True, unreachable=True
        )
    if isinstance(exc, httpx.TimeoutException):
        return SourceUnavailable(
            f"timed out talking to {host} ({type(exc).__name__})", transient=True
        )
    if isinstance(exc, httpx.RemoteProtocolError):
        return SourceUnavailable(f"{host} closed the connection early ({text})", transient=True)
    return SourceUnavailable(f"error talking to {host}: {text}", transient=True)


def proxy_for(url: str) -> str | None:
    """The proxy httpx will use for ``url`` per ``HTTP(S)_PROXY``/``NO_PROXY``, if any."""
    import urllib.request

    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


_SAID_LIMIT = 300


def _said(resp: httpx.Response) -> str:
    """What an error response says, when it is short text (a pixicache mirror's
    own reason, e.g. "not under an upstream of this mirror"); never more than a
    line of printable characters, never a body that is not text."""
    ctype = resp.headers.get("content-type", "")
    if not ctype.startswith(("text/plain", "application/problem+json", "application/json")):
        return ""
    try:
        raw = b""
        for chunk in resp.iter_raw():
            raw += chunk
            if len(raw) >= _SAID_LIMIT:
                break
    except httpx.HTTPError:
        return ""
    text = raw[:_SAID_LIMIT].decode("utf-8", errors="replace")
    if ctype.startswith("application/"):
        import json

        try:
            data = json.loads(text)
        except ValueError:
            return ""
        text = str(data.get("detail") or data.get("title") or "") if isinstance(data, dict) else ""
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return f": {line}" if line else ""


def stream_http(
    ctx: FetchContext,
    url: str,
    writer: BlobWriter,
    headers: dict[str, str] | None = None,
) -> None:
    """One GET of ``url`` into ``writer``, resuming from ``writer.offset``.

    Raises :class:`SourceUnavailable` (transient or not) for every failure, and
    :class:`IntegrityError` when a pixicache mirror refused its upstream's bytes as not
    matching the digest the request carried.
    """
    req_headers = dict(headers or {})
    offset = writer.offset
    if offset:
        req_headers["Range"] = f"bytes={offset}-"
    try:
        with ctx.client.stream("GET", url, headers=req_headers) as resp:
            status = resp.status_code
            if status in (404, 410):
                raise SourceNotFound(f"{url}: HTTP {status} (not there){_said(resp)}")
            if status == 416 and offset:
                writer.restart()
                raise SourceUnavailable(f"{url}: HTTP 416 for a resume", transient=True)
            if status == 502 and resp.headers.get("x-pixicache-error") == "digest":
                # a pixicache mirror got bytes from its upstream that contradict the digest
                # this request carried, and kept none: the bytes out there are bad
                raise IntegrityError(f"{url}: the mirror refused upstream's bytes{_said(resp)}")
            if status in TRANSIENT_STATUS:
                wait = parse_retry_after(resp.headers.get("retry-after"))
                note = f" (asks to retry after {wait:g} s)" if wait is not None else ""
                raise SourceUnavailable(
                    f"{url}: HTTP {status}{note}{_said(resp)}", transient=True, retry_after=wait
                )
            if status == 206:
                start = content_range_start(resp.headers.get("content-range"))
                if start != offset:
                    writer.restart()
                    raise SourceUnavailable(
                        f"{url}: the server answered a Range request with bytes from {start}",
                        transient=True,
                    )
            elif status == 200:
                if offset:
                    writer.restart()  # the server ignored Range: start over
            else:
                raise SourceUnavailable(f"{url}: HTTP {status}{_said(resp)}")
            for chunk in resp.iter_raw():
                writer.write(chunk)
    except httpx.TransportError as exc:
        raise transport_failure(url, exc) from exc
    except httpx.InvalidURL as exc:
        raise SourceUnavailable(f"invalid URL {url!r}: {exc}") from exc


class MirrorSource:
    """A conda mirror laid out like its channels (``--source mirror=URL``)."""

    kind: ClassVar[str] = "mirror"
    tier = "mirror"

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = f"mirror {self.base_url}"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec.startswith(("http://", "https://"))

    @classmethod
    def from_spec(cls, value: str) -> MirrorSource:
        return cls(value)

    def location(self, artifact: Artifact) -> str | None:
        chan = channel_path(artifact)
        if artifact.kind == "conda" and chan and artifact.subdir:
            return f"{self.base_url}{chan}/{artifact.subdir}/{artifact.filename}"
        return digest_url(self.base_url, artifact) if artifact.sha256 else None

    def fetch(self, artifact: Artifact, writer: BlobWriter, ctx: FetchContext) -> None:
        url = self.location(artifact)
        assert url is not None
        stream_http(ctx, url, writer, _expect_headers(artifact))


def _expect_headers(artifact: Artifact) -> dict[str, str]:
    """What a pixicache mirror is told about the artifact: its digest (rattler sends it
    too) and its size, so a fill stops at that many bytes."""
    headers = {"x-expected-sha256": artifact.sha256} if artifact.sha256 else {}
    if artifact.size is not None:
        headers["x-pixicache-expected-size"] = str(artifact.size)
    return headers


class DigestSource:
    """A pixicache mirror addressed by digest (``--source digest=URL``)."""

    kind: ClassVar[str] = "digest"
    tier = "mirror"

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = f"mirror {self.base_url} (by digest)"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return False

    @classmethod
    def from_spec(cls, value: str) -> DigestSource:
        return cls(value)

    def location(self, artifact: Artifact) -> str | None:
        # an artifact pinned by MD5 alone has no digest to ask for
        return digest_url(self.base_url, artifact) if artifact.sha256 else None

    def fetch(self, artifact: Artifact, writer: BlobWriter, ctx: FetchContext) -> None:
        stream_http(ctx, digest_url(self.base_url, artifact), writer)


class UpstreamSource:
    """The artifact's own URL (``--source upstream``)."""

    kind: ClassVar[str] = "upstream"
    tier = "upstream"
    label = "upstream"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec == "upstream"

    @classmethod
    def from_spec(cls, value: str) -> UpstreamSource:
        return cls()

    def location(self, artifact: Artifact) -> str | None:
        if artifact.url.startswith(("http://", "https://", "file://")):
            return artifact.url
        return None

    def fetch(self, artifact: Artifact, writer: BlobWriter, ctx: FetchContext) -> None:
        if artifact.url.startswith("file://"):
            copy_file(path_from_file_url(artifact.url), writer, ctx.chunk_size)
            return
        stream_http(ctx, artifact.url, writer)
