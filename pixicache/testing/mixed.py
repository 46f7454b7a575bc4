"""A workspace with every kind of lock entry, built from real packages, served locally.

:class:`MixedUpstream` builds, under one directory:

* a conda channel (``conda-forge``) with a venv-style ``python``
  (:func:`~pixicache.testing.channel.build_venv_python`: the environment's interpreter
  really installs into the environment), ``hello`` (a ``.conda`` with a text
  placeholder) and ``legacy-data`` (a ``.tar.bz2`` that the lock pins **by md5 alone**,
  as old channels publish no SHA-256);
* a PyPI-shaped index (:class:`~pixicache.testing.pypi.PypiIndex`) of real files:
  ``hello-wheel`` (a wheel with a console script), ``tinybuild`` (a build backend, as a
  wheel) and ``hello-sdist`` (an sdist that requires ``tinybuild`` to build);
* a project directory ``local-pkg`` (a path entry, shipped inside the workspace).

:meth:`MixedUpstream.write_workspace` writes ``pixi.toml`` and ``pixi.lock`` for a
workspace whose lock names the URLs the servers were started on (the index and the
file host are two servers, as PyPI's are), so nothing names a real host.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pixicache.testing.channel import Channel, build_channel, build_venv_python, current_subdir
from pixicache.testing.conda_package import PackageSpec
from pixicache.testing.locks import LockPackage, write_lock
from pixicache.testing.pypi import (
    PypiFile,
    PypiIndex,
    WheelSpec,
    build_backend_wheel,
    build_sdist,
    build_wheel,
    write_project,
)

__all__ = ["MixedUpstream", "build_mixed_upstream"]

WHEEL = WheelSpec(
    "hello-wheel",
    "1.0",
    modules={
        "hello_wheel/__init__.py": (
            "import sys\n\nGREETING = 'hello from a wheel'\n\n\n"
            "def main():\n    print(GREETING + ' in ' + sys.prefix)\n    return 0\n"
        )
    },
    entry_points={"console_scripts": {"hello-wheel": "hello_wheel:main"}},
    requires_python=">=3.8",
)
SDIST = WheelSpec(
    "hello-sdist", "2.0", modules={"hello_sdist/__init__.py": "VALUE = 'built from an sdist'\n"}
)
LOCAL = WheelSpec("local-pkg", "0.1", modules={"local_pkg/__init__.py": "WHERE = 'local'\n"})

MANIFEST = """\
[workspace]
name = "mixed"
channels = ["{channel}"]
platforms = ["{platform}"]

[dependencies]
python = "*"
hello = "*"
legacy-data = "*"

[pypi-dependencies]
hello-wheel = "*"
{sdist}local-pkg = {{ path = "./local-pkg", editable = {editable} }}

[tasks]
check = "python -c 'import hello_wheel, hello_sdist, local_pkg; print(hello_wheel.__file__)'"
"""


@dataclass
class MixedUpstream:
    """The built trees (serve ``channel.root`` and ``index.root`` with
    :class:`~pixicache.testing.server.UpstreamServer`)."""

    root: Path
    channel: Channel
    index: PypiIndex
    files: dict[str, PypiFile] = field(default_factory=dict)  # project -> its file
    project_dir: Path | None = None

    def conda_entries(self, base_url: str | None = None) -> list[LockPackage]:
        """The conda lock entries; ``legacy-data`` has its md5 and no sha256."""
        out = []
        for pkg in self.channel.lock_packages(base_url):
            if pkg.name == "legacy-data":
                pkg.sha256 = None
            out.append(pkg)
        return out

    def pypi_entries(
        self, files_base: str, *, with_sdist: bool = True, editable: bool = False
    ) -> list[LockPackage]:
        """The PyPI lock entries: the wheel and the sdist at ``files_base`` (the file
        host), and ``./local-pkg`` (a path entry; ``editable``: installed in place)."""
        names = ["hello-wheel", "hello-sdist"] if with_sdist else ["hello-wheel"]
        out = [
            LockPackage(
                kind="pypi",
                url=self.files[n].url(files_base),
                sha256=self.files[n].sha256,
                name=n,
                version={"hello-wheel": WHEEL.version, "hello-sdist": SDIST.version}[n],
                requires_python=self.files[n].requires_python,
            )
            for n in names
        ]
        out.append(
            LockPackage(
                kind="pypi", url="./local-pkg", sha256=None, name=LOCAL.name,
                version=LOCAL.version, editable=editable,
            )
        )  # fmt: skip
        return out

    def write_workspace(
        self,
        workspace: Path,
        *,
        index_url: str,
        files_base: str,
        conda_base: str | None = None,
        with_sdist: bool = True,
        editable: bool = False,
        extra: list[LockPackage] | None = None,
    ) -> Path:
        """Write ``pixi.toml``, ``pixi.lock`` and ``local-pkg/`` into ``workspace``; returns
        the lock. ``conda_base`` is the channel URL the lock names (default conda-forge's)."""
        workspace.mkdir(parents=True, exist_ok=True)
        channel = (conda_base or self.channel.default_base_url()).rstrip("/")
        platform = current_subdir()
        (workspace / "pixi.toml").write_text(
            MANIFEST.format(
                channel=channel + "/", platform=platform, editable=str(editable).lower(),
                sdist='hello-sdist = "*"\n' if with_sdist else "",
            )
        )
        assert self.project_dir is not None
        shutil.copytree(self.project_dir, workspace / "local-pkg", dirs_exist_ok=True)
        packages = self.conda_entries(channel) + self.pypi_entries(
            files_base, with_sdist=with_sdist, editable=editable
        ) + list(extra or [])
        return write_lock(
            workspace / "pixi.lock",
            {"default": {platform: packages}},
            channels=[channel + "/"],
            indexes=[index_url],
        )


def build_mixed_upstream(root: Path, host_python: str | None = None) -> MixedUpstream:
    """Build the channel, the index and the project under ``root`` (see the module doc)."""
    host = host_python or sys.executable
    specs = [
        build_venv_python(host),
        PackageSpec(
            "hello", "1.0.0", "h0_0", subdir=current_subdir(),
            files={"bin/hello": "#!/bin/sh\necho hello from a conda package\n"},
        ),
        PackageSpec(
            "legacy-data", "0.9", "0", subdir=current_subdir(), fmt="tar.bz2",
            files={"share/legacy-data/README": "a package pinned by md5 alone\n"},
        ),
    ]  # fmt: skip
    channel = build_channel(root / "channel", specs)
    index = PypiIndex(root / "pypi")
    dist = root / "dist"
    files = {
        "hello-wheel": index.add(build_wheel(WHEEL, dist), "hello-wheel", WHEEL.requires_python),
        "tinybuild": index.add(build_backend_wheel(dist), "tinybuild"),
        "hello-sdist": index.add(build_sdist(SDIST, dist, in_tree_backend=False), "hello-sdist"),
    }
    project = write_project(LOCAL, root / "local-pkg")
    return MixedUpstream(root, channel, index, files, project)
