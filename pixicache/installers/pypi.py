"""The lock's PyPI entries, installed into the environment's own interpreter as Pixi does.

Pixi installs a lock's PyPI packages with uv; pixicache installs the same wheels,
offline, from the node store, with `pypa/installer <https://installer.pypa.io>`_ —
a small pure-Python library (it is in the single-file agent; uv is a 20 MB binary
per platform that would have to be unpacked to run) — and writes what uv writes
for Pixi, so that Pixi finds the environment as it left it:

* each ``.dist-info`` gets ``INSTALLER`` = ``uv-pixi`` (no newline: Pixi compares
  it; anything else, Pixi reinstalls), an empty ``REQUESTED``, a ``RECORD``
  sorted by path, and ``direct_url.json`` only for direct references (a path or
  URL entry, not an index wheel);
* entry points become uv's launcher scripts in ``<prefix>/bin`` (the
  interpreter's absolute path in the shebang, or a ``/bin/sh`` trampoline when
  that path is too long for one);
* no bytecode is compiled (Pixi compiles none).

There is no resolution: the lock is the resolution. A wheel already installed
at the locked version by ``uv-pixi`` is kept; another version, or one another
installer put there, is removed (its ``RECORD``) and replaced; a ``uv-pixi``
package the lock no longer has is removed. The scheme (``site-packages``,
``bin``...) comes from the environment's interpreter itself (``sysconfig``).

Entries that are not wheels:

* an **sdist** is built into a wheel once per node and interpreter
  (``python -m pip wheel --no-deps`` with the environment's Python; build
  requirements come from the mirror's PyPI index when one is configured) and
  the wheel is kept in the node store, keyed by the sdist's digest and the
  target, so the other jobs on the node install it without building;
* a **path** entry inside the workspace (shipped with the job) is installed from
  there: a wheel file as is, a directory or archive built as an sdist is;
* a **git** entry cannot be had offline: it is refused by name, with the fix.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixicache.errors import InstallError

if TYPE_CHECKING:
    from pixicache.model.lockfile import LockedPackage
    from pixicache.store import Store

__all__ = ["INSTALLER_NAME", "PypiPlan", "PythonScheme", "sync_pypi", "target_scheme"]

INSTALLER_NAME = b"uv-pixi"
"""What Pixi's uv writes in ``INSTALLER`` (and checks, byte for byte)."""

_QUERY = (
    "import json, sys, sysconfig; v = sys.version_info; "
    "print(json.dumps({'paths': sysconfig.get_paths(), 'executable': sys.executable, "
    "'tag': sys.implementation.cache_tag, 'version': '%d.%d.%d' % v[:3]}))"
)

UV_LAUNCHER = """{shebang}
# -*- coding: utf-8 -*-
import sys
from {module} import {import_name}
if __name__ == "__main__":
    if sys.argv[0].endswith("-script.pyw"):
        sys.argv[0] = sys.argv[0][:-11]
    elif sys.argv[0].endswith(".exe"):
        sys.argv[0] = sys.argv[0][:-4]
    sys.exit({function}())
"""


@dataclass(frozen=True)
class PythonScheme:
    """Where an interpreter installs things (its ``sysconfig`` paths)."""

    python: str
    purelib: str
    platlib: str
    scripts: str
    data: str
    include: str
    tag: str  # "cpython-312"
    version: str  # "3.12.1"

    def installer_scheme(self, distribution: str) -> dict[str, str]:
        return {
            "purelib": self.purelib,
            "platlib": self.platlib,
            "headers": os.path.join(self.include, distribution),
            "scripts": self.scripts,
            "data": self.data,
        }


