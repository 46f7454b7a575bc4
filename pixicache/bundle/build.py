"""Building the agent as one file: ``pixicache bundle -o pixicache.pyz``.

The bundle is a zip application (PEP 441) that runs with the worker's own
interpreter and nothing else::

    python3 -I pixicache.pyz run train          # Python >= 3.9, no site-packages needed

Contents (``unzip -l pixicache.pyz``)::

    __main__.py              the launcher: stdlib only, parses on any Python (even 2.7),
                             so an old interpreter gets a message, not a traceback
    pixicache-bundle.json    what is inside (build id, versions, minimum Python)
    site/                    pixicache (minus pixicache.testing) and its pure-Python
                             runtime deps: httpx, httpcore, h11, anyio, idna, certifi,
                             click, platformdirs, PyYAML (pure-Python loader, no C
                             extension), rich (progress bars only: without pygments and
                             markdown-it, which it imports only for syntax and markdown),
                             typing_extensions, tomli and exceptiongroup (Python < 3.11)
    rattler/cp310/           py-rattler 0.28 (an abi3 wheel for CPython >= 3.10, manylinux x86_64)
    rattler/cp38/            py-rattler 0.25 (abi3 for CPython >= 3.8: EL9's Python 3.9)

zstandard and aiohttp are not in it: the agent does not use them (``pixicache
serve`` and ``pixicache demo`` are not agent commands and need a full install).

Run time (unpacking once per node, the py-rattler probe): :mod:`pixicache.bundle.runtime`.

**Why a hand-written zipapp, not shiv or pex**: shiv unpacks everything to
``~/.shiv`` (``SHIV_ROOT``), has no notion of a part that only some interpreters
may load, and its launcher needs Python 3.8+ syntax; pex's runtime is larger and
resolves at start-up. What pixicache needs is ~150 lines: unpack into the node
store it already manages, make py-rattler conditional with a probe, explain an
old interpreter in plain words, and build deterministically (fixed timestamps,
sorted entries: the same inputs give the same SHA-256, which the submit file pins).

**Building** (:func:`build_bundle`): ``source="pypi"`` (the default) downloads the
pinned wheels (:data:`PINNED_WHEELS`, resolved for Python 3.9 with hashes, and
:data:`RATTLER_WHEELS`) with ``pip download --require-hashes``; ``source="installed"``
copies the files of the distributions installed in the running interpreter
(offline; the bundle then needs the newest ``Requires-Python`` among them,
recorded as its minimum Python and checked by the launcher).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixicache.bundle.runtime import (
    META_NAME,
    RATTLER_MIN_PYTHON,
    UNPACKED_MARKER,
    BundleError,
    umask,
)
from pixicache.errors import FetchError, UsageError

__all__ = ["BUNDLE_FORMAT", "PINNED_WHEELS", "RATTLER_WHEELS", "BundleInfo", "RattlerWheel", "build_bundle"]

BUNDLE_FORMAT = 1
"""The layout version recorded in ``pixicache-bundle.json``."""

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_SKIP_DIST_FILES = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}

PINNED_WHEELS: dict[str, tuple[str, str]] = {
    # name: (version, sha256 of the wheel pip picks for CPython 3.9 on manylinux x86_64)
    "anyio": ("4.12.1", "d405828884fc140aa80a3c667b8beed277f1dfedec42ba031bd6ac3db606ab6c"),
    "certifi": (
        "2026.10.19.post1",
        "1324c476b4811eff41a8bc2122cd0bbd4d9c7234c725446d99ab1612b3a7fdd2",
    ),
    "click": ("8.1.8", "63c132bbbed01578a06712a2d1f497bb62d9c1c0d329b7903a866228027263b2"),
    "exceptiongroup": ("1.3.2", "41c6a70dfec22050d3d8b43386b059a4dc0bca3f3d40a40971cb206fff1785af"),
    "h11": ("0.16.0", "63cf8bbe7522de3bf65932fda1d9c2772064ffb3dae62d55932da54b31cb6c86"),
    "httpcore": ("1.0.9", "2d400746a40668fc9dec9810239072b40b4484b640a8c38fd654a024c7a1bf55"),
    "httpx": ("0.28.1", "d909fcccc110f8c7faf814ca82a9a4d816bc5a6dbfea25d6591d6985b8ba59ad"),
    # installs the lock's PyPI wheels (pixicache.installers.pypi)
    "installer": ("0.7.0", "05d1933f0a5ba7d8d6296bb6d5018e7c94fa473ceb10cf198a92ccea19c27b53"),
    "idna": ("3.20", "ab7ae7122974553370f0bdb919e1a960b2cd1bc1ef0276416d896db81c14582c"),
    "platformdirs": ("4.4.0", "abd01743f24e5287cd7a5db3752faf1a2d65353f38ec26d98e25a6db65958c85"),
    # the cp39 wheel; its C extension is dropped (the pure-Python loader works everywhere)
    "PyYAML": ("6.0.3", "0150219816b6a1fa26fb4699fb7daa9caf09eb1999f3b70fb6e786805e80375a"),
    "rich": ("15.0.0", "33bd4ef74232fb73fe9279a257718407f169c09b78a87ad3d296f548e27de0bb"),
    "tomli": ("2.5.0", "32a7b79ac57a2e83670ce329ccf675798bc5a2094783a63676866b70503f2e2b"),
    "typing_extensions": (
        "4.16.0",
        "481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8",
    ),
}
"""The pure-Python runtime deps of the agent, pinned for Python >= 3.9 (``source="pypi"``)."""

@dataclass(frozen=True)
class RattlerWheel:
    """One pinned py-rattler build the bundle carries (manylinux_2_17 x86_64, abi3)."""

    tag: str  # "cp310": the wheel's abi3 floor, and its directory in the bundle
    version: str
    sha256: str
    min_python: tuple[int, int]

    def meta(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "version": self.version,
            "min_python": list(self.min_python),
            "platform": "manylinux_2_17_x86_64",
        }


RATTLER_WHEELS: tuple[RattlerWheel, ...] = (
    RattlerWheel(
        "cp310", "0.28.0", "4f4ab1d34d5394e7ce130a86e59009c95ace4f5757d9c3af04de1351bcea47eb", (3, 10)
    ),
    # the newest py-rattler with a wheel for Python < 3.10 (EL9's python3 is 3.9);
    # 0.26 and later publish only a cp310-abi3 wheel
    RattlerWheel(
        "cp38", "0.25.0", "b642304155f492c7dd3eb772df5e8e97942bff445ab8e343dc7a173e3efbfcf1", (3, 8)
    ),
)
"""The py-rattler builds of a ``source="pypi"`` bundle, newest first (the run time
takes the first this interpreter can load)."""

# For source="installed": distributions that must be present, and the optional
# backports whose absence raises the minimum Python of the bundle.
_REQUIRED_DISTS = (
    "httpx",
    "httpcore",
    "h11",
    "anyio",
    "idna",
    "certifi",
    "click",
    "platformdirs",
    "PyYAML",
    "rich",
    "installer",
)
_BACKPORTS = {
    "tomli": (3, 11),
    "exceptiongroup": (3, 11),
    "typing_extensions": (3, 13),
    "sniffio": (3, 9),
}


@dataclass(frozen=True)
class BundleInfo:
    """A built bundle.

    Attributes:
        path: the ``.pyz`` file.
        sha256: its SHA-256 (what ``PIXICACHE_AGENT_SHA256`` in a submit file pins).
        size: its size in bytes.
        build_id: the payload's id (the directory it unpacks into).
        min_python: the oldest Python it runs on, e.g. ``"3.9"``.
        rattler: the bundled py-rattler versions, newest first (empty: none).
        packages: distribution name -> version, for everything inside.
        source: ``"pypi"`` or ``"installed"``.
    """

    path: Path
    sha256: str
    size: int
    build_id: str = ""
    min_python: str = "3.9"
    rattler: tuple[str, ...] = ()
    packages: dict[str, str] = field(default_factory=dict)
    source: str = "pypi"


_LAUNCHER = """\
# pixicache: the worker agent as one file, built by `pixicache bundle`.
# Run it with python3 >= 3.9: python3 -I pixicache.pyz --help
# This launcher parses on any Python, so an old one gets a message, not a traceback.
import gc
import os
import sys

