"""The bundle launcher's first step: find this user's unpacked copy of the bundle, or unpack it.

Imported from inside the zip by the bundle's ``__main__.py`` (the only pixicache
code imported from there on a warm start, so kept small: zipimport compiles it at
every start). It decides where bundles are unpacked (:func:`bundle_root`) and
whether that place is this user's alone (:func:`check_area`): both rules live here
only, and :mod:`pixicache.bundle.runtime` uses them too.

:func:`prefer_unpacked` takes the **warm path** when this build is already unpacked
under a root that passes the check: the unpacked tree goes first on ``sys.path``, so
the rest (:func:`pixicache.bundle.runtime.run_from_archive`, which checks again) is
imported from its files, with their bytecode. Otherwise (first start, a root that
fails the check, a tree without its marker) the runtime is imported from the zip
and unpacks, as it always did. Stdlib only, beside :mod:`pixicache.userarea`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pixicache.userarea import not_private, user_area

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

__all__ = ["UNPACKED_MARKER", "bundle_root", "check_area", "import_from", "prefer_unpacked"]

UNPACKED_MARKER = ".pixicache-unpacked"
"""The file an unpacked tree gets last: a tree without it is never imported from."""


def bundle_root() -> Path:
    """Where bundles are unpacked: ``$PIXICACHE_BUNDLE_DIR``, else the node store's
    ``bundle/`` (``$PIXICACHE_CACHE_DIR/bundle``; in a store shared by several users,
    this user's own area's (:mod:`pixicache.userarea`): code another user unpacked is never run),
    else ``${XDG_CACHE_HOME:-~/.cache}/pixicache/bundle``."""
    env = os.environ
    if env.get("PIXICACHE_BUNDLE_DIR"):
        return Path(env["PIXICACHE_BUNDLE_DIR"]).expanduser()
    if env.get("PIXICACHE_CACHE_DIR"):
        return user_area(Path(env["PIXICACHE_CACHE_DIR"]).expanduser()) / "bundle"
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pixicache" / "bundle"


def check_area(root: Path) -> None:
    """Raise :class:`PermissionError` unless code may be unpacked under ``root`` and run
    from there: its parent (a user's own area of a shared store, ``$PIXICACHE_BUNDLE_DIR``'s
    parent, the cache home) must be this user's alone, created 0700 if missing. Only
    the unshared store's own ``bundle/`` needs no such check (the store root is then
    this user's)."""
    area = root.parent
    if area != Path(os.environ.get("PIXICACHE_CACHE_DIR", "")).expanduser():
        if not area.exists():
            area.mkdir(mode=0o700)
        why = not_private(area)
        if why is not None:
            raise PermissionError(f"{area} is {why}")


def _unpacked_site(meta: dict[str, Any]) -> Path | None:
    """This build's unpacked pure-Python tree, when it is complete and under a root that
    passes :func:`check_area`; ``None`` sends the launcher down the full path."""
    try:
        root = bundle_root()
        check_area(root)
        site = root / str(meta["build_id"]) / "site"
        return site if (site / UNPACKED_MARKER).is_file() else None
    except (OSError, KeyError):
        return None


def prefer_unpacked(archive: str, meta: dict[str, Any]) -> bool:
    """The warm path (see the module doc): when this build is unpacked under a root that
    passes :func:`check_area`, put its tree first on ``sys.path`` instead of the zip and
    forget the modules imported from the zip; whether it did. The launcher then calls
    :func:`pixicache.bundle.runtime.run_from_archive` (from the files, or on the full
    path from the zip), which checks and records the rest."""
    site = _unpacked_site(meta)
    if site is None:
        return False
    import_from([str(site)], archive, forget=True)
    return True


def import_from(paths: list[str], archive: str, *, forget: bool) -> None:
    """Put ``paths`` first on ``sys.path`` in place of the archive's own entries; with
    ``forget``, drop the pixicache modules imported so far (they came from the zip: from
    the files from now on)."""
    inside = os.path.abspath(archive)
    sys.path[:] = paths + [p for p in sys.path if not os.path.abspath(p).startswith(inside)]
    if forget:
        for name in [n for n in sys.modules if n == "pixicache" or n.startswith("pixicache.")]:
            del sys.modules[name]
