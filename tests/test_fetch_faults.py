"""The source chain under injected faults (respx: precise, fast unit tests).

Integration through real local servers is in test_prefetch.py.
"""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest
import respx

from pixicache.errors import IntegrityError
from pixicache.fetch import Fetcher
from pixicache.sources.http import MirrorSource, UpstreamSource
from pixicache.sources.local import LocalDirSource
from pixicache.store import Store

from .helpers import artifact_for

UP = "https://conda.anaconda.org/conda-forge/linux-64/pkg-1.0-0.conda"
MIRROR = "http://mirror.test:8080"
MIRROR_URL = f"{MIRROR}/conda-forge/linux-64/pkg-1.0-0.conda"


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


@pytest.fixture
def data():
    return os.urandom(200_000)


def fetcher(store, *sources, **kw):
    sleeps: list[float] = []
    f = Fetcher(
        store, list(sources), jobs=2, retries=kw.pop("retries", 3), sleep=sleeps.append, **kw
    )
    f.sleeps = sleeps  # type: ignore[attr-defined]
    return f


@respx.mock
def test_wrong_bytes_from_the_mirror_fall_through_to_upstream(store, data):
    art = artifact_for(data, UP)
    wrong = bytes(reversed(data))
    respx.get(MIRROR_URL).respond(200, content=wrong)
    respx.get(UP).respond(200, content=data)
    report = fetcher(store, MirrorSource(MIRROR), UpstreamSource()).fetch([art])
    (r,) = report.results
    assert r.ok and r.tier == "upstream"
    assert len(r.attempts) == 1
    assert art.sha256 in r.attempts[0] and hashlib.sha256(wrong).hexdigest() in r.attempts[0]
    assert store.path_for(art.sha256).read_bytes() == data


@respx.mock
def test_wrong_bytes_from_one_source_and_none_from_the_others_is_an_integrity_error(store, data):
    """A mirror that is down and an upstream that sends other bytes: exit 4, not 3 (the
    lock's artifact was seen tampered with; no source had the right bytes)."""
    art = artifact_for(data, UP)
    respx.get(MIRROR_URL).respond(404)
    respx.get(UP).respond(200, content=b"x" * len(data))
    (r,) = fetcher(store, MirrorSource(MIRROR), UpstreamSource()).fetch([art]).results
    assert isinstance(r.error, IntegrityError) and r.error.exit_code == 4
    assert not store.has(art.sha256)


@respx.mock
def test_the_mirror_gets_the_expected_digest_header(store, data):
    art = artifact_for(data, UP)
    route = respx.get(MIRROR_URL).respond(200, content=data)
    assert fetcher(store, MirrorSource(MIRROR)).fetch([art]).ok
    assert route.calls.last.request.headers["x-expected-sha256"] == art.sha256


@respx.mock
def test_wrong_bytes_everywhere_is_an_integrity_error_naming_the_artifact(store, data):
    art = artifact_for(data, UP)
    respx.get(UP).respond(200, content=b"x" * len(data))
    report = fetcher(store, UpstreamSource()).fetch([art])
    (r,) = report.results
    assert isinstance(r.error, IntegrityError) and r.error.exit_code == 4
    assert "pkg-1.0-0.conda" in str(r.error) and art.sha256 in str(r.error)
    assert not store.has(art.sha256)
    assert not list(store.partial_dir.iterdir())


@respx.mock
def test_transient_errors_are_retried_with_backoff(store, data):
    art = artifact_for(data, UP)
    route = respx.get(UP)
    route.side_effect = [
        httpx.Response(503),
        httpx.Response(500),
        httpx.Response(200, content=data),
    ]
    f = fetcher(store, UpstreamSource(), backoff=0.5)
    assert f.fetch([art]).ok
    assert route.call_count == 3
    assert f.sleeps == [0.5, 1.0]


@pytest.mark.parametrize(
    "status", [404, 507], ids=["not-found", "mirror-disk-full"]
)  # 507: a mirror with a full disk cannot fill; retrying it only delays the job
@respx.mock
def test_a_final_mirror_answer_moves_on_at_once(store, data, status):
    art = artifact_for(data, UP)
    m = respx.get(MIRROR_URL).respond(status)
    respx.get(UP).respond(200, content=data)
    f = fetcher(store, MirrorSource(MIRROR), UpstreamSource())
    (r,) = f.fetch([art]).results
    assert r.ok and r.tier == "upstream" and m.call_count == 1 and f.sleeps == []
    assert f"HTTP {status}" in r.attempts[0]


