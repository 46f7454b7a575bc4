"""PyPI pass-through: project pages of a simple index, rewritten to point at this mirror.

An upstream of kind ``pypi`` (``--upstream pypi=<index URL>``, or
``NAME=pypi+<index URL>``) is a simple repository (PEP 503). ``GET /{name}/{project}/``
answers its project page:

* upstream is asked once per TTL (``repodata_ttl``) for the page, preferring PEP 691
  JSON, with ``If-None-Match``/``If-Modified-Since`` after that (the fetching,
  caching, coalescing and stale-on-error of :class:`~pixicache.serve.repodata.RepodataCache`);
* the page (JSON or HTML) is parsed into :class:`ProjectFile` records — never passed
  through as bytes — and rendered in the format the client's ``Accept`` asks for:
  PEP 691 JSON (``application/vnd.pypi.simple.v1+json``) or PEP 503 HTML;
* each file URL (resolved against the upstream page) that lies under an allow-listed
  upstream is rewritten to this mirror, root-relative (``/pypi-files/packages/...``),
  so pip, uv and Pixi fetch it here; one under no upstream keeps its URL (the mirror
  never fetches it), and the answer says how many with ``x-pixicache-unmirrored``;
* each file's SHA-256 from the page is remembered (:meth:`PypiPages.expected_sha256`):
  a file fill with no ``x-expected-sha256`` from the client is verified against it.

The files themselves are artifacts: ``/{upstream}/{path}`` ending in a distribution
suffix (:func:`is_distribution`) is served from the content-addressed store like a
conda package (single flight, immutable).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urldefrag, urljoin, urlsplit

from pixicache.model.artifact import is_sha256
from pixicache.serve.http import HTTPProblem
from pixicache.serve.repodata import MetaEntry, RepodataCache
from pixicache.serve.upstreams import UpstreamMap

log = logging.getLogger("pixicache.serve")

__all__ = [
    "PEP691_JSON",
    "ProjectFile",
    "ProjectPage",
    "PypiPages",
    "is_distribution",
    "normalize_project",
    "parse_html",
    "parse_json",
    "render_html",
    "render_json",
]

PEP691_JSON = "application/vnd.pypi.simple.v1+json"
PEP691_HTML = "application/vnd.pypi.simple.v1+html"
UPSTREAM_ACCEPT = f"{PEP691_JSON}, {PEP691_HTML};q=0.2, text/html;q=0.01"

DIST_SUFFIXES = (".whl", ".tar.gz", ".zip", ".tar.bz2", ".tgz", ".egg")
"""File names served as PyPI distributions (immutable artifacts)."""

MAX_FILES = 100_000
"""A project page listing more files than this is refused (502): no real project has."""

_PROJECT_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,198}[A-Za-z0-9])?$")


def is_distribution(name: str) -> bool:
    """Whether a file name is a distribution (or its PEP 658 ``.metadata``)."""
    base = name[: -len(".metadata")] if name.endswith(".metadata") else name
    return base.endswith(DIST_SUFFIXES) and len(base) > 4


def normalize_project(name: str) -> str:
    """PEP 503's normalized name; raises :class:`HTTPProblem` (404) for a non-name."""
    if not _PROJECT_RE.match(name):
        raise HTTPProblem(404, f"{name[:100]!r} is not a project name")
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class ProjectFile:
    """One file of a project page (the PEP 691 fields pixicache keeps)."""

    filename: str
    url: str  # absolute, as upstream gave it (resolved against the page)
    hashes: dict[str, str] = field(default_factory=dict)
    requires_python: str | None = None
    yanked: bool | str = False
    core_metadata: bool | dict[str, str] = False
    size: int | None = None
    upload_time: str | None = None

    @property
    def sha256(self) -> str | None:
        value = self.hashes.get("sha256", "").lower()
        return value if is_sha256(value) else None


@dataclass
class ProjectPage:
    name: str
    files: list[ProjectFile]
    versions: list[str] | None = None
    api_version: str = "1.0"


# -- parsing ---------------------------------------------------------------------------


def _check_count(files: list[ProjectFile]) -> None:
    if len(files) > MAX_FILES:
        raise ValueError(f"the page lists {len(files)} files (more than {MAX_FILES})")


