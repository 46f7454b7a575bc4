"""pixicache.testing.server: a real HTTP/1.1 upstream that counts requests and injects faults."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pixicache.testing import UpstreamServer
from pixicache.testing.workload import random_bytes

BIG = random_bytes(1 << 20, seed=3, key="big")
BIG_PATH = "/conda-forge/linux-64/big-1.0-0.conda"
SMALL_PATH = "/conda-forge/noarch/repodata.json"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("upstream")
    (root / "conda-forge/linux-64").mkdir(parents=True)
    (root / "conda-forge/noarch").mkdir(parents=True)
    (root / BIG_PATH.lstrip("/")).write_bytes(BIG)
    (root / SMALL_PATH.lstrip("/")).write_text('{"packages": {}}')
    return root


@pytest.fixture
def srv(root):
    with UpstreamServer(root) as server:
        yield server


@pytest.fixture
def client():
    with httpx.Client(timeout=10) as c:
        yield c


def test_get_head_and_404(srv, client):
    r = client.get(srv.url + BIG_PATH)
    assert r.status_code == 200 and r.content == BIG
    assert r.headers["content-length"] == str(len(BIG))
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["etag"] and r.headers["last-modified"].endswith("GMT")
    h = client.head(srv.url + BIG_PATH)
    assert h.status_code == 200 and h.content == b""
    assert h.headers["content-length"] == str(len(BIG)) and h.headers["etag"] == r.headers["etag"]
    r = client.get(srv.url + SMALL_PATH)
    assert r.headers["content-type"] == "application/json" and r.json() == {"packages": {}}
    for missing in (
        "/conda-forge/linux-64/nope.conda",
        "/conda-forge/linux-64",
        "/",
        "/../etc/passwd",
    ):
        assert client.get(srv.url + missing).status_code == 404, missing
    assert srv.count(BIG_PATH) == 2
    assert srv.count(BIG_PATH, method="HEAD") == 1
    assert srv.count("*/nope.conda", status=404) == 1
    assert srv.bytes_sent == len(BIG) + len(r.content) + sum(
        rec.bytes_sent for rec in srv.requests if rec.status == 404
    )


def test_url_prefix(root, client):
    with UpstreamServer(root, url_prefix="/mirror/") as srv:
        assert srv.url.endswith("/mirror")
        assert client.get(srv.url + SMALL_PATH).status_code == 200
        assert client.get(srv.url.rsplit("/mirror", 1)[0] + SMALL_PATH).status_code == 404


@pytest.mark.parametrize(
    ("header", "status", "span"),
    [
        ("bytes=10-19", 206, (10, 19)),
        ("bytes=1000000-", 206, (1_000_000, len(BIG) - 1)),
        ("bytes=-5", 206, (len(BIG) - 5, len(BIG) - 1)),
        ("bytes=5-999999999", 206, (5, len(BIG) - 1)),
        (f"bytes={len(BIG)}-", 416, None),
        ("bytes=-0", 416, None),
        ("bytes=1-2,5-6", 200, None),
        ("items=1-2", 200, None),
    ],
)
def test_range(srv, client, header, status, span):
    r = client.get(srv.url + BIG_PATH, headers={"Range": header})
    assert r.status_code == status
    if status == 206:
        first, last = span
        assert r.content == BIG[first : last + 1]
        assert r.headers["content-range"] == f"bytes {first}-{last}/{len(BIG)}"
    elif status == 416:
        assert r.headers["content-range"] == f"bytes */{len(BIG)}" and r.content == b""
    else:
        assert r.content == BIG
    assert srv.requests[-1].range == header


def test_conditional_requests(srv, client):
    etag = client.head(srv.url + BIG_PATH).headers["etag"]
    assert client.get(srv.url + BIG_PATH, headers={"If-None-Match": etag}).status_code == 304
    r = client.get(srv.url + BIG_PATH, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert r.status_code == 206
    r = client.get(srv.url + BIG_PATH, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == BIG


def test_fault_status_applies_n_times_to_matching_paths(srv, client):
    fault = srv.fault("*/big-*.conda", "status", code=503, times=2, headers={"Retry-After": "1"})
    assert client.get(srv.url + SMALL_PATH).status_code == 200
    first = client.get(srv.url + BIG_PATH)
    assert first.status_code == 503 and first.headers["retry-after"] == "1"
    assert client.head(srv.url + BIG_PATH).status_code == 503
    assert client.get(srv.url + BIG_PATH).content == BIG
    assert fault.applied == 2 and fault.exhausted
    assert [r.fault for r in srv.requests] == [None, "status", "status", None]
    srv.fault(SMALL_PATH, "status", code=404)
    assert client.get(srv.url + SMALL_PATH).status_code == 404
    srv.clear_faults()
    assert client.get(srv.url + SMALL_PATH).status_code == 200


def test_fault_wrong_bytes_flips_bytes_keeps_length(srv, client):
    srv.fault(BIG_PATH, "wrong_bytes", times=1, at=1000, nbytes=3)
    bad = client.get(srv.url + BIG_PATH).content
    assert len(bad) == len(BIG) and bad != BIG
    diff = [i for i in range(len(BIG)) if bad[i] != BIG[i]]
    assert diff == [1000, 1001, 1002]
    assert all(bad[i] == BIG[i] ^ 0xFF for i in diff)
    assert client.get(srv.url + BIG_PATH).content == BIG
    srv.fault(BIG_PATH, "wrong_bytes", times=1)  # default: the middle of the body
    r = client.get(srv.url + BIG_PATH, headers={"Range": "bytes=100-"})
    assert r.status_code == 206 and len(r.content) == len(BIG) - 100
    assert hashlib.sha256(r.content).digest() != hashlib.sha256(BIG[100:]).digest()


def test_fault_truncate_sends_full_length_then_closes(srv, client):
    srv.fault(BIG_PATH, "truncate", after=1000, times=1)
    got = bytearray()
    with pytest.raises(httpx.RemoteProtocolError), client.stream("GET", srv.url + BIG_PATH) as r:
        assert r.headers["content-length"] == str(len(BIG))
        for chunk in r.iter_raw():
            got += chunk
    assert bytes(got) == BIG[:1000]
    assert srv.wait_idle()
    rec = srv.requests[-1]
    assert (rec.fault, rec.bytes_sent, rec.complete) == ("truncate", 1000, False)
    assert client.get(srv.url + BIG_PATH).content == BIG  # times=1: used up


def test_fault_truncate_is_not_used_up_by_head(srv, client):
    fault = srv.fault(BIG_PATH, "truncate", after=10, times=1)
    assert client.head(srv.url + BIG_PATH).status_code == 200
    assert fault.applied == 0
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(srv.url + BIG_PATH)
    assert fault.applied == 1


def _raw_get(srv: UpstreamServer, path: str) -> bytes:
    """GET with a plain socket; returns what arrived before the connection ended."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        while data := sock.recv(65536):
            received += data
    return bytes(received)


