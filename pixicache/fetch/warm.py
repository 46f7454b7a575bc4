"""Warming a pixicache mirror from lock files (``pixicache prefetch --to URL``).

For each artifact the client asks the mirror's digest endpoint
``GET URL/sha256/<hex>?url=<upstream URL>`` with ``x-pixicache-warm: 1``: the
mirror fills a miss from its allow-listed upstream (single flight, verified
against the digest) and answers ``204`` once the blob is committed, without
sending it back. Nothing crosses the network between the admin's machine and
the mirror but the requests, and many artifacts are warmed in parallel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from pixicache.model.artifact import Artifact
from pixicache.sources.http import MirrorSource, transport_failure
from pixicache.sources.paths import digest_url


@dataclass
class WarmResult:
    artifact: Artifact
    status: str  # "hit" (already there), "filled", "failed"
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass
class WarmReport:
    mirror: str
    results: list[WarmResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.results)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    def bytes(self, status: str) -> int:
        return sum(r.artifact.size or 0 for r in self.results if r.status == status)

    def summary(self) -> str:
        from pixicache.progress import human_bytes

        lines = [
            f"warmed {self.mirror}: {len(self.results)} artifacts in {self.seconds:.1f} s",
            f"  already there   {self.count('hit'):>5}  {human_bytes(self.bytes('hit')):>10}",
            f"  filled now      {self.count('filled'):>5}  {human_bytes(self.bytes('filled')):>10}",
        ]
        failed = [r for r in self.results if r.status == "failed"]
        if failed:
            lines.append(f"FAILED: {len(failed)} artifact(s):")
            lines += [f"  {r.artifact.filename} ({r.artifact.pin}): {r.detail}" for r in failed]
        else:
            lines.append("the mirror holds every artifact, verified")
        return "\n".join(lines)


def _warm_url(base: str, art: Artifact) -> str:
    """Where the mirror is asked for ``art``: by digest, or (pinned by MD5 alone, no digest
    to ask by) at its channel path, which the mirror verifies against the channel's index."""
    if art.sha256 is not None:
        return digest_url(base, art)
    return MirrorSource(base).location(art) or digest_url(base, art)


def warm_mirror(
    mirror: str,
    artifacts: Iterable[Artifact],
    *,
    jobs: int = 8,
    token: str | None = None,
    timeout: float = 3600.0,
    client: httpx.Client | None = None,
    on_done: object = None,
) -> WarmReport:
    """Make ``mirror`` (a pixicache serve URL) hold every artifact.

    ``on_done(result)`` is called after each artifact (from worker threads).
    """
    base = mirror.rstrip("/")
    headers = {"x-pixicache-warm": "1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    own = client is None
    http = client or httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), trust_env=True)
    report = WarmReport(mirror=base)
    lock = threading.Lock()
    start = time.monotonic()

    def one(art: Artifact) -> WarmResult:
        t0 = time.monotonic()
        try:
            resp = http.get(_warm_url(base, art), headers=headers)
        except httpx.TransportError as exc:
            reason = str(transport_failure(base, exc))
            res = WarmResult(art, "failed", reason)
        else:
            if resp.status_code in (200, 204):
                cache = resp.headers.get("x-pixicache-cache", "")
                res = WarmResult(art, "hit" if cache == "hit" else "filled")
            else:
                detail = resp.text.strip().splitlines()[0] if resp.text.strip() else ""
                res = WarmResult(art, "failed", f"HTTP {resp.status_code} {detail}".strip())
        res.seconds = time.monotonic() - t0
        if callable(on_done):
            with lock:
                on_done(res)
        return res

    try:
        unique = {a.key: a for a in artifacts}
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="pixicache-warm") as pool:
            report.results = list(pool.map(one, unique.values()))
    finally:
        if own:
            http.close()
    report.seconds = time.monotonic() - start
    return report