def parse_json(body: bytes, page_url: str, name: str) -> ProjectPage:
    """A PEP 691 JSON project page → :class:`ProjectPage` (``ValueError`` if malformed)."""
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise ValueError("not a PEP 691 project page (no 'files' list)")
    files = []
    for item in data["files"]:
        if not isinstance(item, dict) or not isinstance(item.get("filename"), str):
            raise ValueError("a file entry without a filename")
        if not isinstance(item.get("url"), str):
            raise ValueError(f"file {item['filename'][:100]!r} has no url")
        hashes = item.get("hashes") or {}
        if not isinstance(hashes, dict):
            raise ValueError(f"file {item['filename'][:100]!r}: hashes is not a table")
        meta = item.get("core-metadata", item.get("dist-info-metadata", False))
        size = item.get("size")
        files.append(
            ProjectFile(
                filename=item["filename"],
                url=urldefrag(urljoin(page_url, item["url"]))[0],
                hashes={str(k): str(v) for k, v in hashes.items()},
                requires_python=_opt_str(item.get("requires-python")),
                yanked=item.get("yanked", False) if isinstance(item.get("yanked"), (bool, str)) else False,
                core_metadata=meta if isinstance(meta, (bool, dict)) else False,
                size=size if isinstance(size, int) and size >= 0 else None,
                upload_time=_opt_str(item.get("upload-time")),
            )
        )
        _check_count(files)
    versions = data.get("versions")
    api = (data.get("meta") or {}).get("api-version", "1.0") if isinstance(data.get("meta"), dict) else "1.0"
    return ProjectPage(
        name=name,
        files=files,
        versions=[str(v) for v in versions] if isinstance(versions, list) else None,
        api_version=str(api) if re.match(r"^1\.\d+$", str(api)) else "1.0",
    )


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[tuple[dict[str, str | None], str]] = []
        self._open: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._open, self._text = dict(attrs), []

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._open is not None:
            self.anchors.append((self._open, "".join(self._text).strip()))
            self._open = None
            if len(self.anchors) > MAX_FILES:
                raise ValueError(f"the page has more than {MAX_FILES} links")


def parse_html(body: bytes, page_url: str, name: str) -> ProjectPage:
    """A PEP 503 HTML project page → :class:`ProjectPage` (``ValueError`` if malformed)."""
    parser = _Anchors()
    parser.feed(body.decode("utf-8", errors="replace"))
    parser.close()
    files = []
    for attrs, text in parser.anchors:
        href = attrs.get("href")
        if not href:
            continue
        url, frag = urldefrag(urljoin(page_url, href))
        algo, _, digest = frag.partition("=")
        filename = text or urlsplit(url).path.rsplit("/", 1)[-1]
        yanked: bool | str = False
        if "data-yanked" in attrs:
            yanked = attrs["data-yanked"] or True
        meta_attr = attrs.get("data-core-metadata", attrs.get("data-dist-info-metadata"))
        core: bool | dict[str, str] = False
        if meta_attr is not None:
            m_algo, _, m_digest = meta_attr.partition("=")
            core = {m_algo: m_digest} if m_digest else meta_attr.lower() != "false"
        files.append(
            ProjectFile(
                filename=filename,
                url=url,
                hashes={algo: digest} if algo and digest else {},
                requires_python=attrs.get("data-requires-python"),
                yanked=yanked,
                core_metadata=core,
            )
        )
    return ProjectPage(name=name, files=files)


# -- rendering -------------------------------------------------------------------------


def _link(f: ProjectFile, upstreams: UpstreamMap) -> tuple[str, bool]:
    mirrored = upstreams.mirror_path(f.url)
    return (mirrored, True) if mirrored is not None else (f.url, False)


def render_json(page: ProjectPage, upstreams: UpstreamMap) -> tuple[bytes, int]:
    """The page as PEP 691 JSON with mirrored file URLs; (body, files left unmirrored)."""
    files, unmirrored = [], 0
    for f in page.files:
        url, ok = _link(f, upstreams)
        unmirrored += not ok
        item: dict[str, Any] = {"filename": f.filename, "url": url, "hashes": f.hashes}
        if f.requires_python is not None:
            item["requires-python"] = f.requires_python
        if f.yanked:
            item["yanked"] = f.yanked
        if f.core_metadata:
            item["core-metadata"] = f.core_metadata
            item["dist-info-metadata"] = f.core_metadata
        if f.size is not None:
            item["size"] = f.size
        if f.upload_time is not None:
            item["upload-time"] = f.upload_time
        files.append(item)
    doc: dict[str, Any] = {"meta": {"api-version": page.api_version}, "name": page.name, "files": files}
    if page.versions is not None:
        doc["versions"] = page.versions
    return json.dumps(doc, separators=(",", ":")).encode(), unmirrored


def render_html(page: ProjectPage, upstreams: UpstreamMap) -> tuple[bytes, int]:
    """The page as PEP 503 HTML with mirrored file URLs; (body, files left unmirrored)."""
    lines = [
        "<!DOCTYPE html>",
        "<html><head><meta name=\"pypi:repository-version\" content=\"1.0\">",
        f"<title>Links for {html.escape(page.name)}</title></head><body>",
        f"<h1>Links for {html.escape(page.name)}</h1>",
    ]
    unmirrored = 0
    for f in page.files:
        url, ok = _link(f, upstreams)
        unmirrored += not ok
        if f.sha256:
            url += f"#sha256={f.sha256}"
        attrs = [f'href="{html.escape(url)}"']
        if f.requires_python is not None:
            attrs.append(f'data-requires-python="{html.escape(f.requires_python)}"')
        if f.yanked:
            reason = f.yanked if isinstance(f.yanked, str) else ""
            attrs.append(f'data-yanked="{html.escape(reason)}"')
        if f.core_metadata:
            value = (
                "true"
                if f.core_metadata is True
                else "=".join(next(iter(f.core_metadata.items()), ("", "")))
            )
            attrs.append(f'data-core-metadata="{html.escape(value)}"')
            attrs.append(f'data-dist-info-metadata="{html.escape(value)}"')
        lines.append(f"<a {' '.join(attrs)}>{html.escape(f.filename)}</a><br/>")
    lines.append("</body></html>")
    return ("\n".join(lines) + "\n").encode(), unmirrored


