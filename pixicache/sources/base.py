"""The :class:`Source` protocol: one place an artifact's bytes can come from.

A source makes **one attempt** to stream an artifact into a
:class:`~pixicache.store.cas.BlobWriter`. The :class:`~pixicache.fetch.fetcher.Fetcher`
owns everything around it: the order of sources, retries with backoff,
resuming from ``writer.offset``, verification and commit. So a plugin only
knows how to reach its bytes.

Plugins register a class under the entry-point group ``pixicache.sources``::

    [project.entry-points."pixicache.sources"]
    s3 = "mypkg.s3:S3Source"

The class must provide ``kind`` (its name), ``claims(spec)`` (does a bare
``--source`` value belong to it?) and ``from_spec(value)``; instances follow
:class:`Source`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import httpx

    from pixicache.model.artifact import Artifact
    from pixicache.store import BlobWriter


TIERS = ("store", "local", "mirror", "upstream")
"""Where bytes can come from, nearest first (the report groups by these)."""


@dataclass
class FetchContext:
    """What a source may use during one attempt.

    Attributes:
        client: the shared HTTP client (connection pools, proxies from the
            environment as httpx honours ``HTTP(S)_PROXY``/``NO_PROXY``).
        chunk_size: preferred read size for file copies.
    """

    client: httpx.Client
    chunk_size: int = 1 << 20


@runtime_checkable
class Source(Protocol):
    """One place artifacts can be fetched from.

    Attributes:
        tier: one of :data:`TIERS` except ``"store"``; the report groups by it.
        label: a short human description (``mirror http://host:8080``).
    """

    tier: str
    label: str

    def location(self, artifact: Artifact) -> str | None:
        """Where this source would get ``artifact`` (a URL or path), or ``None``
        if it cannot serve it at all (then it is skipped without an attempt)."""
        ...

    def fetch(self, artifact: Artifact, writer: BlobWriter, ctx: FetchContext) -> None:
        """Stream the artifact's bytes from ``writer.offset`` on into ``writer``.

        The source may resume (HTTP Range) from ``writer.offset`` or call
        ``writer.restart()`` and send everything. It must not commit.

        Raises:
            SourceUnavailable: this attempt failed; ``transient=True`` if the
                same source may succeed when retried (timeouts, 5xx, resets).
        """
        ...


class SourceFactory(Protocol):
    """What an entry point of ``pixicache.sources`` must load."""

    kind: ClassVar[str]

    @classmethod
    def claims(cls, spec: str) -> bool:
        """True if a bare ``--source`` value (no ``kind=``) is for this class."""
        ...

    @classmethod
    def from_spec(cls, value: str) -> Source:
        """Build a source from the value of ``--source kind=value``."""
        ...