def target_scheme(prefix: Path) -> PythonScheme:
    """The scheme of the environment's interpreter (``<prefix>/bin/python``).

    Raises:
        InstallError: the environment has no Python, or it does not run.
    """
    python = prefix / "bin" / "python"
    if not os.access(python, os.X_OK):
        raise InstallError(
            f"the environment has PyPI packages but no Python at {python}: the lock must pin "
            "a python package for them"
        )
    try:
        out = subprocess.run(
            [str(python), "-I", "-c", _QUERY], capture_output=True, text=True, timeout=120,
            check=True, stdin=subprocess.DEVNULL,
        ).stdout  # fmt: skip
        info = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise InstallError(f"the environment's Python {python} does not run: {exc}") from None
    p = info["paths"]
    root = os.path.realpath(prefix)
    for part in ("purelib", "platlib", "scripts"):
        where = os.path.realpath(p[part])
        if os.path.commonpath([root, where]) != root:
            raise InstallError(
                f"the environment's Python ({python}) installs {part} outside the environment "
                f"({where}): PyPI packages would land in another interpreter's site-packages. "
                "Lock a real python package (conda-forge's) for environments with PyPI entries"
            )
    return PythonScheme(
        str(python), p["purelib"], p["platlib"], p["scripts"], p["data"], p["include"],
        info["tag"], info["version"],
    )  # fmt: skip


def _shebang(python: str) -> str:
    """uv's shebang: the interpreter, or a ``/bin/sh`` trampoline for a long or spaced path."""
    if len(python.encode()) + 3 > 127 or " " in python:
        quoted = python.replace("'", "'\"'\"'")
        return f"#!/bin/sh\n'''exec' '{quoted}' \"$0\" \"$@\"\n' '''"
    return "#!" + python


def _destination(scheme: PythonScheme, distribution: str) -> Any:
    """A pypa/installer destination that writes what uv writes (see the module doc)."""
    from installer.destinations import SchemeDictionaryDestination
    from installer.utils import Scheme as Part  # the scheme's parts: "scripts", "purelib"...

    class UvLikeDestination(SchemeDictionaryDestination):
        def write_script(self, name: str, module: str, attr: str, section: str) -> Any:
            text = UV_LAUNCHER.format(
                shebang=_shebang(self.interpreter), module=module,
                import_name=attr.split(".")[0], function=attr,
            )  # fmt: skip
            return self.write_to_fs(Part("scripts"), name, io.BytesIO(text.encode()), is_executable=True)

        def write_file(  # type: ignore[override]  # installer's Scheme is a NewType of str
            self, scheme: str, path: str, stream: Any, is_executable: bool
        ) -> Any:
            if scheme == "scripts":  # .data/scripts: a "#!python" shebang is rewritten
                if stream.read(8) == b"#!python":
                    stream.readline()
                    body = stream.read()
                    data = _shebang(self.interpreter).encode() + b"\n" + body
                    return self.write_to_fs(Part(scheme), path, io.BytesIO(data), True)
                stream.seek(0)
                return self.write_to_fs(Part(scheme), path, stream, True)
            return self.write_to_fs(Part(scheme), path, stream, is_executable)

        def finalize_installation(self, scheme: str, record_file_path: str, records: Any) -> None:
            root = self.scheme_dict[scheme]
            rows = []
            for file_scheme, rec in records:
                rel = rec.path if file_scheme == scheme else os.path.normpath(
                    os.path.join(os.path.relpath(self.scheme_dict[file_scheme], root), rec.path)
                )
                rows.append((rel.replace(os.sep, "/"), rec))
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            for rel, rec in sorted(rows, key=lambda r: r[0]):
                digest = f"{rec.hash_.name}={rec.hash_.value}" if rec.hash_ else ""
                writer.writerow([rel, digest, "" if rec.size is None else rec.size])
            with open(os.path.join(root, record_file_path), "w", encoding="utf-8", newline="") as fh:
                fh.write(out.getvalue())

    return UvLikeDestination(
        scheme.installer_scheme(distribution), interpreter=scheme.python, script_kind="posix"
    )


# -- what is installed ----------------------------------------------------------------------