def wants_json(accept: str | None) -> bool:
    """Whether an ``Accept`` header prefers PEP 691 JSON over HTML (q-values honoured;
    no header, or ``*/*`` alone: HTML, as PEP 691 says)."""
    best_json, best_html = 0.0, 0.0
    for part in (accept or "").split(","):
        kind, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if kind == PEP691_JSON:
            best_json = max(best_json, q)
        elif kind in (PEP691_HTML, "text/html", "*/*", "text/*"):
            best_html = max(best_html, q)
    return best_json > 0 and best_json >= best_html


# -- the cache -------------------------------------------------------------------------


class PypiPages:
    """Project pages of ``pypi`` upstreams: fetched through ``cache``, parsed once per
    upstream version, rendered per format, their files' digests remembered.

    Args:
        cache: fetches and keeps the raw upstream pages (TTL, revalidation, stale).
        upstreams: the allow-list (file URLs are rewritten onto it).
        max_learned: how many file digests are remembered (oldest forgotten first).
    """

    def __init__(self, cache: RepodataCache, upstreams: UpstreamMap, max_learned: int = 500_000) -> None:
        self.cache = cache
        self.upstreams = upstreams
        self._parsed: OrderedDict[str, tuple[float, ProjectPage]] = OrderedDict()
        self._learned: OrderedDict[str, str] = OrderedDict()
        self._max_learned = max_learned
        self._warned: set[str] = set()

    def expected_sha256(self, url: str) -> str | None:
        """The SHA-256 an index page gave for the upstream file ``url``, if one did."""
        return self._learned.get(url)

    async def page(self, upstream: str, index_url: str, project: str) -> tuple[ProjectPage, str]:
        """The parsed page of ``project`` and how it was had (``cached``, ``fetched``...).

        Raises:
            HTTPProblem: 404 (upstream has no such project), 502 (unusable page or
                upstream down with nothing cached), 504.
        """
        url = f"{index_url}/{project}/"
        entry, path, how = await self.cache.get(upstream, [project, "page"], url, accept=UPSTREAM_ACCEPT)
        if entry.status != 200:
            raise HTTPProblem(404, f"upstream {upstream} has no project {project}")
        key = str(path)
        known = self._parsed.get(key)
        if known is not None and known[0] == entry.fetched and how in ("cached", "coalesced"):
            return known[1], how
        page = await self.cache.run(self._parse, path, entry, url, project)
        self._parsed[key] = (entry.fetched, page)
        self._parsed.move_to_end(key)
        while len(self._parsed) > 1024:
            self._parsed.popitem(last=False)
        self._learn(page, upstream)
        return page, how

    def _parse(self, path: Any, entry: MetaEntry, url: str, project: str) -> ProjectPage:
        try:
            with open(path, "rb") as fh:
                body = fh.read()
            is_json = "json" in entry.content_type or body.lstrip()[:1] == b"{"
            return (parse_json if is_json else parse_html)(body, url, project)
        except (OSError, ValueError, UnicodeError, RecursionError) as exc:
            raise HTTPProblem(502, f"upstream's page for {project} is not a usable simple-index page: {exc}") from None

    def _learn(self, page: ProjectPage, upstream: str) -> None:
        for f in page.files:
            resolved = self.upstreams.resolve(f.url)
            if resolved is None:
                host = urlsplit(f.url).netloc
                if host not in self._warned:
                    self._warned.add(host)
                    log.warning(
                        "files of %s (from upstream %s) are not under any upstream: their links "
                        "are passed on unmirrored; add --upstream NAME=%s://%s to mirror them",
                        host, upstream, urlsplit(f.url).scheme, host,
                    )  # fmt: skip
                continue
            if f.sha256:
                self._learned[resolved] = f.sha256
                self._learned.move_to_end(resolved)
        while len(self._learned) > self._max_learned:
            self._learned.popitem(last=False)

    def render(self, page: ProjectPage, accept: str | None) -> tuple[bytes, str, int, str]:
        """(body, content type, unmirrored count, ETag) for a client's ``Accept``."""
        if wants_json(accept):
            body, unmirrored = render_json(page, self.upstreams)
            ctype = PEP691_JSON
        else:
            body, unmirrored = render_html(page, self.upstreams)
            ctype = PEP691_HTML if PEP691_HTML in (accept or "") else "text/html; charset=utf-8"
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        return body, ctype, unmirrored, etag


def project_of(rest: Sequence[str]) -> str | None:
    """The project of ``/{pypi upstream}/{rest}`` when it names a project page."""
    return rest[0] if len(rest) == 1 else None
