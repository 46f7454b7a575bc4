"""Where an artifact lives inside a source: helpers the http and local sources share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from pixicache.errors import SourceNotFound, SourceUnavailable

if TYPE_CHECKING:
    from pixicache.model.artifact import Artifact
    from pixicache.store import BlobWriter

__all__ = ["channel_path", "copy_file", "digest_url", "path_from_file_url"]


def channel_path(artifact: Artifact) -> str | None:
    """The path of the artifact's channel on its host (``/conda-forge``)."""
    if not artifact.channel:
        return None
    path = urlsplit(artifact.channel).path.rstrip("/")
    return path or None


def digest_url(base_url: str, artifact: Artifact) -> str:
    """``BASE/sha256/<hex>?url=<upstream>``: a pixicache mirror's digest endpoint."""
    return f"{base_url}/sha256/{artifact.sha256}?url={quote(artifact.url, safe='')}"


def path_from_file_url(url: str) -> Path:
    """``file:///a/b`` → ``/a/b``."""
    return Path(unquote(urlsplit(url).path))


def copy_file(path: Path, writer: BlobWriter, chunk_size: int = 1 << 20) -> None:
    """Copy ``path`` into ``writer`` from ``writer.offset`` on."""
    try:
        with open(path, "rb") as fh:
            fh.seek(writer.offset)
            while chunk := fh.read(chunk_size):
                writer.write(chunk)
    except FileNotFoundError:
        raise SourceNotFound(f"{path}: no such file") from None
    except PermissionError as exc:
        raise SourceUnavailable(f"{path}: {exc.strerror}") from None
