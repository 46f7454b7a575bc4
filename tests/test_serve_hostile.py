"""The mirror against upstreams that lie and clients that probe: one test per class.

Real servers throughout: ``pixicache serve`` on a loopback port, and a scripted
HTTP/1.1 upstream (:class:`Scripted`) that answers each path as the test says
(redirects to another host, gzip bodies, bodies longer than announced or endless).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from pixicache.errors import ConfigError
from pixicache.serve import ServeConfig, Upstream, start_background
from pixicache.store import Store

PKG = "conda-forge/linux-64/pkg-1.0-0.conda"


class Scripted:
    """An HTTP/1.1 server whose answer for a path is a function (handler) -> None."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]] = {}
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.hits.append(self.path)
                route = outer.routes.get(self.path)
                if route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    route(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def body(self, path: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        def answer(h: http.server.BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            for k, v in {"Content-Length": str(len(data)), **(headers or {})}.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)

        self.routes[path] = answer

    def redirect(self, path: str, location: str) -> None:
        def answer(h: http.server.BaseHTTPRequestHandler) -> None:
            h.send_response(302)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = answer

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def up() -> Iterator[Scripted]:
    s = Scripted()
    yield s
    s.close()


@pytest.fixture
def other() -> Iterator[Scripted]:
    """Another host, on no allow-list."""
    s = Scripted()
    yield s
    s.close()


def serve(tmp_path: Path, up: Scripted, **kw: object):
    ups = kw.pop("upstreams", [Upstream.make("conda-forge", up.url + "/conda-forge")])
    cfg = ServeConfig(cache_dir=tmp_path / "store", port=0, upstreams=ups, **kw)  # type: ignore[arg-type]
    return start_background(cfg)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def get(client: httpx.Client, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """(status, body), status -1 when the transfer was cut short."""
    try:
        r = client.get(url, headers=headers)
        return r.status_code, r.content
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return -1, b""


# -- redirects -----------------------------------------------------------------------------


def test_a_redirect_off_the_allow_list_is_never_followed_on_any_route(tmp_path, up, other):
    data = b"the other host's bytes" * 100
    other.body("/evil.conda", data)
    up.redirect(f"/{PKG}", other.url + "/evil.conda")
    with serve(tmp_path, up) as srv, httpx.Client(timeout=30) as c:
        for url, headers in (
            (f"{srv.url}/{PKG}", {"x-expected-sha256": sha(data)}),
            (f"{srv.url}/sha256/{sha(data)}?url={up.url}/{PKG}", {}),
        ):
            status, body = get(c, url, headers)
            assert status == 502 and body != data, (url, status)
        srv.wait_idle()
    assert other.hits == []  # not one request to the other host
    assert not Store(tmp_path / "store").has(sha(data))


def test_a_redirect_within_the_allow_list_is_followed_and_verified(tmp_path, up):
    data = os.urandom(5000)
    up.body("/conda-forge/linux-64/moved-1.0-0.conda", data)
    up.redirect(f"/{PKG}", "/conda-forge/linux-64/moved-1.0-0.conda")
    with serve(tmp_path, up) as srv, httpx.Client(timeout=30) as c:
        r = c.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": sha(data)})
        assert r.status_code == 200 and r.content == data


def test_an_upstream_may_name_the_hosts_it_redirects_to(tmp_path, up):
    """GitHub's release downloads redirect to its object store: configured per upstream."""
    u = Upstream.make("pixi", "https://example.org/releases", redirects=["objects.example.net"])
    from pixicache.serve.upstreams import UpstreamMap

    m = UpstreamMap([u])
    assert m.may_redirect("pixi", "https://objects.example.net/abc?sig=1")
    assert not m.may_redirect("pixi", "http://objects.example.net/abc")  # https only
    assert not m.may_redirect("pixi", "https://user@objects.example.net/abc")
    assert not m.may_redirect("pixi", "https://evil.example.net/abc")
    with pytest.raises(ConfigError):
        Upstream.make("x", "https://example.org", redirects=["bad host/"])


# -- what upstream bodies may be ---------------------------------------------------------


def test_a_body_in_another_encoding_is_refused(tmp_path, up):
    data = os.urandom(4000)
    up.body(f"/{PKG}", gzip.compress(data), {"Content-Encoding": "gzip"})
    with serve(tmp_path, up) as srv, httpx.Client(timeout=30) as c:
        status, body = get(c, f"{srv.url}/{PKG}", {"x-expected-sha256": sha(data)})
        assert status == 502 and body != data
        srv.wait_idle()
    assert list(Store(tmp_path / "store").iter_blobs()) == []


def test_a_body_longer_than_the_lock_says_is_cut_off(tmp_path, up):
    data = os.urandom(100_000)

    def endless(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(2000):  # 128 MB unless stopped
            h.wfile.write(b"10000\r\n" + bytes(65536) + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    up.routes[f"/{PKG}"] = endless
    with serve(tmp_path, up) as srv, httpx.Client(timeout=60) as c:
        t0 = time.monotonic()
        status, _ = get(
            c, f"{srv.url}/{PKG}",
            {"x-expected-sha256": sha(data), "x-pixicache-expected-size": str(len(data))},
        )  # fmt: skip
        assert status in (502, -1)
        srv.wait_idle()
        assert time.monotonic() - t0 < 30
    store = Store(tmp_path / "store")
    assert list(store.iter_blobs()) == []
    assert all(p.stat().st_size <= len(data) + (1 << 20) for p in store.partial_dir.glob("*"))


# -- what a channel path may answer --------------------------------------------------------


def test_metadata_paths_never_create_state_a_real_file_needs(tmp_path, up):
    repodata = json.dumps({"info": {"subdir": "linux-64"}, "packages": {}}).encode()
    up.body("/conda-forge/linux-64/repodata.json", repodata)
    with serve(tmp_path, up, repodata_ttl=0) as srv, httpx.Client(timeout=30) as c:
        for bad in (
            "linux-64/repodata.json/repodata.json",
            "repodata.json/linux-64/repodata.json",
            "not-a-subdir/repodata.json",
            "linux-64/shards/abc.msgpack.zst",
        ):
            assert c.get(f"{srv.url}/conda-forge/{bad}").status_code == 404, bad
        # many files upstream does not have: remembered in memory, nothing on disk
        for i in range(300):
            assert c.get(f"{srv.url}/conda-forge/linux-64/shards/{i:064x}.msgpack.zst").status_code == 404
        r = c.get(f"{srv.url}/conda-forge/linux-64/repodata.json")
        assert r.status_code == 200 and r.content == repodata
    meta = tmp_path / "store" / "repodata"
    files = [p for p in meta.rglob("*") if p.is_file()] if meta.exists() else []
    assert len(files) <= 2, files  # repodata.json and its .meta.json, nothing else


# -- admin ---------------------------------------------------------------------------------


def test_admin_is_local_only_for_the_client_the_server_itself_reports(tmp_path, up):
    with serve(tmp_path, up, trusted_proxies=["127.0.0.1"]) as srv, httpx.Client(timeout=30) as c:
        # through a trusted proxy on loopback, on behalf of a remote client
        forwarded = c.post(f"{srv.url}/admin/gc?max_size=0", headers={"X-Forwarded-For": "203.0.113.9"})
        assert forwarded.status_code == 403
        # a proxy that says nothing about whom it forwards for is not local either
        assert c.get(f"{srv.url}/admin/fills").status_code == 403
        assert c.get(f"{srv.url}/admin/fills", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200
    with serve(tmp_path, up) as srv, httpx.Client(timeout=30) as c:
        assert c.get(f"{srv.url}/admin/fills").status_code == 200  # plain loopback, no proxy


@pytest.mark.parametrize("token", ["", "   "])
def test_an_empty_token_is_refused_at_start(tmp_path, token):
    with pytest.raises(ConfigError, match="empty"):
        ServeConfig(cache_dir=tmp_path / "s", port=0, token=token)


def test_the_cli_refuses_an_empty_token_file(tmp_path):
    import subprocess
    import sys

    (tmp_path / "token").write_text("\n")
    (tmp_path / "serve.toml").write_text(f'[serve]\ntoken_file = "{tmp_path / "token"}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "pixicache", "serve", "--port", "0", "--cache-dir", str(tmp_path / "s"),
         "--config", str(tmp_path / "serve.toml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 9 and "empty" in proc.stderr and "Traceback" not in proc.stderr


# -- blobs that changed on disk ------------------------------------------------------------


def test_a_blob_changed_after_commit_is_never_served_as_it(tmp_path, up):
    data = os.urandom(20_000)
    up.body(f"/{PKG}", data)
    with serve(tmp_path, up) as srv, httpx.Client(timeout=30) as c:
        assert c.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": sha(data)}).content == data
        srv.wait_idle()
        blob = Store(tmp_path / "store").path_for(sha(data))
        blob.chmod(0o644)  # a careless administrator edits it in place
        with open(blob, "r+b") as fh:
            fh.write(b"rot")
        r = c.get(f"{srv.url}/sha256/{sha(data)}?url={up.url}/{PKG}")
        assert r.status_code == 200 and r.content == data  # re-verified, quarantined, refilled
    store = Store(tmp_path / "store")
    assert len(list(store.quarantine_dir.iterdir())) == 1
    assert hashlib.sha256(store.path_for(sha(data)).read_bytes()).hexdigest() == sha(data)


def test_cache_verify_max_age_and_sample_bound_a_scheduled_pass(tmp_path):
    from pixicache.model.artifact import Artifact

    store = Store(tmp_path / "s")
    digests = []
    for i in range(20):
        data = os.urandom(1000) + bytes([i])
        src = tmp_path / f"f{i}"
        src.write_bytes(data)
        store.add_file(src, Artifact(f"https://x.test/a{i}.conda", sha(data), len(data), f"a{i}.conda"))
        digests.append(sha(data))
    assert store.verify(max_age=3600).due == 0  # all verified at commit, unchanged since
    blob = store.path_for(digests[3])
    os.utime(blob, ns=(0, 0))  # its file changed: due again
    rep = store.verify(max_age=3600)
    assert rep.due == 1 and rep.checked == 1 and not rep.bad
    assert store.verify(max_age=0, sample=0.25, seed=1).due == 5
    blob.chmod(0o644)
    blob.write_bytes(b"rotten")
    rep = store.verify(max_age=3600)
    assert [s for s, _ in rep.bad] == [digests[3]]


# -- the HTTP parser -----------------------------------------------------------------------


def test_requests_the_parser_rejects_are_one_log_line_and_a_short_body(tmp_path, up, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    with serve(tmp_path, up) as srv:
        for raw in (
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
                s.sendall(raw)
                answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0]
            body = answer.split(b"\r\n\r\n", 1)[1]
            assert body == b"400 bad request\n"  # nothing of the request echoed back
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
    assert not [r for r in caplog.records if r.exc_info]  # no traceback logged
    assert sum("400 Bad" in r.getMessage() for r in caplog.records) == 3


def test_range_headers_accept_only_what_rfc_9110_allows():
    from pixicache.httputil import parse_range

    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=-10", 100) == (90, 99)
    for bad in ("bytes=1_0-20", "bytes=+1-5", "bytes=1-+5", "bytes=0x1-5", "bytes=1-5,7-9", "bytes=-", "items=0-1", "bytes=1 0-20"):
        assert parse_range(bad, 100) is None, bad
