"""Render real-shaped ``pixi.lock`` files of any format version, for tests.

:func:`render_lock` writes what pixi writes, field for field and in pixi's
order, for lock format versions 4, 5, 6 and 7, so that a test can hold the
same package set in every version and check that each reader (pixicache's own
and py-rattler's) sees identical records:

* v4/v5: ``- kind: conda`` entries with ``name``, ``version``, ``build``,
  ``subdir``, ``url``... (v5 adds the environments' PyPI ``indexes``);
* v6: entries keyed ``- conda: URL``, leaving out every field rattler derives
  from the URL (name, version, build, build number, subdir, noarch);
* v7: as v6, plus the top-level ``platforms:`` list.

>>> pkg = LockPackage("conda", "https://conda.anaconda.org/conda-forge/linux-64/zlib-1.3.1-hb9d3cd8_2.conda",
...                   "ab" * 32, "zlib", "1.3.1", build="hb9d3cd8_2", build_number=2)
>>> print(render_lock({"default": {"linux-64": [pkg]}}, version=6), end="")
version: 6
environments:
  default:
    channels:
    - url: https://conda.anaconda.org/conda-forge/
    packages:
      linux-64:
      - conda: https://conda.anaconda.org/conda-forge/linux-64/zlib-1.3.1-hb9d3cd8_2.conda
packages:
- conda: https://conda.anaconda.org/conda-forge/linux-64/zlib-1.3.1-hb9d3cd8_2.conda
  sha256: abababababababababababababababababababababababababababababababab
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union
from urllib.parse import urlsplit

import yaml

__all__ = ["DEFAULT_CHANNEL", "LockPackage", "render_lock", "write_lock"]

DEFAULT_CHANNEL = "https://conda.anaconda.org/conda-forge/"
"""The channel written when ``channels`` is not given."""


_CONDA_EXTS = (".conda", ".tar.bz2")
_TRAILING_DIGITS = re.compile(r"(\d+)$")

Environments = dict[str, dict[str, list["LockPackage"]]]
Channels = Union[dict[str, list[str]], list[str], None]


@dataclass
class LockPackage:
    """One package to put in a rendered lock.

    ``url`` is the location: an ``https``/``file`` URL, or (for conda source
    packages and local PyPI packages) a path such as ``.`` or ``./dist/x.whl``.
    ``subdir`` left empty means "derive it from the URL".
    """

    kind: str
    url: str
    sha256: str | None
    name: str
    version: str
    md5: str | None = None
    size: int | None = None
    build: str = ""
    build_number: int = 0
    subdir: str = ""
    depends: list[str] = field(default_factory=list)
    noarch: str | None = None
    license: str | None = None
    timestamp: int | None = None
    requires_dist: list[str] = field(default_factory=list)
    requires_python: str | None = None
    editable: bool = False  # a PyPI path entry installed in place

    def __post_init__(self) -> None:
        if self.kind not in ("conda", "pypi"):
            raise ValueError(f"kind must be 'conda' or 'pypi', not {self.kind!r}")

    @property
    def is_url(self) -> bool:
        """True when the location is a URL (not a path)."""
        return "://" in self.url

    @property
    def effective_subdir(self) -> str:
        """``subdir``, or the one in the URL (``.../<subdir>/<file>``)."""
        if self.subdir or self.kind != "conda":
            return self.subdir
        parts = urlsplit(self.url).path.split("/") if self.is_url else []
        return parts[-2] if len(parts) >= 2 else ""

    @property
    def effective_noarch(self) -> str | None:
        """``noarch``, or rattler's guess for a package in the ``noarch`` subdir."""
        if self.noarch or self.effective_subdir != "noarch":
            return self.noarch
        return "python" if "py" in self.build else "generic"

    def sort_key(self) -> tuple[str, str, str]:
        """Order of the ``packages`` section: by name, then kind, then URL."""
        return (self.name.lower(), self.kind, self.url)


