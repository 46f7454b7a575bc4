"""`pixicache serve` under faults: a misbehaving upstream, misbehaving or hostile clients,
a full disk, eviction and shutdown. In every case nothing wrong is committed or served as
good, the server stays up, and the error says what happened."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from pixicache.serve import ServeConfig, Upstream, start_background
from pixicache.store import Store
from pixicache.testing import UpstreamServer

from .test_serve import (
    PKG,
    UP_PATH,
    client,
    outcome,
    put,
    serve,
    serve_config,
    upstream,
    upstream_root,
)

__all__ = ["client", "serve", "upstream", "upstream_root"]  # fixtures shared with test_serve.py


def store_of(srv) -> Store:
    return Store(srv.config.cache_dir)


def partials(srv) -> list[Path]:
    return sorted(store_of(srv).partial_dir.iterdir())


def healthy(srv) -> bool:
    return httpx.get(srv.url + "/healthz", timeout=10).status_code == 200


def raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are (no client-side normalisation) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        out = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
    return bytes(out)


def status_of(response: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", response)
    assert m, response[:200]
    return int(m.group(1))


def metric(srv, line_start: str) -> float:
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- upstream faults -----------------------------------------------------------------------------


def test_upstream_wrong_bytes_are_never_committed_nor_served_complete(
    serve, upstream, upstream_root, client
):
    data = os.urandom(2_000_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(UP_PATH, "wrong_bytes", times=1)
    kind, detail = outcome(client, f"{serve.url}/{PKG}", {"x-expected-sha256": sha})
    assert kind in ("aborted", "status"), kind
    if kind == "aborted":
        assert detail[0] < len(data)  # type: ignore[index]
    else:
        assert detail == 502
    serve.wait_idle()
    assert not store_of(serve).has(sha) and partials(serve) == []
    assert metric(serve, 'pixicache_serve_upstream_errors_total{reason="digest"}') == 1
    ok = client.get(f"{serve.url}/{PKG}", headers={"x-expected-sha256": sha})
    assert ok.status_code == 200 and ok.content == data
    assert upstream.count(UP_PATH) == 2


def test_upstream_truncating_mid_body_aborts_clients_and_the_next_request_resumes(
    serve, upstream, upstream_root, client
):
    data = os.urandom(1_500_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(UP_PATH, "truncate", after=600_000, times=1)
    kind, detail = outcome(client, f"{serve.url}/{PKG}", {"x-expected-sha256": sha})
    assert kind == "aborted" or (kind == "status" and detail == 502), (kind, detail)
    serve.wait_idle()
    store = store_of(serve)
    assert not store.has(sha)
    kept = store.partial_dir / f"{sha}.part"
    got = kept.stat().st_size  # kept to resume (the agent's fetcher does the same)
    assert 0 < got <= 600_000
    ok = client.get(f"{serve.url}/{PKG}", headers={"x-expected-sha256": sha})
    assert ok.status_code == 200 and ok.content == data
    last = upstream.requests[-1]
    assert last.range == f"bytes={got}-" and last.status == 206
    assert upstream.bytes_for(UP_PATH) == 600_000 + len(data) - got
    serve.wait_idle()
    assert store.path_for(sha).read_bytes() == data and not kept.exists()


def test_upstream_reset_before_and_during_the_body(serve, upstream, upstream_root, client):
    data = os.urandom(800_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(
        UP_PATH, "reset", times=2
    )  # the client retries a dropped GET once (RFC 9112 9.3.1)
    r = client.get(f"{serve.url}/{PKG}", headers={"x-expected-sha256": sha})
    assert r.status_code == 502 and "upstream" in r.text
    assert upstream.count(UP_PATH) == 2
    serve.wait_idle()
    upstream.fault(UP_PATH, "reset", after=300_000, times=1)
    kind, _ = outcome(client, f"{serve.url}/{PKG}", {"x-expected-sha256": sha})
    assert kind in ("aborted", "status")
    serve.wait_idle()
    assert not store_of(serve).has(sha)
    ok = client.get(f"{serve.url}/{PKG}", headers={"x-expected-sha256": sha})
    assert ok.status_code == 200 and ok.content == data
    assert healthy(serve)


def test_upstream_down_is_a_502_that_names_the_host(tmp_path, upstream_root, client):
    dead = UpstreamServer(upstream_root).start()
    dead_url = dead.channel_url()
    dead.stop()
    cfg = ServeConfig(
        cache_dir=tmp_path / "store", port=0, upstreams=[Upstream.make("conda-forge", dead_url)]
    )
    with start_background(cfg) as srv:
        t0 = time.monotonic()
        r = client.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": "a" * 64})
        assert r.status_code == 502 and "cannot connect" in r.text and "127.0.0.1" in r.text
        assert time.monotonic() - t0 < 5
        assert client.get(f"{srv.url}/conda-forge/linux-64/repodata.json").status_code == 502
        assert healthy(srv) and partials(srv) == []


def test_upstream_not_having_it_is_a_404(serve, upstream, client):
    r = client.get(
        f"{serve.url}/conda-forge/linux-64/nope-1-0.conda", headers={"x-expected-sha256": "b" * 64}
    )
    assert r.status_code == 404 and "nope-1-0.conda" in r.text
    serve.wait_idle()
    assert partials(serve) == [] and not store_of(serve).has("b" * 64)


def test_upstream_too_slow_is_a_504_then_recovers(tmp_path, upstream, upstream_root, client):
    data = os.urandom(100_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(UP_PATH, "delay", seconds=5, times=1)
    with start_background(serve_config(tmp_path, upstream, upstream_read_timeout=0.5)) as srv:
        t0 = time.monotonic()
        r = client.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": sha})
        assert r.status_code == 504 and "timed out" in r.text
        assert time.monotonic() - t0 < 4
        srv.wait_idle()
        assert not store_of(srv).has(sha)
        ok = client.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": sha})
        assert ok.status_code == 200 and ok.content == data


def test_a_body_that_stalls_is_cut_after_the_read_timeout_and_resumed(
    tmp_path, upstream, upstream_root, client
):
    data = os.urandom(2_500_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(UP_PATH, "stall", after=1_300_000, seconds=30, times=1)
    cfg = serve_config(tmp_path, upstream, upstream_read_timeout=0.7)
    with start_background(cfg) as srv:
        t0 = time.monotonic()
        kind, detail = outcome(client, f"{srv.url}/{PKG}", {"x-expected-sha256": sha})
        assert kind == "aborted" or (kind == "status" and detail == 504), (kind, detail)
        srv.wait_idle()
        assert time.monotonic() - t0 < 10  # the timeout cut it, not the stall's end
        kept = store_of(srv).partial_dir / f"{sha}.part"
        got = kept.stat().st_size
        assert 0 < got <= 1_300_000 and kept.read_bytes() == data[:got]
        ok = client.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": sha})
        assert ok.status_code == 200 and ok.content == data
        assert upstream.requests[-1].range == f"bytes={got}-"


# -- client behaviour during a fill --------------------------------------------------------------


def test_a_client_disconnecting_mid_stream_neither_cancels_the_fill_nor_hurts_others(
    serve, upstream, upstream_root
):
    data = os.urandom(2_000_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(UP_PATH, "slow", rate=4_000_000)
    url = f"{serve.url}/{PKG}"
    h = {"x-expected-sha256": sha}
    digests: list[str] = []

    def full() -> None:
        with httpx.Client(timeout=30) as c:
            digests.append(hashlib.sha256(c.get(url, headers=h).content).hexdigest())

    with httpx.Client(timeout=30) as quitter, quitter.stream("GET", url, headers=h) as resp:
        next(resp.iter_raw())  # the fill is streaming
        others = [threading.Thread(target=full) for _ in range(2)]
        for t in others:
            t.start()
        # leaving the block closes this connection mid-body
    for t in others:
        t.join(30)
    assert digests == [sha, sha]
    serve.wait_idle()
    assert store_of(serve).path_for(sha).read_bytes() == data
    assert upstream.count(UP_PATH) == 1 and upstream.requests[0].complete


def test_the_fill_completes_when_its_only_client_leaves(serve, upstream, upstream_root):
    data = os.urandom(1_000_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(UP_PATH, "slow", rate=4_000_000)
    with (
        httpx.Client(timeout=30) as c,
        c.stream("GET", f"{serve.url}/{PKG}", headers={"x-expected-sha256": sha}) as r,
    ):
        next(r.iter_raw())
    serve.wait_idle()
    assert store_of(serve).has(sha)
    assert upstream.count(UP_PATH) == 1


def test_range_requests_during_an_in_flight_fill(serve, upstream, upstream_root):
    data = os.urandom(2_000_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(UP_PATH, "slow", rate=5_000_000)
    url = f"{serve.url}/{PKG}"
    h = {"x-expected-sha256": sha}
    with (
        httpx.Client(timeout=30) as a,
        httpx.Client(timeout=30) as b,
        a.stream("GET", url, headers=h) as first,
    ):
        chunks = first.iter_raw()
        body = bytearray(next(chunks))
        assert first.headers["x-pixicache-cache"] == "miss"
        part = b.get(url, headers={**h, "Range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == data[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
        assert part.headers["x-pixicache-cache"] in ("coalesced", "hit")
        tail = b.get(url, headers={**h, "Range": "bytes=-100"})
        assert tail.status_code == 206 and tail.content == data[-100:]
        for chunk in chunks:
            body += chunk
    assert bytes(body) == data
    assert upstream.count(UP_PATH) == 1


def test_eviction_while_a_response_streams_never_breaks_it(tmp_path, upstream, upstream_root):
    big = os.urandom(48 << 20)
    small = os.urandom(10_000)
    big_sha = put(upstream_root, PKG, big)
    small_sha = put(upstream_root, "conda-forge/linux-64/small-1-0.conda", small)
    with start_background(serve_config(tmp_path, upstream)) as srv, httpx.Client(timeout=60) as c:
        for path, sha in ((PKG, big_sha), ("conda-forge/linux-64/small-1-0.conda", small_sha)):
            assert c.get(f"{srv.url}/{path}", headers={"x-expected-sha256": sha}).status_code == 200
        srv.wait_idle()
        h = hashlib.sha256()
        with (
            httpx.Client(timeout=60) as reader,
            reader.stream(
                "GET", f"{srv.url}/{PKG}", headers={"x-expected-sha256": big_sha}
            ) as resp,
        ):
            assert resp.headers["x-pixicache-cache"] == "hit"
            chunks = resp.iter_raw(65536)
            h.update(next(chunks))
            report = c.post(f"{srv.url}/admin/gc?max_size=0").json()  # loopback: no token needed
            assert report["removed"] == 1 and report["kept_in_use"] == 1
            assert not store_of(srv).has(small_sha) and store_of(srv).has(big_sha)
            for chunk in chunks:
                h.update(chunk)
        assert h.hexdigest() == big_sha
        assert c.post(f"{srv.url}/admin/gc?max_size=0").json()["removed"] == 1  # no longer in use


def test_disk_full_refuses_misses_with_507_and_keeps_serving_hits(
    tmp_path, upstream, upstream_root, client, monkeypatch
):
    import pixicache.serve.writer as writer_mod

    kept = os.urandom(30_000)
    kept_sha = put(upstream_root, "conda-forge/linux-64/kept-1-0.conda", kept)
    new_sha = put(upstream_root, PKG, os.urandom(200_000))
    other_sha = put(upstream_root, "conda-forge/linux-64/other-1-0.conda", os.urandom(1000))
    with start_background(serve_config(tmp_path, upstream)) as srv:
        kept_url = f"{srv.url}/conda-forge/linux-64/kept-1-0.conda"
        assert client.get(kept_url, headers={"x-expected-sha256": kept_sha}).status_code == 200
        srv.wait_idle()

        def no_space(*_args: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(writer_mod, "_pwritev", no_space)
        r = client.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": new_sha})
        assert r.status_code == 507 and "full" in r.text
        srv.wait_idle()
        assert not store_of(srv).has(new_sha) and partials(srv) == []
        # while the store is full, further misses are refused without asking upstream
        before = upstream.count("*")
        other = client.get(
            f"{srv.url}/conda-forge/linux-64/other-1-0.conda",
            headers={"x-expected-sha256": other_sha},
        )
        assert other.status_code == 507 and upstream.count("*") == before
        hit = client.get(kept_url, headers={"x-expected-sha256": kept_sha})
        assert hit.status_code == 200 and hit.content == kept
        assert httpx.get(srv.url + "/healthz").json()["store_full"] is True
        # space freed (eviction) and writes working again: misses are filled again
        monkeypatch.undo()
        assert client.post(f"{srv.url}/admin/gc?max_size=0").json()["freed"] == len(kept)
        again = client.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": new_sha})
        assert again.status_code == 200


# -- hostile requests ----------------------------------------------------------------------------


BAD_TARGETS = [
    "/conda-forge/../../etc/passwd",
    "/conda-forge/linux-64/../../../pkg-1.0-0.conda",
    "/conda-forge/%2e%2e/%2e%2e/etc/passwd",
    "/conda-forge/linux-64/..%2f..%2fpkg-1.0-0.conda",
    "/conda-forge/linux-64/%2E%2E%5Cpkg-1.0-0.conda",
    "/conda-forge\\..\\linux-64\\pkg-1.0-0.conda",
    "/conda-forge/linux-64/pkg%00-1.0-0.conda",
    "/conda-forge/linux-64/%252e%252e/pkg-1.0-0.conda",
    "/conda-forge//linux-64/pkg-1.0-0.conda",
    "//evil.example/conda-forge/linux-64/pkg-1.0-0.conda",
    "/conda-forge/linux-64/pkg 1.conda",
    "/" + "a" * 1100 + ".conda",
]


def test_path_traversal_odd_encodings_and_absolute_urls_get_4xx_and_touch_nothing(
    serve, upstream, upstream_root
):
    put(upstream_root, PKG, os.urandom(1000))
    targets = [
        *BAD_TARGETS,
        f"{upstream.url}{UP_PATH}",
        f"http://127.0.0.1:{upstream.port}/etc/passwd",
    ]
    for target in targets:
        resp = raw(
            serve.port,
            f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"),
        )
        assert 400 <= status_of(resp) < 500, (target, resp[:200])
    long_header = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
        + b"a" * 20000
        + b"\r\nConnection: close\r\n\r\n"
    )
    assert status_of(raw(serve.port, long_header)) in (400, 431)
    assert status_of(raw(serve.port, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n")) in (
        400,
        405,
    )
    assert (
        status_of(
            raw(
                serve.port,
                b"PUT /conda-forge/linux-64/x.conda HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
        )
        == 405
    )
    assert upstream.count("*") == 0
    store = store_of(serve)
    assert list(store.iter_blobs()) == [] and partials(serve) == []
    assert not (store.root / "repodata").exists()
    assert healthy(serve)


def test_only_allow_listed_upstreams_are_ever_fetched(
    serve, upstream, upstream_root, tmp_path, client
):
    data = os.urandom(1000)
    sha = put(upstream_root, PKG, data)
    other_root = tmp_path / "other"
    put(other_root, PKG, data)
    with UpstreamServer(other_root) as other:
        port = upstream.port
        refused = [
            f"{other.url}{UP_PATH}",  # another server
            f"http://127.0.0.1:{port}/conda-forge-evil/linux-64/pkg-1.0-0.conda",  # prefix lookalike
            f"http://user@127.0.0.1:{port}{UP_PATH}",  # credentials
            f"http://127.0.0.1:{port}/conda-forge/../secret/pkg-1.0-0.conda",  # traversal
            f"http://127.0.0.1:{port}/conda-forge/%2e%2e/secret/pkg-1.0-0.conda",
            f"http://127.0.0.1:{port}{UP_PATH}?x=1",  # query
            f"http://127.0.0.1:{port}/conda-forge",  # the upstream itself, not a file below it
            "file:///etc/passwd",
            f"ftp://127.0.0.1:{port}{UP_PATH}",
        ]
        for url in refused:
            r = client.get(f"{serve.url}/sha256/{sha}", params={"url": url})
            assert r.status_code == 403 and "nothing was fetched" in r.text, url
        r = client.get(
            f"{serve.url}/sha256/{sha}", headers={"x-pixicache-upstream-url": refused[0]}
        )
        assert r.status_code == 403
        r = client.get(f"{serve.url}/evil/linux-64/pkg-1.0-0.conda")
        assert r.status_code == 404 and "conda-forge" in r.text
        assert client.get(f"{serve.url}/conda-forge/linux-64/notes.txt").status_code == 404
        assert other.count("*") == 0 and upstream.count("*") == 0
    assert list(store_of(serve).iter_blobs()) == []


def test_a_client_digest_header_cannot_poison_what_a_url_serves(
    serve, upstream, upstream_root, client
):
    good = os.urandom(5000)
    good_sha = put(upstream_root, PKG, good)
    other = os.urandom(6000)
    put(upstream_root, "conda-forge/linux-64/victim-1-0.conda", other)
    assert (
        client.get(f"{serve.url}/{PKG}", headers={"x-expected-sha256": good_sha}).status_code == 200
    )
    serve.wait_idle()
    victim = f"{serve.url}/conda-forge/linux-64/victim-1-0.conda"
    # a digest the index cannot confirm for this URL is no hit: upstream's bytes for the
    # URL are fetched, and they are not those of the digest, so nothing is served
    kind, detail = outcome(client, victim, {"x-expected-sha256": good_sha})
    assert kind in ("aborted", "status") and detail != 200, (kind, detail)
    if kind == "aborted":
        assert detail[0] < len(other)  # type: ignore[index]  # the last byte held back
    serve.wait_idle()
    # the digest route is where a digest names the bytes
    assert client.get(f"{serve.url}/sha256/{good_sha}").content == good
    # once the URL's own bytes are known, a header that contradicts them is a 409
    other_sha = hashlib.sha256(other).hexdigest()
    assert client.get(victim, headers={"x-expected-sha256": other_sha}).content == other
    serve.wait_idle()
    conflict = client.get(victim, headers={"x-expected-sha256": good_sha})
    assert conflict.status_code == 409 and good_sha in conflict.text
    assert client.get(victim, headers={"x-expected-sha256": other_sha}).headers["x-pixicache-cache"] == "hit"


def test_a_slowloris_client_is_dropped_after_the_header_timeout(tmp_path, upstream):
    with start_background(serve_config(tmp_path, upstream, header_timeout=1.0)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            t0 = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            sent_more = 0
            closed = False
            while time.monotonic() - t0 < 8:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")  # a header line now and then, never the end
                    sent_more += 1
                    sock.settimeout(0.3)
                    if sock.recv(1024) == b"":
                        closed = True
                        break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
            elapsed = time.monotonic() - t0
        assert closed and elapsed < 4, (closed, elapsed)
        assert healthy(srv)


def test_connection_bound_and_per_client_cap(tmp_path, upstream, upstream_root):
    with start_background(serve_config(tmp_path, upstream, max_connections=2)) as srv:
        socks = []
        for _ in range(2):  # two keep-alive connections, each known to the server
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(s.recv(65536)) == 200
            socks.append(s)
        busy = raw(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(busy) == 503
        for s in socks:
            s.close()
        assert (
            metric(srv, 'pixicache_serve_refused_total{reason="connections"}') >= 1
        )  # retried until a slot frees
    data = os.urandom(400_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(UP_PATH, "slow", rate=1_000_000)
    with start_background(serve_config(tmp_path / "b", upstream, per_client=1)) as srv:
        elsewhere = httpx.HTTPTransport(local_address="127.0.0.2")  # another client address
        with (
            httpx.Client(timeout=30) as a,
            httpx.Client(timeout=30) as b,
            httpx.Client(timeout=30, transport=elsewhere) as c,
        ):
            with a.stream("GET", f"{srv.url}/{PKG}", headers={"x-expected-sha256": sha}) as first:
                chunks = first.iter_raw()
                got = bytearray(next(chunks))
                second = b.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": sha})
                assert second.status_code == 429 and second.headers["retry-after"] == "1"
                other = c.get(f"{srv.url}/{PKG}", headers={"x-expected-sha256": sha})
                assert other.status_code == 200 and other.content == data
                for chunk in chunks:
                    got += chunk
            assert bytes(got) == data



def test_behind_a_trusted_proxy_the_cap_counts_forwarded_clients(
    tmp_path, upstream, upstream_root
):
    """A squid in front makes every request come from one address: with it trusted,
    the cap applies per X-Forwarded-For client; an untrusted peer's header is ignored."""
    data = os.urandom(400_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(UP_PATH, "slow", rate=1_000_000)
    cfg = serve_config(tmp_path, upstream, per_client=1, trusted_proxies=["127.0.0.1"])
    with start_background(cfg) as srv:
        stranger = httpx.HTTPTransport(local_address="127.0.0.2")  # not a trusted proxy
        with (
            httpx.Client(timeout=30) as a,
            httpx.Client(timeout=30) as b,
            httpx.Client(timeout=30, transport=stranger) as c,
        ):
            digest = {"x-expected-sha256": sha}
            job1 = {**digest, "X-Forwarded-For": "10.0.0.1"}
            with a.stream("GET", f"{srv.url}/{PKG}", headers=job1) as first:
                chunks = first.iter_raw()
                got = bytearray(next(chunks))
                # the same job behind the proxy: over its cap
                again = b.get(f"{srv.url}/{PKG}", headers=job1)
                assert again.status_code == 429 and "10.0.0.1" in again.text
                # another job behind the same proxy: its own cap
                other = b.get(f"{srv.url}/{PKG}", headers={**digest, "X-Forwarded-For": "10.0.0.2"})
                assert other.status_code == 200 and other.content == data
                # a forged header from an untrusted peer counts as that peer
                forged = c.get(f"{srv.url}/{PKG}", headers=job1)
                assert forged.status_code == 200 and forged.content == data
                for chunk in chunks:
                    got += chunk
            assert bytes(got) == data


# -- shutdown ------------------------------------------------------------------------------------


def test_sigterm_finishes_running_responses_and_refuses_new_ones(tmp_path, upstream, upstream_root):
    data = os.urandom(1_500_000)
    sha = put(upstream_root, PKG, data)
    upstream.fault(UP_PATH, "slow", rate=2_000_000)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pixicache.serve",
            "--port",
            "0",
            "--cache-dir",
            str(tmp_path / "store"),
            "--upstream",
            f"conda-forge={upstream.channel_url()}",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "".join(lines)
        port = int(url.rsplit(":", 1)[1])
        h = hashlib.sha256()
        with (
            httpx.Client(timeout=30) as c,
            c.stream("GET", f"{url}/{PKG}", headers={"x-expected-sha256": sha}) as r,
        ):
            chunks = r.iter_raw()
            h.update(next(chunks))
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            refused = False
            while time.monotonic() < deadline and not refused:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except (ConnectionRefusedError, ConnectionResetError):
                    refused = True
                except TimeoutError:
                    pass  # a loaded machine: the backlog is full until the server reacts
                else:
                    time.sleep(0.05)  # still listening: ask again without filling its backlog
            assert refused, "still accepting connections after SIGTERM"
            for chunk in chunks:
                h.update(chunk)
        assert h.hexdigest() == sha
        assert proc.wait(30) == 0
        rest = proc.stderr.read()
        assert "stopping" in rest and f"GET /{PKG} 200 {len(data)}B" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bytes_that_arrived_with_the_break_are_kept_for_the_resume():
    """When the rest of a body and the connection's end arrive in one read, aiohttp has
    the error set before the pump reads the bytes: the batch still holds them, so the
    partial file (and the resume's Range) starts where the upstream stopped."""
    import asyncio
    from unittest import mock

    import aiohttp
    from aiohttp.streams import StreamReader

    from pixicache.serve.fill import FillManager

    async def scenario(first: bytes | None) -> tuple[int, BaseException | None]:
        loop = asyncio.get_running_loop()
        reader = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=loop)
        if first is not None:
            reader.feed_data(first)
        reader.feed_data(b"b" * 600_000)
        reader.set_exception(aiohttp.ClientPayloadError("not enough data for Content-Length"))
        total, broken = 0, None
        while broken is None:
            parts, size, broken = await FillManager._batch(None, reader, loop)  # type: ignore[arg-type]
            assert size == sum(len(p) for p in parts)
            total += size
        return total, broken

    for first in (None, b"a" * 1000):
        total, broken = asyncio.run(scenario(first))
        assert isinstance(broken, aiohttp.ClientPayloadError)
        assert total == 600_000 + (len(first) if first else 0)
