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

import os
import sys
from dataclasses import dataclass, field
from importlib import import_module
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


def _entry_points(group: str) -> list[tuple[str, str, str]]:
    """``(name, target, "dist version")`` for every entry point of ``group`` of every
    distribution on ``sys.path``, deduplicated (the same distribution found twice).

    The ``*.dist-info``/``*.egg-info`` directories of ``sys.path`` are read directly:
    :mod:`importlib.metadata` finds the same entry points (a test checks that they
    agree) but costs ~35 ms to import at every agent start. A zip on ``sys.path`` is
    searched through :mod:`importlib.metadata`.
    """
    out: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    for name, target, dist in _scan(group):
        key = (dist.split(" ")[0].lower().replace("_", "-"), name, target)
        if key in seen:
            continue
        seen.add(key)
        out.append((name, target, dist))
    return out


def _scan(group: str) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    for entry in sys.path:
        where = entry or "."
        if os.path.isfile(where):
            found += _from_importlib_metadata(group, where)
            continue
        try:
            names = sorted(os.listdir(where))
        except OSError:
            continue
        for info in names:
            if not info.endswith((".dist-info", ".egg-info")):
                continue
            base = os.path.join(where, info)
            try:
                with open(os.path.join(base, "entry_points.txt"), encoding="utf-8") as fh:
                    text = fh.read()
            except OSError:
                continue
            if f"[{group}]" not in text:
                continue  # its metadata is read only when it has one of ours (start-up time)
            dist = _dist_label(base, "METADATA" if info.endswith(".dist-info") else "PKG-INFO")
            found += [(n, t, dist) for n, t in _section(text, group)]
    return found


def _section(text: str, group: str) -> list[tuple[str, str]]:
    """The ``name = target`` lines of section ``[group]`` of an ``entry_points.txt``."""
    rows: list[tuple[str, str]] = []
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            inside = line[1:-1].strip() == group
        elif inside and "=" in line:
            name, _, target = line.partition("=")
            rows.append((name.strip(), target.strip()))
    return rows


def _dist_label(base: str, headers: str) -> str:
    """``"name version"`` from a distribution's metadata headers."""
    fields: dict[str, str] = {}
    try:
        with open(os.path.join(base, headers), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                if key in ("Name", "Version") and key not in fields:
                    fields[key] = value.strip()
    except OSError:
        pass
    return f"{fields.get('Name', '?')} {fields.get('Version', '?')}"


def _from_importlib_metadata(group: str, path: str) -> list[tuple[str, str, str]]:
    from importlib import metadata

    found = []
    for dist in metadata.distributions(path=[path]):
        for ep in dist.entry_points:
            if ep.group == group:
                found.append((ep.name, ep.value, f"{dist.metadata['Name'] or '?'} {dist.version}"))
    return found


def _load_target(target: str) -> Any:
    """The object an entry point names: ``module:attr.attr`` (extras ignored), as
    :meth:`importlib.metadata.EntryPoint.load` finds it."""
    module, _, attrs = target.partition("[")[0].strip().partition(":")
    obj: Any = import_module(module.strip())
    for attr in filter(None, attrs.strip().split(".")):
        obj = getattr(obj, attr)
    return obj


def _discover(group: PluginGroup) -> PluginSet:
    result = PluginSet(group)
    for name, target, dist in _entry_points(group.group):
        other = result.entries.get(name)
        if other is not None:
            raise PluginError(
                f"two plugins claim the {group.noun} name '{name}' in {group.group}: "
                f"{other.describe()} and {name} = {target} (from {dist}); uninstall one "
                "of the two distributions"
            )
        result.entries[name] = _load(group, name, target, dist)
    return result


def _load(group: PluginGroup, name: str, target: str, dist: str) -> Plugin:
    plugin = Plugin(name, group.group, target, dist)
    try:
        obj = _load_target(target)
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