def render_lock(
    environments: Environments,
    *,
    version: int = 6,
    channels: Channels = None,
    indexes: list[str] | None = None,
) -> str:
    """Render a ``pixi.lock`` text.

    Args:
        environments: environment name -> platform name -> packages. A package
            may appear in several environments and platforms; it is written
            once in the ``packages`` section.
        version: the lock format version, 4 to 7.
        channels: the conda channels, one list for every environment or a
            mapping per environment (default: conda-forge).
        indexes: the PyPI indexes written (v5+) for environments that have
            PyPI packages (default: ``<origin>/simple`` of the first PyPI file's URL).

    Returns:
        The lock text; the same input always renders to the same bytes.

    Raises:
        ValueError: an unsupported version, or two different packages with the
            same location.
    """
    if version not in (4, 5, 6, 7):
        raise ValueError(f"cannot render lock format version {version} (4, 5, 6 or 7)")
    unique: dict[tuple[str, str], LockPackage] = {}
    for platforms in environments.values():
        for pkgs in platforms.values():
            for pkg in pkgs:
                known = unique.setdefault((pkg.kind, pkg.url), pkg)
                if known != pkg:
                    raise ValueError(f"two different {pkg.kind} packages at {pkg.url}")

    doc: dict[str, Any] = {"version": version}
    if version >= 7:
        names = sorted({p for platforms in environments.values() for p in platforms})
        doc["platforms"] = [{"name": name} for name in names]
    doc["environments"] = {
        env: _environment(env, platforms, version, channels, indexes)
        for env, platforms in environments.items()
    }
    entry = _legacy_entry if version <= 5 else _keyed_entry
    # The `packages` section: by name up to v6, by location in v7 (as rattler writes).
    key = (lambda p: p.url) if version >= 7 else LockPackage.sort_key
    doc["packages"] = [entry(p) for p in sorted(unique.values(), key=key)]
    return yaml.dump(
        doc,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=2**16,
    )


def write_lock(path: str | os.PathLike[str], environments: Environments, **kw: Any) -> Path:
    """Render (see :func:`render_lock`) and write a lock to ``path``; return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(render_lock(environments, **kw), encoding="utf-8")
    return p


# --------------------------------------------------------------------------- internals


class _Dumper(yaml.SafeDumper):
    """SafeDumper that never writes YAML aliases (a list shared by two entries)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _environment(
    env: str,
    platforms: dict[str, list[LockPackage]],
    version: int,
    channels: Channels,
    indexes: list[str] | None,
) -> dict[str, Any]:
    if channels is None:
        chans = [DEFAULT_CHANNEL]
    elif isinstance(channels, dict):
        chans = list(channels.get(env, [DEFAULT_CHANNEL]))
    else:
        chans = list(channels)
    out: dict[str, Any] = {"channels": [{"url": c} for c in chans]}
    has_pypi = any(p.kind == "pypi" for pkgs in platforms.values() for p in pkgs)
    if version >= 5 and (has_pypi or indexes):
        out["indexes"] = list(indexes or _derived_indexes(platforms))

    def ref_key(p: LockPackage) -> tuple[Any, ...]:
        # Conda before PyPI; pixi 0.2x (v6) orders by file name, rattler (v4,
        # v5, v7) by location.
        if version == 6:
            return (p.kind != "conda", p.url.rsplit("/", 1)[-1], p.url)
        return (p.kind != "conda", p.url)

    out["packages"] = {
        plat: [{p.kind: p.url} for p in sorted(pkgs, key=ref_key)]
        for plat, pkgs in platforms.items()
    }
    return out


def _derived_indexes(platforms: dict[str, list[LockPackage]]) -> list[str]:
    """``<origin>/simple`` of the first PyPI file's URL: no index host is assumed."""
    for pkgs in platforms.values():
        for p in pkgs:
            if p.kind == "pypi" and p.is_url:
                parts = urlsplit(p.url)
                return [f"{parts.scheme}://{parts.netloc}/simple"]
    raise ValueError("a lock with PyPI packages but no URL among them needs indexes=[...]")


