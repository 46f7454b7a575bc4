"""A local directory as a source (``--source dir=/path`` or a bare path).

The directory may be flat (``/path/<file>``), laid out like a conda channel
(``/path/<channel path>/<subdir>/<file>`` or ``/path/<subdir>/<file>``), or be
another pixicache store (``/path/sha256/ab/<hex>``). The bytes are verified
like any other source's: a local copy is not trusted either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pixicache.errors import SourceNotFound
from pixicache.sources.paths import channel_path, copy_file, path_from_file_url

if TYPE_CHECKING:
    from pixicache.model.artifact import Artifact
    from pixicache.sources.base import FetchContext
    from pixicache.store import BlobWriter


class LocalDirSource:
    """Artifacts from a directory on this machine."""

    kind: ClassVar[str] = "dir"
    tier = "local"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.label = f"dir {self.root}"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec.startswith(("/", "./", "../", "~", "file://"))

    @classmethod
    def from_spec(cls, value: str) -> LocalDirSource:
        if value.startswith("file://"):
            return cls(path_from_file_url(value))
        return cls(value)

    def candidates(self, artifact: Artifact) -> list[Path]:
        """The paths tried, in order."""
        sha = artifact.sha256
        out = [self.root / "sha256" / sha[:2] / sha] if sha else []
        chan = channel_path(artifact)
        if chan and artifact.subdir:
            out.append(self.root / chan.lstrip("/") / artifact.subdir / artifact.filename)
        if artifact.subdir:
            out.append(self.root / artifact.subdir / artifact.filename)
        out.append(self.root / artifact.filename)
        return out

    def location(self, artifact: Artifact) -> str | None:
        for path in self.candidates(artifact):
            if path.is_file():
                return str(path)
        return str(self.root / artifact.filename)

    def fetch(self, artifact: Artifact, writer: BlobWriter, ctx: FetchContext) -> None:
        for path in self.candidates(artifact):
            if path.is_file():
                copy_file(path, writer, ctx.chunk_size)
                return
        raise SourceNotFound(f"{artifact.filename}: not in {self.root}")
