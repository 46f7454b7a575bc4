"""The worker agent: plan → preflight → verified Pixi → fetch → install → task → report.

- :mod:`~pixicache.agent.pipeline` — :func:`install` and :func:`run`, one step per phase;
- :mod:`~pixicache.agent.options` — :class:`AgentOptions`, what a caller chooses;
- :mod:`~pixicache.agent.main` — the command-line wrappers (exit codes, the report);
- :mod:`~pixicache.agent.preflight` — can this node run the environment?
- :mod:`~pixicache.agent.runner` — the task, signals forwarded;
- :mod:`~pixicache.agent.report` — ``pixicache-report.json``;
- :mod:`~pixicache.agent.signals` — stopping cleanly before the task starts.

Names are imported on first use, so the CLI's start-up (which imports
:mod:`~pixicache.agent.report` for its defaults) stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "AgentInterrupted": "signals",
    "AgentOptions": "options",
    "InstallOutcome": "pipeline",
    "install": "pipeline",
    "run": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pixicache.agent' has no attribute {name!r}")
    return getattr(import_module(f"pixicache.agent.{module}"), name)
