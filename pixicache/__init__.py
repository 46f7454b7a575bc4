"""pixicache: verified, cached Pixi environments for HTCondor GPU pools.

The public API, re-exported here (see each module for the contracts):

- :class:`~pixicache.model.artifact.Artifact` — a file pinned by SHA-256.
- :class:`~pixicache.model.lockfile.Lock` — a ``pixi.lock`` read into artifacts.
- :func:`~pixicache.model.plan.make_plan` — what locks need, and what is present.
- :class:`~pixicache.store.Store` — the verified content-addressed store.
- :class:`~pixicache.fetch.Fetcher` — the source chain that fills a store.
- :func:`~pixicache.agent.install` / :func:`~pixicache.agent.run` — the worker agent.
- :mod:`~pixicache.errors` — the exception hierarchy and exit codes.

The package, by concept (data flows down the list; ``serve`` stands beside it)::

    model/       artifact, lockfile, manifest, plan
    sources/     the Source protocol, its registry, http and local sources
    store/       the CAS, its index, the commit primitive, locks, the local view
    fetch/       the fetcher (the source chain into the store), results, mirror warming
    backends/    py-rattler (probe, child process) and the Pixi binary (pins, commands)
    installers/  the Installer protocol, its registry (auto), rattler and pixi
    agent/       the pipeline (plan, preflight, fetch, install, task), runner, report
    serve/       the pull-through mirror
    bundle/      the single-file agent: run time (launcher side) and build
    cli/         click commands only
    plugins.py   the one validating entry-point loader

Names are imported on first use, so ``import pixicache`` (and the CLI's
start-up) stays cheap.
"""

from __future__ import annotations

from importlib import import_module

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Artifact": "model.artifact",
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
    "Lock": "model.lockfile",
    "Plan": "model.plan",
    "make_plan": "model.plan",
    "Store": "store",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pixicache' has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)
