"""Which committed blobs the server sends as they are, and which it hashes first.

A blob is sent with ``ETag`` = its digest and ``Cache-Control: immutable``, so a
cache in front keeps it for a year: the bytes must be the digest's. A blob may have
changed since it was verified (bit rot, an administrator's edit, another user of a
shared node store replacing it), so before a blob is sent, the file the server has
open is compared with the one that was verified:

* its identity (device, inode, size, mtime, ctime:
  :func:`pixicache.store.files.file_identity`) is what this process last verified
  → send;
* else, the identity the store recorded when the blob was committed or last
  verified (``identities`` table) matches, and the file belongs to this user or to
  root (another user of a shared store can write the index, not forge a file of
  ours) → send;
* else the open file is hashed first (in a worker thread, from the very file
  descriptor that will be sent): right → its identity is recorded and it is sent;
  wrong → it is quarantined (:meth:`~pixicache.store.Store.verify`) and the request
  is a miss (filled again from upstream), so wrong bytes are never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pixicache.errors import StoreError
from pixicache.store import HASH_CHUNK, Store
from pixicache.store.files import file_identity

log = logging.getLogger("pixicache.serve")

__all__ = ["BlobTrust"]


class BlobTrust:
    """Decides whether an open blob may be sent (see the module doc).

    Args:
        store: the served store.
        run: runs a blocking call in a worker thread (``await run(fn, *args)``).
        on_bad: called with ``(sha256, reason)`` for a blob found bad (metrics).
    """

    def __init__(
        self,
        store: Store,
        run: Callable[..., Any],
        on_bad: Callable[[str, str], None] | None = None,
        max_known: int = 200_000,
    ) -> None:
        self.store = store
        self._run = run
        self._on_bad = on_bad
        self._known: OrderedDict[str, str] = OrderedDict()
        self._max = max_known
        self._uid = os.getuid()

    def known(self, sha: str, st: os.stat_result) -> bool:
        """Whether the file whose ``fstat`` is ``st`` is the one this process verified as
        ``sha`` (no I/O: the front path's check; anything else goes to :meth:`sendable`)."""
        return self._known.get(sha) == file_identity(st)

    async def vouched(self, sha: str, st: os.stat_result) -> bool:
        """Whether the blob whose ``fstat`` is ``st`` may be sent as ``sha`` without
        hashing it: the file this process verified, or the one the store recorded (then
        remembered). False says nothing about its bytes (:meth:`sendable` hashes)."""
        ident = file_identity(st)
        if self._known.get(sha) == ident:
            return True
        if st.st_uid in (self._uid, 0):
            try:
                recorded = await self._run(self.store.index.identity, sha)
            except StoreError:
                recorded = None
            if recorded is not None and recorded[0] == ident:
                self._remember(sha, ident)
                return True
        return False

    async def sendable(self, sha: str, fd: int, st: os.stat_result | None = None) -> bool:
        """True if the open blob ``fd`` (whose ``fstat`` is ``st``, if the caller has it)
        may be sent as ``sha``; False: it was bad (and is quarantined now)."""
        if st is None:
            st = os.fstat(fd)
        if await self.vouched(sha, st):
            return True
        ident = file_identity(st)
        actual = await self._run(_hash_fd, fd)
        if actual == sha:
            self._remember(sha, ident)
            # a reader that may not write the index: verified for this process only
            with contextlib.suppress(StoreError):
                await self._run(self.store.index.record_identity, sha, ident)
            return True
        reason = f"its bytes hash to {actual} (the file changed after it was committed)"
        log.error("blob %s is bad: %s; quarantined, not served", sha, reason)
        if self._on_bad is not None:
            self._on_bad(sha, reason)
        try:
            await self._run(self.store.verify, [sha])
        except StoreError as exc:
            log.error("%s", exc)
        self._known.pop(sha, None)
        return False

    def _remember(self, sha: str, ident: str) -> None:
        self._known[sha] = ident
        self._known.move_to_end(sha)
        while len(self._known) > self._max:
            self._known.popitem(last=False)


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, HASH_CHUNK, offset)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)
        offset += len(chunk)
