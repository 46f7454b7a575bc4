"""What a fetch did: :class:`FetchResult` per artifact, :class:`FetchReport` for a run,
and the :class:`ProgressSink` protocol progress displays implement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pixicache.errors import PixicacheError
from pixicache.model.artifact import Artifact

__all__ = ["FetchReport", "FetchResult", "NullProgress", "ProgressSink"]


@dataclass
class FetchResult:
    """What happened to one artifact.

    ``tier`` is ``"store"`` for a hit, the winning source's tier otherwise,
    and ``None`` if the artifact could not be obtained (then ``error`` says why
    and ``attempts`` lists every source tried).
    """

    artifact: Artifact
    tier: str | None = None
    source: str | None = None
    bytes: int = 0  # bytes that crossed the network (or were copied) this run
    resumed_from: int = 0
    seconds: float = 0.0
    waited: float = 0.0  # seconds spent waiting for another process's download
    attempts: list[str] = field(default_factory=list)
    error: PixicacheError | None = None

    @property
    def ok(self) -> bool:
        return self.tier is not None


@dataclass
class FetchReport:
    """The outcome of :meth:`Fetcher.fetch`."""

    results: list[FetchResult]
    seconds: float
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    """Counters per source label (requests, served, bytes, errors, retries...)."""
    down: dict[str, str] = field(default_factory=dict)
    """Sources given up on during the run (unreachable), with why."""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def missing(self) -> list[FetchResult]:
        return [r for r in self.results if not r.ok]

    @property
    def total_bytes(self) -> int:
        return sum(r.artifact.size or 0 for r in self.results)

    def by_tier(self) -> dict[str, dict[str, int]]:
        """``{tier: {"artifacts": n, "bytes": b}}``; ``bytes`` counts artifact sizes."""
        out: dict[str, dict[str, int]] = {}
        for r in self.results:
            key = r.tier or "missing"
            slot = out.setdefault(key, {"artifacts": 0, "bytes": 0, "transferred": 0})
            slot["artifacts"] += 1
            slot["bytes"] += r.artifact.size or 0
            slot["transferred"] += r.bytes
        return out

    def by_source(self) -> dict[str, dict[str, int]]:
        """Like :meth:`by_tier` but per source label (``node store`` for hits)."""
        out: dict[str, dict[str, int]] = {}
        for r in self.results:
            key = r.source or ("node store" if r.tier == "store" else "missing")
            slot = out.setdefault(key, {"artifacts": 0, "bytes": 0})
            slot["artifacts"] += 1
            slot["bytes"] += r.artifact.size or 0
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "artifacts": len(self.results),
            "bytes": self.total_bytes,
            "by_tier": self.by_tier(),
            "by_source": self.by_source(),
            "sources": self.sources,
            "down": self.down,
            "missing": [
                {
                    "url": r.artifact.url,
                    "sha256": r.artifact.sha256,
                    "md5": r.artifact.md5,
                    "error": str(r.error) if r.error else None,
                    "attempts": r.attempts,
                }
                for r in self.missing
            ],
        }


    def failover(self) -> list[str]:
        """One sentence per source that was down, naming what served instead."""
        served = {k: v["artifacts"] for k, v in self.by_source().items() if k not in self.down}
        instead = ", ".join(f"{label} ({n})" for label, n in sorted(served.items()) if label != "missing")
        return [
            f"{label} was down ({why}); served instead by: {instead or 'nothing'}"
            for label, why in self.down.items()
        ]


class ProgressSink(Protocol):
    """What the fetcher tells a progress display (all methods thread-safe)."""

    def begin(self, total_artifacts: int, total_bytes: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def artifact_done(self, result: FetchResult) -> None: ...
    def end(self, report: FetchReport) -> None: ...


class NullProgress:
    """A :class:`ProgressSink` that shows nothing."""

    def begin(self, total_artifacts: int, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def artifact_done(self, result: FetchResult) -> None:
        pass

    def end(self, report: FetchReport) -> None:
        pass
