"""Where artifacts come from: the :class:`Source` protocol and its plugins."""

from .base import TIERS, FetchContext, Source, SourceFactory
from .registry import parse_source, parse_sources, source_plugins

__all__ = [
    "TIERS",
    "FetchContext",
    "Source",
    "SourceFactory",
    "parse_source",
    "parse_sources",
    "source_plugins",
]