gc.disable()  # until the command's long part: pixicache.bundle.runtime.resume_collection
META = {meta}


def _fail(message):
    sys.stderr.write("pixicache.pyz: error: " + message + "\\n")
    sys.exit(8)


if sys.version_info[:2] < tuple(META["min_python"]):
    _fail(
        "this bundle needs Python >= %s, but %s is Python %s. Run it with a newer "
        "python3 (RHEL/Rocky 8: dnf install python39 or python3.11), or build a "
        "bundle for older Pythons with `pixicache bundle` (pinned wheels)."
        % (".".join(str(v) for v in META["min_python"]), sys.executable, sys.version.split()[0])
    )


_prewarmed = None
_words = sys.argv[1:]
if ("install" in _words or "run" in _words) and not (
    set(_words) & {"-h", "--help", "--version", "--bundle-info"}
):
    # may need py-rattler: its child starts first and imports asyncio meanwhile
    # (pixicache.agent.ahead decides whether it is used, or ends it). posix_spawn, not
    # subprocess: importing that is ~7 ms the child would wait (it becomes a Popen later,
    # pixicache.bundle.runtime.take_prewarmed). Its pipes are close-on-exec; fds this
    # process inherited are closed in the child, as Popen's close_fds does.
    _pipes = []
    try:
        _pipes = [os.pipe() for _ in range(3)]
        _actions = [(os.POSIX_SPAWN_DUP2, _pipes[0][0], 0), (os.POSIX_SPAWN_DUP2, _pipes[1][1], 1),
                    (os.POSIX_SPAWN_DUP2, _pipes[2][1], 2)]
        try:
            _open = [int(n) for n in os.listdir("/proc/self/fd")]
        except OSError:
            _open = []
        for _fd in _open:
            try:
                if _fd > 2 and os.get_inheritable(_fd):
                    _actions.append((os.POSIX_SPAWN_CLOSE, _fd))
            except OSError:
                pass
        _pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", "-c", {prewarm}],
                              os.environ, file_actions=_actions)
        _prewarmed = (_pid, _pipes[0][1], _pipes[1][0], _pipes[2][0])
        for _fd in (_pipes[0][0], _pipes[1][1], _pipes[2][1]):
            os.close(_fd)
    except (OSError, AttributeError, ValueError):  # no posix_spawn: no child ahead
        for _fd in [fd for pair in _pipes for fd in pair]:
            try:
                os.close(_fd)
            except OSError:
                pass
        _prewarmed = None

