"""What locks need, and what a store already holds: the plan.

``pixicache plan --json`` prints :meth:`Plan.to_json`, a stable schema
(``"schema": "pixicache.plan/1"``)::

    {
      "schema": "pixicache.plan/1",
      "locks": ["pixi.lock"],
      "environment": "default" | null,     # null: every environment
      "platform": "linux-64" | null,       # null: every platform
      "count": 121, "bytes": 3705969704,
      "store": "/path" | null,             # present only with a store
      "present_count": 0, "present_bytes": 0,
      "artifacts": [
        {"url": ..., "filename": ..., "sha256": ..., "size": ..., "kind": "conda"|"pypi",
         "md5": ..., "channel": ..., "subdir": ..., "present": true|false|null}
      ]
    }

Fields may be added in later versions; none is removed or changes meaning
without a new ``schema`` value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixicache.model.artifact import Artifact
from pixicache.model.lockfile import Lock

if TYPE_CHECKING:
    from pixicache.store import Store

SCHEMA = "pixicache.plan/1"


@dataclass
class Plan:
    """The artifacts one or more locks need (de-duplicated by digest)."""

    locks: list[Path]
    environment: str | None
    platform: str | None
    artifacts: list[Artifact]
    store: Store | None = None
    present: set[str] = field(default_factory=set)

    @property
    def count(self) -> int:
        return len(self.artifacts)

    @property
    def bytes(self) -> int:
        return sum(a.size or 0 for a in self.artifacts)

    @property
    def present_bytes(self) -> int:
        return sum(a.size or 0 for a in self.artifacts if a.key in self.present)

    @property
    def missing(self) -> list[Artifact]:
        """The artifacts the store lacked when the plan was made."""
        return [a for a in self.artifacts if a.key not in self.present]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "locks": [str(p) for p in self.locks],
            "environment": self.environment,
            "platform": self.platform,
            "count": self.count,
            "bytes": self.bytes,
            "store": str(self.store.root) if self.store else None,
        }
        if self.store is not None:
            out["present_count"] = len(self.present)
            out["present_bytes"] = self.present_bytes
        arts = []
        for a in self.artifacts:
            item = a.to_json()
            item["present"] = (a.key in self.present) if self.store is not None else None
            arts.append(item)
        out["artifacts"] = arts
        return out


def environment_plan(
    lock: Lock,
    environment: str,
    platform: str,
    store: Store | None = None,
    *,
    require_sha256: bool = False,
) -> Plan:
    """The plan of one environment and platform of a parsed lock (what the agent installs).

    Raises :class:`~pixicache.errors.LockError` when the lock lacks the
    environment or platform, or an artifact has no usable digest.
    """
    artifacts = lock.artifacts(environment, platform, require_sha256=require_sha256)
    return Plan([lock.path], environment, platform, artifacts, store, _present(artifacts, store))


def _present(artifacts: list[Artifact], store: Store | None) -> set[str]:
    if store is None:
        return set()
    return {a.key for a in artifacts if store.has_artifact(a)}


def make_plan(
    lock_paths: list[str | os.PathLike[str]],
    *,
    environment: str | None = None,
    platform: str | None = None,
    store: Store | None = None,
    require_sha256: bool = False,
) -> Plan:
    """Read the locks and list their artifacts (``None`` = every env/platform).

    Raises :class:`~pixicache.errors.LockError` for a lock that cannot be used
    or an environment/platform it does not have.
    """
    seen: dict[str, Artifact] = {}
    paths = [Path(p) for p in lock_paths]
    for path in paths:
        lock = Lock.load(path)
        for art in lock.artifacts(environment, platform, require_sha256=require_sha256):
            seen.setdefault(art.key, art)
    artifacts = list(seen.values())
    return Plan(paths, environment, platform, artifacts, store, _present(artifacts, store))
