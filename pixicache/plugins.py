"""The one entry-point loader: sources and installers are found, checked and recorded here.

Built-in plugins register through the same entry points as third-party ones
(``[project.entry-points."pixicache.sources"]`` in ``pyproject.toml``; the
single-file bundle carries pixicache's own ``entry_points.txt``). For each group
(:class:`PluginGroup`) :func:`plugins` finds every entry point of every
installed distribution, once per process, and:

* **records who provides it** — the distribution's name and version, shown by
  ``pixicache plugins``;
* **refuses a name clash** — two distributions registering the same name in one
  group is a :class:`~pixicache.errors.PluginError` naming both, never "the
  first one wins";
* **loads and checks it** against the group's ``Protocol``: every member the
  protocol declares must be there. A plugin that fails to import or to match is
  kept as *broken*: using it by name raises a :class:`PluginError` that names it,
  its distribution and what went wrong, while every other plugin (and every
  command that does not need it) keeps working.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from pixicache.errors import Interrupted, PluginError

__all__ = ["Plugin", "PluginGroup", "PluginSet", "plugins", "protocol_members"]


def protocol_members(protocol: type) -> tuple[str, ...]:
    """The names a ``typing.Protocol`` declares (methods, attributes, class variables)."""
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass is object or getattr(klass, "_is_protocol", False) is False:
            continue
        if klass.__name__ in ("Protocol", "Generic"):
            continue
        names.update(k for k in vars(klass) if not k.startswith("_"))
        names.update(k for k in getattr(klass, "__annotations__", {}) if not k.startswith("_"))
    return tuple(sorted(names))


@dataclass(frozen=True)
class PluginGroup:
    """One kind of plugin: its entry-point group and the Protocol its objects follow."""

    group: str
    noun: str  # "source", "installer": for messages
    protocol: type

    @property
    def required(self) -> tuple[str, ...]:
        return protocol_members(self.protocol)


@dataclass
class Plugin:
    """One entry point of a group, loaded (``obj``) or broken (``error``)."""

    name: str
    group: str
    target: str  # "package.module:Name"
    distribution: str  # "pixicache 0.1.0"
    obj: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        return f"{self.name} = {self.target} (from {self.distribution})"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "target": self.target,
            "distribution": self.distribution,
            "ok": self.ok,
            "error": self.error,
        }


@dataclass
class PluginSet:
    """The plugins of one group, by name."""

    group: PluginGroup
    entries: dict[str, Plugin] = field(default_factory=dict)
    _warned: bool = False

    def get(self, name: str) -> Any | None:
        """The loaded object of plugin ``name``; ``None`` if there is none.

        Raises:
            PluginError: the plugin exists but is broken (the message says why).
        """
        plugin = self.entries.get(name)
        if plugin is not None and not plugin.ok:
            raise PluginError(self.broken_message(plugin))
        self.warn_broken()
        return None if plugin is None else plugin.obj

    def loaded(self) -> dict[str, Any]:
        """Every working plugin's object, by name (broken ones are skipped, with a warning)."""
        self.warn_broken()
        return {n: p.obj for n, p in self.entries.items() if p.ok}

    def names(self) -> list[str]:
        return sorted(self.entries)

    def broken_message(self, plugin: Plugin) -> str:
        return (
            f"the {self.group.noun} plugin '{plugin.name}' ({plugin.target}, from the "
            f"distribution {plugin.distribution}) cannot be used: {plugin.error}. Fix or "
            f"uninstall that distribution (`pixicache plugins` lists every plugin)"
        )

    def warn_broken(self) -> None:
        """Say once per process which plugins of the group are skipped."""
        if self._warned:
            return
        self._warned = True
        for plugin in self.entries.values():
            if not plugin.ok:
                sys.stderr.write(f"pixicache: warning: {self.broken_message(plugin)}; skipped\n")


_CACHE: dict[str, PluginSet] = {}


def plugins(group: PluginGroup) -> PluginSet:
    """The plugins of ``group`` (found and loaded once per process).

    Raises:
        PluginError: two distributions register the same name in the group.
    """
    found = _CACHE.get(group.group)
    if found is None:
        found = _CACHE[group.group] = _discover(group)
    return found


def _entry_points(group: str) -> list[tuple[metadata.EntryPoint, str]]:
    """``(entry point, "dist version")`` for every distribution on ``sys.path``, deduplicated."""
    out: list[tuple[metadata.EntryPoint, str]] = []
    seen: set[tuple[str, str, str]] = set()
    for dist in metadata.distributions():
        mine = [ep for ep in dist.entry_points if ep.group == group]
        if not mine:
            continue  # its METADATA is parsed only when it has one of ours (start-up time)
        name = dist.metadata["Name"] or "?"
        for ep in mine:
            key = (name.lower(), ep.name, ep.value)
            if key in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(key)
            out.append((ep, f"{name} {dist.version}"))
    return out


def _discover(group: PluginGroup) -> PluginSet:
    result = PluginSet(group)
    for ep, dist in _entry_points(group.group):
        other = result.entries.get(ep.name)
        if other is not None:
            raise PluginError(
                f"two plugins claim the {group.noun} name '{ep.name}' in {group.group}: "
                f"{other.describe()} and {ep.name} = {ep.value} (from {dist}); uninstall one "
                "of the two distributions"
            )
        result.entries[ep.name] = _load(group, ep, dist)
    return result


def _load(group: PluginGroup, ep: metadata.EntryPoint, dist: str) -> Plugin:
    plugin = Plugin(ep.name, group.group, ep.value, dist)
    try:
        obj = ep.load()
    except Interrupted:  # a signal arrived while importing: not the plugin's fault
        raise
    except Exception as exc:  # a third party's import error must not break pixicache
        plugin.error = f"importing it failed: {type(exc).__name__}: {exc}"
        return plugin
    missing = [m for m in group.required if not hasattr(obj, m)]
    if missing:
        plugin.error = (
            f"it does not follow the {group.protocol.__name__} protocol "
            f"(missing: {', '.join(missing)})"
        )
        return plugin
    plugin.obj = obj
    return plugin


def reset_cache() -> None:
    """Forget what was found (for tests that install plugins on the fly)."""
    _CACHE.clear()
