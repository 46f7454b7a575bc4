"""The front path (pixicache.serve.front): hits answered without aiohttp, the same answers.

Two servers share one store: ``slow`` (``fast_hits=False``: every request through
aiohttp's handler) and ``fast`` (the default). Each answer of the fast server, on a
connection whose requests the front path answers or hands over, is compared byte for
byte (``Date`` aside) with the slow server's answer to the same request.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixicache.serve import ServeConfig, Upstream, start_background
from pixicache.serve.front import parse_head
from pixicache.serve.runner import ServeHandle
from pixicache.store import Store
from pixicache.testing import UpstreamServer

SMALL = "conda-forge/linux-64/small-1.0-0.conda"
BIG = "conda-forge/linux-64/big-1.0-0.conda"
HUGE = "conda-forge/linux-64/huge-1.0-0.conda"  # more than any socket buffer holds
HUGE_SIZE = 48 << 20


@pytest.fixture(scope="module")
def upstream_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("front-upstream")
    for rel, size in ((SMALL, 3_000), (BIG, 3 << 20), (HUGE, HUGE_SIZE)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(size))
    return root


@pytest.fixture(scope="module")
def upstream(upstream_root: Path) -> Iterator[UpstreamServer]:
    with UpstreamServer(upstream_root) as srv:
        yield srv


def sha_of(root: Path, rel: str) -> str:
    return hashlib.sha256((root / rel).read_bytes()).hexdigest()


def config(store: Path, upstream: UpstreamServer, **kw: object) -> ServeConfig:
    ups = [Upstream.make("conda-forge", upstream.channel_url("conda-forge"))]
    return ServeConfig(cache_dir=store, port=0, upstreams=ups, **kw)  # type: ignore[arg-type]


def learned(srv: ServeHandle, upstream_root: Path, *rels: str) -> None:
    """Fill each artifact, then have it answered once as a hit on aiohttp's path (what
    teaches the front path the target)."""
    assert srv.front is not None
    with httpx.Client(timeout=30) as c:
        for rel in rels:
            sha = sha_of(upstream_root, rel)
            assert c.get(f"{srv.url}/{rel}", headers={"x-expected-sha256": sha}).status_code == 200
            srv.wait_idle()  # committed: what follows are hits
            for target in (f"/{rel}", f"/sha256/{sha}"):
                r = c.get(srv.url + target, headers={"x-expected-sha256": sha})
                assert r.status_code == 200 and r.headers["x-pixicache-cache"] == "hit"
    with httpx.Client(timeout=30) as c:  # a new connection: the front path answers now
        before = srv.front.answered
        for rel in rels:
            c.head(f"{srv.url}/{rel}", headers={"x-expected-sha256": sha_of(upstream_root, rel)})
        assert srv.front.answered == before + (len(rels) if srv.config.fast_hits else 0)


@pytest.fixture(scope="module")
def twins(
    tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamServer, upstream_root: Path
) -> Iterator[tuple[ServeHandle, ServeHandle]]:
    """(slow, fast): one store, every artifact filled and answered once as a hit by each."""
    store = tmp_path_factory.mktemp("front-store") / "store"
    with (
        start_background(config(store, upstream, fast_hits=False)) as slow,
        start_background(config(store, upstream)) as fast,
    ):
        learned(slow, upstream_root, SMALL, BIG)
        learned(fast, upstream_root, SMALL, BIG)
        yield slow, fast


def exchange(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection; everything the server sends until it closes
    (or until ``timeout`` of silence)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = bytearray()
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                out += chunk
    return bytes(out)


def without_date(raw: bytes) -> bytes:
    return b"\r\n".join(line for line in raw.split(b"\r\n") if not line.startswith(b"Date: "))


def parse_responses(raw: bytes, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``raw``, one per request method given (HEAD: no body)."""
    out = []
    for method in methods:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"incomplete response: {head[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = 0 if method == "HEAD" or status == 304 else int(headers.get("content-length", 0))
        out.append((status, headers, raw[:n]))
        raw = raw[n:]
    assert raw == b"", f"{len(raw)} bytes after the last response"
    return out