def _derived(pkg: LockPackage) -> tuple[str | None, str | None, str | None]:
    """(name, version, build) as rattler derives them from a conda file name."""
    filename = pkg.url.rstrip("/").rsplit("/", 1)[-1]
    for ext in _CONDA_EXTS:
        if filename.endswith(ext):
            parts = filename[: -len(ext)].rsplit("-", 2)
            if len(parts) == 3:
                return parts[0], parts[1], parts[2]
    return None, None, None


def _derived_build_number(build: str) -> int:
    m = _TRAILING_DIGITS.search(build)
    return int(m.group(1)) if m else 0


def _url_subdir(pkg: LockPackage) -> str | None:
    if not pkg.is_url or _derived(pkg)[0] is None:
        return None
    parts = urlsplit(pkg.url).path.split("/")
    return parts[-2] if len(parts) >= 2 else None


def _tail(pkg: LockPackage, out: dict[str, Any]) -> dict[str, Any]:
    """The fields after the identity, in pixi's order."""
    if pkg.kind == "conda":
        if pkg.sha256:
            out["sha256"] = pkg.sha256
        if pkg.md5:
            out["md5"] = pkg.md5
        if pkg.depends:
            out["depends"] = list(pkg.depends)
        if pkg.license is not None:
            out["license"] = pkg.license
        if pkg.size is not None:
            out["size"] = pkg.size
        if pkg.timestamp is not None:
            out["timestamp"] = pkg.timestamp
    else:
        if pkg.sha256:
            out["sha256"] = pkg.sha256
        if pkg.md5:
            out["md5"] = pkg.md5
        if pkg.requires_dist:
            out["requires_dist"] = list(pkg.requires_dist)
        if pkg.requires_python:
            out["requires_python"] = pkg.requires_python
        if pkg.editable:
            out["editable"] = True
    return out


def _legacy_entry(pkg: LockPackage) -> dict[str, Any]:
    """A v4/v5 entry: ``kind`` first, every identity field spelled out."""
    out: dict[str, Any] = {"kind": pkg.kind, "name": pkg.name, "version": pkg.version}
    if pkg.kind == "pypi":
        out["url" if pkg.is_url else "path"] = pkg.url
        return _tail(pkg, out)
    if not pkg.is_url:
        raise ValueError(f"lock versions 4 and 5 cannot hold conda source package {pkg.url}")
    if pkg.build:
        out["build"] = pkg.build
    if pkg.build_number or pkg.build_number != _derived_build_number(pkg.build):
        out["build_number"] = pkg.build_number
    out["subdir"] = pkg.effective_subdir
    if pkg.effective_noarch:
        out["noarch"] = pkg.effective_noarch
    out["url"] = pkg.url
    return _tail(pkg, out)


def _keyed_entry(pkg: LockPackage) -> dict[str, Any]:
    """A v6/v7 entry keyed by location, omitting what rattler can derive."""
    out: dict[str, Any] = {pkg.kind: pkg.url}
    if pkg.kind == "pypi":
        out["name"] = pkg.name
        out["version"] = pkg.version
        return _tail(pkg, out)
    d_name, d_version, d_build = _derived(pkg)
    d_subdir = _url_subdir(pkg)
    if pkg.name != d_name:
        out["name"] = pkg.name
    if pkg.version != d_version:
        out["version"] = pkg.version
    if pkg.build != (d_build or ""):
        out["build"] = pkg.build
    if pkg.build_number != _derived_build_number(pkg.build):
        out["build_number"] = pkg.build_number
    subdir = pkg.effective_subdir
    # rattler derives the subdir from http(s) URLs only: spell it out for file:// ones
    if subdir != d_subdir or not pkg.url.startswith(("http://", "https://")):
        out["subdir"] = subdir
    base = d_subdir or subdir
    guessed = (
        ("python" if "py" in (d_build or pkg.build) else "generic") if base == "noarch" else None
    )
    if pkg.effective_noarch != guessed:
        out["noarch"] = pkg.effective_noarch
    return _tail(pkg, out)
