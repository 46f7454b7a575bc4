"""Filling the store: the source chain, in parallel, verified.

- :mod:`~pixicache.fetch.fetcher` — :class:`Fetcher`: each artifact through the sources, into the store;
- :mod:`~pixicache.fetch.results` — :class:`FetchResult`, :class:`FetchReport`, the progress protocol;
- :mod:`~pixicache.fetch.client` — the shared HTTP client;
- :mod:`~pixicache.fetch.warm` — asking a mirror to fill itself (``prefetch --to``).
"""

from pixicache.fetch.fetcher import Fetcher
from pixicache.fetch.results import FetchReport, FetchResult, NullProgress, ProgressSink

__all__ = ["FetchReport", "FetchResult", "Fetcher", "NullProgress", "ProgressSink"]