def request(method: str, target: str, *lines: str) -> bytes:
    """The request, ending with ``Connection: close`` unless it names a Connection."""
    if not any(x.lower().startswith("connection:") for x in lines):
        lines = (*lines, "Connection: close")
    return (
        f"{method} {target} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{x}\r\n" for x in lines) + "\r\n"
    ).encode("latin-1")


# -- the same answers ----------------------------------------------------------------------


def _variants(upstream_root: Path) -> list[tuple[str, str, list[str]]]:
    out = []
    for rel in (SMALL, BIG):
        sha = sha_of(upstream_root, rel)
        size = (upstream_root / rel).stat().st_size
        for method in ("GET", "HEAD"):
            for target, extra in (
                (f"/{rel}", [f"x-expected-sha256: {sha}"]),
                (f"/{rel}", [f"X-Expected-SHA256:   {sha.upper()}  "]),
                (f"/sha256/{sha}", []),
                (f"/{rel}", [f"x-expected-sha256: {sha}", "Range: bytes=10-19"]),
                (f"/{rel}", [f"x-expected-sha256: {sha}", f"Range: bytes={size - 5}-"]),
                (f"/{rel}", [f"x-expected-sha256: {sha}", "Range: bytes=-7"]),
                (f"/{rel}", [f"x-expected-sha256: {sha}", f"Range: bytes={size}-"]),
                (f"/{rel}", [f"x-expected-sha256: {sha}", "Range: bytes=0-1,5-9"]),
                (f"/{rel}", [f"x-expected-sha256: {sha}", f'If-None-Match: "{sha}"']),
                (f"/{rel}", [f"x-expected-sha256: {sha}", 'If-None-Match: "other", *']),
                (f"/{rel}", [f"x-expected-sha256: {sha}", "If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT"]),
                (f"/{rel}", [f"x-expected-sha256: {sha}", "If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT"]),
                (f"/{rel}", [f"x-expected-sha256: {sha}", "Range: bytes=0-3", f'If-Range: "{sha}"']),
                (f"/{rel}", [f"x-expected-sha256: {sha}", "Range: bytes=0-3", 'If-Range: "nope"']),
                (f"/{rel}", [f"x-expected-sha256: {sha}", "Connection: keep-alive, close"]),
            ):
                out.append((method, target, extra))
    return out


def test_every_plain_hit_is_answered_on_the_front_path_exactly_as_aiohttp_answers_it(
    twins, upstream_root
):
    slow, fast = twins
    variants = _variants(upstream_root)
    before = fast.front.answered
    for method, target, extra in variants:
        req = request(method, target, *extra)
        want = exchange(slow.port, req)
        got = exchange(fast.port, req)
        assert without_date(got) == without_date(want), (method, target, extra)
        assert b"x-pixicache-cache: hit" in got
    assert fast.front.answered - before == len(variants)


