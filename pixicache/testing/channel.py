"""A conda channel of real packages on disk, its ``repodata.json``, and a lock for it.

:func:`build_channel` writes ``root/<channel>/<subdir>/<package>`` for every
:class:`~pixicache.testing.conda_package.PackageSpec`, and a ``repodata.json``
per subdir (always including an empty-or-not ``noarch/``), in the format conda
and rattler read: ``info.subdir``, ``packages`` (``.tar.bz2``), ``packages.conda``,
``removed`` and ``repodata_version: 1``.

The :class:`Channel` knows its packages and writes a ``pixi.lock`` for them
whose URLs are the ones the *upstream* would use (conda-forge by default), so a
test serves the tree with :class:`~pixicache.testing.server.UpstreamServer` and
points a mirror, a source or rattler's mirror middleware at it.

:func:`demo_channel_specs` is a small set of real packages that exercises what
an installer must get right: a text-mode prefix placeholder in an executable
script (``hello``), a binary-mode placeholder in a file with NUL bytes
(``hello-data``, a ``.tar.bz2``), dependencies, and a ``noarch: python``
package with an entry point (``hello-py``) on top of a stand-in ``python``
package (:func:`build_python_shim`) that runs a host interpreter.

Example::

    channel = build_demo_channel(tmp_path / "upstream")
    lock = channel.write_lock(tmp_path / "pixi.lock")   # conda-forge URLs
    with UpstreamServer(channel.root) as srv:
        ...  # srv.channel_url("conda-forge") serves the packages
"""

from __future__ import annotations

import json
import os
import platform as _platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixicache.testing.conda_package import (
    PLACEHOLDER,
    BuiltPackage,
    FileSpec,
    PackageSpec,
    build_conda_package,
)
from pixicache.testing.locks import LockPackage, render_lock

__all__ = [
    "DEFAULT_UPSTREAM",
    "Channel",
    "build_channel",
    "build_demo_channel",
    "build_python_shim",
    "build_venv_python",
    "current_subdir",
    "demo_channel_specs",
    "repodata",
]

DEFAULT_UPSTREAM = "https://conda.anaconda.org"
"""Where a channel named ``conda-forge`` lives upstream (``<this>/<channel>``)."""


def current_subdir() -> str:
    """The conda subdir of this machine (``linux-64``, ``osx-arm64``...)."""
    system = {"Linux": "linux", "Darwin": "osx", "Windows": "win"}.get(_platform.system(), "linux")
    machine = _platform.machine().lower()
    arch = {
        "x86_64": "64",
        "amd64": "64",
        "aarch64": "aarch64" if system == "linux" else "arm64",
        "arm64": "arm64" if system == "osx" else "aarch64",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
    }.get(machine, "64")
    return f"{system}-{arch}"


def repodata(subdir: str, packages: Iterable[BuiltPackage]) -> dict[str, Any]:
    """The ``repodata.json`` document of one subdir holding ``packages``."""
    tar_bz2: dict[str, Any] = {}
    conda: dict[str, Any] = {}
    for pkg in packages:
        if pkg.subdir != subdir:
            continue
        target = conda if pkg.filename.endswith(".conda") else tar_bz2
        target[pkg.filename] = dict(pkg.record)
    return {
        "info": {"subdir": subdir},
        "packages": dict(sorted(tar_bz2.items())),
        "packages.conda": dict(sorted(conda.items())),
        "removed": [],
        "repodata_version": 1,
    }