def test_fault_reset_sends_rst(srv, client):
    srv.fault(BIG_PATH, "reset", times=1)
    with pytest.raises(ConnectionResetError):
        _raw_get(srv, BIG_PATH)
    srv.fault(BIG_PATH, "reset", times=1, after=5000)
    with pytest.raises(ConnectionResetError):
        _raw_get(srv, BIG_PATH)
    assert srv.wait_idle()
    first, second = srv.requests
    assert (first.status, first.bytes_sent, first.fault) == (None, 0, "reset")
    assert (second.status, second.bytes_sent, second.fault) == (200, 5000, "reset")
    srv.fault(BIG_PATH, "reset", times=1)
    with pytest.raises(httpx.TransportError):
        client.get(srv.url + BIG_PATH)
    assert client.get(srv.url + BIG_PATH).content == BIG


def test_fault_slow_and_delay(srv, client):
    srv.fault(BIG_PATH, "slow", rate=400_000, times=1)
    t0 = time.monotonic()
    r = client.get(srv.url + BIG_PATH, headers={"Range": "bytes=0-199999"})
    slow = time.monotonic() - t0
    assert r.content == BIG[:200_000]
    assert slow >= 0.45  # 200 kB at 400 kB/s
    srv.fault(SMALL_PATH, "delay", seconds=0.3, times=1)
    t0 = time.monotonic()
    assert client.get(srv.url + SMALL_PATH).status_code == 200
    assert time.monotonic() - t0 >= 0.3
    assert [r.fault for r in srv.requests] == ["slow", "delay"]


