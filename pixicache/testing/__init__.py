"""Real conda packages, channels, locks and an HTTP upstream for tests, demos and benchmarks.

Everything here is real: the packages install with conda, rattler or Pixi;
the server is an HTTP/1.1 server on 127.0.0.1; the locks are read by py-rattler.
Sites can use it in their own tests, as they would use respx or pytest-httpserver.

* :mod:`~pixicache.testing.conda_package`: :func:`build_conda_package` writes
  ``.conda`` / ``.tar.bz2`` files from a :class:`PackageSpec`.
* :mod:`~pixicache.testing.channel`: :func:`build_channel` (a channel tree with
  ``repodata.json``), :func:`build_demo_channel`, :class:`Channel` (its lock).
* :mod:`~pixicache.testing.locks`: :func:`render_lock` / :func:`write_lock` for
  real-shaped ``pixi.lock`` files of versions 4 to 7.
* :mod:`~pixicache.testing.server`: :class:`UpstreamServer`, with request
  counting and fault injection.
* :mod:`~pixicache.testing.workload`: size-faithful synthetic workloads of a
  real lock (random blobs, or installable packages).
* :mod:`~pixicache.testing.condor`: an HTCondor job's sandbox environment and
  ads, to run the real ``bootstrap.sh`` without a pool.
"""

from __future__ import annotations

from pixicache.testing.channel import (
    DEFAULT_UPSTREAM,
    Channel,
    build_channel,
    build_demo_channel,
    build_python_shim,
    current_subdir,
    demo_channel_specs,
    repodata,
)
from pixicache.testing.conda_package import (
    PLACEHOLDER,
    BuiltPackage,
    FileSpec,
    PackageSpec,
    build_conda_package,
    package_filename,
)
from pixicache.testing.locks import LockPackage, render_lock, write_lock
from pixicache.testing.server import FAULT_KINDS, Fault, RequestRecord, UpstreamServer
from pixicache.testing.workload import (
    Workload,
    WorkloadArtifact,
    default_lock_path,
    make_blob_workload,
    make_package_workload,
)

__all__ = [
    "DEFAULT_UPSTREAM",
    "FAULT_KINDS",
    "PLACEHOLDER",
    "BuiltPackage",
    "Channel",
    "Fault",
    "FileSpec",
    "LockPackage",
    "PackageSpec",
    "RequestRecord",
    "UpstreamServer",
    "Workload",
    "WorkloadArtifact",
    "build_channel",
    "build_conda_package",
    "build_demo_channel",
    "build_python_shim",
    "current_subdir",
    "default_lock_path",
    "demo_channel_specs",
    "make_blob_workload",
    "make_package_workload",
    "package_filename",
    "render_lock",
    "repodata",
    "write_lock",
]