@dataclass
class Channel:
    """A channel directory ``root/name`` and the packages in it.

    Attributes:
        root: the directory served (holds ``name/``).
        name: the channel's name (``conda-forge``).
        packages: the built packages, in build order.
    """

    root: Path
    name: str
    packages: list[BuiltPackage] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """The channel directory (``root/name``)."""
        return self.root / self.name

    @property
    def subdirs(self) -> list[str]:
        """The subdirs with a ``repodata.json`` (``noarch`` always among them)."""
        return sorted({p.subdir for p in self.packages} | {"noarch"})

    @property
    def platforms(self) -> list[str]:
        """The non-``noarch`` subdirs holding packages, or this machine's subdir if none."""
        subdirs = sorted({p.subdir for p in self.packages} - {"noarch"})
        return subdirs or [current_subdir()]

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        """``"<subdir>/<filename>"`` -> repodata record, for every package."""
        return {f"{p.subdir}/{p.filename}": dict(p.record) for p in self.packages}

    def package(self, name: str) -> BuiltPackage:
        """The (first) package called ``name``; ``KeyError`` if none."""
        for pkg in self.packages:
            if pkg.spec.name == name:
                return pkg
        raise KeyError(f"no package {name!r} in channel {self.name} at {self.path}")

    def default_base_url(self) -> str:
        """``https://conda.anaconda.org/<name>``: where upstream serves this channel."""
        return f"{DEFAULT_UPSTREAM}/{self.name}"

    def url_of(self, pkg: BuiltPackage, base_url: str | None = None) -> str:
        """The URL of ``pkg`` below ``base_url`` (default: :meth:`default_base_url`)."""
        base = (base_url or self.default_base_url()).rstrip("/")
        return f"{base}/{pkg.subdir}/{pkg.filename}"

    def add(self, specs: Iterable[PackageSpec], *, compression_level: int | None = None) -> None:
        """Build more packages into the channel and rewrite its ``repodata.json`` files."""
        for spec in specs:
            out = self.path / spec.effective_subdir
            built = build_conda_package(out, spec, compression_level=compression_level)
            self.packages = [p for p in self.packages if p.filename != built.filename]
            self.packages.append(built)
        self.write_repodata()

    def write_repodata(self) -> None:
        """Write ``<subdir>/repodata.json`` for every subdir (atomically)."""
        for subdir in self.subdirs:
            target = self.path / subdir / "repodata.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".repodata.json.{os.getpid()}")
            tmp.write_text(json.dumps(repodata(subdir, self.packages), indent=2))
            os.replace(tmp, target)

    # -- locks -------------------------------------------------------------------------------

    def lock_package(self, pkg: BuiltPackage, base_url: str | None = None) -> LockPackage:
        """The lock entry of ``pkg`` with its upstream URL."""
        rec = pkg.record
        return LockPackage(
            kind="conda",
            url=self.url_of(pkg, base_url),
            sha256=pkg.sha256,
            name=rec["name"],
            version=rec["version"],
            md5=pkg.md5,
            size=pkg.size,
            build=rec["build"],
            build_number=int(rec.get("build_number", 0)),
            subdir=pkg.subdir,
            depends=list(rec.get("depends", [])),
            noarch=rec.get("noarch"),
            license=rec.get("license"),
            timestamp=rec.get("timestamp"),
        )

    def lock_packages(
        self, base_url: str | None = None, platform: str | None = None
    ) -> list[LockPackage]:
        """Lock entries for the packages (of ``platform`` plus ``noarch``, if given).

        Args:
            base_url: the channel URL the lock names (default
                ``https://conda.anaconda.org/<name>``).
            platform: only the packages a ``platform`` environment holds.
        """
        wanted = None if platform is None else {platform, "noarch"}
        return [
            self.lock_package(p, base_url)
            for p in self.packages
            if wanted is None or p.subdir in wanted
        ]

    def render_lock(
        self,
        base_url: str | None = None,
        version: int = 6,
        *,
        environment: str = "default",
        platforms: Sequence[str] | None = None,
    ) -> str:
        """The text of a ``pixi.lock`` holding every package (see :meth:`write_lock`)."""
        base = (base_url or self.default_base_url()).rstrip("/")
        envs = {
            environment: {
                plat: self.lock_packages(base, plat) for plat in (platforms or self.platforms)
            }
        }
        return render_lock(envs, version=version, channels=[base + "/"])

    def write_lock(
        self,
        path: Path | str,
        base_url: str | None = None,
        version: int = 6,
        *,
        environment: str = "default",
        platforms: Sequence[str] | None = None,
    ) -> Path:
        """Write a ``pixi.lock`` with one environment holding every package.

        Args:
            path: the file to write.
            base_url: the channel URL in the lock (default: upstream conda-forge-style).
            version: lock format version (4 to 7).
            environment: the environment's name.
            platforms: the platforms (default :attr:`platforms`); each holds its
                subdir's packages plus the ``noarch`` ones.

        Returns:
            ``path``.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            self.render_lock(base_url, version, environment=environment, platforms=platforms),
            encoding="utf-8",
        )
        return target


def build_channel(
    root: Path | str,
    specs: Iterable[PackageSpec],
    channel_name: str = "conda-forge",
    *,
    compression_level: int | None = None,
) -> Channel:
    """Build ``specs`` into ``root/<channel_name>/<subdir>/`` with ``repodata.json`` files.

    Each package is written in its spec's format (``spec.fmt``). Building the
    same specs again gives byte-identical packages.

    Returns:
        The :class:`Channel`.
    """
    channel = Channel(Path(root).resolve(), channel_name)
    channel.add(specs, compression_level=compression_level)
    return channel


# -- the demo channel ------------------------------------------------------------------------

HELLO_SCRIPT = """#!/bin/sh
# hello: the demo program of pixicache.testing's channel.
# Prints the prefix it was installed into (rewritten from the build placeholder
# at install time) and its arguments, one per line, then exits with the code
# given by `--exit N` or by $HELLO_EXIT_CODE (default 0).
prefix="@PREFIX@"
code="${HELLO_EXIT_CODE:-0}"
echo "hello from $prefix"
for arg in "$@"; do
  printf 'arg: %s\\n' "$arg"