def test_fault_arguments_are_checked(srv):
    with pytest.raises(ValueError, match="unknown fault kind"):
        srv.fault("*", "explode")
    with pytest.raises(ValueError, match="no parameter"):
        srv.fault("*", "truncate", code=500)
    with pytest.raises(ValueError, match="rate"):
        srv.fault("*", "slow")
    with pytest.raises(ValueError, match="times"):
        srv.fault("*", "status", times=0)


def test_log_counters_and_reset(srv, client):
    client.get(srv.url + SMALL_PATH, headers={"X-Expected-Sha256": "ab" * 32})
    client.get(srv.url + BIG_PATH, headers={"Range": "bytes=0-99"})
    assert srv.wait_idle()  # the handler finishes its record after the client has the body
    recs = srv.requests
    assert [(r.method, r.path, r.status) for r in recs] == [
        ("GET", SMALL_PATH, 200),
        ("GET", BIG_PATH, 206),
    ]
    assert recs[0].headers["x-expected-sha256"] == "ab" * 32
    assert recs[1].bytes_sent == 100 and recs[1].complete
    assert srv.bytes_for("/conda-forge/*") == srv.bytes_sent == recs[0].bytes_sent + 100
    assert srv.count() == 2 and srv.count("*.conda") == 1
    assert srv.counts() == {SMALL_PATH: 1, BIG_PATH: 1}
    srv.reset_log()
    assert srv.requests == [] and srv.bytes_sent == 0 and srv.count() == 0


def test_twenty_parallel_clients(srv):
    srv.fault("*", "delay", seconds=0.3)
    start = threading.Barrier(20)
    limits = httpx.Limits(max_connections=20, max_keepalive_connections=20)

    def fetch(c: httpx.Client) -> str:
        start.wait(timeout=30)
        return hashlib.sha256(c.get(srv.url + BIG_PATH).content).hexdigest()

    with httpx.Client(timeout=30, limits=limits) as c, ThreadPoolExecutor(20) as pool:
        digests = list(pool.map(fetch, [c] * 20))
    assert digests == [hashlib.sha256(BIG).hexdigest()] * 20
    assert srv.count(BIG_PATH) == 20 and srv.bytes_sent == 20 * len(BIG)
    recs = srv.requests
    overlap = max(sum(1 for o in recs if o.started <= r.started < o.finished) for r in recs)
    assert overlap >= 10  # each request waited 0.3 s while the others were being served


def test_stop_ends_a_running_slow_response(root):
    srv = UpstreamServer(root).start()
    srv.fault(BIG_PATH, "slow", rate=10_000)
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            httpx.get(srv.url + BIG_PATH, timeout=30)
        except httpx.HTTPError as exc:
            errors.append(exc)

    t = threading.Thread(target=fetch)
    t.start()
    while not srv.bytes_sent:
        time.sleep(0.01)  # polling the server's state, not synchronising by duration
    t0 = time.monotonic()
    srv.stop()
    t.join(timeout=10)
    assert not t.is_alive() and errors
    assert time.monotonic() - t0 < 5


def test_command_line(root, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixicache.testing.server", str(root), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + BIG_PATH, timeout=10).content == BIG
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert f"served 1 requests, {len(BIG)} body bytes" in err
