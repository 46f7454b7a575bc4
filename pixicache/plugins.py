"""Entry-point plugin discovery, shared by sources and installers.

Built-in plugins register through the same entry points as third-party ones
(see ``pyproject.toml``); ``fallback`` only fills in names when the package
metadata is not installed (running from a bare source tree).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


def load_target(target: str) -> Any:
    """``"pkg.mod:Name"`` → the object."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_entry_points(group: str, fallback: dict[str, str] | None = None) -> dict[str, Any]:
    """Map plugin name → loaded object for an entry-point group."""
    from importlib.metadata import entry_points

    found: dict[str, Any] = {}
    if sys.version_info >= (3, 10):
        eps = list(entry_points(group=group))
    else:  # pragma: no cover - Python 3.9
        eps = list(entry_points().get(group, []))
    for ep in eps:
        if ep.name not in found:
            found[ep.name] = ep.load()
    for name, target in (fallback or {}).items():
        if name not in found:
            found[name] = load_target(target)
    return found
