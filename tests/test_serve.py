"""`pixicache serve`: the pull-through mirror, against real local upstreams and real clients.

Faults (upstream misbehaving, clients misbehaving, hostile requests, disk
full, shutdown) are in test_serve_faults.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from pixicache.fetch import Fetcher
from pixicache.serve import ServeConfig, Upstream, start_background
from pixicache.sources.http import DigestSource, MirrorSource
from pixicache.store import Store
from pixicache.testing import UpstreamServer, current_subdir

from .helpers import artifact_for

CF = "https://conda.anaconda.org/conda-forge"


# -- helpers shared with test_serve_faults.py ----------------------------------------------------


def put(root: Path, rel: str, data: bytes) -> str:
    """Write ``root/rel`` and return its SHA-256."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def serve_config(tmp_path: Path, upstream: UpstreamServer, **kw: object) -> ServeConfig:
    """A config serving ``conda-forge`` and ``pixi`` from the local upstream, on a free port."""
    ups = kw.pop(
        "upstreams",
        [
            Upstream.make("conda-forge", upstream.channel_url("conda-forge")),
            Upstream.make("pixi", upstream.url + "/pixi-releases"),
        ],
    )
    return ServeConfig(cache_dir=tmp_path / "serve-store", port=0, upstreams=ups, **kw)  # type: ignore[arg-type]


def outcome(
    client: httpx.Client, url: str, headers: dict[str, str] | None = None
) -> tuple[str, object]:
    """("ok", body) for a complete 2xx, ("status", code) for an error status,
    ("aborted", n) when the connection was cut after n body bytes."""
    got = bytearray()
    try:
        with client.stream("GET", url, headers=headers) as resp:
            if resp.status_code >= 300:
                resp.read()
                return "status", resp.status_code
            for chunk in resp.iter_raw():
                got += chunk
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        return "aborted", (len(got), str(exc))
    return "ok", bytes(got)


@pytest.fixture
def upstream_root(tmp_path: Path) -> Path:
    root = tmp_path / "upstream"
    (root / "conda-forge" / "linux-64").mkdir(parents=True)
    return root


@pytest.fixture
def upstream(upstream_root: Path):
    with UpstreamServer(upstream_root) as srv:
        yield srv


@pytest.fixture
def serve(tmp_path: Path, upstream: UpstreamServer):
    with start_background(serve_config(tmp_path, upstream)) as handle:
        yield handle


@pytest.fixture
def client():
    with httpx.Client(timeout=30) as c:
        yield c


PKG = "conda-forge/linux-64/pkg-1.0-0.conda"
UP_PATH = "/" + PKG


# -- hits and misses -----------------------------------------------------------------------------


def test_miss_then_hit_verified_by_the_expected_digest(
    serve, upstream, upstream_root, client, caplog
):
    caplog.set_level(logging.INFO, logger="pixicache.serve.access")
    data = os.urandom(300_000)
    sha = put(upstream_root, PKG, data)
    url = f"{serve.url}/{PKG}"
    first = client.get(url, headers={"x-expected-sha256": sha})
    assert first.status_code == 200 and first.content == data
    assert first.headers["x-pixicache-cache"] == "miss"
    assert first.headers["etag"] == f'"{sha}"'
    assert first.headers["content-length"] == str(len(data))
    serve.wait_idle()
    store = Store(serve.config.cache_dir)
    assert store.path_for(sha).read_bytes() == data
    assert store.lookup_url(upstream.channel_url() + "/linux-64/pkg-1.0-0.conda") == sha
    second = client.get(url, headers={"x-expected-sha256": sha})
    assert second.status_code == 200 and second.content == data
    assert second.headers["x-pixicache-cache"] == "hit"
    assert second.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert second.headers["accept-ranges"] == "bytes"
    assert "last-modified" in second.headers
    assert upstream.count(UP_PATH) == 1
    assert upstream.requests[0].headers["x-expected-sha256"] == sha
    client.get(serve.url + "/healthz")  # same keep-alive connection: the hit's log line is out
    lines = [r.getMessage() for r in caplog.records if r.name == "pixicache.serve.access"]
    assert any(f"GET /{PKG} 200 {len(data)}B" in line and line.endswith("miss") for line in lines)
    assert any(line.endswith("hit") for line in lines)


