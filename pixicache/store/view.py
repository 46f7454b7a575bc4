"""A localhost, read-only HTTP view of the node store, laid out like the lock's channels.

An installer that downloads by URL (Pixi, or rattler behind its mirror
middleware) is pointed at this view with a ``mirrors`` table, so every package
comes from the node store and nothing from outside::

    with StoreView(store, lock.artifacts("default", "linux-64")) as view:
        view.mirrors(["https://conda.anaconda.org/conda-forge/"])
        # {"https://conda.anaconda.org/conda-forge":
        #      ["http://127.0.0.1:41234/conda.anaconda.org/conda-forge"]}

The view serves ``/<host>/<path of the artifact's URL>`` (the host keeps two
channels of the same name on different hosts apart), so the mirror of a
channel ``https://HOST/PATH`` is ``<view>/HOST/PATH``, a plain URL-prefix swap
as Pixi's ``mirrors`` and rattler's mirror middleware do it. A request whose
path does not match exactly is still answered when its file name is that of
exactly one artifact (so a client that joins URLs differently still works).

For the lock's PyPI entries it also stands in for their index (``indexes=``): each
index ``https://HOST/PATH`` has PEP 503 project pages at ``<view>/HOST/PATH/<project>/``
listing the lock's files of that project (their view URLs, with ``#sha256=``), so a
client that asks the index first (uv under Pixi) finds exactly what the lock pins.

It answers only the artifacts it was given, only when their blob is present
in the store (the store verified them on the way in), and streams them with
``sendfile(2)`` while holding the blob's shared lock (so ``gc`` cannot remove
it meanwhile). Everything else — ``repodata.json`` included: an install from a
lock needs none — is a 404, and is recorded in :attr:`StoreView.misses` for
the error message. ``GET /healthz`` answers ``ok``. It binds 127.0.0.1 on an
ephemeral port and runs a thread per connection.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from pixicache.model.artifact import Artifact
    from pixicache.store.cas import Store

__all__ = ["StoreView", "ViewRequest", "project_of_file", "view_path"]

_CHUNK = 16 << 20


def _host_key(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    return f"{host}:{parts.port}" if parts.port else host


def _normalize(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def project_of_file(filename: str) -> str:
    """The normalized project of a wheel or sdist file name."""
    if filename.endswith(".whl"):
        return _normalize(filename.split("-", 1)[0])
    stem = filename
    for ext in (".tar.gz", ".tar.bz2", ".zip", ".tgz"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return _normalize(stem.rsplit("-", 1)[0])


def view_path(url: str) -> str | None:
    """The path at which the view serves ``url`` (``/<host>/<path>``), or ``None``
    for a URL it cannot serve (not http(s)).

    >>> view_path("https://conda.anaconda.org/conda-forge/noarch/x-1-0.conda")
    '/conda.anaconda.org/conda-forge/noarch/x-1-0.conda'
    """
    host = _host_key(url)
    if host is None:
        return None
    path = unquote(urlsplit(url).path).rstrip("/")
    return f"/{host}{path}"


@dataclass
class ViewRequest:
    """One request the view answered."""

    method: str
    path: str
    status: int
    bytes: int = 0
    reason: str = ""
    sha256: str | None = None  # the artifact asked for, when the path named one


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, addr: tuple[str, int], view: StoreView) -> None:
        self.view = view
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that goes away mid-response is not our error


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pixicache-store-view/1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _plain(self, code: int, text: str, head: bool) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        view = self.server.view
        path = unquote(urlsplit(self.path).path)
        if path == "/healthz":
            self._plain(200, "ok\n", head)
            view._log(ViewRequest(self.command, path, 200))
            return
        page = view._project_page(path)
        if page is not None:
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            view._log(ViewRequest(self.command, path, 200))
            return
        artifact, reason = view._lookup(path)
        expected = self.headers.get("x-expected-sha256")
        if artifact is not None and expected and artifact.sha256 and expected.lower() != artifact.sha256:
            artifact, reason = None, f"x-expected-sha256 {expected} differs from the lock's"
        if artifact is None:
            self._plain(404, f"not in this store view: {reason}\n", head)
            view._log(ViewRequest(self.command, path, 404, reason=reason))
            return
        store = view.store
        try:
            sha = store.blob_of(artifact)
            if sha is None:
                raise FileNotFoundError(artifact.url)
            with store.pin(sha) as blob, store.open_blob(sha, artifact.size) as fh:
                size = blob.stat().st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.send_header("ETag", f'"{sha}"')
                self.send_header("Cache-Control", "public, max-age=31536000, immutable")
                self.end_headers()
                sent = 0
                if not head:
                    self.wfile.flush()
                    while sent < size:
                        n = self.connection.sendfile(fh, sent, min(_CHUNK, size - sent))
                        if n == 0:
                            break
                        sent += n
                view._log(ViewRequest(self.command, path, 200, sent, sha256=sha))
        except FileNotFoundError:
            reason = f"{artifact.filename} ({artifact.pin}) is not in the store"
            self._plain(404, f"not in this store view: {reason}\n", head)
            view._log(ViewRequest(self.command, path, 404, reason=reason, sha256=store.blob_of(artifact)))


class StoreView:
    """Serve ``artifacts`` from ``store`` on ``http://127.0.0.1:<port>``.

    Use it as a context manager (or :meth:`start` / :meth:`stop`).

    Args:
        store: the node store; each artifact is served from its blob.
        artifacts: what may be served (normally the lock's artifacts for one
            environment and platform).
        host: the address to bind (keep the default: the view is for this node).
    """

    def __init__(
        self,
        store: Store,
        artifacts: Iterable[Artifact],
        *,
        host: str = "127.0.0.1",
        indexes: Iterable[str] = (),
    ) -> None:
        self.store = store
        self.host = host
        self._indexes = [p for p in (view_path(i) for i in indexes) if p is not None]
        self._projects: dict[str, list[Artifact]] = {}
        self._by_path: dict[str, Artifact] = {}
        by_name: dict[str, list[Artifact]] = {}
        for a in artifacts:
            p = view_path(a.url)
            if p is None:
                continue
            self._by_path[p] = a
            by_name.setdefault(unquote(a.filename), []).append(a)
            if a.kind == "pypi":
                self._projects.setdefault(project_of_file(unquote(a.filename)), []).append(a)
        self._by_name = {
            name: arts[0] for name, arts in by_name.items() if len({x.key for x in arts}) == 1
        }
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._requests: list[ViewRequest] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> StoreView:
        """Bind and serve in a background thread; returns ``self``."""
        if self._server is None:
            self._server = _Server((self.host, 0), self)
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.01},
                name="pixicache-store-view",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> StoreView:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (the view must be started)."""
        if self._server is None:
            raise RuntimeError("the store view is not started")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def mirror_of(self, channel: str) -> str | None:
        """The view URL that stands in for ``channel`` (``None`` if not http(s))."""
        p = view_path(channel)
        return None if p is None else self.url + p

    def mirrors(self, channels: Iterable[str], pypi: Iterable[str] = ()) -> dict[str, list[str]]:
        """A ``mirrors`` table (Pixi config / rattler ``MirrorMiddleware``) mapping
        each http(s) channel URL and PyPI prefix (an index URL, a file host), without
        its trailing slash, to this view."""
        out: dict[str, list[str]] = {}
        for channel in [*channels, *pypi]:
            mirror = self.mirror_of(channel)
            if mirror is not None:
                out[channel.rstrip("/")] = [mirror]
        return out

    def url_for(self, artifact: Artifact) -> str | None:
        """Where the view serves ``artifact`` (``None`` for a non-http(s) URL)."""
        p = view_path(artifact.url)
        return None if p is None else self.url + p

    # -- what happened --------------------------------------------------------------------
    @property
    def requests(self) -> list[ViewRequest]:
        """Every request answered so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def misses(self) -> list[ViewRequest]:
        """The requests answered 404 (with the reason)."""
        return [r for r in self.requests if r.status == 404]

    @property
    def bytes_served(self) -> int:
        """Body bytes sent for artifacts."""
        return sum(r.bytes for r in self.requests)

    # -- used by the handler --------------------------------------------------------------
    def _project_page(self, path: str) -> str | None:
        """The PEP 503 page for ``<index>/<project>/``, if ``path`` names one."""
        import html

        head, _, project = path.rstrip("/").rpartition("/")
        if head not in self._indexes:
            return None
        files = self._projects.get(_normalize(project), [])
        if not files:
            return None  # a project the lock does not have: 404, as an index says
        links = "".join(
            f'<a href="{html.escape(self.url + (view_path(a.url) or ""))}'
            f'{"#sha256=" + a.sha256 if a.sha256 else ""}">{html.escape(a.filename)}</a><br/>\n'
            for a in files
        )
        name = html.escape(_normalize(project))
        return f"<!DOCTYPE html>\n<html><body><h1>Links for {name}</h1>\n{links}</body></html>\n"

    def _log(self, rec: ViewRequest) -> None:
        with self._lock:
            self._requests.append(rec)

    def _lookup(self, path: str) -> tuple[Artifact | None, str]:
        a = self._by_path.get(path.rstrip("/"))
        if a is not None:
            return a, ""
        name = path.rstrip("/").rsplit("/", 1)[-1]
        a = self._by_name.get(name)
        if a is not None and name.endswith((".conda", ".tar.bz2", ".whl", ".tar.gz", ".zip")):
            return a, ""
        if name.startswith("repodata"):
            return None, f"{name}: an install from a lock needs no repodata"
        return None, f"{path} is not an artifact of the lock"
