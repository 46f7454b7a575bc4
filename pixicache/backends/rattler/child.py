"""The child process that runs py-rattler for :mod:`pixicache.installers.rattler`.

py-rattler can crash at interpreter exit (SIGSEGV/SIGABRT after ``install()``),
so every call into it happens here, in a process that prints one JSON line on
stdout and ends with ``os._exit`` (:func:`run`). It imports only the standard library and
``rattler``, to start fast. The parent starts it as
:func:`pixicache.backends.rattler.process.child_argv` says (imported, so its bytecode
is cached; a script run by path is compiled at every start), or by hand::

    python .../backends/rattler/child.py [--rattler-path DIR] install '<json request>'
    python .../backends/rattler/child.py [--rattler-path DIR] activate '<json request>'

A request may also be given as ``@path`` (a file holding the JSON).
``--rattler-path`` puts a directory holding the ``rattler`` package first on
``sys.path`` (the bundle's unpacked py-rattler build). The child works with
py-rattler 0.28 and 0.25 (the newest release for Python 3.8/3.9): it uses only
the API they share (``LockFile``, ``install``, ``MirrorMiddleware``,
``shell.activate``) and reads the build string with ``str()`` (a plain ``str``
in 0.25, a ``BuildString`` in 0.28).

``install`` request keys: ``lock``, ``environment``, ``platform``, ``prefix``
(absolute), ``package_cache``, ``mirrors`` (channel URL -> list of mirror
URLs, for rattler's ``MirrorMiddleware``), ``state`` (the dict written to the
prefix marker), ``guard`` (default true), ``view_if_needed`` (the parent started no
store view: when the checked cache lacks an entry, answer ``{"ok": true, "need_view":
true, "missing": [...], "evicted": [...]}`` without installing). It answers ``{"ok": true,
"operations": n, "evicted": [...], "verified": [...], "seconds": s}`` or
``{"ok": false, "error": "...", "type": "..."}`` (exit code 5).

``activate`` request keys: ``prefix``. It answers ``{"ok": true, "script": "..."}``.

``wait [--lock PATH]`` starts ahead of need (see
:func:`pixicache.backends.rattler.process.start_ahead`): it imports rattler and reads
PATH while the parent is still planning, then runs the one command it is sent on
stdin (``{"command": ..., "payload": ...}``), or ends quietly at EOF. Before it, the
parent may send ``prepare`` (the ``install`` keys ``lock``, ``environment``,
``platform``, ``package_cache``): the cache guard's check of those entries runs
then, and the ``install`` that matches uses it (:func:`cmd_prepare`).

The node cache guard
--------------------
rattler hard-links prefix files to the extracted package in its cache, so a
job that modifies a file of its prefix in place (``>>``, an editor, a
``open(..., "r+")``) modifies the cache, and every later install on the node
would copy the modified file. :class:`CacheGuard` defends without giving up
hard links (copies cost ~7x and a full re-hash ~3x a warm install, measured):

* after a package is extracted, a snapshot of its files (size, mtime, inode)
  is written to ``<cache>/.pixicache-snapshots/<entry>.json``; a file changed
  after extraction (an mtime not older than the install) is first hashed
  against the package's ``paths.json``;
* before an install, each cache entry the environment needs is compared with
  its snapshot (a ``stat`` per file); an entry without a snapshot (extracted
  by another tool) is hashed against ``paths.json`` once; an entry that
  changed is moved aside and deleted, so rattler extracts it again from the
  (verified) node store.

Both steps hold rattler's own cache lock (``<cache>/.cache.lock``, which
rattler holds for a whole install, linking included), so no install links
from an entry while it is checked or removed. A job's own prefix keeps its
modified file: only the shared cache is repaired.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

STATE_FILE = "pixicache-state"
"""The marker in ``<prefix>/conda-meta`` (no ``.json`` suffix: rattler reads every
``conda-meta/*.json`` as a package record and fails on anything else)."""

ACTIVATION_FILE = "pixicache-activation"
"""The cached activation script in ``<prefix>/conda-meta`` (see :func:`prefix_fingerprint`)."""

SNAPSHOT_DIR = ".pixicache-snapshots"
TRASH_DIR = ".pixicache-trash"
CACHE_LOCK = ".cache.lock"
PATH_SENTINEL = "/@pixicache-base-path@"
_FRESH_SLACK_NS = 2_000_000_000


# -- helpers shared with the parent (stdlib only) ------------------------------------------


def prefix_fingerprint(prefix: str | os.PathLike[str]) -> str:
    """A digest of the prefix's package records (names, sizes, mtimes of
    ``conda-meta/*.json``): it changes whenever a package is linked or unlinked."""
    meta = Path(prefix) / "conda-meta"
    rows = []
    try:
        for entry in os.scandir(meta):
            if entry.name.endswith(".json"):
                st = entry.stat()
                rows.append(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}")
    except OSError:
        return ""
    rows.sort()
    return _sha256("\n".join(rows).encode())


def _sha256(data: bytes) -> str:
    """The SHA-256 hex digest of ``data``, by CPython's own implementation where it is a
    module of its own (``_sha2`` from 3.12, ``_sha256`` before), the same digest as
    :mod:`hashlib`'s: importing hashlib loads OpenSSL, ~3-4 ms of the child's start."""
    try:
        from _sha2 import sha256
    except ImportError:
        try:
            from _sha256 import sha256
        except ImportError:
            from hashlib import sha256
    return str(sha256(data).hexdigest())


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    No fsync (8 ms each here): every file written this way is a cache whose
    loss or truncation after a power cut only costs a re-check (an unreadable
    marker or snapshot reads as absent).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """rattler's whole-cache lock (an ``flock`` on ``<cache>/.cache.lock``)."""
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / CACHE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the cache guard -----------------------------------------------------------------------


def _hash(path: Path) -> str:
    import hashlib  # OpenSSL's, for whole files: imported only when one is checked

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class CacheGuard:
    """Snapshots and repairs of rattler package-cache entries (see the module doc)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.snapdir = cache / SNAPSHOT_DIR
        self.evicted: list[str] = []
        self.verified: list[str] = []
        self.seconds = 0.0  # how long a check run ahead took (cmd_prepare)
        self._clean: set[str] = set()  # entries found matching their snapshot before the install

    def _snap_path(self, entry: str) -> Path:
        return self.snapdir / f"{entry}.json"

    @staticmethod
    def _paths(entry_dir: Path) -> list[dict[str, Any]] | None:
        try:
            data = json.loads((entry_dir / "info" / "paths.json").read_text())
        except (OSError, ValueError):
            return None
        paths = data.get("paths")
        return paths if isinstance(paths, list) else None

    def check(self, entry: str, sha256: str) -> str:
        """``"ok"`` (matches its snapshot), ``"changed"`` or ``"unknown"`` (no snapshot)."""
        try:
            snap = json.loads(self._snap_path(entry).read_text())
        except (OSError, ValueError):
            return "unknown"
        if snap.get("sha256") != sha256:
            return "unknown"
        base = self.cache / entry
        for rel, size, mtime, ino in snap.get("files", []):
            try:
                st = os.lstat(base / rel)
            except OSError:
                return "changed"
            if st.st_size != size or st.st_mtime_ns != mtime or st.st_ino != ino:
                return "changed"
        return "ok"

    def verify(self, entry: str, only_since_ns: int | None = None) -> bool:
        """Hash the entry's files against its ``paths.json`` (all of them, or only
        those modified at or after ``only_since_ns``)."""
        base = self.cache / entry
        paths = self._paths(base)
        if paths is None:
            return True  # an old package without paths.json: nothing to check against
        for item in paths:
            rel = item.get("_path")
            if not isinstance(rel, str):
                continue
            p = base / rel
            kind = item.get("path_type", "hardlink")
            if kind == "softlink":
                if not p.is_symlink():
                    return False
                continue
            if kind != "hardlink":
                continue
            try:
                st = p.stat()
            except OSError:
                return False
            if only_since_ns is not None and st.st_mtime_ns < only_since_ns:
                continue
            size = item.get("size_in_bytes")
            if size is not None and st.st_size != size:
                return False
            digest = item.get("sha256")
            if digest and _hash(p) != digest:
                return False
        return True

    def snapshot(self, entry: str, sha256: str) -> None:
        base = self.cache / entry
        files = []
        paths = self._paths(base) or []
        for item in paths:
            rel = item.get("_path")
            if not isinstance(rel, str) or item.get("path_type", "hardlink") != "hardlink":
                continue
            try:
                st = os.lstat(base / rel)
            except OSError:
                continue
            files.append([rel, st.st_size, st.st_mtime_ns, st.st_ino])
        self.snapdir.mkdir(parents=True, exist_ok=True)
        write_atomic(self._snap_path(entry), json.dumps({"sha256": sha256, "files": files}))

    def evict(self, entry: str) -> None:
        """Move the entry aside and delete it (rattler extracts it again)."""
        trash = self.cache / TRASH_DIR
        trash.mkdir(parents=True, exist_ok=True)
        target = trash / f"{entry}.{os.getpid()}.{time.monotonic_ns()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.cache / entry, target)
        with contextlib.suppress(FileNotFoundError):
            self._snap_path(entry).unlink()
        import shutil  # rarely needed: not imported at every start

        shutil.rmtree(target, ignore_errors=True)
        self.evicted.append(entry)

    def before_install(self, entries: list[tuple[str, str]]) -> None:
        """Repair what the install will link from (hold :func:`cache_lock`)."""
        for entry, sha in entries:
            if not (self.cache / entry).is_dir():
                continue
            state = self.check(entry, sha)
            if state == "ok":
                self._clean.add(entry)
                continue
            if state == "unknown":
                if self.verify(entry):
                    self.snapshot(entry, sha)
                    self.verified.append(entry)
                    self._clean.add(entry)
                    continue
                state = "changed"
            if state == "changed":
                self.evict(entry)

    def unready(self, entries: list[tuple[str, str]]) -> list[str]:
        """The entries :meth:`before_install` did not find present and intact (missing,
        or evicted): the install would have to extract them from an archive."""
        return [entry for entry, _ in entries if entry not in self._clean]

    def after_install(self, entries: list[tuple[str, str]], started_ns: int) -> list[str]:
        """Snapshot new entries; returns those modified since ``started_ns`` (evicted).

        Entries that matched their snapshot before the install are not looked at
        again (rattler links from a valid entry without touching it).
        """
        raced = []
        for entry, sha in entries:
            if entry in self._clean or not (self.cache / entry).is_dir():
                continue
            if self.check(entry, sha) == "ok":
                continue
            if self.verify(entry, only_since_ns=started_ns - _FRESH_SLACK_NS):
                self.snapshot(entry, sha)
            else:
                self.evict(entry)
                raced.append(entry)
        return raced


# -- commands ------------------------------------------------------------------------------


_READ_AHEAD: dict[str, Any] = {}
"""A lock parsed while the parent was still starting (``wait --lock``): the path, its
file identity before the parse, and the :class:`rattler.LockFile`."""


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_ahead(lock: str) -> None:
    import rattler

    with contextlib.suppress(Exception):  # a guess: the request decides
        before = _identity(lock)
        _READ_AHEAD.update(path=lock, identity=before, lock=rattler.LockFile.from_path(Path(lock)))


def _lock_file(lock: str) -> Any:
    """The parsed lock: the one read ahead if it is this file, unchanged since, else read now."""
    import rattler

    if _READ_AHEAD.get("path") == lock:
        with contextlib.suppress(OSError):
            if _identity(lock) == _READ_AHEAD["identity"]:
                _READ_AHEAD["used"] = True
                return _READ_AHEAD["lock"]
    return rattler.LockFile.from_path(Path(lock))


def _records(lock: str, environment: str, platform: str) -> list[Any]:
    lf = _lock_file(lock)
    env = lf.environment(environment)
    if env is None:
        names = ", ".join(name for name, _ in lf.environments())
        raise ValueError(f"{lock}: no environment '{environment}' (environments: {names})")
    plats = [p for p in env.platforms() if p.name == platform]
    if not plats:
        have = ", ".join(p.name for p in env.platforms())
        raise ValueError(
            f"{lock}: environment '{environment}' is not locked for {platform} (platforms: {have})"
        )
    return list(env.conda_repodata_records_for_platform(plats[0]) or [])


def _entry(rec: Any) -> str:
    return f"{rec.name.normalized}-{rec.version}-{rec.build!s}"


def _linked(prefix: str) -> dict[str, tuple[str, int]]:
    """The prefix's linked packages: name -> (``conda-meta`` record file, its mtime)."""
    linked: dict[str, tuple[str, int]] = {}
    with contextlib.suppress(OSError):
        for item in os.scandir(Path(prefix) / "conda-meta"):
            if item.name.endswith(".json"):
                with contextlib.suppress(OSError):
                    # <name>-<version>-<build>.json: a name may hold "-", the others not
                    linked[item.name[:-5].rsplit("-", 2)[0]] = (item.name, item.stat().st_mtime_ns)
    return linked


def operations_between(
    before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]]
) -> int:
    """The transaction's operations, counted as rattler counts them: a package
    installed, removed, or changed (another record file, or the same one written
    again) is one each. Counted from ``conda-meta`` rather than with an
    ``InstallerReporter``, whose per-package callbacks into Python cost about
    10 ms of a warm install."""
    names = before.keys() | after.keys()
    return sum(1 for name in names if before.get(name) != after.get(name))


async def _install(records: list[Any], req: dict[str, Any], reinstall: set[str] | None) -> int:
    import rattler
    from rattler.networking import Client, MirrorMiddleware

    middlewares: list[Any] = []
    if req.get("mirrors"):
        middlewares.append(MirrorMiddleware(req["mirrors"]))
    client = Client(middlewares)
    before = _linked(req["prefix"])
    await rattler.install(
        records,
        target_prefix=req["prefix"],
        cache_dir=Path(req["package_cache"]),
        client=client,
        show_progress=False,
        reinstall_packages=reinstall,
    )
    return operations_between(before, _linked(req["prefix"]))


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write the prefix marker (with the time of the install)."""
    state["installed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_atomic(path, json.dumps(state, indent=1, sort_keys=True))


def activation_script(prefix: str) -> str:
    """The bash activation script of ``prefix``; it prepends ``<prefix>/bin`` to
    the ``PATH`` the script finds when it runs."""
    from rattler.shell import ActivationVariables, Shell, activate

    result = activate(Path(prefix), ActivationVariables(None, [PATH_SENTINEL]), Shell.bash)
    script = result.script
    return script.replace(PATH_SENTINEL + ":", "").replace(":" + PATH_SENTINEL, "")


def save_activation(prefix: str, script: str) -> None:
    meta = Path(prefix) / "conda-meta"
    with contextlib.suppress(OSError):
        write_atomic(
            meta / ACTIVATION_FILE,
            json.dumps({"fingerprint": prefix_fingerprint(prefix), "script": script}),
        )


def _entries(records: list[Any]) -> list[tuple[str, str]]:
    """(cache entry name, SHA-256) of each record: what the cache guard checks."""
    return [(_entry(r), r.sha256.hex() if r.sha256 else "") for r in records]


_PREPARED: dict[tuple[str, tuple[tuple[str, str], ...]], CacheGuard] = {}
"""Cache guards whose check ran ahead (``prepare``), by (package cache, entries)."""


def cmd_prepare(req: dict[str, Any]) -> None:
    """``prepare`` (only while waiting, before the request): run the cache guard's check
    of the coming install's entries now, while the parent is still planning; the
    ``install`` for the same package cache and entries uses it instead of checking
    again. The check repairs only what is wrong, so doing it early is never harmful;
    rattler links under its own cache lock later, as it would anyway. Prints nothing."""
    cache = Path(req["package_cache"])
    entries = _entries(_records(req["lock"], req["environment"], req["platform"]))
    start = time.monotonic()
    guard = CacheGuard(cache)
    with cache_lock(cache):
        guard.before_install(entries)
    guard.seconds = time.monotonic() - start
    _PREPARED.clear()
    _PREPARED[(str(cache), tuple(entries))] = guard


def cmd_install(req: dict[str, Any]) -> dict[str, Any]:
    start = time.monotonic()
    timings: dict[str, float] = {}
    records = _records(req["lock"], req["environment"], req["platform"])
    timings["records"] = time.monotonic() - start
    cache = Path(req["package_cache"])
    prefix = Path(req["prefix"])
    entries = _entries(records)
    prepared = _PREPARED.pop((str(cache), tuple(entries)), None)
    guard = (prepared or CacheGuard(cache)) if req.get("guard", True) else None
    state_path = prefix / "conda-meta" / STATE_FILE
    with contextlib.suppress(FileNotFoundError):
        state_path.unlink()  # the marker only ever describes a finished install
    t = time.monotonic()
    if guard is not None and guard is not prepared:
        with cache_lock(cache):
            guard.before_install(entries)
    timings["guard_before"] = time.monotonic() - t
    if guard is not None and guard is prepared:
        timings["guard_ahead"] = prepared.seconds
    if req.get("view_if_needed"):
        # the parent started no store view: install only if no archive is needed
        if guard is not None:
            missing = guard.unready(entries)
        else:
            missing = [e for e, _ in entries if not (cache / e).is_dir()]
        if missing:
            return {
                "ok": True,
                "need_view": True,
                "missing": missing[:20],
                "evicted": guard.evicted if guard else [],
                "verified": guard.verified if guard else [],
            }
    started_ns = time.time_ns()
    import asyncio

    t = time.monotonic()
    operations = asyncio.run(_install(records, req, None))
    timings["install"] = time.monotonic() - t
    raced: list[str] = []
    t = time.monotonic()
    if guard is not None:
        with cache_lock(cache):
            raced = guard.after_install(entries, started_ns)
        timings["guard_after"] = time.monotonic() - t
        if raced:
            names = {r.name.normalized for r in records if _entry(r) in raced}
            with cache_lock(cache):
                guard.before_install([e for e in entries if e[0] in raced])
            asyncio.run(_install(records, req, names))
            with cache_lock(cache):
                again = guard.after_install(entries, time.time_ns())
            if again:
                raise RuntimeError(
                    f"package cache entries {', '.join(again)} in {cache} keep changing during "
                    "the install (another job is writing into its prefix's hard links?)"
                )
    t = time.monotonic()
    save_activation(str(prefix), activation_script(str(prefix)))
    timings["activation"] = time.monotonic() - t
    if req.get("state") is not None:  # else the parent writes it, after what it installs
        write_state(state_path, dict(req["state"]))
    return {
        "ok": True,
        "operations": operations,
        "packages": len(records),
        "evicted": guard.evicted if guard else [],
        "verified": guard.verified if guard else [],
        "raced": raced,
        "seconds": time.monotonic() - start,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }


def cmd_activate(req: dict[str, Any]) -> dict[str, Any]:
    script = activation_script(req["prefix"])
    if req.get("save", True):
        save_activation(req["prefix"], script)
    return {"ok": True, "script": script}


COMMANDS = {"install": cmd_install, "activate": cmd_activate}


def _wait(argv: list[str]) -> tuple[str, str] | None:
    """``wait [--lock PATH]``: import rattler (and read PATH) now, then take the command
    from one line of stdin, ``{"command": ..., "payload": {...}}``; ``None`` at EOF (the
    parent did not need us)."""
    # the point: everything an install imports, imported before the request comes
    import asyncio  # noqa: F401
    import importlib

    import rattler  # noqa: F401

    for module in ("rattler.install", "rattler.networking", "rattler.shell"):
        with contextlib.suppress(ImportError):  # the command says so, if it needs one
            importlib.import_module(module)

    if argv[:1] == ["--lock"] and len(argv) >= 2:
        _read_ahead(argv[1])
    while True:
        line = sys.stdin.readline()
        if not line.strip():
            return None
        request = json.loads(line)
        if request["command"] != "prepare":
            return str(request["command"]), json.dumps(request["payload"])
        with contextlib.suppress(Exception):  # a hint: the request decides
            cmd_prepare(request["payload"])


def main(argv: list[str]) -> int:
    """Run one command; print its JSON answer; return the exit code (0 or 5)."""
    if argv[:1] == ["--rattler-path"] and len(argv) >= 2:
        sys.path.insert(0, argv[1])
        argv = argv[2:]
    ahead = argv[:1] == ["wait"]
    if ahead:
        try:
            taken = _wait(argv[1:])
        except Exception as exc:
            print(json.dumps({"ok": False, "error": str(exc), "type": type(exc).__name__}))
            return 5
        if taken is None:
            return 0
        argv = list(taken)
    if len(argv) != 2 or argv[0] not in COMMANDS:
        print(json.dumps({"ok": False, "error": f"usage: {sorted(COMMANDS)} <json|@file>"}))
        return 2
    raw = argv[1]
    try:
        if raw.startswith("@"):
            raw = Path(raw[1:]).read_text()
        answer = COMMANDS[argv[0]](json.loads(raw))
        if ahead:
            answer["ahead"] = {"lock_read_ahead": bool(_READ_AHEAD.get("used"))}
        rc = 0
    except Exception as exc:  # reported to the parent, which raises InstallError
        answer = {"ok": False, "error": str(exc), "type": type(exc).__name__}
        rc = 5
    print(json.dumps(answer))
    return rc


def import_asyncio_without_ssl() -> None:
    """Import asyncio with Python's ``ssl`` unavailable (about 7 ms: asyncio imports it
    at once and would use it only for TLS connections, which the child never makes;
    py-rattler does its TLS in Rust); ``ssl`` stays importable for anything else."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import asyncio  # noqa: F401
    finally:
        if sys.modules.get("ssl", 0) is None:
            del sys.modules["ssl"]


def run(argv: list[str]) -> NoReturn:
    """The child process: :func:`main`, then the end without the interpreter's teardown
    (where py-rattler can crash)."""
    import_asyncio_without_ssl()
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run(sys.argv[1:])
