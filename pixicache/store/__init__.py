"""The node store: a verified content-addressed store (CAS) shared by the jobs of a node.

- :mod:`~pixicache.store.cas` — :class:`Store`: blobs by SHA-256, ``has``/``pin``/``gc``/``verify``;
- :mod:`~pixicache.store.writer` — :class:`BlobWriter`, streaming one artifact in;
- :mod:`~pixicache.store.commit` — the one commit primitive (verify, fsync, rename);
- :mod:`~pixicache.store.index` — the SQLite index (URL → digest, last use);
- :mod:`~pixicache.store.locking` — ``flock`` locks across the processes of a node;
- :mod:`~pixicache.store.view` — the store as a local conda mirror for installers.
"""

from pixicache.store.cas import GcReport, Store, StoreInfo, VerifyReport, hash_file
from pixicache.store.writer import HASH_CHUNK, BlobWriter

__all__ = [
    "HASH_CHUNK",
    "BlobWriter",
    "GcReport",
    "Store",
    "StoreInfo",
    "VerifyReport",
    "hash_file",
]