@pytest.mark.parametrize(
    "req",
    [
        b"GET /%(rel)s HTTP/1.0\r\nx-expected-sha256: %(sha)s\r\n\r\n",
        b"get /%(rel)s HTTP/1.1\r\nx-expected-sha256: %(sha)s\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\nx-expected-sha256: %(sha)s\nConnection: close\n\n",
        b"GET /%(rel)s HTTP/1.1\r\nx-expected-sha256: %(sha)s\r\nConnection: close\r\n\r\n"[:-2] + b"\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nx-expected-sha256 : %(sha)s\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nx-expected-sha256: %(sha)s\r\n  folded\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nx-expected-sha256: %(sha)s\r\nx-expected-sha256: %(other)s\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nx-expected-sha256: %(other)s\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        b"GET /%(rel)s HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, close\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nx-pixicache-warm: 1\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET //%(rel)s HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET http://x/%(rel)s HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /conda-forge/linux-64/%%2e%%2e/%(rel)s HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nX-Bad\x00: 1\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nX-Obs: caf\xe9\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\nConnection: close\r\n\r\n",
        b"GET /%(rel)s HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"Connection: close\r\n\r\n",
        b"PUT /%(rel)s HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    ],
    ids=lambda r: r[:60].decode("latin-1").replace("%(rel)s", "P").replace("\r\n", "|"),
)
def test_anything_unusual_or_malformed_gets_the_answer_aiohttp_gives(twins, upstream_root, req):
    """What the front path does not answer itself, aiohttp answers, from the first byte
    the client sent: the answer is the slow server's, byte for byte."""
    slow, fast = twins
    subs = {
        b"rel": SMALL.encode(),
        b"sha": sha_of(upstream_root, SMALL).encode(),
        b"other": b"0" * 64,
    }
    req = req.replace(b"%%", b"\x00PCT\x00")
    for key, value in subs.items():
        req = req.replace(b"%(" + key + b")s", value)
    req = req.replace(b"\x00PCT\x00", b"%")
    before = fast.front.answered
    want = exchange(slow.port, req, timeout=3)
    got = exchange(fast.port, req, timeout=3)
    assert without_date(got) == without_date(want)
    assert fast.front.answered == before  # the front path answered none of them


def test_pipelined_requests_are_answered_in_order_across_the_hand_over(twins, upstream_root):
    """Hits, then a request the front path hands over, then more hits, in one write:
    every answer, in order, complete."""
    _slow, fast = twins
    small, big = (upstream_root / SMALL).read_bytes(), (upstream_root / BIG).read_bytes()
    hit = lambda rel: f"GET /{rel} HTTP/1.1\r\nHost: x\r\n\r\n".encode()  # noqa: E731
    data = hit(SMALL) + hit(BIG) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + hit(BIG)
    data += request("GET", f"/{SMALL}")
    before, handed = fast.front.answered, fast.front.handed_off
    got = parse_responses(exchange(fast.port, data), ["GET"] * 5)
    assert [s for s, _, _ in got] == [200, 200, 200, 200, 200]
    assert got[0][2] == small and got[1][2] == big and got[3][2] == big and got[4][2] == small
    assert b'"status": "ok"' in got[2][2]
    assert fast.front.answered - before == 2 and fast.front.handed_off - handed == 1


def test_a_keep_alive_connection_stays_on_the_front_path(twins, upstream_root):
    _slow, fast = twins
    sha = sha_of(upstream_root, BIG)
    before, handed = fast.front.answered, fast.front.handed_off
    with httpx.Client(timeout=30) as c:
        for rel in (SMALL, BIG) * 5:
            r = c.get(f"{fast.url}/{rel}", headers={"x-expected-sha256": sha_of(upstream_root, rel)})
            assert r.status_code == 200 and r.content == (upstream_root / rel).read_bytes()
        r = c.head(f"{fast.url}/sha256/{sha}")
        assert r.status_code == 200 and r.headers["content-length"] == str(3 << 20)
    assert fast.front.answered - before == 11 and fast.front.handed_off == handed


def test_a_client_that_half_closes_after_its_request_gets_the_whole_answer(twins, upstream_root):
    _slow, fast = twins
    with socket.create_connection(("127.0.0.1", fast.port), timeout=10) as sock:
        sock.sendall(f"GET /{BIG} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := sock.recv(1 << 20):
            out += chunk
    (status, _, body), = parse_responses(bytes(out), ["GET"])
    assert status == 200 and body == (upstream_root / BIG).read_bytes()


def test_a_hit_this_process_has_not_answered_before_stays_on_the_front_path(
    tmp_path, upstream, upstream_root
):
    """A server started on a store that holds the blobs (a restart; each worker of
    ``serve --workers N``) looks a hit it has not answered yet up and answers it on the
    front path, instead of handing the connection to aiohttp for good: pipelined
    requests (artifact paths, digests, GET and HEAD) answered in order, each exactly as
    aiohttp answers it, none handed over."""
    store = tmp_path / "store"
    with start_background(config(store, upstream, fast_hits=False)) as slow:
        learned(slow, upstream_root, SMALL, BIG)
        with start_background(config(store, upstream)) as fresh:
            assert fresh.front is not None and len(fresh.app.known_hits) == 0
            small, big = sha_of(upstream_root, SMALL), sha_of(upstream_root, BIG)
            reqs = [
                ("GET", f"/{BIG}", [f"x-expected-sha256: {big}"]),
                ("HEAD", f"/{SMALL}", []),
                ("GET", f"/sha256/{small}", []),
                ("GET", f"/{SMALL}", ["Range: bytes=10-19"]),
                ("GET", f"/{BIG}", []),
            ]
            data = b"".join(request(m, t, *x, "Connection: keep-alive") for m, t, x in reqs[:-1])
            data += request(*reqs[-1][:2])
            got = exchange(fresh.port, data)
            want = exchange(slow.port, data)
            assert without_date(got) == without_date(want)
            answers = parse_responses(got, [m for m, _, _ in reqs])
            assert [a[0] for a in answers] == [200, 200, 200, 206, 200]
            assert answers[0][2] == (upstream_root / BIG).read_bytes()
            assert fresh.front.answered == len(reqs) and fresh.front.handed_off == 0


def test_a_look_up_that_outlasts_the_header_timeout_still_gets_its_answer(
    tmp_path, upstream, upstream_root, monkeypatch
):
    """While a hit is looked up the header timeout does not run: a slow index (here
    0.8 s, the timeout 0.3 s) delays the answer, never drops the request."""
    store = tmp_path / "store"
    with start_background(config(store, upstream)) as first:
        learned(first, upstream_root, SMALL)
    with start_background(config(store, upstream, header_timeout=0.3)) as fresh:
        known_sha = fresh.app._known_sha

        async def slow_index(url: str, upstream_name: str) -> str | None:
            import asyncio

            await asyncio.sleep(0.8)
            return await known_sha(url, upstream_name)

        monkeypatch.setattr(fresh.app, "_known_sha", slow_index)
        (status, _headers, body), = parse_responses(exchange(fresh.port, request("GET", f"/{SMALL}")), ["GET"])
        assert status == 200 and body == (upstream_root / SMALL).read_bytes()
        assert fresh.front.answered == 1 and fresh.front.handed_off == 0


def test_front_path_hits_are_logged_and_counted_like_the_others(twins, upstream_root, caplog):
    caplog.set_level(logging.INFO, logger="pixicache.serve.access")
    _slow, fast = twins
    sha = sha_of(upstream_root, SMALL)
    before = fast.front.answered
    exchange(fast.port, request("GET", f"/{SMALL}", f"x-expected-sha256: {sha}"))
    assert fast.front.answered == before + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "pixicache.serve.access"]
    assert any(f"GET /{SMALL} 200 3000B" in line and line.endswith(" hit") for line in lines)
    text = httpx.get(f"{fast.url}/metrics").text
    assert 'pixicache_serve_requests_total{method="GET",route="artifact",status="200"}' in text
    assert 'pixicache_serve_cache_total{result="hit"}' in text
    assert f"pixicache_serve_front_answered_total {float(fast.front.answered)}" in text
    assert f"pixicache_serve_front_handed_off_total {float(fast.front.handed_off)}" in text


# -- limits and faults ---------------------------------------------------------------------


def slow_reader(port: int) -> tuple[socket.socket, bytes]:
    """A connection with a small receive buffer that asked for the huge blob and read
    the first bytes of the answer (a 200): the server is still sending it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /{HUGE} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200 ")
    return sock, first


def test_a_changed_blob_is_never_sent_by_the_front_path(tmp_path, upstream, upstream_root):
    """The front path sends only the very file this process verified; a blob edited in
    place is handed over, hashed, quarantined and filled again."""
    data = (upstream_root / SMALL).read_bytes()
    with start_background(config(tmp_path / "store", upstream)) as srv:
        learned(srv, upstream_root, SMALL)
        blob = Store(tmp_path / "store").path_for(sha_of(upstream_root, SMALL))
        blob.chmod(0o644)
        with open(blob, "r+b") as fh:
            fh.write(b"rot")
        before = srv.front.answered
        (status, headers, body), = parse_responses(exchange(srv.port, request("GET", f"/{SMALL}")), ["GET"])
        assert status == 200 and body == data and headers["x-pixicache-cache"] == "miss"
        assert srv.front.answered == before
    assert len(list(Store(tmp_path / "store").quarantine_dir.iterdir())) == 1


def test_an_evicted_blob_is_filled_again(tmp_path, upstream, upstream_root):
    with start_background(config(tmp_path / "store", upstream)) as srv:
        learned(srv, upstream_root, SMALL)
        Store(tmp_path / "store").gc(0)
        before = srv.front.answered
        req = request("GET", f"/{SMALL}", f"x-expected-sha256: {sha_of(upstream_root, SMALL)}")
        (status, headers, body), = parse_responses(exchange(srv.port, req), ["GET"])
        assert srv.front.answered == before
        assert status == 200 and body == (upstream_root / SMALL).read_bytes()
        assert headers["x-pixicache-cache"] == "miss"


def test_a_stalled_client_is_dropped_after_the_send_timeout(tmp_path, upstream, upstream_root):
    """A client that takes nothing of a large answer for ``send_timeout`` seconds is
    dropped (the connection aborted mid-body), and the server goes on serving."""
    with start_background(config(tmp_path / "store", upstream, send_timeout=1.0)) as srv:
        learned(srv, upstream_root, HUGE, BIG)
        before = srv.front.answered
        sock, first = slow_reader(srv.port)
        assert srv.front.answered == before + 1
        time.sleep(2.5)
        r = httpx.get(f"{srv.url}/{BIG}", timeout=30)
        assert r.status_code == 200 and len(r.content) == 3 << 20  # not stuck
        total = len(first)
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                total += len(chunk)
        sock.close()
        assert total < HUGE_SIZE
        assert 'status="200-aborted"' in httpx.get(f"{srv.url}/metrics").text


def test_an_idle_or_unfinished_connection_is_closed_after_the_header_timeout(tmp_path, upstream):
    with start_background(config(tmp_path / "store", upstream, header_timeout=0.5)) as srv:
        for sent in (b"", b"GET /conda"):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(sent)
                t0 = time.monotonic()
                assert sock.recv(100) == b""
                assert time.monotonic() - t0 < 5


def test_the_per_client_cap_counts_front_path_answers(tmp_path, upstream, upstream_root):
    with start_background(config(tmp_path / "store", upstream, per_client=1)) as srv:
        learned(srv, upstream_root, HUGE, BIG)
        before = srv.front.answered
        sock, _ = slow_reader(srv.port)  # still sending: it counts
        assert srv.front.answered == before + 1
        capped = httpx.get(f"{srv.url}/{BIG}", timeout=30)
        assert capped.status_code == 429
        elsewhere = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(timeout=30, transport=elsewhere) as other:
            assert other.get(f"{srv.url}/{BIG}").status_code == 200
        sock.close()


def test_shutdown_closes_idle_connections_and_finishes_answers_in_flight(
    tmp_path, upstream, upstream_root
):
    srv = start_background(config(tmp_path / "store", upstream))
    learned(srv, upstream_root, HUGE)
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    before = srv.front.answered
    busy, first = slow_reader(srv.port)
    assert srv.front.answered == before + 1
    got = bytearray(first)
    assert srv.front.protocols
    import threading

    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    assert idle.recv(100) == b""  # closed at once
    busy.settimeout(20)
    while chunk := busy.recv(1 << 20):
        got += chunk
    stopper.join(30)
    (status, _, body), = parse_responses(bytes(got), ["GET"])
    assert status == 200 and body == (upstream_root / HUGE).read_bytes()
    idle.close()
    busy.close()


# -- the parser ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.sampled_from(
                [b"GET ", b"HEAD ", b"/a", b"/b?c=d", b" HTTP/1.1", b" HTTP/1.0", b"\r\n", b"\n",
                 b"Host: x", b"X-A:b", b"X-A: b ", b"Connection: close", b"Content-Length: 1",
                 b"Transfer-Encoding: chunked", b" folded", b"\t", b":", b"\x00", b"\xff", b"x"]
            ),
            max_size=20,
        ).map(b"".join),
    )
)
def test_the_front_parser_accepts_only_what_a_reference_parser_reads_the_same(data):
    """Whatever ``parse_head`` accepts, h11 (a strict, well-tested HTTP/1.1 parser)
    parses to the same method, target and headers, with no body; whatever it cannot
    tell yet it never accepts."""
    got = parse_head(data, 8190)
    if got is None or got is False:
        return
    method, target, fields, end = got
    head = data[:end]
    if "host" not in fields:  # h11 insists on one (aiohttp does not): add it for h11
        line_end = head.index(b"\r\n") + 2
        head = head[:line_end] + b"Host: added\r\n" + head[line_end:]
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert event.method.decode() == method and event.target.decode() == target
    theirs = {k.decode(): v.decode() for k, v in event.headers}
    if "host" not in fields:
        assert theirs.pop("host") == "added"
    assert theirs == dict(fields)
    assert isinstance(conn.next_event(), h11.EndOfMessage)  # no body


def test_the_doctests_of_the_front_path_and_the_http_helpers_hold() -> None:
    import doctest

    from pixicache.serve import front, http

    for module in (front, http):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_a_head_that_trickles_in_goes_to_aiohttp_and_is_answered(twins, upstream_root):
    """Byte by byte: the front path hands the connection over (aiohttp reads a head
    incrementally) and the request is answered all the same."""
    _slow, fast = twins
    handed = fast.front.handed_off
    req = request("GET", f"/{SMALL}", f"x-expected-sha256: {sha_of(upstream_root, SMALL)}")
    with socket.create_connection(("127.0.0.1", fast.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(req)):
            sock.sendall(req[i : i + 1])
            time.sleep(0.002)
        out = bytearray()
        while chunk := sock.recv(1 << 20):
            out += chunk
    (status, _, body), = parse_responses(bytes(out), ["GET"])
    assert status == 200 and body == (upstream_root / SMALL).read_bytes()
    assert fast.front.handed_off == handed + 1


def test_the_table_of_known_hits_stays_small_whatever_the_queries() -> None:
    from pixicache.serve.blobs import KnownHits

    table = KnownHits(limit=100, longest=64)
    for i in range(1000):
        table.learn(f"/sha256/{'a' * 64}?url={i}", "sha256", "a" * 64, None)
        assert len(table) <= 100
    table.learn("/" + "x" * 65, "artifact", "b" * 64, "https://u/x")
    assert table.get("/" + "x" * 65) is None
    table.learn("/x", "artifact", "b" * 64, "https://u/x")
    assert table.get("/x") == ("artifact", "b" * 64, "https://u/x")


def test_a_blob_is_pinned_while_sent_and_released_after(twins, upstream_root, tmp_path) -> None:
    """gc cannot take a pinned blob's lock; the pins of a finished send are released
    (a leaked one would keep gc away from the blob for good)."""
    from pixicache.serve.blobs import BlobFiles
    from pixicache.store.locking import FileLock, LockTimeout

    slow, fast = twins
    sha = sha_of(upstream_root, HUGE)
    store = fast.app.store
    blobs = BlobFiles(store)
    gc_lock = lambda: FileLock(store.lock_dir / f"{sha}.lock", timeout=0)  # noqa: E731
    blobs.pin(sha)
    blobs.pin(sha)
    blobs.unpin(sha)
    assert blobs.pins(sha) == 1
    with pytest.raises(LockTimeout):
        gc_lock().acquire()
    blobs.unpin(sha)
    assert blobs.pins(sha) == 0
    gc_lock().acquire().release()
    for _ in range(3):
        exchange(fast.port, request("GET", f"/{HUGE}"))
    assert fast.app.blobs.pins(sha) == 0 and slow.app.blobs.pins(sha) == 0


def test_pins_keep_a_bounded_set_of_lock_files_open_and_never_drop_a_held_pin(tmp_path, monkeypatch) -> None:
    """A pin leaves its lock file open after the last unpin (a blob sent again is pinned
    with two flock calls), but at most LOCK_FILES of them; a blob pinned meanwhile keeps
    its lock (gc cannot take it) however many others come and go, the others are
    unlocked, and close() leaves no lock file open."""
    from pixicache.serve import blobs as B
    from pixicache.store.locking import FileLock, LockTimeout

    monkeypatch.setattr(B, "LOCK_FILES", 2)
    store = Store(tmp_path / "store")
    files = B.BlobFiles(store)
    shas = [f"{i:064x}" for i in range(6)]
    lock_of = lambda sha: store.lock_dir / f"{sha}.lock"  # noqa: E731

    def open_lock_files() -> set[str]:
        held = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(str(store.lock_dir)):
                    held.add(Path(target).name)
        return held

    files.pin(shas[0])
    for sha in shas[1:]:
        files.pin(sha)
        files.unpin(sha)
        assert f"{shas[0]}.lock" in open_lock_files() and len(open_lock_files()) <= 2
    files.pin(shas[5])  # the last one used: still open, pinned again without opening it
    assert open_lock_files() == {f"{shas[0]}.lock", f"{shas[5]}.lock"}
    with pytest.raises(LockTimeout):
        FileLock(lock_of(shas[0]), timeout=0).acquire()
    with pytest.raises(LockTimeout):
        FileLock(lock_of(shas[5]), timeout=0).acquire()
    for sha in shas[1:5]:
        FileLock(lock_of(sha), timeout=0).acquire().release()
    files.unpin(shas[0])
    files.unpin(shas[5])
    for sha in shas:
        FileLock(lock_of(sha), timeout=0).acquire().release()
    files.close()
    assert open_lock_files() == set()


def _front_protocols(srv: ServeHandle) -> list[Any]:
    assert srv.front is not None
    return list(srv.front.protocols)


def test_a_large_body_is_sent_corked_and_the_cork_is_released_after_it(tmp_path, upstream, upstream_root):
    """While the front path sends a large body, ``TCP_CORK`` is on (only full segments
    leave, as on aiohttp's path and nginx's ``tcp_nopush``); when it is sent the cork is
    off again, so nothing of the body's end, nor of the next answer, is held back."""
    if not hasattr(socket, "TCP_CORK"):
        pytest.skip("TCP_CORK is Linux's; the front path does not cork elsewhere")
    with start_background(config(tmp_path / "store", upstream)) as fast:
        learned(fast, upstream_root, HUGE, SMALL)
        sock, first = slow_reader(fast.port)  # the huge blob, not read: its body is in progress
        _read_corked_answer(fast, sock, first, upstream_root)


def _read_corked_answer(fast: ServeHandle, sock: socket.socket, first: bytes, upstream_root: Path) -> None:
    with sock:
        deadline = time.monotonic() + 10
        while not (sending := [p for p in _front_protocols(fast) if p._body is not None]):
            assert time.monotonic() < deadline, "no body in progress on the front path"
            time.sleep(0.01)
        out = sending[0]._out
        assert out.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 1
        data = bytearray(first)
        head_end = data.find(b"\r\n\r\n") + 4
        sock.settimeout(30)
        while len(data) - head_end < HUGE_SIZE:
            chunk = sock.recv(1 << 20)
            assert chunk, "the connection closed before the body was complete"
            data += chunk
        assert hashlib.sha256(data[head_end:]).hexdigest() == sha_of(upstream_root, HUGE)
        while sending[0]._body is not None:
            assert time.monotonic() < deadline + 30
            time.sleep(0.01)
        assert out.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
        sock.sendall(request("GET", f"/{SMALL}"))  # the next answer on this connection
        rest = bytearray()
        while chunk := sock.recv(1 << 20):
            rest += chunk
        assert parse_responses(bytes(rest), ["GET"])[0][2] == (upstream_root / SMALL).read_bytes()


def test_a_region_goes_out_a_slice_per_turn_of_the_event_loop(tmp_path, monkeypatch) -> None:
    """``RegionSender`` puts at most ``SEND_SLICE`` bytes on the socket before the event
    loop takes a turn, even when the socket would take more (a control shows it would),
    and sends the whole region, intact, from its writer callback."""
    import asyncio

    from pixicache.serve import http as serve_http

    monkeypatch.setattr(serve_http, "SEND_SLICE", 16 << 10)
    size = 1 << 20
    payload = os.urandom(size)
    (tmp_path / "blob").write_bytes(payload)

    def pair() -> tuple[socket.socket, socket.socket]:
        with socket.create_server(("127.0.0.1", 0)) as lsn:
            client = socket.create_connection(lsn.getsockname())
            server, _ = lsn.accept()
        server.setblocking(False)
        return server, client

    async def main() -> tuple[int, int, bytes]:
        loop = asyncio.get_running_loop()
        control, control_client = pair()  # how much a socket like this takes at once
        took = 0
        with control, control_client, open(tmp_path / "blob", "rb") as fh, contextlib.suppress(BlockingIOError):
            while took < size:
                took += os.sendfile(control.fileno(), fh.fileno(), took, size - took)
        server, client = pair()
        client.setblocking(False)
        done: asyncio.Future[tuple[int, object]] = loop.create_future()
        received = bytearray()
        with server, client, open(tmp_path / "blob", "rb") as fh:
            sender = serve_http.RegionSender(
                loop, server.fileno(), fh.fileno(), 0, size, 30,
                lambda sent, err: done.set_result((sent, err)),
            )  # fmt: skip
            sender.start()
            first_turn = sender.sent
            while len(received) < size:
                with contextlib.suppress(BlockingIOError):
                    received += client.recv(1 << 20)
                await asyncio.sleep(0)
            sent, err = await asyncio.wait_for(done, 30)
        assert err is None and sent == size
        return took, first_turn, bytes(received)

    took, first_turn, received = asyncio.run(main())
    assert took > 16 << 10, "the control socket took no more than a slice: nothing to show"
    assert first_turn == 16 << 10
    assert received == payload


def _bytes_served(srv: ServeHandle) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("pixicache_serve_bytes_served_total")
    )


@pytest.mark.parametrize("fast_hits", [False, True], ids=["aiohttp-path", "front-path"])
def test_an_answer_cut_short_counts_the_bytes_it_sent(tmp_path, upstream, upstream_root, fast_hits):
    """A client that goes away in the middle of a large answer: the bytes-served metric
    counts what was put on its socket (at least what it read), not nothing."""
    with start_background(config(tmp_path / "store", upstream, fast_hits=fast_hits)) as srv:
        learned(srv, upstream_root, HUGE)
        before = _bytes_served(srv)
        sock, first = slow_reader(srv.port)
        got = len(first)
        sock.settimeout(30)
        while got < 8 << 20:
            chunk = sock.recv(1 << 20)
            assert chunk
            got += len(chunk)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, with the rest of the answer unread
        deadline = time.monotonic() + 30
        while 'status="200-aborted"' not in httpx.get(f"{srv.url}/metrics", timeout=30).text:
            assert time.monotonic() < deadline, "the cut answer was never counted"
            time.sleep(0.05)
        assert got - 4096 <= _bytes_served(srv) - before < HUGE_SIZE
