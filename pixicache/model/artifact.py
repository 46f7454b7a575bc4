"""The one thing pixicache moves around: an :class:`Artifact`.

An artifact is a file a job needs, named by the URL it comes from upstream and
pinned by the SHA-256 (and, where known, size and MD5) that the lock records.
Conda packages, PyPI wheels and sdists, and the Pixi binary's archive are all
artifacts.

Some channels publish no SHA-256 (older ones, robostack): their lock entries
carry only an MD5. Such an artifact is pinned by MD5 and size; its SHA-256 is
computed while it is downloaded, and the store (keyed by SHA-256) records which
MD5 it answers to. :attr:`Artifact.key` names an artifact either way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

CONDA_EXTENSIONS = (".conda", ".tar.bz2")


MD5_RE = re.compile(r"^[0-9a-f]{32}$")


def is_md5(value: str) -> bool:
    """True if ``value`` is 32 lower-case hex digits."""
    return bool(MD5_RE.match(value))


def is_sha256(value: str) -> bool:
    """True if ``value`` is 64 lower-case hex digits.

    >>> is_sha256("0" * 64)
    True
    >>> is_sha256("xyz")
    False
    """
    return bool(SHA256_RE.match(value))


@dataclass(frozen=True)
class Artifact:
    """A file pinned by digest.

    Attributes:
        url: where upstream serves it (as the lock records it).
        sha256: 64 lower-case hex digits, the identity of the bytes; ``None`` for an
            entry pinned by MD5 alone (then :attr:`md5` is set).
        size: the size in bytes, or ``None`` when the lock does not say.
        filename: the last path component of ``url``.
        kind: ``"conda"``, ``"pypi"`` or ``"pixi"``.
        md5: the MD5 the lock records, if any (checked when there is no SHA-256).
        channel: for conda packages, the channel URL (``https://host/name``).
        subdir: for conda packages, the subdir (``linux-64``, ``noarch``...).
    """

    url: str
    sha256: str | None
    size: int | None
    filename: str
    kind: str = "conda"
    md5: str | None = None
    channel: str | None = None
    subdir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.sha256 is None:
            if not (self.md5 and is_md5(self.md5)):
                raise ValueError(f"no SHA-256 and no MD5 to verify {self.url} by")
        elif not is_sha256(self.sha256):
            raise ValueError(f"not a SHA-256 hex digest: {self.sha256!r} (for {self.url})")

    @property
    def key(self) -> str:
        """What names the artifact's bytes: its SHA-256, else ``md5-<md5>``
        (locks, partial files and de-duplication use it)."""
        return self.sha256 if self.sha256 is not None else f"md5-{self.md5}"

    @property
    def pin(self) -> str:
        """How the lock pins it, for messages: ``sha256 <hex>`` or ``md5 <hex>``."""
        return f"sha256 {self.sha256}" if self.sha256 else f"md5 {self.md5}"

    @property
    def md5_only(self) -> bool:
        """Pinned by MD5 (and size) alone: the lock records no SHA-256."""
        return self.sha256 is None

    @property
    def channel_name(self) -> str | None:
        """The channel's last path component (``conda-forge``), if known."""
        if not self.channel:
            return None
        return self.channel.rstrip("/").rsplit("/", 1)[-1] or None

    @property
    def host(self) -> str:
        """The host name of the upstream URL ('' for file paths)."""
        return urlsplit(self.url).hostname or ""

    def to_json(self) -> dict[str, Any]:
        """The artifact as a JSON-ready dict (the ``plan --json`` schema)."""
        data = asdict(self)
        data.pop("extra", None)
        data["md5_only"] = self.md5_only  # verified by md5 and size; its SHA-256 learnt on download
        return data


def conda_location(url: str) -> tuple[str | None, str | None, str]:
    """Split a conda package URL into (channel URL, subdir, filename).

    >>> conda_location("https://conda.anaconda.org/conda-forge/linux-64/x-1-0.conda")
    ('https://conda.anaconda.org/conda-forge', 'linux-64', 'x-1-0.conda')
    """
    path = url.rstrip("/")
    head, _, filename = path.rpartition("/")
    channel, _, subdir = head.rpartition("/")
    if not channel or not subdir:
        return None, None, filename
    return channel, subdir, filename