def _norm(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Installed:
    """A distribution found in ``site-packages``."""

    name: str
    version: str
    dist_info: Path
    installer: str


def installed(scheme: PythonScheme) -> dict[str, Installed]:
    """Every distribution in the environment's ``site-packages``, by normalized name."""
    out: dict[str, Installed] = {}
    for lib in dict.fromkeys([scheme.purelib, scheme.platlib]):
        try:
            entries = list(os.scandir(lib))
        except FileNotFoundError:
            continue
        for entry in entries:
            if not entry.name.endswith(".dist-info") or not entry.is_dir():
                continue
            stem = entry.name[: -len(".dist-info")]
            name, _, version = stem.rpartition("-")
            try:
                who = (Path(entry.path) / "INSTALLER").read_bytes().strip().decode()
            except OSError:
                who = ""
            out[_norm(name)] = Installed(name, version, Path(entry.path), who)
    return out


def uninstall(dist: Installed) -> int:
    """Remove a distribution's files (its ``RECORD``) and its ``.dist-info``; the count."""
    root = dist.dist_info.parent
    removed = 0
    try:
        rows = list(csv.reader(io.StringIO((dist.dist_info / "RECORD").read_text())))
    except OSError:
        rows = []
    dirs: set[Path] = set()
    for row in rows:
        if not row:
            continue
        path = (root / row[0]).resolve() if not os.path.isabs(row[0]) else Path(row[0])
        try:
            path.unlink()
            removed += 1
        except (FileNotFoundError, IsADirectoryError):
            continue
        dirs.add(path.parent)
        cache = path.parent / "__pycache__"
        if cache.is_dir():
            for pyc in cache.glob(path.stem + ".*.pyc"):
                pyc.unlink(missing_ok=True)
            dirs.add(cache)
    shutil.rmtree(dist.dist_info, ignore_errors=True)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        try:
            if d != root and root in d.parents:
                d.rmdir()
        except OSError:
            pass
    return removed


# -- the plan ------------------------------------------------------------------------------


@dataclass
class Wanted:
    """One PyPI entry of the lock, and the wheel that installs it."""

    package: LockedPackage
    wheel: Path | None  # a wheel file (a store blob or a file of the workspace)
    filename: str  # the wheel's own name (blobs are named by digest)
    direct_url: dict[str, Any] | None = None
    editable: Path | None = None  # a project directory installed in place (PEP 660)
    sha256: str | None = None  # the wheel's digest, checked as it is read (a store blob)
    index_url: str | None = None  # where an editable build's requirements come from


@dataclass
class PypiPlan:
    """What :func:`sync_pypi` did."""

    installed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    built: list[str] = field(default_factory=list)

    def note(self) -> str:
        parts = [f"{len(self.installed)} installed", f"{len(self.kept)} kept"]
        if self.removed:
            parts.append(f"{len(self.removed)} removed")
        if self.built:
            parts.append(f"{len(self.built)} built from sdists ({', '.join(self.built)})")
        return "PyPI packages: " + ", ".join(parts)


def _install_wheel(want: Wanted, scheme: PythonScheme) -> None:
    if want.editable is not None:
        _install_editable(want, scheme)
        return
    from installer import install
    from installer.sources import WheelFile

    from pixicache.store.files import open_regular

    extra: dict[str, bytes] = {"INSTALLER": INSTALLER_NAME, "REQUESTED": b""}
    if want.direct_url is not None:
        extra["direct_url.json"] = json.dumps(want.direct_url, separators=(",", ":")).encode()
    assert want.wheel is not None
    try:
        with os.fdopen(open_regular(want.wheel), "rb") as fh:
            if want.sha256 is not None:
                check_digest(fh, want.sha256, want.filename)
            with zipfile.ZipFile(fh) as zf:
                zf.filename = want.filename  # a blob is named by its digest: the wheel's name
                source = WheelFile(zf)
                install(source, _destination(scheme, source.distribution), extra)
    except (zipfile.BadZipFile, ValueError, KeyError, OSError) as exc:
        raise InstallError(
            f"cannot install {want.filename} into {scheme.purelib}: {type(exc).__name__}: {exc}"
        ) from exc


def _install_editable(want: Wanted, scheme: PythonScheme) -> None:
    """Install a project directory in place (``pip install --no-deps --editable``: the
    backend's PEP 660 hook), then make its ``.dist-info`` what uv writes for Pixi."""
    assert want.editable is not None
    args = [*pip_command(scheme), "install", "--no-deps", "--no-compile", *_index_args(want.index_url)]
    _run_pip(
        [*args, "--editable", str(want.editable)],
        what=f"installing {want.package.name} (editable) from {want.editable}",
    )
    found = installed(scheme).get(_norm(want.package.name))
    if found is None:
        raise InstallError(f"pip installed no {want.package.name} from {want.editable}")
    _restamp(found.dist_info, want.direct_url)


def _restamp(dist_info: Path, direct_url: dict[str, Any] | None) -> None:
    """Rewrite another installer's ``INSTALLER``/``REQUESTED``/``direct_url.json`` as
    uv's, and its ``RECORD`` (sorted, with the new files' hashes)."""
    import base64
    import hashlib

    (dist_info / "INSTALLER").write_bytes(INSTALLER_NAME)
    (dist_info / "REQUESTED").write_bytes(b"")
    if direct_url is not None:
        (dist_info / "direct_url.json").write_text(json.dumps(direct_url, separators=(",", ":")))
    root = dist_info.parent
    record = dist_info / "RECORD"
    rows = {r[0]: r for r in csv.reader(io.StringIO(record.read_text())) if r}
    for name in ("INSTALLER", "REQUESTED", "direct_url.json"):
        path = dist_info / name
        if path.exists():
            data = path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            rows[rel] = [rel, f"sha256={digest}", str(len(data))]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for rel in sorted(rows):
        writer.writerow(rows[rel])
    record.write_text(out.getvalue())


def sync_pypi(prefix: Path, wanted: list[Wanted], scheme: PythonScheme | None = None) -> PypiPlan:
    """Make the environment's ``site-packages`` hold exactly the locked PyPI packages
    (see the module doc); returns what was done.

    Raises:
        InstallError: a wheel cannot be installed (the message names it).
    """
    scheme = scheme or target_scheme(prefix)
    have = installed(scheme)
    plan = PypiPlan()
    wanted_names = {_norm(w.package.name) for w in wanted}
    for name, dist in sorted(have.items()):
        if dist.installer == INSTALLER_NAME.decode() and name not in wanted_names:
            uninstall(dist)
            plan.removed.append(dist.name)
    for want in wanted:
        name = _norm(want.package.name)
        current = have.get(name)
        if (
            current is not None
            and current.installer == INSTALLER_NAME.decode()
            and current.version == want.package.version
        ):
            plan.kept.append(want.package.name)
            continue
        if current is not None:
            uninstall(current)
        _install_wheel(want, scheme)
        plan.installed.append(f"{want.package.name}=={want.package.version}")
    return plan


# -- entries that are not wheels -------------------------------------------------------------


def classify(package: LockedPackage, workspace: Path) -> tuple[str, Path | None]:
    """``("wheel" | "sdist" | "path-wheel" | "path-sdist" | "path-dir" | "git", local path)``.

    Raises:
        InstallError: a path outside the workspace, or one that does not exist.
    """
    url = package.url
    if url.startswith("git+"):
        return "git", None
    if "://" in url and not url.startswith("file://"):
        name = url.split("#", 1)[0].split("?", 1)[0].rsplit("/", 1)[-1]
        return ("wheel" if name.endswith(".whl") else "sdist"), None
    raw = url[len("file://") :] if url.startswith("file://") else url
    path = (workspace / raw).resolve() if not os.path.isabs(raw) else Path(raw)
    if workspace.resolve() not in (path, *path.parents):
        raise InstallError(
            f"PyPI entry {package.name} is the path {url}, outside the workspace {workspace}: "
            "a job only has what it ships; put it inside the workspace (and in "
            "transfer_input_files), or build a wheel and lock it from an index"
        )
    if not path.exists():
        raise InstallError(
            f"PyPI entry {package.name} is the path {url}, which is not in the job's sandbox "
            f"({path}): add it to transfer_input_files"
        )
    if path.is_dir():
        return "path-dir", path
    return ("path-wheel" if path.name.endswith(".whl") else "path-sdist"), path


def refuse_git(package: LockedPackage) -> InstallError:
    return InstallError(
        f"PyPI entry {package.name} comes from git ({package.url}), which cannot be fetched or "
        "verified offline on a worker. Build a wheel of it (`pip wheel --no-deps <repo>`), "
        "publish or ship it, and lock that (`pixi add --pypi <name> @ <wheel URL or path>`)"
    )


def pip_command(scheme: PythonScheme) -> list[str]:
    """How to run pip for the environment's interpreter: its own pip, else this
    process's pip driving it (``pip --python``, pip >= 22.3), so an environment
    without pip can still have its sdists built.

    Raises:
        InstallError: neither has pip.
    """
    probe = subprocess.run(
        [scheme.python, "-I", "-c", "import pip"], capture_output=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if probe.returncode == 0:
        return [scheme.python, "-m", "pip"]
    import importlib.util

    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip", "--python", scheme.python]
    raise InstallError(
        "the lock has PyPI entries that must be built on the node (sdists or project "
        "directories), but neither the environment nor the agent's Python has pip to build "
        "them with: add pip to the environment, or build wheels and lock those"
    )


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1", PIP_NO_INPUT="1")
    return env


def _run_pip(args: list[str], *, what: str) -> None:
    try:
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=1800, env=_pip_env(),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{what} failed: {exc}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise InstallError(f"{what} failed:\n{tail}")


def _index_args(index_url: str | None) -> list[str]:
    return ["--index-url", index_url] if index_url else ["--no-index"]


def build_wheel(
    source: Path, scheme: PythonScheme, out: Path, *, index_url: str | None, name: str
) -> Path:
    """Build ``source`` (an sdist or a project directory) into a wheel in ``out`` for the
    environment's interpreter (``pip wheel --no-deps``; build requirements from
    ``index_url``, or none at all: ``--no-index``); returns the wheel.

    Raises:
        InstallError: no pip, or the build failed (the message has its tail).
    """
    out.mkdir(parents=True, exist_ok=True)
    args = [*pip_command(scheme), "wheel", "--no-deps", "--wheel-dir", str(out)]
    _run_pip([*args, *_index_args(index_url), str(source)], what=f"building {name} from {source.name}")
    wheels = sorted(out.glob("*.whl"))
    if not wheels:
        raise InstallError(f"building {name} from {source.name} produced no wheel")
    return wheels[0]


def check_digest(fh: Any, sha: str, what: str) -> None:
    """Hash the open file ``fh`` (then rewind it) and compare with ``sha``: a wheel is read
    straight from the node store, which other users of the node write to, so the bytes
    read are the bytes checked (unlike conda archives, which py-rattler verifies as it
    downloads them from the store view).

    Raises:
        InstallError: other bytes (the blob is named as the suspect, so the agent
            re-verifies and fetches it again).
    """
    import hashlib

    h = hashlib.sha256()
    while chunk := fh.read(1 << 20):
        h.update(chunk)
    fh.seek(0)
    if h.hexdigest() != sha:
        raise InstallError(
            f"{what}: the node store's blob {sha} holds other bytes (SHA-256 {h.hexdigest()}); "
            "not installed",
            suspects=[sha],
        )


def built_wheel(
    store: Store, key: str, source: Path, scheme: PythonScheme, *, index_url: str | None, name: str
) -> tuple[Path, str, bool]:
    """The wheel of the sdist ``key`` (its digest) for this interpreter: built once per node
    and kept in the store (``(blob path, wheel file name, built now)``; the blob's name is
    its digest, which :func:`check_digest` verifies when it is installed)."""
    target = f"{scheme.tag}-{os.uname().machine}"
    with store.lock(f"build-{key}-{target}"):
        found = store.index.lookup_build(key, target)
        if found is not None and store.has(found[0]):
            return store.path_for(found[0]), found[1], False
        tmp = store.private_dir(store.user_dir / "builds") / f"{key[:16]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            wheel = build_wheel(source, scheme, tmp, index_url=index_url, name=name)
            sha = store.add_built(wheel)
            store.index.record_build(key, target, sha, wheel.name)
            return store.path_for(sha), wheel.name, True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
