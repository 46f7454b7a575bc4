"""Finding source plugins (entry-point group ``pixicache.sources``) and
turning ``--source`` values into :class:`~pixicache.sources.base.Source` objects.

A value is either ``KIND=VALUE`` (``mirror=http://host:8080``,
``dir=/scratch/pkgs``, ``digest=http://host:8080``) or a bare value that one
plugin ``claims()`` (an ``http(s)://`` URL is a mirror, a path is a
directory, ``upstream`` is upstream).
"""

from __future__ import annotations

from typing import Any

from pixicache.errors import ConfigError
from pixicache.plugins import PluginGroup, plugins
from pixicache.sources.base import Source, SourceFactory

GROUP = PluginGroup("pixicache.sources", "source", SourceFactory)
"""Source plugins: classes following :class:`~pixicache.sources.base.SourceFactory`."""


def source_plugins() -> dict[str, Any]:
    """Every working source class, by kind (broken plugins are skipped with a warning)."""
    return plugins(GROUP).loaded()


def parse_source(spec: str) -> Source:
    """One ``--source`` value → a source; :class:`ConfigError` if unknown."""
    spec = spec.strip()
    found = plugins(GROUP)
    kind, sep, value = spec.partition("=")
    if sep:
        factory = found.get(kind)  # PluginError for a broken plugin of that name
        if factory is not None:
            return factory.from_spec(value)
    for factory in found.loaded().values():
        if factory.claims(spec):
            return factory.from_spec(spec)
    raise ConfigError(
        f"unknown source {spec!r}: use KIND=VALUE with KIND one of "
        f"{', '.join(found.names())}, an http(s):// mirror URL, a directory path, "
        "or 'upstream'"
    )


def parse_sources(specs: list[str]) -> list[Source]:
    """Several ``--source`` values (each may hold a comma-separated list)."""
    out: list[Source] = []
    for spec in specs:
        for part in spec.split(","):
            if part.strip():
                out.append(parse_source(part))
    return out