def test_http_semantics_of_a_stored_artifact(serve, upstream_root, client):
    data = os.urandom(100_000)
    sha = put(upstream_root, PKG, data)
    url = f"{serve.url}/{PKG}"
    assert client.get(url, headers={"x-expected-sha256": sha}).status_code == 200
    serve.wait_idle()
    h = {"x-expected-sha256": sha}
    head = client.head(url, headers=h)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data)) and head.headers["etag"] == f'"{sha}"'
    r = client.get(url, headers={**h, "Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(data)}"
    assert client.get(url, headers={**h, "Range": "bytes=-5"}).content == data[-5:]
    assert client.get(url, headers={**h, "Range": "bytes=99990-"}).content == data[99990:]
    r = client.get(url, headers={**h, "Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    assert (
        client.get(url, headers={**h, "Range": "bytes=0-1,5-6"}).status_code == 200
    )  # multi: whole body
    r = client.get(url, headers={**h, "If-None-Match": f'"{sha}"'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == f'"{sha}"'
    assert client.get(url, headers={**h, "If-None-Match": '"other"'}).status_code == 200
    lm = head.headers["last-modified"]
    assert client.get(url, headers={**h, "If-Modified-Since": lm}).status_code == 304
    stale = client.get(url, headers={**h, "Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == data
    fresh = client.get(url, headers={**h, "Range": "bytes=0-9", "If-Range": f'"{sha}"'})
    assert fresh.status_code == 206 and fresh.content == data[:10]


def _publish_record(upstream_root: Path, rel: str, data: bytes, *, sha: bool = True) -> None:
    """A channel ``repodata.json`` beside ``rel`` with its record (sha256 or md5 only)."""
    subdir_dir = (upstream_root / rel).parent
    name = rel.rsplit("/", 1)[-1]
    rec = {"size": len(data), "md5": hashlib.md5(data).hexdigest()}
    if sha:
        rec["sha256"] = hashlib.sha256(data).hexdigest()
    key = "packages.conda" if name.endswith(".conda") else "packages"
    doc = {"info": {"subdir": subdir_dir.name}, "packages": {}, "packages.conda": {}}
    doc[key][name] = rec
    (subdir_dir / "repodata.json").write_text(json.dumps(doc, indent=1))


def test_a_fill_without_a_digest_is_verified_from_the_channel_record(
    serve, upstream, upstream_root, client
):
    """conda and mamba send no x-expected-sha256: the record in the channel's own
    repodata.json (passed through by this mirror) says what the bytes must be."""
    data = os.urandom(50_000)
    sha = put(upstream_root, PKG, data)
    _publish_record(upstream_root, PKG, data)
    url = f"{serve.url}/{PKG}"
    first = client.get(url)
    assert first.status_code == 200 and first.content == data
    serve.wait_idle()
    second = client.get(url)
    assert second.headers["x-pixicache-cache"] == "hit" and second.headers["etag"] == f'"{sha}"'
    third = client.get(url, headers={"x-expected-sha256": sha})
    assert third.headers["x-pixicache-cache"] == "hit" and third.content == data
    assert upstream.count(UP_PATH) == 1


def test_a_fill_without_a_digest_that_contradicts_the_record_is_never_stored(
    serve, upstream, upstream_root, client
):
    data = os.urandom(50_000)
    put(upstream_root, PKG, data)
    _publish_record(upstream_root, PKG, os.urandom(50_000))  # the channel says: other bytes
    kind, detail = outcome(client, f"{serve.url}/{PKG}")
    assert kind in ("aborted", "status") and detail != 200
    serve.wait_idle()
    assert not Store(serve.config.cache_dir).has(hashlib.sha256(data).hexdigest())
    # a file the channel has no record of is not fetched at all
    put(upstream_root, "conda-forge/linux-64/unlisted-1-0.conda", data)
    unlisted = client.get(f"{serve.url}/conda-forge/linux-64/unlisted-1-0.conda")
    assert unlisted.status_code == 404 and "repodata.json" in unlisted.text
    assert upstream.count("/conda-forge/linux-64/unlisted-1-0.conda") == 0


def test_a_package_the_channel_pins_by_md5_alone_is_verified_by_md5_and_size(
    serve, upstream, upstream_root, client
):
    data = os.urandom(30_000)
    rel = "conda-forge/linux-64/old-1-0.tar.bz2"
    put(upstream_root, rel, data)
    _publish_record(upstream_root, rel, data, sha=False)
    ok = client.get(f"{serve.url}/{rel}")
    assert ok.status_code == 200 and ok.content == data
    serve.wait_idle()
    store = Store(serve.config.cache_dir)
    sha = hashlib.sha256(data).hexdigest()
    assert store.has(sha) and store.index.lookup_md5(hashlib.md5(data).hexdigest(), len(data)) == sha
    bad_rel = "conda-forge/linux-64/old-2-0.tar.bz2"
    put(upstream_root, bad_rel, data)
    _publish_record(upstream_root, bad_rel, os.urandom(30_000), sha=False)
    kind, detail = outcome(client, f"{serve.url}/{bad_rel}")
    assert kind in ("aborted", "status") and detail != 200


def test_digest_endpoint_hits_fills_from_allowed_urls_and_verifies(
    serve, upstream, upstream_root, client
):
    data = os.urandom(40_000)
    sha = put(upstream_root, PKG, data)
    upstream_url = f"{upstream.channel_url()}/linux-64/pkg-1.0-0.conda"
    missing = client.get(f"{serve.url}/sha256/{sha}")
    assert missing.status_code == 404 and "?url=" in missing.text
    r = client.get(f"{serve.url}/sha256/{sha}", params={"url": upstream_url})
    assert r.status_code == 200 and r.content == data and r.headers["etag"] == f'"{sha}"'
    serve.wait_idle()
    hit = client.get(f"{serve.url}/sha256/{sha.upper()}")
    assert hit.status_code == 200 and hit.headers["x-pixicache-cache"] == "hit"
    # the URL may come as a header too; a wrong digest is never committed
    wrong = "0" * 64
    kind, detail = outcome(
        client, f"{serve.url}/sha256/{wrong}", headers={"x-pixicache-upstream-url": upstream_url}
    )
    assert kind in ("status", "aborted") and detail != 200
    serve.wait_idle()
    store = Store(serve.config.cache_dir)
    assert not store.has(wrong)
    assert upstream.count(UP_PATH) == 2


def test_the_agent_fetches_through_the_mirror_by_channel_path_and_by_digest(
    serve, upstream_root, tmp_path
):
    blobs = [os.urandom(n) for n in (10_000, 2_000_000)]
    arts = []
    for i, data in enumerate(blobs):
        name = f"conda-forge/linux-64/agent{i}-1.0-0.conda"
        put(upstream_root, name, data)
        arts.append(artifact_for(data, f"{CF}/linux-64/agent{i}-1.0-0.conda"))
    # the agent asks with conda-forge URLs: the serve's conda-forge upstream stands in for them
    store = Store(tmp_path / "agent-store")
    report = Fetcher(store, [MirrorSource(serve.url)], retries=0).fetch(arts[:1])
    assert report.ok, report.to_json()
    report = Fetcher(store, [DigestSource(serve.url)], retries=0).fetch(arts[1:])
    assert report.ok, report.to_json()
    for art, data in zip(arts, blobs):
        assert store.path_for(art.sha256).read_bytes() == data


def test_warm_up_answers_204_once_committed_and_needs_the_token(
    tmp_path, upstream, upstream_root, client
):
    data = os.urandom(70_000)
    sha = put(upstream_root, PKG, data)
    cfg = serve_config(tmp_path, upstream, token="s3cret")
    with start_background(cfg) as srv:
        url = f"{srv.url}/{PKG}"
        h = {"x-expected-sha256": sha, "x-pixicache-warm": "1"}
        assert client.get(url, headers=h).status_code == 401
        assert upstream.count(UP_PATH) == 0
        r = client.get(url, headers={**h, "Authorization": "Bearer s3cret"})
        assert r.status_code == 204 and r.content == b""
        assert Store(cfg.cache_dir).path_for(sha).read_bytes() == data  # committed before the 204
        again = client.get(url, headers={**h, "Authorization": "Bearer s3cret"})
        assert again.status_code == 204 and again.headers["x-pixicache-cache"] == "hit"
        warm = {"x-pixicache-warm": "1"}
        assert client.get(f"{srv.url}/sha256/{sha}", headers=warm).status_code == 401
        auth = {**warm, "Authorization": "Bearer s3cret"}
        by_digest = client.get(f"{srv.url}/sha256/{sha}", headers=auth)
        assert by_digest.status_code == 204 and by_digest.content == b""
        assert upstream.count(UP_PATH) == 1


def test_a_fill_waits_for_an_agent_downloading_into_the_same_store(
    tmp_path, upstream, upstream_root, client
):
    data = os.urandom(50_000)
    sha = put(upstream_root, PKG, data)
    cfg = serve_config(tmp_path, upstream)
    store = Store(cfg.cache_dir)
    agent_lock = store.lock(sha).acquire()  # an agent of this node is fetching it right now
    with start_background(cfg) as srv:
        got: dict[str, httpx.Response] = {}

        def fetch() -> None:
            got["r"] = httpx.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": sha}, timeout=30)

        waiter = threading.Thread(target=fetch)
        waiter.start()
        admin = f"{srv.url}/admin/fills"
        deadline = time.monotonic() + 10
        while not httpx.get(admin).json() and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a condition: the fill exists and waits for the lock
        assert [f["state"] for f in httpx.get(admin).json()] == ["waiting"]
        writer = store.writer(artifact_for(data, f"{CF}/linux-64/pkg-1.0-0.conda"))
        writer.write(data)
        writer.commit()
        agent_lock.release()
        waiter.join(30)
        assert got["r"].status_code == 200 and got["r"].content == data
        assert got["r"].headers["x-pixicache-cache"] == "hit"
    assert upstream.count(UP_PATH) == 0


def test_many_concurrent_clients_cost_one_upstream_request_and_stream_early(
    serve, upstream, upstream_root
):
    data = os.urandom(1_500_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(UP_PATH, "slow", rate=3_000_000)  # ~0.5 s: clients overlap the fill
    n = 24
    barrier = threading.Barrier(n)
    results: list[tuple[int, str, str, bool]] = []
    lock = threading.Lock()

    def one() -> None:
        with httpx.Client(timeout=30) as c:
            barrier.wait()
            with c.stream("GET", f"{serve.url}/{PKG}", headers={"x-expected-sha256": sha}) as resp:
                h = hashlib.sha256()
                early = False
                for chunk in resp.iter_raw():
                    if not early:
                        # bytes arrive while upstream is still sending: no store-then-forward
                        early = not upstream.requests[0].complete
                    h.update(chunk)
                with lock:
                    results.append(
                        (resp.status_code, h.hexdigest(), resp.headers["x-pixicache-cache"], early)
                    )

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == n
    assert all(status == 200 and digest == sha for status, digest, _, _ in results)
    assert upstream.count(UP_PATH) == 1
    outcomes = sorted(r[2] for r in results)
    assert outcomes.count("miss") == 1 and outcomes.count("coalesced") >= n // 2
    assert any(r[3] for r in results)
    serve.wait_idle()
    metrics = httpx.get(serve.url + "/metrics").text
    assert 'pixicache_serve_cache_total{result="miss"} 1.0' in metrics
    assert "pixicache_serve_fills_in_flight 0.0" in metrics


def test_head_on_a_miss_starts_the_fill_and_answers_with_the_size(
    serve, upstream, upstream_root, client
):
    data = os.urandom(120_000)
    sha = put(upstream_root, PKG, data)
    head = client.head(f"{serve.url}/{PKG}", headers={"x-expected-sha256": sha})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data)) and head.headers["etag"] == f'"{sha}"'
    serve.wait_idle()
    get = client.get(f"{serve.url}/{PKG}", headers={"x-expected-sha256": sha})
    assert get.headers["x-pixicache-cache"] == "hit" and get.content == data
    assert upstream.count(UP_PATH) == 1
    assert client.head(f"{serve.url}/conda-forge/linux-64/nope-1-0.conda").status_code == 404


class ChunkedUpstream:
    """A real HTTP/1.1 server answering every GET with a chunked body (no Content-Length)."""

    def __init__(self, body: bytes) -> None:
        import http.server

        outer = self
        self.body = body
        self.count = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.count += 1
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(outer.body), 65536):
                    chunk = outer.body[i : i + 65536]
                    self.wfile.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChunkedUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_an_upstream_without_content_length_is_streamed_chunked(tmp_path, client):
    data = os.urandom(700_000)
    sha = hashlib.sha256(data).hexdigest()
    with ChunkedUpstream(data) as up:
        cfg = ServeConfig(
            cache_dir=tmp_path / "s", port=0, upstreams=[Upstream.make("conda-forge", up.url)]
        )
        with start_background(cfg) as srv:
            url = f"{srv.url}/linux-64/x-1-0.conda".replace("/linux-64", "/conda-forge/linux-64")
            # a Range on a miss of unknown size is answered from the store once committed
            part = client.get(url, headers={"x-expected-sha256": sha, "Range": "bytes=10-19"})
            assert part.status_code == 206 and part.content == data[10:20]
            other = url.replace("x-1-0", "y-1-0")
            # same digest, other URL: not a hit by the header alone (a client's header never
            # decides what a URL holds): upstream is asked for that URL, verified
            full = client.get(other, headers={"x-expected-sha256": sha})
            assert full.status_code == 200 and full.content == data
            assert full.headers["x-pixicache-cache"] == "miss"
            third = url.replace("x-1-0", "z-1-0")
            # no digest, and this upstream has no repodata.json to say what the bytes must
            # be (it answers everything with the same body): refused, nothing stored
            refused = client.get(third)
            assert refused.status_code == 404 and "x-expected-sha256" in refused.text
            kind, detail = outcome(
                client, url.replace("x-1-0", "w-1-0"), {"x-expected-sha256": "c" * 64}
            )
            assert kind in ("aborted", "status") and detail != 200
            srv.wait_idle()
            assert not Store(cfg.cache_dir).has("c" * 64)
            assert up.count == 4  # x, y, the repodata.json asked for z, w


# -- metadata ------------------------------------------------------------------------------------


def test_repodata_passes_through_with_ttl_and_conditional_revalidation(
    tmp_path, upstream, upstream_root, client
):
    repodata = json.dumps({"info": {"subdir": "linux-64"}, "packages": {}}).encode()
    put(upstream_root, "conda-forge/linux-64/repodata.json", repodata)
    with start_background(serve_config(tmp_path, upstream, repodata_ttl=0)) as srv:
        url = f"{srv.url}/conda-forge/linux-64/repodata.json"
        first = client.get(url)
        assert first.status_code == 200 and first.content == repodata
        assert first.headers["x-pixicache-cache"] == "fetched"
        assert first.headers["cache-control"] == "public, max-age=0"
        etag = first.headers["etag"]
        second = client.get(url)  # TTL 0: revalidated with upstream's validators, no body
        assert second.status_code == 200 and second.content == repodata
        assert second.headers["x-pixicache-cache"] == "revalidated"
        path = "/conda-forge/linux-64/repodata.json"
        assert [r.status for r in upstream.requests if r.path == path] == [200, 304]
        assert upstream.requests[-1].headers.get("if-none-match") == etag
        assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
        # upstream failing: the stale copy is served, marked as such
        upstream.fault(path, "status", code=503)
        stale = client.get(url)
        assert stale.status_code == 200 and stale.content == repodata
        assert stale.headers["x-pixicache-cache"] == "stale" and "warning" in stale.headers
        upstream.clear_faults()
        # a metadata file upstream lacks is a 404, not a 5xx
        assert client.get(f"{srv.url}/conda-forge/linux-64/repodata.json.zst").status_code == 404
    with start_background(serve_config(tmp_path, upstream, repodata_ttl=600)) as srv:
        upstream.reset_log()
        for _ in range(3):
            assert client.get(f"{srv.url}/conda-forge/linux-64/repodata.json").content == repodata
            assert (
                client.get(f"{srv.url}/conda-forge/linux-64/repodata.json.zst").status_code == 404
            )
        # the copy cached before the restart is fresh for 600 s: no upstream request; the
        # 404 was remembered in memory only (never on disk), so it is asked once again
        assert upstream.count("/conda-forge/linux-64/repodata.json") == 0
        assert upstream.count("/conda-forge/linux-64/repodata.json.zst") == 1
        r = client.get(f"{srv.url}/conda-forge/linux-64/repodata.json")
        assert r.headers["x-pixicache-cache"] == "cached"


# -- pixi archives -------------------------------------------------------------------------------


def test_pixi_archives_are_verified_against_the_pin_table(
    tmp_path, upstream, upstream_root, client, monkeypatch
):
    archive = "pixi-x86_64-unknown-linux-musl.tar.gz"
    data = os.urandom(30_000)
    sha = put(upstream_root, f"pixi-releases/v0.0.1/{archive}", data)
    put(upstream_root, f"pixi-releases/v0.0.2/{archive}", os.urandom(1000))
    put(upstream_root, f"pixi-releases/v0.0.3/{archive}", data)
    pins = tmp_path / "pins.toml"
    pins.write_text(
        textwrap.dedent(
            f"""
            [[pin]]
            version = "0.0.1"
            target = "x86_64-unknown-linux-musl"
            sha256 = "{sha}"
            [[pin]]
            version = "0.0.2"
            target = "x86_64-unknown-linux-musl"
            sha256 = "{hashlib.sha256(b"what the pin promised").hexdigest()}"
            """
        )
    )
    monkeypatch.setenv("PIXICACHE_PIXI_PINS", str(pins))
    with start_background(serve_config(tmp_path, upstream)) as srv:
        r = client.get(f"{srv.url}/pixi/0.0.1/{archive}")
        assert r.status_code == 200 and r.content == data and r.headers["etag"] == f'"{sha}"'
        assert upstream.count(f"/pixi-releases/v0.0.1/{archive}") == 1
        kind, _ = outcome(client, f"{srv.url}/pixi/v0.0.2/{archive}")  # bytes differ from the pin
        assert kind in ("status", "aborted")
        srv.wait_idle()
        # an unpinned release is fetched only when the request names its digest
        unpinned = client.get(f"{srv.url}/pixi/0.0.3/{archive}")
        assert unpinned.status_code == 404 and "not pinned" in unpinned.text
        named = client.get(f"{srv.url}/pixi/0.0.3/{archive}", headers={"x-expected-sha256": sha})
        assert named.status_code == 200 and named.content == data
        srv.wait_idle()
        assert client.get(f"{srv.url}/sha256/{sha}").status_code == 200


# -- operations ----------------------------------------------------------------------------------


def test_healthz_metrics_and_admin(tmp_path, upstream, upstream_root, client):
    sha = put(upstream_root, PKG, os.urandom(20_000))
    with start_background(serve_config(tmp_path, upstream, token="tok")) as srv:
        health = client.get(srv.url + "/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        client.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": sha})
        srv.wait_idle()
        text = client.get(srv.url + "/metrics").text
        for name in (
            "pixicache_serve_requests_total",
            "pixicache_serve_bytes_served_total",
            "pixicache_serve_cache_total",
            "pixicache_serve_upstream_requests_total",
            "pixicache_serve_upstream_bytes_total",
            "pixicache_serve_fills_in_flight",
            "pixicache_serve_store_bytes 20000.0",
            "pixicache_serve_store_blobs 1.0",
        ):
            assert name in text, name
        assert client.post(srv.url + "/admin/gc?max_size=0").status_code == 401
        bad = client.post(
            srv.url + "/admin/gc?max_size=0", headers={"Authorization": "Bearer nope"}
        )
        assert bad.status_code == 401
        ok = client.post(srv.url + "/admin/gc?max_size=0", headers={"Authorization": "Bearer tok"})
        assert ok.status_code == 200 and ok.json()["removed"] == 1
        assert not Store(srv.config.cache_dir).has(sha)
        fills = client.get(srv.url + "/admin/fills", headers={"Authorization": "Bearer tok"})
        assert fills.json() == []
        assert client.get(srv.url + "/").status_code == 200


def test_disk_budget_evicts_least_recently_used_after_commits(
    tmp_path, upstream, upstream_root, client
):
    shas = [
        put(upstream_root, f"conda-forge/linux-64/b{i}-1-0.conda", os.urandom(100_000))
        for i in range(4)
    ]
    with start_background(serve_config(tmp_path, upstream, max_size=250_000)) as srv:
        for i, sha in enumerate(shas):
            r = client.get(
                f"{srv.url}/conda-forge/linux-64/b{i}-1-0.conda", headers={"x-expected-sha256": sha}
            )
            assert r.status_code == 200
            srv.wait_idle()
            srv.call(_settle(srv))
        store = Store(srv.config.cache_dir)
        present = [store.has(s) for s in shas]
        assert present[-1] and sum(present) <= 2
        assert sum(st.st_size for _, _, st in store.iter_blobs()) <= 250_000


async def _settle(srv) -> None:
    task = srv.app._gc_task
    if task is not None:
        await task


# -- tiers and real clients ----------------------------------------------------------------------


def test_tiers_node_serve_to_site_serve_to_upstream(tmp_path, upstream, upstream_root, client):
    data = os.urandom(500_000)
    sha = put(upstream_root, PKG, data)
    site_cfg = serve_config(tmp_path / "site", upstream)
    with start_background(site_cfg) as site:
        node_cfg = ServeConfig(
            cache_dir=tmp_path / "node-store",
            port=0,
            upstreams=[Upstream.make("conda-forge", site.url + "/conda-forge")],
        )
        with start_background(node_cfg) as node:
            r = client.get(f"{node.url}/{PKG}", headers={"x-expected-sha256": sha})
            assert r.status_code == 200 and r.content == data
            node.wait_idle()
            site.wait_idle()
            assert Store(site_cfg.cache_dir).has(sha) and Store(node_cfg.cache_dir).has(sha)
            # the agent's digest requests name conda-forge's public URL: the node maps it to the site
            upstream_public = f"{CF}/linux-64/pkg-1.0-0.conda"
            data2 = os.urandom(10_000)
            sha2 = put(upstream_root, "conda-forge/linux-64/pkg2-1.0-0.conda", data2)
            r2 = client.get(
                f"{node.url}/sha256/{sha2}",
                params={"url": upstream_public.replace("pkg-", "pkg2-")},
            )
            assert r2.status_code == 200 and r2.content == data2
            assert (
                client.get(f"{node.url}/{PKG}", headers={"x-expected-sha256": sha}).headers[
                    "x-pixicache-cache"
                ]
                == "hit"
            )
    assert upstream.count(UP_PATH) == 1


_RATTLER = """
import asyncio, json, os, sys, traceback
rc = 0
try:
    import rattler
    from rattler.networking import Client, MirrorMiddleware
    lock = rattler.LockFile.from_path({lock!r})
    env = lock.default_environment()
    plat = next(p for p in env.platforms() if str(p) == {subdir!r})
    records = env.conda_repodata_records_for_platform(plat)
    client = Client([MirrorMiddleware({{{cf!r}: [{mirror!r}]}})])
    asyncio.run(rattler.install(records, target_prefix={prefix!r}, cache_dir={cache!r},
                                client=client, show_progress=False))
    print(json.dumps(len(records)))
except BaseException:
    traceback.print_exc()
    rc = 1
sys.stdout.flush(); sys.stderr.flush()
os._exit(rc)
"""


def _rattler_install(lock: Path, prefix: Path, cache: Path, mirror: str) -> int:
    code = _RATTLER.format(
        lock=str(lock),
        subdir=current_subdir(),
        cf=CF,
        mirror=mirror,
        prefix=str(prefix),
        cache=str(cache),
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


def test_rattler_installs_through_the_mirror_and_a_second_install_costs_upstream_nothing(
    tmp_path, demo_channel, demo_lock, demo_upstream
):
    cfg = ServeConfig(
        cache_dir=tmp_path / "store",
        port=0,
        upstreams=[Upstream.make("conda-forge", demo_upstream.channel_url("conda-forge"))],
    )
    with start_background(cfg) as srv:
        prefix = tmp_path / "env"
        n = _rattler_install(demo_lock, prefix, tmp_path / "pkgs1", srv.url + "/conda-forge")
        assert n == len(demo_upstream.requests) >= 3
        out = subprocess.run([str(prefix / "bin" / "hello"), "x"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.splitlines()[0] == f"hello from {prefix}"
        srv.wait_idle()
        before = len(demo_upstream.requests)
        prefix2 = tmp_path / "env2"
        _rattler_install(demo_lock, prefix2, tmp_path / "pkgs2", srv.url + "/conda-forge")
        assert len(demo_upstream.requests) == before  # every package came from the mirror's store
        assert (prefix2 / "bin" / "hello").exists()
        metrics = httpx.get(srv.url + "/metrics").text
        assert f'pixicache_serve_cache_total{{result="hit"}} {float(n)}' in metrics


def test_the_mirror_serves_the_single_file_agent_with_its_digest_as_etag(tmp_path):
    import hashlib

    import httpx

    from pixicache.serve import ServeConfig, start_background

    agent = tmp_path / "pixicache.pyz"
    agent.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    cfg = ServeConfig(cache_dir=tmp_path / "store", port=0, upstreams=[], agent_file=agent)
    with start_background(cfg) as srv:
        r = httpx.get(f"{srv.url}/agent/pixicache.pyz")
        assert r.status_code == 200 and r.content == agent.read_bytes()
        assert r.headers["etag"] == f'"{hashlib.sha256(agent.read_bytes()).hexdigest()}"'
        assert httpx.get(f"{srv.url}/agent/other.pyz").status_code == 404
    cfg = ServeConfig(cache_dir=tmp_path / "store", port=0, upstreams=[])
    with start_background(cfg) as srv:
        assert httpx.get(f"{srv.url}/agent/pixicache.pyz").status_code == 404


def test_workers_share_one_port_and_fill_each_artifact_once(tmp_path, upstream, upstream_root):
    """`serve --workers 2`: two processes on one listening socket and one store; 16
    concurrent cold requests reach upstream once (the store's flock spans processes)."""
    import concurrent.futures
    import re

    data = os.urandom(3_000_000)
    sha = put(upstream_root, PKG, data)
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pixicache", "serve", "--workers", "2", "--port", "0",
             "--cache-dir", str(tmp_path / "store"), "--only-upstreams",
             "--upstream", f"conda-forge={upstream.channel_url()}", "--per-client", "0"],
            stderr=err,
        )  # fmt: skip
    try:
        deadline = time.time() + 30
        while len(re.findall(r"listening on (\S+)", log.read_text())) < 2 and time.time() < deadline:
            time.sleep(0.05)
        urls = set(re.findall(r"listening on (\S+)", log.read_text()))
        pids = set(re.findall(r"worker pid (\d+)", log.read_text()))
        assert len(urls) == 1 and len(pids) == 2, log.read_text()
        url = f"{urls.pop()}/{PKG}"

        def fetch(_i: int) -> bytes:
            return httpx.get(url, headers={"x-expected-sha256": sha}, timeout=60).content

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            bodies = list(pool.map(fetch, range(16)))
        assert all(b == data for b in bodies)
        assert upstream.count(UP_PATH) == 1
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


def _server_sockets(pid: int, port: int) -> set[int]:
    """The client ports of the established connections to ``port`` that process ``pid``
    holds (from /proc: its socket inodes, and /proc/net/tcp's table)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    peers = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            cols = line.split()
            local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
            if state == "01" and int(local.split(":")[1], 16) == port and inode in inodes:
                peers.add(int(remote.split(":")[1], 16))
    return peers


def test_workers_take_connections_in_turn(tmp_path):
    """`serve --workers 2` shares one listening socket, and a worker takes a connection
    only while it holds no more than the other: 8 connections made one after another
    are held 4 and 4 (with SO_REUSEPORT's hash, as often 3/5 or 2/6), and all are served."""
    import re
    import socket

    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pixicache", "serve", "--workers", "2", "--port", "0",
             "--cache-dir", str(tmp_path / "store"), "--only-upstreams", "--per-client", "0"],
            stderr=err,
        )  # fmt: skip
    conns: list[socket.socket] = []
    try:
        deadline = time.time() + 30
        while len(re.findall(r"worker pid (\d+)", log.read_text())) < 2 and time.time() < deadline:
            time.sleep(0.05)
        pids = [int(p) for p in re.findall(r"worker pid (\d+)", log.read_text())]
        port = int(re.findall(r"listening on http://127.0.0.1:(\d+)", log.read_text())[0])
        assert len(pids) == 2, log.read_text()
        for _ in range(8):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200"), "a connection was not served"
            conns.append(conn)
        held = [_server_sockets(pid, port) for pid in pids]
        assert sorted(len(h) for h in held) == [4, 4], held
        assert held[0] | held[1] == {c.getsockname()[1] for c in conns}
    finally:
        for conn in conns:
            conn.close()
        proc.terminate()
        assert proc.wait(60) == 0


def test_a_worker_that_stopped_accepting_never_makes_another_wait() -> None:
    from pixicache.serve.balance import ConnectionShare

    share = ConnectionShare(3)
    for index, count in enumerate((2, 1, 5)):
        share.publish(index, count)
    assert share.least(1, 1) and not share.least(0, 2) and not share.least(2, 5)
    share.retire(1)  # stopping: its connections are not counted against the others
    assert share.least(0, 2) and not share.least(2, 5)
    with pytest.raises(ValueError):
        ConnectionShare(0)


def test_a_worker_waits_for_a_less_loaded_one_but_not_for_ever() -> None:
    """The other worker's slot says it holds fewer connections. The first connection is
    left to it, and it takes it; then it stops accepting (busy or hung): each new
    connection is left to it first, then taken after MAX_DEFER, every time anew (the
    first wait, ended by the other worker, does not count against the next); a
    stopped acceptor makes nobody wait."""
    import asyncio
    import socket

    from pixicache.serve.balance import MAX_DEFER, BalancedAcceptor, ConnectionShare

    async def main() -> None:
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(8)
        lsock.setblocking(False)
        share = ConnectionShare(2)
        share.publish(1, 0)  # the other worker: idle, it says
        held: list[asyncio.BaseTransport] = []

        class Held(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                held.append(transport)

        acceptor = BalancedAcceptor(lsock, share, 0, lambda: len(held) + 1, Held)
        acceptor.start()
        clients = [await asyncio.open_connection(*lsock.getsockname())]
        for _ in range(2000):  # the other worker takes it once this one has left it
            if acceptor.deferred:
                break
            await asyncio.sleep(0.001)
        assert acceptor.deferred, "the connection was not left to the less-loaded worker"
        other, _addr = lsock.accept()
        await asyncio.sleep(MAX_DEFER * 3)
        assert not held
        for n in (1, 2):
            deferred = acceptor.deferred
            clients.append(await asyncio.open_connection(*lsock.getsockname()))
            for _ in range(2000):
                if len(held) == n:
                    break
                await asyncio.sleep(0.001)
            assert len(held) == n, "the connection was never accepted"
            assert acceptor.deferred > deferred, f"connection {n} was not left to the other worker first"
            await asyncio.sleep(MAX_DEFER * 3)  # idle: the next wait is a new one
        acceptor.stop()
        assert share.least(1, 10**9)  # a stopped worker is nobody's reason to wait
        for transport in held:
            transport.close()
        for _reader, writer in clients:
            writer.close()
        other.close()
        lsock.close()

    asyncio.run(main())


def _soft_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as fh:
        line = next(x for x in fh if x.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.parametrize("hard", [None, 512], ids=["hard-limit-high", "hard-limit-512"])
def test_serve_raises_its_open_file_limit_to_fit_its_connections(tmp_path, hard):
    """Started with a soft limit of 256 open files, `serve` raises it to what
    max_connections needs (two descriptors each, plus a reserve), up to the hard limit;
    below what it needs, it says so and serves anyway."""
    import re
    import resource

    _, current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = current_hard if hard is None else hard
    if cap != resource.RLIM_INFINITY and cap < 3072 and hard is None:
        pytest.skip(f"the hard open-file limit here is {cap}: nothing to raise the soft one to")

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, cap))

    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pixicache", "serve", "--port", "0", "--max-connections", "1024",
             "--cache-dir", str(tmp_path / "store"), "--only-upstreams"],
            stderr=err, preexec_fn=low_limit,
        )  # fmt: skip
    try:
        deadline = time.time() + 30
        while "listening on" not in log.read_text() and time.time() < deadline:
            time.sleep(0.05)
        url = re.findall(r"listening on (\S+)", log.read_text())[0]
        assert httpx.get(f"{url}/healthz").status_code == 200
        if hard is None:
            assert _soft_nofile(proc.pid) == 2 * 1024 + 1024
            assert "open-file limit" not in log.read_text()
        else:
            assert _soft_nofile(proc.pid) == 512
            assert "the open-file limit (512) is below what 1024 connections need" in log.read_text()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


def test_workers_that_cannot_start_say_why_once_with_the_documented_code(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, "-m", "pixicache", "serve", "--workers", "2", "--port", "0",
         "--cache-dir", str(blocker / "store")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 7, proc.stderr  # StoreError
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("cannot create the store") == 1, proc.stderr


_BUFFER_CHURN = textwrap.dedent(
    """
    import resource, sys
    from pixicache.serve.runner import keep_buffers_mapped
    if sys.argv[1] == "tuned":
        assert keep_buffers_mapped()
    def rounds(n):  # a fill's pattern: several MiB-sized buffers at once, all freed per batch
        for _ in range(n):
            bufs = [bytearray(2 << 20) for _ in range(8)]
            for b in bufs:
                b[::4096] = bytes(len(range(0, len(b), 4096)))
            del bufs
    rounds(3)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    """
)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
    reason="keep_buffers_mapped tunes glibc's malloc; elsewhere it is a documented no-op",
)
def test_keep_buffers_mapped_reuses_freed_body_buffers_instead_of_faulting_them_in_again():
    """Freed MiB-sized buffers stay in the heap (without it, glibc trims them and the
    next batch faults them in again)."""

    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _BUFFER_CHURN, mode], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    plain = faults("plain")
    if plain < 1000:
        pytest.skip(f"this glibc keeps freed heap by default ({plain} faults): nothing to measure")
    tuned = faults("tuned")
    assert tuned < 200, (plain, tuned)


def test_the_server_process_tunes_malloc_before_it_serves(monkeypatch, tmp_path):
    from pixicache.serve import runner

    class Called(Exception):
        pass

    def called() -> bool:
        raise Called

    monkeypatch.setattr(runner, "keep_buffers_mapped", called)
    with pytest.raises(Called):
        runner.run_server(ServeConfig(cache_dir=tmp_path / "store", port=0))


def test_a_client_that_stops_reading_a_hit_is_dropped_after_the_send_timeout(
    tmp_path, upstream, upstream_root, client
):
    """A hit larger than the sockets' buffers, to a client that reads its headers and
    stops: the server drops it once it has accepted nothing for the send timeout
    (its connection is not held for good), and serves other clients meanwhile."""
    import socket
    import time as _time

    data = os.urandom(48 << 20)
    sha = put(upstream_root, PKG, data)
    with start_background(serve_config(tmp_path, upstream, send_timeout=1.0)) as srv:
        url = f"{srv.url}/{PKG}"
        assert client.get(url, headers={"x-expected-sha256": sha}).content == data  # the fill
        srv.wait_idle()
        host, port = srv.url.split("//", 1)[1].split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.connect((host, int(port)))
        sock.sendall(f"GET /{PKG} HTTP/1.1\r\nHost: x\r\nx-expected-sha256: {sha}\r\n\r\n".encode())
        got = sock.recv(4096)
        assert b" 200 " in got.split(b"\r\n", 1)[0] and b"x-pixicache-cache: hit" in got.lower()
        start = _time.monotonic()
        _time.sleep(3.0)  # accepts nothing for longer than the send timeout
        other = client.get(url, headers={"x-expected-sha256": sha})
        assert other.status_code == 200 and other.content == data  # the server is not stuck
        total = len(got)
        sock.settimeout(20)
        try:
            while chunk := sock.recv(1 << 20):
                total += len(chunk)
        except ConnectionResetError:
            pass
        sock.close()
        assert total < len(data), "the stalled client was sent the whole body"
        assert _time.monotonic() - start < 20


def test_a_large_hit_is_complete_through_either_send_path(
    tmp_path, upstream, upstream_root, client, monkeypatch
):
    """What the socket does not take at once goes out from one writer callback, or,
    where that cannot be used (TLS; a loop without selector writers), through
    ``loop.sendfile`` in chunks: both deliver every byte, in order."""
    from pixicache.serve import http as serve_http

    data = os.urandom(24 << 20)
    sha = put(upstream_root, PKG, data)
    with start_background(serve_config(tmp_path, upstream)) as srv:
        url = f"{srv.url}/{PKG}"
        assert client.get(url, headers={"x-expected-sha256": sha}).content == data  # the fill
        srv.wait_idle()
        used: list[int] = []
        real = serve_http._send_when_writable

        async def counted(*args: object, **kwargs: object) -> int:
            used.append(n := await real(*args, **kwargs))  # type: ignore[arg-type]
            return n

        monkeypatch.setattr(serve_http, "_send_when_writable", counted)
        hit = client.get(url, headers={"x-expected-sha256": sha})
        assert hit.headers["x-pixicache-cache"] == "hit" and hit.content == data
        assert used and used[0] > 0  # the writer callback sent the rest

        async def unavailable(*args: object, **kwargs: object) -> int:
            return 0

        monkeypatch.setattr(serve_http, "_send_when_writable", unavailable)
        again = client.get(url, headers={"x-expected-sha256": sha})
        assert again.headers["x-pixicache-cache"] == "hit" and again.content == data
