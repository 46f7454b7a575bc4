"""Finding source plugins (entry-point group ``pixicache.sources``) and
turning ``--source`` values into :class:`~pixicache.sources.base.Source` objects.

A value is either ``KIND=VALUE`` (``mirror=http://host:8080``,
``dir=/scratch/pkgs``, ``digest=http://host:8080``) or a bare value that one
plugin ``claims()`` (an ``http(s)://`` URL is a mirror, a path is a
directory, ``upstream`` is upstream).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..errors import ConfigError
from ..plugins import load_entry_points
from .base import Source

GROUP = "pixicache.sources"

# Used only when the package's metadata is not installed (a bare checkout on
# sys.path): the same names the entry points in pyproject.toml declare.
_BUILTIN = {
    "dir": "pixicache.sources.local:LocalDirSource",
    "mirror": "pixicache.sources.http:MirrorSource",
    "digest": "pixicache.sources.http:DigestSource",
    "upstream": "pixicache.sources.http:UpstreamSource",
}


@lru_cache(maxsize=1)
def source_plugins() -> dict[str, Any]:
    """Every registered source class, by kind."""
    return load_entry_points(GROUP, _BUILTIN)


def parse_source(spec: str) -> Source:
    """One ``--source`` value → a source; :class:`ConfigError` if unknown."""
    spec = spec.strip()
    plugins = source_plugins()
    kind, sep, value = spec.partition("=")
    if sep and kind in plugins:
        return plugins[kind].from_spec(value)
    for factory in plugins.values():
        if factory.claims(spec):
            return factory.from_spec(spec)
    raise ConfigError(
        f"unknown source {spec!r}: use KIND=VALUE with KIND one of "
        f"{', '.join(sorted(plugins))}, an http(s):// mirror URL, a directory path, "
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