@respx.mock
def test_a_truncated_body_is_resumed_with_range(store, data):
    art = artifact_for(data, UP)
    calls = []

    def handler(request):
        calls.append(request.headers.get("range"))
        if len(calls) == 1:
            # what a connection dropped mid-body looks like to httpx
            return httpx.Response(200, stream=_Truncating(data, 70_000))
        start = int(request.headers["range"].split("=")[1].rstrip("-"))
        return httpx.Response(
            206,
            content=data[start:],
            headers={"content-range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
        )

    respx.get(UP).mock(side_effect=handler)
    (r,) = fetcher(store, UpstreamSource()).fetch([art]).results
    assert r.ok, r.attempts
    assert calls == [None, "bytes=70000-"]
    assert store.path_for(art.sha256).read_bytes() == data


@respx.mock
def test_a_server_ignoring_range_restarts_cleanly(store, data):
    art = artifact_for(data, UP)
    (store.partial_dir / f"{art.sha256}.part").write_bytes(data[:5000])
    respx.get(UP).respond(200, content=data)
    (r,) = fetcher(store, UpstreamSource()).fetch([art]).results
    assert r.ok and r.resumed_from == 5000
    assert store.path_for(art.sha256).read_bytes() == data


@respx.mock
def test_an_unresolvable_host_is_named_and_not_retried_for_every_artifact(store):
    import socket

    arts = [
        artifact_for(
            os.urandom(100), f"https://conda.anaconda.org/conda-forge/noarch/p{i}-1-0.conda"
        )
        for i in range(5)
    ]
    route = respx.get(url__startswith="https://conda.anaconda.org/")
    route.side_effect = httpx.ConnectError("[Errno -3] Temporary failure in name resolution")
    route.side_effect.__cause__ = socket.gaierror(-3, "Temporary failure in name resolution")
    f = fetcher(store, UpstreamSource())
    f.jobs = 1
    report = f.fetch(arts)
    assert not report.ok and len(report.missing) == 5
    assert route.call_count == 1  # then the source is skipped
    first = report.results[0]
    assert "cannot resolve host conda.anaconda.org" in first.attempts[0]
    assert all("skipped" in r.attempts[0] for r in report.results[1:])
    assert f.sleeps == []


def test_a_local_directory_source_is_verified_too(store, tmp_path, data):
    art = artifact_for(data, UP)
    d = tmp_path / "pkgs" / "conda-forge" / "linux-64"
    d.mkdir(parents=True)
    (d / art.filename).write_bytes(data)
    (r,) = fetcher(store, LocalDirSource(tmp_path / "pkgs")).fetch([art]).results
    assert r.ok and r.tier == "local" and r.bytes == len(data)
    (d / art.filename).write_bytes(b"0" * len(data))
    other = Store(tmp_path / "other")
    (r,) = fetcher(other, LocalDirSource(tmp_path / "pkgs")).fetch([art]).results
    assert not r.ok and "SHA-256 mismatch" in r.attempts[0]


@respx.mock
def test_a_second_fetch_is_a_hit_with_no_request(store, data):
    art = artifact_for(data, UP)
    route = respx.get(UP).respond(200, content=data)
    fetcher(store, UpstreamSource()).fetch([art])
    report = fetcher(store, UpstreamSource()).fetch([art])
    assert report.results[0].tier == "store" and route.call_count == 1
    assert report.by_tier()["store"] == {"artifacts": 1, "bytes": len(data), "transferred": 0}


class _Truncating(httpx.SyncByteStream):
    def __init__(self, data: bytes, cut: int) -> None:
        self.data, self.cut = data, cut

    def __iter__(self):
        yield self.data[: self.cut]
        raise httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body"
        )


@respx.mock
def test_a_busy_mirror_is_waited_for_as_long_as_it_asks(store, data):
    """429/503 with Retry-After: the fetcher waits what the mirror asks (not its own
    shorter backoff) and stays with the mirror instead of going upstream."""
    art = artifact_for(data, UP)
    m = respx.get(MIRROR_URL)
    m.side_effect = [
        httpx.Response(429, headers={"retry-after": "4"}),
        httpx.Response(503, headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}),  # past
        httpx.Response(200, content=data),
    ]
    up = respx.get(UP).respond(200, content=data)
    f = fetcher(store, MirrorSource(MIRROR), UpstreamSource(), backoff=0.5)
    (r,) = f.fetch([art]).results
    assert r.ok and r.tier == "mirror" and up.call_count == 0
    assert f.sleeps == [4.0, 1.0]


