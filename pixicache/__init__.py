"""pixicache: verified, cached Pixi environments for HTCondor GPU pools.

The public API, re-exported here (see each module for the contracts):

- :class:`~pixicache.artifact.Artifact` — a file pinned by SHA-256.
- :class:`~pixicache.lockfile.Lock` — a ``pixi.lock`` read into artifacts.
- :class:`~pixicache.store.Store` — the verified content-addressed store.
- :class:`~pixicache.fetch.Fetcher` — the source chain that fills a store.
- :func:`~pixicache.plan.make_plan` — what locks need, and what is present.
- :mod:`~pixicache.errors` — the exception hierarchy and exit codes.

Names are imported on first use, so ``import pixicache`` (and the CLI's
start-up) stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Artifact": "artifact",
    "ConfigError": "errors",
    "FetchError": "errors",
    "InstallError": "errors",
    "IntegrityError": "errors",
    "LockError": "errors",
    "PixicacheError": "errors",
    "StoreError": "errors",
    "Fetcher": "fetch",
    "FetchReport": "fetch",
    "FetchResult": "fetch",
    "Lock": "lockfile",
    "Plan": "plan",
    "make_plan": "plan",
    "Store": "store",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pixicache' has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)
