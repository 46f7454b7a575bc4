"""Where artifacts come from: the :class:`Source` protocol and its plugins."""

from pixicache.sources.base import TIERS, FetchContext, Source, SourceFactory
from pixicache.sources.registry import parse_source, parse_sources, source_plugins

__all__ = [
    "TIERS",
    "FetchContext",
    "Source",
    "SourceFactory",
    "parse_source",
    "parse_sources",
    "source_plugins",
]