@respx.mock
def test_a_mirror_asking_for_too_long_a_pause_is_skipped(store, data):
    art = artifact_for(data, UP)
    respx.get(MIRROR_URL).respond(503, headers={"retry-after": "3600"})
    respx.get(UP).respond(200, content=data)
    f = fetcher(store, MirrorSource(MIRROR), UpstreamSource(), max_retry_after=30)
    (r,) = f.fetch([art]).results
    assert r.ok and r.tier == "upstream" and f.sleeps == []
    assert "3600" in r.attempts[0] and "30 s" in r.attempts[0]


# -- failover you can see -------------------------------------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections are refused


def test_a_refused_mirror_moves_on_at_once_and_the_report_says_so(store, data, demo_lock, demo_upstream):
    """A real refused connection (a closed port), then the real upstream: no retry, no
    backoff, and the summary names the mirror that was down and who served instead."""
    from pixicache.cli.common import format_summary
    from pixicache.model.lockfile import Lock
    from pixicache.sources.http import MirrorSource as Mirror

    dead = Mirror(f"http://127.0.0.1:{_closed_port()}")
    live = Mirror(demo_upstream.url)
    f = fetcher(store, dead, live)
    report = f.fetch(Lock.load(demo_lock).artifacts())
    assert report.ok
    assert f.sleeps == []  # not one backoff pause
    # given up after its first refusal: at most one request per worker (jobs=2) was already
    # on its way before that refusal came back; none after it
    assert report.sources[dead.label]["requests"] <= 2 < len(report.results)
    assert report.sources[dead.label]["retries"] == 0
    assert report.sources[live.label]["served"] == len(report.results)
    assert dead.label in report.down and "refused" in report.down[dead.label]
    text = format_summary(report)
    assert f"{dead.label} was down" in text and f"served instead by: {live.label}" in text


@respx.mock
def test_the_last_source_left_keeps_its_retries_when_refused(store, data):
    """A restarting mirror that is the only source is asked again (with backoff)."""
    art = artifact_for(data, UP)
    route = respx.get(MIRROR_URL)
    route.side_effect = [httpx.ConnectError("[Errno 111] Connection refused"), httpx.Response(200, content=data)]
    f = fetcher(store, MirrorSource(MIRROR))
    report = f.fetch([art])
    assert report.ok and route.call_count == 2 and len(f.sleeps) == 1


@respx.mock
def test_timeouts_and_5xx_keep_their_retries_before_the_next_source(store, data):
    art = artifact_for(data, UP)
    respx.get(MIRROR_URL).side_effect = [httpx.ReadTimeout("slow"), httpx.Response(503), httpx.Response(200, content=data)]
    respx.get(UP).respond(200, content=data)
    f = fetcher(store, MirrorSource(MIRROR), UpstreamSource())
    (r,) = f.fetch([art]).results
    assert r.ok and r.tier == "mirror" and len(f.sleeps) == 2


def test_the_mirrors_own_reason_is_shown_not_a_bare_status(tmp_path, store, data, demo_upstream):
    """A real `pixicache serve` refuses a URL outside its upstreams: its reason reaches the user."""
    pytest.importorskip("aiohttp", reason="the mirror is `pixicache serve` (the serve extra)")
    from pixicache.serve import ServeConfig, Upstream, start_background
    from pixicache.sources.http import DigestSource

    art = artifact_for(data, "https://elsewhere.example/conda-forge/linux-64/pkg-1.0-0.conda")
    cfg = ServeConfig(
        cache_dir=tmp_path / "mirror",
        port=0,
        upstreams=[Upstream.make("conda-forge", demo_upstream.channel_url())],
    )
    with start_background(cfg) as srv:
        (r,) = fetcher(store, DigestSource(srv.url)).fetch([art]).results
    assert not r.ok
    assert "HTTP 403: " in r.attempts[0] and "not under an upstream" in r.attempts[0], r.attempts