_archive = os.path.abspath(getattr(__loader__, "archive", None) or sys.argv[0])
sys.path.insert(0, os.path.join(_archive, "site"))
from pixicache.bundle.launch import prefer_unpacked  # noqa: E402

prefer_unpacked(_archive, META)  # once unpacked, nothing more is imported from the zip
from pixicache.bundle.runtime import run_from_archive  # noqa: E402  (unpacks if needed)

run_from_archive(_archive, META, _prewarmed)
from pixicache.agent.ahead import start_from_argv  # noqa: E402  (from the unpacked files now)

start_from_argv(sys.argv[1:])  # the py-rattler child starts while the CLI is imported
from pixicache.cli import entry  # noqa: E402

entry()
"""


@dataclass
class _Entry:
    data: bytes
    mode: int = 0o644


def _parse_python(text: str) -> tuple[int, int]:
    t = text.strip().lower().removeprefix("cp").removeprefix("py")
    try:
        major, minor = [*t.split("."), "0"][:2] if "." in t else (t[0], t[1:] or "0")
        version = (int(major), int(minor))
    except (ValueError, IndexError):
        raise UsageError(f"not a Python version: {text!r} (examples: 3.9, py39, cp310)") from None
    if version < (3, 9):
        raise UsageError(f"the agent needs Python >= 3.9 (asked for {text})")
    return version


def _requires_python_floor(spec: str | None) -> tuple[int, int]:
    """The lower bound of a ``Requires-Python`` such as ``>=3.10`` (``(3, 0)`` if none)."""
    floor = (3, 0)
    for clause in (spec or "").split(","):
        clause = clause.strip()
        if clause.startswith(">="):
            nums = clause[2:].strip().split(".")
            with contextlib.suppress(ValueError, IndexError):
                floor = max(floor, (int(nums[0]), int(nums[1]) if len(nums) > 1 else 0))
    return floor


def _skip_pure(rel: str) -> bool:
    """Files of a pure-Python dependency that the bundle leaves out."""
    name = rel.rsplit("/", 1)[-1]
    return (
        "__pycache__/" in rel
        or rel.endswith((".pyc", ".so", ".pyd"))
        or rel.startswith("_yaml/")  # PyYAML's C-extension shim
        or (".dist-info/" in rel and name in _SKIP_DIST_FILES)
    )


def _wheel_entries(wheel: Path, *, pure: bool) -> tuple[dict[str, _Entry], str | None]:
    """The files of a wheel (``.data/purelib`` and ``platlib`` mapped to the root), and
    its ``Requires-Python``."""
    import zipfile

    out: dict[str, _Entry] = {}
    requires: str | None = None
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            rel = info.filename
            if rel.split("/", 1)[0].endswith(".data"):
                _, _, rest = rel.partition("/")
                kind, _, rel = rest.partition("/")
                if kind not in ("purelib", "platlib"):
                    continue
            if (pure and _skip_pure(rel)) or (
                not pure and ("__pycache__/" in rel or rel.endswith(".pyc"))
            ):
                continue
            if ".dist-info/" in rel and rel.rsplit("/", 1)[-1] in _SKIP_DIST_FILES:
                continue
            data = zf.read(info)
            if rel.endswith(".dist-info/METADATA"):
                for line in data.decode("utf-8", "replace").splitlines():
                    if line.lower().startswith("requires-python:"):
                        requires = line.split(":", 1)[1].strip()
            mode = (info.external_attr >> 16) & 0o777
            out[rel] = _Entry(data, 0o755 if mode & 0o100 else 0o644)
    return out, requires


def _download(wheelhouse: Path, args: list[str], lines: list[str]) -> None:
    import subprocess

    req = wheelhouse / f".requirements-{os.getpid()}.txt"
    req.write_text("\n".join(lines) + "\n")
    cmd = [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
        "--require-hashes", "--only-binary=:all:", "-d", str(wheelhouse), "-r", str(req), *args,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"pip download failed to run: {exc}") from None
    finally:
        req.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise FetchError(
            f"pip download of the bundle's pinned wheels failed (exit {proc.returncode}):\n{tail}\n"
            "Build offline from what is installed with --from-installed, or give a "
            "--wheelhouse DIR that holds the wheels."
        )


def _find_wheel(wheelhouse: Path, name: str, version: str) -> Path:
    stem = name.lower().replace("-", "_")
    for path in sorted(wheelhouse.glob("*.whl")):
        parts = path.name.split("-")
        if parts[0].lower().replace("-", "_") == stem and parts[1] == version:
            return path
    raise FetchError(f"no wheel for {name}=={version} in {wheelhouse}")


def _pypi_payload(
    wheelhouse: Path, include_rattler: bool
) -> tuple[dict[str, _Entry], dict[str, _Entry], dict[str, str], list[dict[str, Any]]]:
    wheelhouse.mkdir(parents=True, exist_ok=True)
    missing = [n for n, (v, _) in PINNED_WHEELS.items() if not _has_wheel(wheelhouse, n, v)]
    if missing:
        lines = [f"{n}=={PINNED_WHEELS[n][0]} --hash=sha256:{PINNED_WHEELS[n][1]}" for n in missing]
        _download(
            wheelhouse,
            ["--python-version", "3.9", "--implementation", "cp", "--abi", "cp39", "--abi", "none",
             "--platform", "manylinux2014_x86_64", "--platform", "any"],
            lines,
        )  # fmt: skip
    site: dict[str, _Entry] = {}
    packages: dict[str, str] = {}
    for name, (version, digest) in PINNED_WHEELS.items():
        wheel = _find_wheel(wheelhouse, name, version)
        _check_digest(wheel, digest)
        files, _ = _wheel_entries(wheel, pure=True)
        site.update(files)
        packages[name] = version
    rattler: dict[str, _Entry] = {}
    builds: list[dict[str, Any]] = []
    for build in RATTLER_WHEELS if include_rattler else ():
        if not _has_wheel(wheelhouse, "py-rattler", build.version):
            floor = ".".join(map(str, build.min_python))
            _download(
                wheelhouse,
                ["--python-version", floor, "--implementation", "cp", "--abi", "abi3",
                 "--platform", "manylinux_2_17_x86_64"],
                [f"py-rattler=={build.version} --hash=sha256:{build.sha256}"],
            )  # fmt: skip
        wheel = _find_wheel(wheelhouse, "py-rattler", build.version)
        _check_digest(wheel, build.sha256)
        files, _ = _wheel_entries(wheel, pure=False)
        rattler.update({f"{build.tag}/{k}": v for k, v in files.items()})
        builds.append(build.meta())
    if builds:
        packages["py-rattler"] = ", ".join(b["version"] for b in builds)
    return site, rattler, packages, builds


def _has_wheel(wheelhouse: Path, name: str, version: str) -> bool:
    try:
        _find_wheel(wheelhouse, name, version)
    except FetchError:
        return False
    return True


def _check_digest(path: Path, expected: str) -> None:
    import hashlib

    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        from pixicache.errors import IntegrityError

        raise IntegrityError(
            f"{path}: SHA-256 {actual} does not match the pinned {expected}; delete it and rebuild",
            expected=expected,
            actual=actual,
        )


def _installed_files(name: str, *, pure: bool) -> tuple[dict[str, _Entry], str, str | None]:
    from importlib import metadata

    dist = metadata.distribution(name)
    base = Path(str(dist.locate_file(""))).resolve()
    out: dict[str, _Entry] = {}
    for f in dist.files or []:
        path = Path(str(dist.locate_file(f))).resolve()
        try:
            rel = path.relative_to(base).as_posix()
        except ValueError:
            continue  # scripts in bin/, data outside site-packages
        skip = _skip_pure(rel) if pure else ("__pycache__/" in rel or rel.endswith(".pyc"))
        if skip or (".dist-info/" in rel and path.name in _SKIP_DIST_FILES) or not path.is_file():
            continue
        out[rel] = _Entry(path.read_bytes(), 0o755 if path.stat().st_mode & 0o100 else 0o644)
    if not out:
        raise BundleError(f"{name} is installed without a file list (RECORD): cannot bundle it")
    return out, dist.version, (dist.metadata.get_all("Requires-Python") or [None])[0]


def _installed_payload(
    include_rattler: bool,
) -> tuple[
    dict[str, _Entry], dict[str, _Entry], dict[str, str], list[dict[str, Any]], tuple[int, int], list[str]
]:
    from importlib import metadata

    site: dict[str, _Entry] = {}
    packages: dict[str, str] = {}
    floor = (3, 9)
    why: list[str] = []
    names = list(_REQUIRED_DISTS) + list(_BACKPORTS)
    for name in names:
        try:
            files, version, requires = _installed_files(name, pure=True)
        except metadata.PackageNotFoundError:
            if name in _BACKPORTS:
                if _BACKPORTS[name] > floor:
                    floor = _BACKPORTS[name]
                    why.append(
                        f"{name} is not installed here (needed below Python {_BACKPORTS[name][0]}.{_BACKPORTS[name][1]})"
                    )
                continue
            raise BundleError(
                f"{name} is not installed in {sys.prefix}: pip install pixicache first"
            ) from None
        site.update(files)
        packages[name] = version
        req = _requires_python_floor(requires)
        if req > floor:
            floor = req
            why.append(f"{name} {version} requires Python >={req[0]}.{req[1]}")
    rattler: dict[str, _Entry] = {}
    builds: list[dict[str, Any]] = []
    if include_rattler:
        try:
            files, version, requires = _installed_files("py-rattler", pure=False)
        except metadata.PackageNotFoundError:
            raise BundleError(
                "py-rattler is not installed here: pip install 'pixicache[rattler]', or build with --no-rattler"
            ) from None
        build = RattlerWheel(
            f"cp{sys.version_info[0]}{sys.version_info[1]}",
            version,
            "",
            max(_requires_python_floor(requires), RATTLER_MIN_PYTHON),
        )
        rattler = {f"{build.tag}/{k}": v for k, v in files.items()}
        builds.append(build.meta())
        packages["py-rattler"] = version
    return site, rattler, packages, builds, floor, why


def _pixicache_entries() -> dict[str, _Entry]:
    """pixicache's own modules and data (not ``pixicache.testing``), and a dist-info
    carrying its entry points (plugins are found through them)."""
    from pixicache import __version__

    pkg = Path(__file__).resolve().parent.parent  # the pixicache package
    out: dict[str, _Entry] = {}
    for path in sorted(pkg.rglob("*")):
        rel = path.relative_to(pkg).as_posix()
        if (
            not path.is_file()
            or "__pycache__" in rel
            or rel.endswith(".pyc")
            or rel.startswith("testing/")
        ):
            continue
        out[f"pixicache/{rel}"] = _Entry(path.read_bytes())
    info = f"pixicache-{__version__}.dist-info"
    out[f"{info}/METADATA"] = _Entry(
        f"Metadata-Version: 2.1\nName: pixicache\nVersion: {__version__}\nRequires-Python: >=3.9\n".encode()
    )
    eps = _entry_points_text(pkg)
    if eps:
        out[f"{info}/entry_points.txt"] = _Entry(eps.encode())
    return out


def _entry_points_text(pkg: Path) -> str | None:
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError, OSError):
        text = metadata.distribution("pixicache").read_text("entry_points.txt")
        if text:
            return text
    pyproject = pkg.parent / "pyproject.toml"
    if not pyproject.is_file():
        return None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    project = tomllib.loads(pyproject.read_text()).get("project", {})
    sections = [("console_scripts", project.get("scripts", {}))]
    sections += list(project.get("entry-points", {}).items())
    return "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(eps.items())) + "\n"
        for group, eps in sections
        if eps
    )


def _write_zip(output: Path, entries: dict[str, _Entry], compresslevel: int) -> None:
    import stat
    import zipfile

    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(b"#!/usr/bin/env python3\n")
            with zipfile.ZipFile(fh, "w") as zf:
                for name in sorted(entries):
                    entry = entries[name]
                    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
                    info.external_attr = (stat.S_IFREG | entry.mode) << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.create_system = 3
                    zf.writestr(info, entry.data, compresslevel=compresslevel)
        os.chmod(tmp, 0o755 & ~umask())
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_bundle(
    output: Path,
    *,
    python_tag: str = "3.9",
    include_rattler: bool = True,
    source: str = "pypi",
    wheelhouse: Path | None = None,
    compresslevel: int = 6,
) -> BundleInfo:
    """Build the single-file agent at ``output`` (written atomically, mode 0755).

    Args:
        output: the ``.pyz`` to write.
        python_tag: the oldest Python the bundle must run on (``"3.9"``, ``"py310"``...);
            at least 3.9.
        include_rattler: bundle py-rattler (:data:`RATTLER_WHEELS`; see the module doc).
        source: ``"pypi"``: the pinned wheels (:data:`PINNED_WHEELS`, :data:`RATTLER_WHEELS`),
            downloaded with pip into ``wheelhouse`` unless already there;
            ``"installed"``: the files installed in this interpreter (offline).
        wheelhouse: where wheels are kept for ``source="pypi"`` (default: a temporary dir).
        compresslevel: zlib level of the zip entries.

    Returns:
        The :class:`BundleInfo`.

    Raises:
        UsageError: bad arguments; ``source="installed"`` with packages that need a
            newer Python than ``python_tag``.
        FetchError: pip could not download the wheels.
        IntegrityError: a wheel does not match its pinned SHA-256.
        BundleError: a distribution is missing or cannot be read.
    """
    import hashlib
    import tempfile

    floor = _parse_python(python_tag)
    output = Path(output)
    why: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pixicache-bundle-") as tmpdir:
        if source == "pypi":
            house = Path(wheelhouse) if wheelhouse else Path(tmpdir) / "wheels"
            site, rattler, packages, builds = _pypi_payload(house, include_rattler)
        elif source == "installed":
            site, rattler, packages, builds, got, why = _installed_payload(include_rattler)
            if got > floor:
                floor = got
        else:
            raise UsageError(f"unknown bundle source {source!r}: use 'pypi' or 'installed'")
    from pixicache import __version__

    packages = {"pixicache": __version__, **dict(sorted(packages.items()))}
    payload: dict[str, _Entry] = {f"site/{k}": v for k, v in site.items()}
    payload.update({f"site/{k}": v for k, v in _pixicache_entries().items()})
    payload.update({f"rattler/{k}": v for k, v in rattler.items()})
    digest = hashlib.sha256()
    digest.update(_LAUNCHER.encode())
    for name in sorted(payload):
        digest.update(f"{name}\0{payload[name].mode:o}\0".encode())
        digest.update(hashlib.sha256(payload[name].data).digest())
    build_id = digest.hexdigest()[:16]
    meta: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "build_id": build_id,
        "pixicache": __version__,
        "min_python": list(floor),
        "min_python_because": why,
        "packages": packages,
        "rattler": builds,
        "source": source,
    }
    entries = dict(payload)
    from pixicache.backends.rattler.process import PREWARM

    launcher = _LAUNCHER.replace("{meta}", repr(meta)).replace("{prewarm}", repr(PREWARM))
    entries["__main__.py"] = _Entry(launcher.replace("{marker}", UNPACKED_MARKER).encode())
    entries[META_NAME] = _Entry((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_zip(output, entries, compresslevel)
    sha = hashlib.sha256()
    with open(output, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return BundleInfo(
        path=output,
        sha256=sha.hexdigest(),
        size=output.stat().st_size,
        build_id=build_id,
        min_python=f"{floor[0]}.{floor[1]}",
        rattler=tuple(b["version"] for b in builds),
        packages=packages,
        source=source,
    )
