"""The bundle at run time: unpacking it once per node and choosing the py-rattler that loads.

The bundle is the agent as one file (``pixicache bundle -o pixicache.pyz``,
:mod:`pixicache.bundle.build`).

**Unpacking** (as shiv and pex do): on first use ``site/`` and one ``rattler/<tag>/``
are unpacked into ``<root>/<build id>/site`` and ``.../rattler-<tag>``, where
``<root>`` is ``$PIXICACHE_BUNDLE_DIR``, else the node store's ``bundle/`` (this
user's own area's ``bundle/`` in a store shared by several users (:mod:`pixicache.userarea`): code another
user unpacked is never run), else ``${XDG_CACHE_HOME:-~/.cache}/pixicache/bundle``
(a temporary directory if that cannot be created). Each part is extracted under a
file lock into a temporary directory that is renamed into place, so concurrent jobs
of a node unpack it once and none sees a half-written tree. Later starts import from
the unpacked files (with ``__pycache__`` bytecode), so a warm start costs what an
installed pixicache costs. The build id is the SHA-256 of the bundle's payload: a
new bundle unpacks beside the old one, never over it.

Everything is unpacked, not only the compiled parts, because pixicache relies on
real files: the rattler installer runs ``backends/rattler/child.py`` from the unpacked tree in a
child process (py-rattler can crash at interpreter exit), and package data is read
from files. The child is told where the chosen py-rattler is on its command line
(``--rattler-path``), never through ``PYTHONPATH``, which would leak into the job's
task.

**py-rattler builds.** The bundle carries py-rattler 0.28 (a cp310-abi3 wheel, for
CPython >= 3.10) and py-rattler 0.25 (cp38-abi3: the newest release with a wheel
for EL9's Python 3.9; the child speaks both APIs). :func:`choose_rattler` takes the
newest build this interpreter can load (Linux x86_64); a one-time probe (a child
process that imports it, cached per build, interpreter and glibc in
``<root>/<build id>/rattler-probe-*.json``) confirms it. Where none loads, it is left
off ``sys.path``, :func:`pixicache.backends.rattler.probe.rattler_available` says
why, and the agent falls back to a verified Pixi and says so.
``python3 pixicache.pyz --bundle-info`` prints the bundle's contents and this
decision as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixicache.bundle.launch import UNPACKED_MARKER, bundle_root, check_area, import_from
from pixicache.errors import PixicacheError

if TYPE_CHECKING:
    import subprocess

__all__ = [
    "META_NAME",
    "RATTLER_MIN_PYTHON",
    "UNPACKED_MARKER",
    "BundleError",
    "BundleRuntime",
    "bundle_root",
    "bundle_runtime",
    "drop_prewarmed",
    "run_from_archive",
    "take_prewarmed",
]

META_NAME = "pixicache-bundle.json"
RATTLER_MIN_PYTHON = (3, 8)
"""The oldest Python any py-rattler build pixicache uses supports (0.25's cp38-abi3 wheel)."""


class BundleError(PixicacheError):
    """The bundle cannot be built or unpacked."""

    exit_code = 7


class BundleRuntime:
    """How this process runs from a bundle (see :func:`bundle_runtime`); read-only by
    convention (a plain class: a dataclass would cost the launcher ``inspect``'s import
    before the py-rattler child starts).

    Attributes:
        archive: the ``.pyz`` file.
        build_id: the bundle's build id (SHA-256 of its payload, 16 hex digits).
        home: ``<root>/<build id>``, where it is unpacked.
        site: the unpacked pure-Python part (first on ``sys.path``).
        rattler_dir: the unpacked py-rattler (on ``sys.path``), or ``None`` when unusable.
        rattler_ok: whether py-rattler is usable in this interpreter.
        rattler_reason: why (or why not), one sentence.
        unpack_seconds: time spent unpacking in this process (``0.0``: already unpacked).
        meta: the bundle's ``pixicache-bundle.json``.
    """

    __slots__ = (
        "archive",
        "build_id",
        "home",
        "meta",
        "rattler_dir",
        "rattler_ok",
        "rattler_reason",
        "site",
        "unpack_seconds",
    )  # fmt: skip

    def __init__(
        self,
        *,
        archive: Path,
        build_id: str,
        home: Path,
        site: Path,
        rattler_dir: Path | None,
        rattler_ok: bool,
        rattler_reason: str,
        unpack_seconds: float,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.archive = archive
        self.build_id = build_id
        self.home = home
        self.site = site
        self.rattler_dir = rattler_dir
        self.rattler_ok = rattler_ok
        self.rattler_reason = rattler_reason
        self.unpack_seconds = unpack_seconds
        self.meta = meta if meta is not None else {}

    def to_json(self) -> dict[str, Any]:
        """The runtime as JSON (``--bundle-info``)."""
        return {
            "archive": str(self.archive),
            "build_id": self.build_id,
            "home": str(self.home),
            "site": str(self.site),
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "rattler": {
                "ok": self.rattler_ok,
                "reason": self.rattler_reason,
                "dir": None if self.rattler_dir is None else str(self.rattler_dir),
            },
            "unpack_seconds": round(self.unpack_seconds, 4),
            "sys_path": list(sys.path),
            "meta": self.meta,
        }


_RUNTIME: BundleRuntime | None = None

def bundle_runtime() -> BundleRuntime | None:
    """The :class:`BundleRuntime` when running from a bundle, else ``None``."""
    return _RUNTIME


_PREWARMED: list[Any] = []  # the launcher's pre-warmed py-rattler child, until taken


def resume_collection() -> None:
    """Turn Python's cyclic garbage collector back on in a bundle's process.

    The bundle's launcher turns it off as it starts: a start imports much and frees
    little, and the collections its allocations trigger, each a pass over every object
    imported so far, cost ~5-10 ms of every job. It is back on before anything long
    runs: other commands get it at once (:func:`pixicache.agent.ahead.start_from_argv`),
    ``install`` and ``run`` once a download starts or the install ends
    (:mod:`pixicache.agent.pipeline`). What exists by then is frozen first
    (:func:`gc.freeze`: modules and the plan, needed to the end), else the first
    collection would be the deferred pass over all of it. Outside a bundle this changes
    nothing."""
    import gc

    if _RUNTIME is not None and not gc.isenabled():
        gc.freeze()
        gc.enable()


def take_prewarmed() -> subprocess.Popen[str] | None:
    """The py-rattler child the launcher started before anything else (see
    :data:`pixicache.backends.rattler.process.PREWARM`), once, as a :class:`subprocess.Popen`
    (text mode, its stdin, stdout and stderr pipes); ``None`` if there is none or it was
    taken. Whoever takes it owns it."""
    if not _PREWARMED:
        return None
    pid, stdin, stdout, stderr = _PREWARMED.pop()
    return _adopt(pid, stdin, stdout, stderr)


def _adopt(pid: int, stdin: int, stdout: int, stderr: int) -> subprocess.Popen[str]:
    """A :class:`subprocess.Popen` for a child this process spawned itself (``os.posix_spawn``),
    with the parent's ends of its pipes: Popen sets everything up as for a child of its
    own, except that it creates no pipes (:meth:`_get_handles`) and starts nothing
    (:meth:`_execute_child`), both unchanged in this role from Python 3.9 to 3.13."""
    import subprocess

    class Adopted(subprocess.Popen):
        def _get_handles(self, *args: Any) -> tuple[int, int, int, int, int, int]:
            return -1, stdin, stdout, -1, stderr, -1

        def _execute_child(self, *args: Any, **kwargs: Any) -> None:
            self.pid = pid
            self._child_created = True
            self._closed_child_pipe_fds = True

    pipe = subprocess.PIPE
    proc: subprocess.Popen[str] = Adopted(
        [sys.executable, "-c", "PREWARM"], stdin=pipe, stdout=pipe, stderr=pipe, text=True
    )
    return proc


def drop_prewarmed() -> None:
    """End the pre-warmed child if nobody took it (the command needs no py-rattler);
    also run at exit. It has read nothing but its stdin, so it is killed."""
    proc = take_prewarmed()
    if proc is not None:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.communicate()


def _pyver() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


def _note(message: str) -> None:
    sys.stderr.write(f"pixicache.pyz: {message}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed; read-only if not ours)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ensure_unpacked(
    archive: str, prefix: str, dest: Path
) -> float:
    """Unpack the members under ``prefix`` into ``dest`` once (atomically).

    Returns the seconds spent unpacking (``0.0`` when ``dest`` was complete).
    """
    if (dest / UNPACKED_MARKER).exists():
        return 0.0
    import shutil
    import tempfile
    import zipfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    with _flock(dest.parent / f".{dest.name}.lock"):
        if (dest / UNPACKED_MARKER).exists():
            return 0.0  # another process unpacked it while we waited
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            mask = umask()
            os.chmod(tmp, 0o777 & ~mask)
            files = nbytes = 0
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not info.filename.startswith(prefix) or info.is_dir():
                        continue
                    rel = info.filename[len(prefix) :]
                    parts = rel.split("/")
                    if not rel or rel.startswith("/") or ".." in parts:
                        raise BundleError(f"{archive}: unsafe member name {info.filename!r}")
                    target = tmp.joinpath(*parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    mode = (info.external_attr >> 16) & 0o777
                    if mode:
                        os.chmod(target, mode & ~mask)
                    files += 1
                    nbytes += info.file_size
            seconds = time.perf_counter() - start
            marker = {
                "files": files,
                "bytes": nbytes,
                "seconds": round(seconds, 4),
                "pid": os.getpid(),
            }
            (tmp / UNPACKED_MARKER).write_text(json.dumps(marker))
            if dest.exists():  # a tree without its marker: not ours to trust
                stale = dest.parent / f".{dest.name}.stale-{os.getpid()}"
                os.rename(dest, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return time.perf_counter() - start


def _ensure_compiled(tree: Path) -> float:
    """Write this interpreter's bytecode for every module of ``tree`` once, if it would
    not write it itself (``PYTHONDONTWRITEBYTECODE``, ``-B``).

    Such an interpreter compiles every module it imports at every start: about 0.25 s
    per agent start here, paid by every job. The tree is this user's unpacked copy, so
    writing ``__pycache__`` there litters nothing. Returns the seconds spent (``0.0``:
    nothing to do or already done); a tree that cannot be written is left as it is.
    """
    marker = tree / f".pixicache-compiled-{sys.implementation.cache_tag}"
    if not sys.dont_write_bytecode or marker.exists():
        return 0.0
    import compileall

    start = time.perf_counter()
    with _flock(tree.parent / f".{tree.name}.lock"):
        if marker.exists():
            return 0.0
        with contextlib.suppress(OSError):
            # once, whatever it says: a file this Python cannot compile (one meant for
            # another version) would fail the same way at every start
            compileall.compile_dir(str(tree), quiet=2, workers=1)
            marker.write_text("")
    return time.perf_counter() - start


_PROBE = """\
import os, sys
sys.path.insert(0, sys.argv[1])
import rattler
from rattler import Platform
print(getattr(rattler, "__version__", "?"), Platform.current())
sys.stdout.flush()
os._exit(0)
"""


def _libc_tag() -> str:
    try:
        value = os.confstr("CS_GNU_LIBC_VERSION") or "unknown"
    except (ValueError, OSError):
        value = "unknown"
    return "".join(c if c.isalnum() or c == "." else "-" for c in value)


def choose_rattler(builds: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The bundled py-rattler build this interpreter can load, or ``None`` and why not.

    Builds are tried newest first; each names the oldest CPython its abi3 wheel
    supports (py-rattler 0.28: 3.10; 0.25: 3.8, for EL9's Python 3.9).
    """
    exe = f"{sys.implementation.name} {_pyver()} ({sys.executable})"
    if not builds:
        return None, "this bundle was built without py-rattler (pixicache bundle --no-rattler)"
    versions = ", ".join(
        f"{b['version']} (CPython >= {'.'.join(map(str, b['min_python']))})" for b in builds
    )
    if sys.implementation.name != "cpython":
        return None, f"the bundle's py-rattler builds ({versions}) need CPython; this is {exe}"
    for build in builds:
        if sys.version_info[:2] >= tuple(build["min_python"]):
            break
    else:
        return None, f"the bundle's py-rattler builds ({versions}) need a newer Python; this is {exe}"
    machine = os.uname().machine
    if not sys.platform.startswith("linux") or machine not in ("x86_64", "AMD64"):
        return None, (
            f"the bundle's py-rattler {build['version']} is built for Linux x86_64; "
            f"this is {sys.platform} {machine}"
        )
    return build, ""


def _rattler_status(
    archive: str, meta: dict[str, Any], home: Path
) -> tuple[bool, str, Path | None, float]:
    """Whether this interpreter can use the bundle's py-rattler: (ok, reason, dir, unpack s)."""
    build, why = choose_rattler(list(meta.get("rattler") or []))
    if build is None:
        return False, why, None, 0.0
    tag = build["tag"]
    rdir = home / f"rattler-{tag}"
    exe = f"{sys.implementation.name} {_pyver()} ({sys.executable})"
    seconds = _ensure_unpacked(archive, f"rattler/{tag}/", rdir)
    probe = home / f"rattler-probe-{tag}-{sys.implementation.cache_tag}-{_libc_tag()}.json"
    try:
        cached = json.loads(probe.read_text())
        return bool(cached["ok"]), str(cached["reason"]), rdir if cached["ok"] else None, seconds
    except (OSError, ValueError, KeyError, TypeError):
        pass
    import subprocess

    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _PROBE, str(rdir)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        # Not cached: a busy node may time out once; the next start probes again.
        return (
            False,
            f"the bundle's py-rattler could not be probed with {exe}: {exc}",
            None,
            seconds,
        )
    if proc.returncode == 0:
        ok, reason = (
            True,
            f"py-rattler {proc.stdout.split()[0] if proc.stdout.split() else '?'} from the bundle ({rdir})",
        )
    else:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        ok, reason = False, f"the bundle's py-rattler cannot be loaded by {exe}: {tail}"
    tmp = probe.with_name(f".{probe.name}.{os.getpid()}")
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps({"ok": ok, "reason": reason, "python": sys.executable}))
        os.replace(tmp, probe)
    return ok, reason, rdir if ok else None, seconds


def _prepare(archive: str, meta: dict[str, Any]) -> dict[str, Any]:
    build_id = str(meta["build_id"])
    root = bundle_root()
    try:
        check_area(root)  # code is unpacked there, so it must be ours
        root.mkdir(parents=True, exist_ok=True)
        if (
            not os.access(root, os.W_OK)
            and not (root / build_id / "site" / UNPACKED_MARKER).exists()
        ):
            raise PermissionError(f"{root} is not writable")
    except OSError as exc:
        import tempfile

        fallback = Path(tempfile.gettempdir()) / f"pixicache-bundle-{os.getuid()}"
        _note(f"cannot use {root} ({exc}); unpacking into {fallback}")
        root = fallback
    home = root / build_id
    try:
        seconds = _ensure_unpacked(archive, "site/", home / "site")
        ok, reason, rdir, more = _rattler_status(archive, meta, home)
        compiled = _ensure_compiled(home / "site") + (_ensure_compiled(rdir) if rdir else 0.0)
    except OSError as exc:
        raise BundleError(
            f"cannot unpack {archive} into {home}: {exc}. Set PIXICACHE_CACHE_DIR (or "
            "PIXICACHE_BUNDLE_DIR) to a writable directory on local disk."
        ) from None
    seconds += more
    if seconds:
        _note(f"unpacked bundle {build_id} into {home} in {seconds:.2f} s")
    if compiled:
        _note(f"wrote the bundle's bytecode for {sys.implementation.cache_tag} in {compiled:.2f} s")
    return {
        "archive": Path(archive),
        "build_id": build_id,
        "home": home,
        "site": home / "site",
        "rattler_dir": rdir,
        "rattler_ok": ok,
        "rattler_reason": reason,
        "unpack_seconds": seconds,
        "meta": meta,
    }


def run_from_archive(
    archive: str, meta: dict[str, Any], prewarmed: tuple[int, int, int, int] | None = None
) -> None:
    """The launcher's second half: unpack and put the unpacked tree on ``sys.path``.

    Called by the bundle's ``__main__.py`` (after
    :func:`pixicache.bundle.launch.prefer_unpacked`); the launcher then imports and runs
    the CLI from the unpacked files (this module included, with :func:`bundle_runtime` set). ``prewarmed``: the
    py-rattler child the launcher started (its pid and the parent's ends of its stdin,
    stdout and stderr pipes), kept for :func:`take_prewarmed` (and ended at exit if
    nobody takes it). Exits the process itself only for an error or
    ``--bundle-info``.
    """
    try:
        state = _prepare(archive, meta)
    except BundleError as exc:
        _note(f"error: {exc}")
        sys.exit(exc.exit_code)
    paths = [str(state["site"])]
    if state["rattler_dir"] is not None:
        paths.append(str(state["rattler_dir"]))
    # imported from the zip (first start): import pixicache again from the files
    from_zip = os.path.abspath(__file__).startswith(os.path.abspath(archive) + os.sep)
    import_from(paths, archive, forget=from_zip)
    import importlib

    unpacked = importlib.import_module(__name__)  # this module, from the unpacked files
    runtime = unpacked.BundleRuntime(**state)
    unpacked._RUNTIME = runtime  # type: ignore[attr-defined]
    if prewarmed is not None:
        import atexit

        unpacked._PREWARMED.append(prewarmed)
        atexit.register(unpacked.drop_prewarmed)
    if sys.argv[1:2] == ["--bundle-info"]:
        print(json.dumps(runtime.to_json(), indent=2))
        sys.exit(0)