done
while [ $# -gt 0 ]; do
  if [ "$1" = "--exit" ] && [ $# -gt 1 ]; then
    code="$2"
    shift
  fi
  shift
done
if [ -f "$prefix/share/hello-data/greeting.txt" ]; then
  echo "data: $(cat "$prefix/share/hello-data/greeting.txt")"
fi
exit "$code"
"""

BINARY_SUFFIX = b"/share/hello-data"
"""What follows the placeholder in ``hello-data``'s binary file (a C string)."""

BINARY_BLOB = (
    b"\x7fBIN\x00\x01\x02" + PLACEHOLDER.encode() + BINARY_SUFFIX + b"\x00TAIL\x00\xff\xfe"
)
"""The ``share/hello-data/prefix.bin`` file of ``hello-data``: NUL bytes around a
NUL-terminated string that starts with the padded placeholder. After install
it has the same length and holds ``<prefix>/share/hello-data`` padded with NULs."""

HELLO_PY_INIT = '''"""hello_py: the demo noarch python package of pixicache.testing."""

import os
import sys


def main(argv=None):
    """Print the environment prefix and the arguments; exit with --exit N."""
    args = list(sys.argv[1:] if argv is None else argv)
    prefix = os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0])))
    print("hello-py from " + prefix)
    for arg in args:
        print("arg: " + arg)
    if "--exit" in args and args.index("--exit") + 1 < len(args):
        return int(args[args.index("--exit") + 1])
    return 0
'''


def _python_version(host_python: str) -> str:
    if os.path.realpath(host_python) == os.path.realpath(sys.executable):
        v = sys.version_info
        return f"{v.major}.{v.minor}.{v.micro}"
    code = "import sys; v = sys.version_info; print(f'{v.major}.{v.minor}.{v.micro}')"
    out = subprocess.run(
        [host_python, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    return out.stdout.strip()


def build_python_shim(
    host_python: str | os.PathLike[str] | None = None,
    *,
    subdir: str | None = None,
    version: str | None = None,
) -> PackageSpec:
    """A stand-in ``python`` package whose ``bin/python`` runs a host interpreter.

    ``noarch: python`` packages install only into an environment with a
    ``python`` record (the installer takes ``lib/pythonX.Y/site-packages`` and
    the entry-point shebang ``bin/pythonX.Y`` from it). This package provides
    ``bin/python`` and ``bin/pythonX.Y``: shell scripts that put the prefix's
    ``site-packages`` on ``PYTHONPATH`` and ``exec`` ``host_python``. No
    ``python_abi`` package is involved.

    Args:
        host_python: the interpreter to run (default: this one, ``sys.executable``).
        subdir: the package's subdir (default: this machine's).
        version: the python version recorded (default: the host interpreter's).
    """
    host = os.fspath(host_python or sys.executable)
    version = version or _python_version(host)
    major_minor = ".".join(version.split(".")[:2])
    script = (
        "#!/bin/sh\n"
        "# python: pixicache.testing's stand-in, running a host interpreter.\n"
        f'prefix="{PLACEHOLDER}"\n'
        f'PYTHONPATH="$prefix/lib/python{major_minor}/site-packages${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        "export PYTHONPATH\n"
        f'exec "{host}" "$@"\n'
    )
    shim = FileSpec(script, mode=0o755)
    return PackageSpec(
        "python",
        version,
        "0_pixicache_shim",
        subdir=subdir or current_subdir(),
        files={"bin/python": shim, f"bin/python{major_minor}": shim},
        license="Python-2.0",
    )


def build_venv_python(
    host_python: str | os.PathLike[str] | None = None,
    *,
    subdir: str | None = None,
    version: str | None = None,
) -> PackageSpec:
    """A ``python`` package that makes the environment a real virtual environment over a
    host interpreter: ``bin/python``, ``bin/python3`` and ``bin/pythonX.Y`` are symbolic
    links to it and ``pyvenv.cfg`` names its home, with
    ``include-system-site-packages = false``.

    Unlike :func:`build_python_shim`, the interpreter's own ``sysconfig`` then reports
    the environment's ``lib/pythonX.Y/site-packages`` and ``bin`` (``sys.prefix`` is the
    prefix), so PyPI wheels install into the environment as they would into a
    conda-forge ``python``, and nothing of the host's ``site-packages`` is visible.
    """
    host = os.path.realpath(os.fspath(host_python or sys.executable))
    version = version or _python_version(host)
    major_minor = ".".join(version.split(".")[:2])
    cfg = (
        f"home = {os.path.dirname(host)}\n"
        "include-system-site-packages = false\n"
        f"version = {version}\n"
        f"executable = {host}\n"
    )
    files: dict[str, Any] = {
        "pyvenv.cfg": FileSpec(cfg),
        f"lib/python{major_minor}/site-packages/.keep": "",
    }
    for name in ("python", "python3", f"python{major_minor}"):
        files[f"bin/{name}"] = FileSpec(link=host)
    return PackageSpec(
        "python",
        version,
        "0_pixicache_venv",
        subdir=subdir or current_subdir(),
        files=files,
        license="Python-2.0",
    )


def demo_channel_specs(
    host_python: str | os.PathLike[str] | None = sys.executable,
    *,
    subdir: str | None = None,
) -> list[PackageSpec]:
    """The packages of the demo channel.

    * ``hello 1.0.0`` (``.conda``, ``subdir``): ``bin/hello`` (executable,
      text-mode placeholder); depends on ``hello-data``.
    * ``hello-data 1.0.0`` (``.tar.bz2``, ``subdir``): ``share/hello-data/prefix.bin``
      (binary-mode placeholder, :data:`BINARY_BLOB`) and ``greeting.txt``.
    * ``python`` (``.conda``): :func:`build_python_shim` of ``host_python``.
    * ``hello-py 1.0.0`` (``.conda``, ``noarch: python``): module ``hello_py``,
      entry point ``hello-py``; depends on ``python``.

    ``host_python=None`` leaves out ``python`` and ``hello-py``.
    """
    sub = subdir or current_subdir()
    specs = [
        PackageSpec(
            "hello",
            "1.0.0",
            "h0_0",
            subdir=sub,
            depends=["hello-data >=1.0"],
            files={
                "bin/hello": FileSpec(HELLO_SCRIPT.replace("@PREFIX@", PLACEHOLDER), mode=0o755)
            },
        ),
        PackageSpec(
            "hello-data",
            "1.0.0",
            "h0_0",
            subdir=sub,
            fmt="tar.bz2",
            files={
                "share/hello-data/prefix.bin": FileSpec(BINARY_BLOB, file_mode="binary"),
                "share/hello-data/greeting.txt": "Hello from a real conda package!\n",
            },
        ),
    ]
    if host_python is not None:
        specs.append(build_python_shim(host_python, subdir=sub))
        specs.append(
            PackageSpec(
                "hello-py",
                "1.0.0",
                "pyh0_0",
                noarch="python",
                depends=["python"],
                files={"site-packages/hello_py/__init__.py": HELLO_PY_INIT},
                entry_points=["hello-py = hello_py:main"],
            )
        )
    return specs


def build_demo_channel(
    root: Path | str,
    host_python: str | os.PathLike[str] | None = sys.executable,
    channel_name: str = "conda-forge",
) -> Channel:
    """Build :func:`demo_channel_specs` into ``root/<channel_name>`` (a few ms)."""
    return build_channel(root, demo_channel_specs(host_python), channel_name)
