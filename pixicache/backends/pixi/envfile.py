"""The environment file Pixi keeps in ``<prefix>/conda-meta/pixi``, written as Pixi writes it.

When an installer other than Pixi makes the prefix, a later ``pixi run`` (or
``pixi shell``) in the workspace reads this file to decide whether the
environment is current; without it (or with a wrong hash) Pixi re-validates the
whole prefix against the lock first. :func:`write_environment_file` writes what
Pixi 0.79 writes after an install, so Pixi sees the environment as up to date.

What Pixi reads and writes (``pixi_core::environment::EnvironmentFile``, checked in
Pixi's source at the pinned release line; serialized with ``serde_json``'s pretty
printer, in this field order)::

    {
      "manifest_path": "/abs/pixi.toml",
      "environment_name": "default",
      "pixi_version": "0.79.0",
      "environment_lock_file_hash": "bf19dda66e2d1340",
      "resolved_platform": {"subdir": "linux-64", "virtual_packages": ["__archspec=0=x86_64", ...]},
      "minimum_supported_platform": null
    }

Only ``environment_lock_file_hash`` decides freshness: ``pixi run`` recomputes it
from the lock and skips the install when it is equal (``UpdateMode::QuickValidate``).
It is ``xxh3_64`` (seed 0; :mod:`pixicache.backends.pixi.xxh3`) over Rust's ``Hash``
encoding of, in order:

* each package of the environment and platform, in rattler_lock's order (conda
  binary packages sorted by URL, then PyPI packages sorted by location): the
  location (UTF-8 bytes and ``0xFF``), and for a conda package its SHA-256, else
  its MD5 (an 8-byte little-endian length, then the raw digest bytes);
* the platform's subdir, then its declared virtual packages, sorted, each as
  ``name=version[=build]``: the lock's ``virtual-packages`` for a v7 platform that
  lists them, else the subdir's defaults (``__unix=0=0``, ``__linux=4.18``,
  ``__glibc=2.28``, ``__archspec=0=x86_64`` on linux-64) merged under the
  manifest's ``[system-requirements]`` (``cuda = "12.9"`` → ``__cuda=12.9``).

The hash is printed in lower-case hex without padding (Rust's ``{:x}``).
``minimum_supported_platform`` is written ``null``, which Pixi reads as "nothing
to check". An environment with conda *source* packages is always re-validated by
Pixi, whatever the file says.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixicache.backends.pixi.xxh3 import xxh3_64

if TYPE_CHECKING:
    from pixicache.model.lockfile import Lock, LockedPackage
    from pixicache.model.manifest import Manifest

__all__ = [
    "ENVIRONMENT_FILE",
    "declared_virtual_packages",
    "environment_file",
    "locked_environment_hash",
    "write_environment_file",
]

ENVIRONMENT_FILE = "pixi"
"""``<prefix>/conda-meta/pixi`` (Pixi's ``ENVIRONMENT_FILE_NAME``)."""

_ARCHSPEC = {
    "linux-64": "x86_64",
    "osx-64": "x86_64",
    "win-64": "x86_64",
    "linux-aarch64": "aarch64",
    "win-arm64": "aarch64",
    "osx-arm64": "m1",
    "linux-ppc64le": "ppc64le",
    "linux-s390x": "s390x",
}
_SYSREQ_NAMES = {"linux": "__linux", "cuda": "__cuda", "macos": "__osx"}


def _default_virtual_packages(subdir: str) -> list[tuple[str, str, str]]:
    """Pixi's ``subdir_default_virtual_packages``: (name, version, build)."""
    out: list[tuple[str, str, str]] = []
    if not subdir.startswith("win-"):
        out.append(("__unix", "0", "0"))
    if subdir.startswith("linux-"):
        out += [("__linux", "4.18", ""), ("__glibc", "2.28", "")]
    if subdir.startswith("win-"):
        out.append(("__win", "10.0", ""))
    if subdir.startswith("osx-"):
        out.append(("__osx", "13.0", ""))
    if subdir in _ARCHSPEC:
        out.append(("__archspec", "0", _ARCHSPEC[subdir]))
    return out


def _sysreq_virtual_packages(tables: list[tuple[str, dict[str, Any]]], subdir: str) -> dict[str, tuple[str, str]]:
    """``[system-requirements]`` as virtual packages (later tables win), for ``subdir``."""
    out: dict[str, tuple[str, str]] = {}
    for _, table in tables:
        for key, value in table.items():
            if key == "libc":
                family, version = "glibc", value
                if isinstance(value, dict):
                    family, version = str(value.get("family", "glibc")), value.get("version")
                name = f"__{family}"
            else:
                name = _SYSREQ_NAMES.get(key, "")
                version = value
            if not name or version is None:
                continue
            linux_only = name in ("__linux", "__glibc", "__musl", "__eglibc")
            if (linux_only and not subdir.startswith("linux-")) or (
                (name == "__osx" and not subdir.startswith("osx-"))
                or (name == "__cuda" and subdir.startswith("osx-"))
            ):
                continue
            out[name] = (str(version), "")
    return out


def declared_virtual_packages(
    lock: Lock, environment: str, platform: str, manifest: Manifest | None
) -> list[str]:
    """The platform's declared virtual packages as Pixi renders them (``name=version[=build]``)."""
    listed = lock.platform_virtual_packages(platform)
    if listed is not None:
        return list(listed)
    subdir = lock.platform_subdir(platform)
    tables = manifest.system_requirement_tables(environment) if manifest is not None else []
    declared = _sysreq_virtual_packages(tables, subdir)
    has_libc = any(n in declared for n in ("__glibc", "__musl", "__eglibc"))
    merged = {n: v for n, v in declared.items()}
    for name, version, build in _default_virtual_packages(subdir):
        if name == "__glibc" and has_libc:
            continue
        merged.setdefault(name, (version, build))
    return [f"{n}={v}" + (f"={b}" if b else "") for n, (v, b) in merged.items()]


def _rust_str(text: str) -> bytes:
    return text.encode("utf-8") + b"\xff"


def _rust_bytes(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def locked_environment_hash(
    packages: list[LockedPackage], subdir: str, virtual_packages: list[str]
) -> str:
    """Pixi's ``LockedEnvironmentHash`` of these packages on this platform (see the module doc)."""
    conda = sorted((p for p in packages if p.kind == "conda" and p.fetchable), key=lambda p: p.url.encode())
    pypi = sorted((p for p in packages if p.kind == "pypi"), key=lambda p: p.url.encode())
    data = bytearray()
    for pkg in conda:
        data += _rust_str(pkg.url)
        if pkg.sha256:
            data += _rust_bytes(bytes.fromhex(pkg.sha256))
        elif pkg.md5:
            data += _rust_bytes(bytes.fromhex(pkg.md5))
    for pkg in pypi:
        data += _rust_str(pkg.url)
    data += _rust_str(subdir)
    for vp in sorted(virtual_packages):
        data += _rust_str(vp)
    return format(xxh3_64(bytes(data)), "x")


def environment_file(
    manifest: Manifest, lock: Lock, environment: str, platform: str, pixi_version: str
) -> dict[str, Any]:
    """The content of ``conda-meta/pixi`` for an installed environment (see the module doc)."""
    subdir = lock.platform_subdir(platform)
    vps = declared_virtual_packages(lock, environment, platform, manifest)
    packages = lock.packages(environment, platform)
    return {
        "manifest_path": str(manifest.path),
        "environment_name": environment,
        "pixi_version": pixi_version,
        "environment_lock_file_hash": locked_environment_hash(packages, subdir, vps),
        "resolved_platform": {"subdir": subdir, "virtual_packages": vps},
        "minimum_supported_platform": None,
    }


def write_environment_file(prefix: str | os.PathLike[str], content: dict[str, Any]) -> Path:
    """Write ``<prefix>/conda-meta/pixi`` atomically (Pixi's pretty JSON, 2-space indent)."""
    meta = Path(prefix) / "conda-meta"
    path = meta / ENVIRONMENT_FILE
    tmp = meta / f".{ENVIRONMENT_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(content, indent=2))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path
