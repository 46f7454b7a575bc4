"""What a channel's own ``repodata.json`` says a package file is: the digest a fill
without ``x-expected-sha256`` is verified against.

conda, mamba and older tools ask for ``/{channel}/{subdir}/{file}`` without telling the
mirror the digest they expect. The channel publishes it: the file's record in
``{subdir}/repodata.json`` (``sha256``, else ``md5``, and ``size``). The mirror already
passes that file through (:class:`~pixicache.serve.repodata.RepodataCache`), so the
record is looked up there — fetched first if no client has asked for it yet — by a
search for the file name's key in the raw JSON (``mmap``; the whole document, hundreds
of MB for a big channel, is never parsed), and only that record is decoded.
"""

from __future__ import annotations

import json
import mmap
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixicache.model.artifact import is_md5, is_sha256
from pixicache.serve.http import HTTPProblem
from pixicache.serve.repodata import RepodataCache

__all__ = ["ChannelRecords", "Record", "find_record"]


@dataclass(frozen=True)
class Record:
    """The digests and size a channel's repodata gives for one file."""

    sha256: str | None
    md5: str | None
    size: int | None


def find_record(path: Path, filename: str) -> Record | None:
    """The record of ``filename`` in the ``repodata.json`` at ``path`` (``None``: none).

    Raises:
        ValueError: the record is there but is not a JSON object with usable fields.
    """
    key = json.dumps(filename).encode()
    with open(path, "rb") as fh:
        try:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file
            return None
        with mm:
            start = 0
            while True:
                at = mm.find(key, start)
                if at < 0:
                    return None
                pos = at + len(key)
                while pos < len(mm) and mm[pos : pos + 1] in (b" ", b"\n", b"\r", b"\t"):
                    pos += 1
                if mm[pos : pos + 1] == b":":
                    return _decode(mm, pos + 1)
                start = at + 1


def _decode(mm: mmap.mmap, pos: int) -> Record:
    end = min(len(mm), pos + (1 << 20))  # a record is a few KB: never read more than 1 MiB
    text = mm[pos:end].decode("utf-8", errors="replace").lstrip()
    obj, _ = json.JSONDecoder().raw_decode(text)
    if not isinstance(obj, dict):
        raise ValueError("the record is not an object")
    sha = obj.get("sha256")
    md5 = obj.get("md5")
    size = obj.get("size")
    return Record(
        sha.lower() if isinstance(sha, str) and is_sha256(sha.lower()) else None,
        md5.lower() if isinstance(md5, str) and is_md5(md5.lower()) else None,
        size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
    )


class ChannelRecords:
    """Looks records up in the cached ``repodata.json`` of a channel subdir.

    Args:
        repodata: the metadata cache (fetches ``repodata.json`` when needed).
        run: ``await run(fn, *args)`` runs a blocking call in a worker thread.
    """

    def __init__(self, repodata: RepodataCache, run: Any, max_cached: int = 50_000) -> None:
        self.repodata = repodata
        self._run = run
        self._cache: OrderedDict[tuple[str, float, str], Record | None] = OrderedDict()
        self._max = max_cached

    async def record(
        self, upstream: str, rest: Sequence[str], repodata_url: str
    ) -> Record:
        """The record of ``/{upstream}/{rest}`` (``rest[-1]`` the file).

        Raises:
            HTTPProblem: 404 when the channel's repodata has no record of the file, 502
                when there is no repodata to ask or its record is unusable.
        """
        meta_rest = [*rest[:-1], "repodata.json"]
        try:
            entry, path, _how = await self.repodata.get(upstream, meta_rest, repodata_url)
        except HTTPProblem as exc:
            raise HTTPProblem(
                502,
                f"{rest[-1]} was asked for without x-expected-sha256, and the channel's "
                f"repodata.json, which would say what its bytes must be, cannot be had "
                f"({exc.message}): nothing unverified is served",
            ) from None
        if entry.status != 200:
            raise HTTPProblem(
                404,
                f"the channel has no {'/'.join(meta_rest)}, so nothing says what {rest[-1]} "
                "must be: send x-expected-sha256 (pixi and rattler do)",
            )
        key = (str(path), os.stat(path).st_mtime, rest[-1])
        if key in self._cache:
            found = self._cache[key]
        else:
            try:
                found = await self._run(find_record, path, rest[-1])
            except (ValueError, OSError) as exc:
                raise HTTPProblem(502, f"the channel's record of {rest[-1]} is unusable: {exc}") from None
            self._cache[key] = found
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if found is None or (found.sha256 is None and found.md5 is None):
            raise HTTPProblem(
                404,
                f"{rest[-1]} is not in the channel's {'/'.join(meta_rest)} (or has no digest "
                "there): nothing says what its bytes must be, so it is not served; send "
                "x-expected-sha256 to fetch it by digest",
            )
        return found
