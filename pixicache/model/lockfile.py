"""Read ``pixi.lock`` files into the artifacts a job needs.

A :class:`Lock` is parsed from lock format versions 4, 5, 6 and 7 with the
semantics of ``rattler_lock`` (the parser inside pixi and py-rattler), but
without needing py-rattler: only PyYAML.

* Versions 4 and 5 list packages as ``- kind: conda|pypi`` with ``url:`` (or
  ``path:`` for local PyPI packages).
* Versions 6 and 7 key each package by its location (``- conda: URL`` or
  ``- pypi: URL``); ``name``, ``version``, ``build``, ``build_number``,
  ``subdir`` and ``noarch`` may be omitted and are then derived from the file
  name and the URL, exactly as rattler derives them.
* Version 7 also lists the lock's platforms at the top level
  (``platforms: [{name: linux-64}]``); an environment may only use declared
  platform names, which may be custom (``name: cuda, subdir: linux-64``).

Either entry style is accepted in any version. Environments reference packages
by location (``- conda: URL`` / ``- pypi: URL``); every reference must resolve.

What is an artifact: an entry whose location is an ``http``, ``https`` or
``file`` URL and, for conda, names a ``.conda`` / ``.tar.bz2`` archive. Source
packages (``conda: .`` or another path), local or editable PyPI packages and
``git+`` PyPI URLs are not fetchable: :meth:`Lock.artifacts` skips them, while
:meth:`Lock.packages` still returns them (an installer must know about them).
An artifact must carry a SHA-256; PyPI entries may give it as ``sha256:`` or as
the legacy ``hash: {sha256: ...}`` mapping (which rattler ignores).

Every failure raises :class:`~pixicache.errors.LockError` (exit code 2) whose
message starts with the lock's path and names the environment, platform and
entry at fault.

>>> lock = Lock.parse('''
... version: 6
... environments:
...   default:
...     channels: [{url: "https://conda.anaconda.org/conda-forge/"}]
...     packages:
...       linux-64:
...       - conda: https://conda.anaconda.org/conda-forge/noarch/tzdata-2025b-h78e105d_0.conda
... packages:
... - conda: https://conda.anaconda.org/conda-forge/noarch/tzdata-2025b-h78e105d_0.conda
...   sha256: 5aaa366385d716557e365f0a4e9c3fca43ba196872abbbe3d56bb610d131e192
...   size: 122968
... ''')
>>> [(a.filename, a.subdir, a.size) for a in lock.artifacts()]
[('tzdata-2025b-h78e105d_0.conda', 'noarch', 122968)]
>>> lock.packages(platform="linux-64")[0].noarch
'generic'
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pixicache.errors import LockError
from pixicache.model.artifact import Artifact, conda_location

__all__ = [
    "KNOWN_SUBDIRS",
    "SUPPORTED_VERSIONS",
    "Lock",
    "LockedEnvironment",
    "LockedPackage",
    "load_lock",
]

SUPPORTED_VERSIONS: tuple[int, ...] = (4, 5, 6, 7)
"""The ``version:`` values of ``pixi.lock`` that this module reads."""

KNOWN_SUBDIRS: frozenset[str] = frozenset(
    """noarch linux-32 linux-64 linux-aarch64 linux-armv6l linux-armv7l linux-loongarch64
    linux-ppc64le linux-ppc64 linux-ppc linux-s390x linux-riscv32 linux-riscv64 freebsd-32
    freebsd-64 freebsd-arm64 freebsd-ppc64le freebsd-ppc64 osx-64 osx-arm64 ios-arm64
    iossimulator-arm64 iossimulator-64 android-aarch64 android-armv7a android-64 android-32
    win-32 win-64 win-arm64 emscripten-wasm32 emscripten-wasm64 wasi-wasm32 zos-z""".split()  # noqa: SIM905
)
"""Conda subdirs that rattler knows (platform names of lock versions 4-6)."""

_SUPPORTED_TEXT = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
_FETCH_SCHEMES = ("http", "https", "file")
_CONDA_EXTS = (".conda", ".tar.bz2")
_TRAILING_DIGITS = re.compile(r"(\d+)$")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class LockedEnvironment:
    """One environment of a lock.

    Attributes:
        name: the environment's name (``default``, ``cuda``...).
        channels: the conda channel URLs as the lock writes them.
        indexes: the PyPI index URLs, if the environment has any.
        platforms: the platform names the environment is locked for.
    """

    name: str
    channels: tuple[str, ...]
    indexes: tuple[str, ...]
    platforms: tuple[str, ...]


@dataclass
class LockedPackage:
    """One package entry of a lock, with the fields an installer needs.

    Fields the lock omits are derived as rattler derives them (name, version
    and build from a conda file name; subdir from the URL; build number from the
    build string; ``noarch`` from subdir and build). ``url`` is the location as
    written: a URL, or a path for source and local packages. ``raw`` is the
    entry exactly as the lock holds it.
    """

    kind: str
    url: str
    sha256: str | None
    md5: str | None
    size: int | None
    name: str
    version: str
    build: str = ""
    build_number: int = 0
    subdir: str = ""
    depends: list[str] = field(default_factory=list)
    constrains: list[str] = field(default_factory=list)
    noarch: str | None = None
    license: str | None = None
    timestamp: int | None = None
    requires_dist: list[str] = field(default_factory=list)
    requires_python: str | None = None
    editable: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def filename(self) -> str:
        """The last path component of the location (may be ``.`` for a source)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def fetchable(self) -> bool:
        """True when this entry is a downloadable artifact (see the module doc)."""
        scheme = _scheme(self.url)
        if scheme not in _FETCH_SCHEMES:
            return False
        if self.kind == "conda":
            return _archive_stem(self.filename) is not None
        return True

    def artifact(self) -> Artifact:
        """This entry as an :class:`~pixicache.model.artifact.Artifact`.

        Raises:
            LockError: the entry is not fetchable or has no valid SHA-256.
        """
        if not self.fetchable:
            raise LockError(f"{self.kind} entry {self.url} is not a downloadable artifact")
        if not self.sha256 and not self.md5:
            raise LockError(f"{self.kind} entry {self.url} has no sha256 (and no md5)")
        channel = subdir = None
        if self.kind == "conda":
            channel, subdir, _ = conda_location(self.url)
            subdir = self.subdir or subdir
        return Artifact(
            url=self.url,
            sha256=self.sha256,
            size=self.size,
            filename=self.filename,
            kind=self.kind,
            md5=self.md5,
            channel=channel,
            subdir=subdir,
            extra={"name": self.name, "version": self.version},
        )


@dataclass
class _Env:
    locked: LockedEnvironment
    # platform name -> references, each (kind, location, selector mapping)
    refs: dict[str, list[tuple[str, str, dict[str, Any]]]]


# --------------------------------------------------------------------------- Lock


class Lock:
    """A parsed ``pixi.lock``.

    Build one with :meth:`load` (a file) or :meth:`parse` (text). Parsing checks
    the structure and that every reference resolves; per-artifact checks (a
    SHA-256 is present) happen in :meth:`artifacts`, where the message can name
    the environment and platform that need the entry.
    """

    path: Path
    version: int

    def __init__(
        self,
        path: Path,
        version: int,
        environments: dict[str, _Env],
        packages: list[LockedPackage],
        platform_subdirs: dict[str, str],
        platform_virtual_packages: dict[str, list[str]] | None = None,
    ) -> None:
        self.path = path
        self.version = version
        self._envs = environments
        self._packages = packages
        self._platform_subdirs = platform_subdirs
        self._platform_vps = dict(platform_virtual_packages or {})
        self._index: dict[tuple[str, str], list[LockedPackage]] = {}
        for pkg in packages:
            self._index.setdefault((pkg.kind, pkg.url), []).append(pkg)
        # (env, platform) -> packages, every reference resolved (and checked) once
        self._resolved: dict[tuple[str, str], list[LockedPackage]] = {}
        self._resolve_all()
        # (env, platform, require_sha256) -> artifacts: the lock is immutable once read
        self._artifacts: dict[tuple[str | None, str | None, bool], list[Artifact]] = {}

    def __repr__(self) -> str:
        return (
            f"Lock({str(self.path)!r}, version={self.version}, environments={self.environments()})"
        )

    # ------------------------------------------------------------ constructors

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Lock:
        """Read and parse the lock at ``path``.

        Raises:
            LockError: the file cannot be read or is not a usable lock.
        """
        p = Path(path)
        return cls._from_bytes(_read_lock(p), p)

    @classmethod
    def load_cached(cls, path: str | os.PathLike[str], cache_dir: Path | None) -> Lock:
        """:meth:`load`, through a cache of parsed locks in ``cache_dir``.

        A job on a warm node reads the lock it ran before: parsing it again (PyYAML's
        pure-Python loader in the bundle: ~0.1 s for 121 packages) is then replaced by
        loading the :class:`Lock` pickled the first time, under a key made of the
        SHA-256 of the lock's bytes, the interpreter's cache tag and the identity of
        this module's source (:func:`_cache_key`): any change to the lock or to this
        code reads it afresh. ``cache_dir`` must be a directory of this user's alone
        (the store's user area: pickles run code when loaded, so an entry is read only
        when it is a regular file of this user's, writable by nobody else).
        ``None``, or a cache that cannot be read or written, is :meth:`load`.

        Raises:
            LockError: as :meth:`load`.
        """
        p = Path(path)
        data = _read_lock(p)
        if cache_dir is None:
            return cls._from_bytes(data, p)
        from pixicache.model import lockcache

        entry = cache_dir / _cache_key(data)
        lock = lockcache.read(entry, cls)
        if lock is None:
            lock = cls._from_bytes(data, p)
            lockcache.write(entry, lock)
        lock.path = p
        return lock

    @classmethod
    def _from_bytes(cls, data: bytes, p: Path) -> Lock:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LockError(f"{p}: not a text file (invalid UTF-8 at byte {exc.start})") from exc
        return cls.parse(text, str(p))

    @classmethod
    def parse(cls, text: str, path: str = "<string>") -> Lock:
        """Parse lock ``text``; ``path`` is only used in messages and :attr:`path`.

        Raises:
            LockError: malformed YAML, an unsupported version, a missing or
                malformed section, or a reference that does not resolve.
        """
        from pixicache.model.lockyaml import load_document  # PyYAML: only on a cache miss

        doc = load_document(text, path)
        return _Parser(path, doc).build(cls)

    # ------------------------------------------------------------ queries

    def environments(self) -> list[str]:
        """The environment names, in the order the lock lists them."""
        return list(self._envs)

    def environment(self, name: str) -> LockedEnvironment:
        """The environment called ``name``.

        Raises:
            LockError: there is no such environment (the message lists those that exist).
        """
        return self._env(name).locked

    def platforms(self, env: str = "default") -> list[str]:
        """The platform names environment ``env`` is locked for."""
        return list(self._env(env).locked.platforms)

    def platform_subdir(self, platform: str) -> str:
        """The conda subdir of a platform name (differs only for custom v7 names)."""
        return self._platform_subdirs.get(platform, platform)

    def platform_virtual_packages(self, platform: str) -> list[str] | None:
        """The virtual packages a v7 lock declares for ``platform`` (``__cuda=12.6``...),
        or ``None`` when the lock does not say (v4-v6, or a plain platform)."""
        return self._platform_vps.get(platform)

    def packages(self, env: str = "default", platform: str | None = None) -> list[LockedPackage]:
        """Every package of ``env`` on ``platform``, in lock order, sources included.

        ``platform`` may be omitted when the environment has a single platform.

        Raises:
            LockError: unknown environment or platform, or ``platform`` omitted
                while the environment has several.
        """
        e = self._env(env)
        if platform is None:
            if len(e.refs) != 1:
                raise LockError(
                    f"{self.path}: environment '{env}' is locked for "
                    f"{_names(e.refs) or 'no platform'}; choose one platform"
                )
            platform = next(iter(e.refs))
        return list(self._platform_packages(env, platform))

    def artifacts(
        self,
        env: str | None = "default",
        platform: str | None = None,
        *,
        require_sha256: bool = False,
    ) -> list[Artifact]:
        """The downloadable artifacts of an environment and platform.

        Args:
            env: an environment name, or ``None`` for every environment.
            platform: a platform name, or ``None`` for every platform of the
                selected environment(s).
            require_sha256: refuse entries pinned by MD5 alone (some sites want
                every artifact pinned by SHA-256); by default they are artifacts
                verified by MD5 and size, as Pixi and rattler accept them.

        Returns:
            One :class:`Artifact` per distinct URL, in lock order (environments,
            then platforms, then each platform's package list). Source, local
            and ``git+`` packages are skipped.

        Raises:
            LockError: the environment or platform does not exist, or an
                artifact has no SHA-256 (the message names file, environment,
                platform and URL).
        """
        memo = self._artifacts.get((env, platform, require_sha256))
        if memo is None:
            memo = self._artifacts[(env, platform, require_sha256)] = self._collect_artifacts(
                env, platform, require_sha256
            )
        return list(memo)

    def _collect_artifacts(
        self, env: str | None, platform: str | None, require_sha256: bool
    ) -> list[Artifact]:
        envs = self.environments() if env is None else [self._env(env).locked.name]
        selected: list[tuple[str, str]] = []
        for name in envs:
            plats = list(self._envs[name].refs)
            if platform is None:
                selected.extend((name, p) for p in plats)
            elif platform in self._envs[name].refs:
                selected.append((name, platform))
            elif env is not None:
                raise self._no_platform(name, platform)
        if env is None and platform is not None and not selected:
            every = sorted({p for e in self._envs.values() for p in e.refs})
            raise LockError(
                f"{self.path}: no environment is locked for platform '{platform}' "
                f"(platforms in this lock: {', '.join(every) or 'none'})"
            )

        seen: set[str] = set()
        out: list[Artifact] = []
        for name, plat in selected:
            for pkg in self._platform_packages(name, plat):
                if pkg.url in seen or not pkg.fetchable:
                    continue
                if not pkg.sha256 and (require_sha256 or not pkg.md5):
                    why = (
                        "pinned by md5 alone, and sha256 is required here (--require-sha256 / "
                        "require_sha256 in the config): ask the channel for sha256 digests or "
                        "drop the requirement"
                        if pkg.md5 and require_sha256
                        else "has no sha256, so pixicache cannot verify it; re-create the lock "
                        "with a recent pixi (`pixi lock`)"
                    )
                    raise LockError(
                        f"{self.path}: environment '{name}', platform '{plat}': {pkg.kind} "
                        f"package {pkg.url} {why}"
                    )
                seen.add(pkg.url)
                out.append(pkg.artifact())
        return out

    # ------------------------------------------------------------ internals

    def _env(self, name: str) -> _Env:
        try:
            return self._envs[name]
        except KeyError:
            raise LockError(
                f"{self.path}: no environment '{name}' in the lock "
                f"(environments: {_names(self._envs) or 'none'})"
            ) from None

    def _no_platform(self, env: str, platform: str) -> LockError:
        return LockError(
            f"{self.path}: environment '{env}' is not locked for platform '{platform}' "
            f"(platforms of '{env}': {_names(self._envs[env].refs) or 'none'})"
        )

    def _platform_packages(self, env: str, platform: str) -> list[LockedPackage]:
        e = self._env(env)
        if platform not in e.refs:
            raise self._no_platform(env, platform)
        return self._resolved[(env, platform)]

    def _resolve(
        self, env: str, platform: str, kind: str, location: str, selector: dict[str, Any]
    ) -> LockedPackage:
        candidates = self._index.get((kind, location))
        if not candidates:
            raise LockError(
                f"{self.path}: environment '{env}', platform '{platform}' refers to {kind} "
                f"package {location}, which is not in the `packages` section"
            )
        if len(candidates) == 1:
            return candidates[0]
        # Several entries share a location (v6/v7 source packages told apart by
        # name and variants, or binaries listed once per subdir): pick as rattler
        # does, else the first.
        subdir = self.platform_subdir(platform)
        for pkg in candidates:
            if selector.get("name") and pkg.name != str(selector["name"]):
                continue
            variants = selector.get("variants") or {}
            raw_variants = pkg.raw.get("variants") or {}
            if any(raw_variants.get(k) != v for k, v in variants.items()):
                continue
            binary = kind == "conda" and _archive_stem(pkg.filename) and pkg.subdir
            if binary and pkg.subdir not in (subdir, "noarch"):
                continue
            return pkg
        return candidates[0]

    def _resolve_all(self) -> None:
        for name, e in self._envs.items():
            for plat, refs in e.refs.items():
                resolved = self._resolved[(name, plat)] = []
                for kind, location, selector in refs:
                    pkg = self._resolve(name, plat, kind, location, selector)
                    resolved.append(pkg)
                    if self.version >= 7 and kind == "conda" and pkg.fetchable:
                        subdir = self.platform_subdir(plat)
                        if pkg.subdir not in (subdir, "noarch"):
                            raise LockError(
                                f"{self.path}: environment '{name}', platform '{plat}' refers "
                                f"to {location}, a package for subdir '{pkg.subdir}' "
                                f"(expected '{subdir}' or 'noarch')"
                            )


def _read_lock(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as exc:
        raise LockError(f"{p}: cannot read the lock file: {exc.strerror or exc}") from exc


def _cache_key(data: bytes) -> str:
    """The cache entry's name for a lock whose bytes are ``data`` (see :meth:`Lock.load_cached`)."""
    import hashlib
    import sys

    from pixicache.model import artifact

    h = hashlib.sha256(data)
    for module in (__file__, artifact.__file__):
        try:
            st = os.stat(module)
            h.update(f"\0{module}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        except OSError:  # no source to identify (a zip import): never reuse an entry
            h.update(os.urandom(16))
    return f"{h.hexdigest()[:40]}.{sys.implementation.cache_tag}.pickle"


def load_lock(path: str | os.PathLike[str]) -> Lock:
    """Read and parse the ``pixi.lock`` at ``path`` (see :meth:`Lock.load`)."""
    return Lock.load(path)


# --------------------------------------------------------------------------- parsing


class _Parser:
    """Turns the YAML document of one lock into a :class:`Lock`."""

    def __init__(self, path: str, doc: Any) -> None:
        self.path = path
        self.doc = doc

    def fail(self, message: str) -> LockError:
        return LockError(f"{self.path}: {message}")

    def build(self, cls: type[Lock]) -> Lock:
        doc = self.doc
        if not isinstance(doc, dict):
            raise self.fail(
                "not a pixi lock file: expected a mapping with `version`, `environments` "
                f"and `packages`, found {_type_name(doc)}"
            )
        version = self.version(doc)
        platform_subdirs = self.declared_platforms(doc, version)
        envs_doc = doc.get("environments")
        if not isinstance(envs_doc, dict):
            raise self.fail(
                "missing `environments` section"
                if envs_doc is None
                else f"`environments` must be a mapping, found {_type_name(envs_doc)}"
            )
        pkgs_doc = doc.get("packages")
        if pkgs_doc is None:
            raise self.fail("missing `packages` section")
        if not isinstance(pkgs_doc, list):
            raise self.fail(f"`packages` must be a list, found {_type_name(pkgs_doc)}")

        packages = [self.package(i, entry, version) for i, entry in enumerate(pkgs_doc)]
        self.check_duplicates(packages)
        environments = {
            str(name): self.environment(str(name), env_doc, version, platform_subdirs)
            for name, env_doc in envs_doc.items()
        }
        return cls(
            Path(self.path), version, environments, packages, platform_subdirs,
            self.declared_virtual_packages(doc),
        )  # fmt: skip

    def version(self, doc: dict[str, Any]) -> int:
        if "version" not in doc:
            raise self.fail(
                f"no `version` field: not a pixi lock file? (supported versions: {_SUPPORTED_TEXT})"
            )
        v = doc["version"]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(
                f"`version` must be an integer, found {v!r} (supported versions: {_SUPPORTED_TEXT})"
            )
        if v in SUPPORTED_VERSIONS:
            return v
        if v > max(SUPPORTED_VERSIONS):
            raise self.fail(
                f"lock format version {v} is newer than this pixicache supports "
                f"(supported versions: {_SUPPORTED_TEXT}); upgrade pixicache"
            )
        raise self.fail(
            f"lock format version {v} is not supported (supported versions: "
            f"{_SUPPORTED_TEXT}); re-create the lock with a recent pixi (`pixi lock`)"
        )

    def declared_platforms(self, doc: dict[str, Any], version: int) -> dict[str, str]:
        """Top-level ``platforms:`` (v7): name -> subdir. Empty when absent."""
        raw = doc.get("platforms")
        if raw is None:
            if version >= 7:
                raise self.fail("missing `platforms` section (required by lock format version 7)")
            return {}
        if not isinstance(raw, list):
            raise self.fail(f"`platforms` must be a list, found {_type_name(raw)}")
        out: dict[str, str] = {}
        for item in raw:
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or not item.get("name"):
                raise self.fail(f"`platforms` entry {item!r} has no `name`")
            name = str(item["name"])
            subdir = str(item.get("subdir") or name)
            if subdir not in KNOWN_SUBDIRS:
                raise self.fail(
                    f"platform '{name}' has unknown subdir '{subdir}' "
                    "(give `subdir:` one of the conda subdirs, e.g. linux-64)"
                )
            if name in out:
                raise self.fail(f"platform '{name}' is declared twice in `platforms`")
            out[name] = subdir
        return out

    def declared_virtual_packages(self, doc: dict[str, Any]) -> dict[str, list[str]]:
        """``virtual-packages`` of each top-level ``platforms:`` entry that lists them (v7)."""
        out: dict[str, list[str]] = {}
        for item in doc.get("platforms") or []:
            if not isinstance(item, dict):
                continue
            vps = item.get("virtual-packages", item.get("virtual_packages"))
            if vps is None:
                continue
            if not isinstance(vps, list) or not all(isinstance(v, str) for v in vps):
                raise self.fail(f"platform {item.get('name')!r}: `virtual-packages` must be a list of strings")
            out[str(item.get("name"))] = list(vps)
        return out

    def environment(self, name: str, doc: Any, version: int, declared: dict[str, str]) -> _Env:
        if not isinstance(doc, dict):
            raise self.fail(f"environment '{name}' must be a mapping, found {_type_name(doc)}")
        channels = tuple(self.channel(name, c) for c in self.seq(doc.get("channels"), f"environment '{name}': `channels`"))
        indexes = tuple(str(i) for i in self.seq(doc.get("indexes"), f"environment '{name}': `indexes`"))
        pkgs = doc.get("packages")
        if pkgs is None:
            pkgs = {}
        if not isinstance(pkgs, dict):
            raise self.fail(
                f"environment '{name}': `packages` must map platforms to lists, "
                f"found {_type_name(pkgs)}"
            )
        refs: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
        for plat, items in pkgs.items():
            plat = str(plat)
            if declared:
                if plat not in declared:
                    raise self.fail(
                        f"environment '{name}' uses platform '{plat}', which the lock's "
                        f"`platforms` section does not declare (declared: {_names(declared)})"
                    )
            elif plat not in KNOWN_SUBDIRS:
                raise self.fail(f"environment '{name}' uses unknown platform '{plat}'")
            refs[plat] = [
                self.reference(name, plat, item)
                for item in self.seq(items, f"environment '{name}', platform '{plat}'")
            ]
        locked = LockedEnvironment(name, channels, indexes, tuple(refs))
        return _Env(locked, refs)

    def seq(self, value: Any, where: str) -> list[Any]:
        """A list field (absent or null: empty); anything else is an error naming it."""
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(f"{where} must be a list, found {_type_name(value)}")
        return value

    def channel(self, env: str, item: Any) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, dict) and item.get("url"):
            return str(item["url"])
        raise self.fail(f"environment '{env}': channel {item!r} has no `url`")

    def reference(self, env: str, plat: str, item: Any) -> tuple[str, str, dict[str, Any]]:
        if isinstance(item, dict):
            for kind in ("conda", "pypi"):
                loc = item.get(kind)
                if loc:
                    return kind, str(loc), item
        raise self.fail(
            f"environment '{env}', platform '{plat}': package reference {item!r} "
            "is neither `- conda: URL` nor `- pypi: URL`"
        )

    # ------------------------------------------------------------ entries

    def package(self, index: int, entry: Any, version: int) -> LockedPackage:
        if not isinstance(entry, dict):
            raise self.fail(f"`packages` entry #{index + 1} must be a mapping, found {entry!r}")
        if "kind" in entry:  # versions 4 and 5
            kind = entry.get("kind")
            if kind not in ("conda", "pypi"):
                raise self.fail(f"`packages` entry #{index + 1} has unknown kind {kind!r}")
            location = entry.get("url") or entry.get("path")
            legacy = True
        elif entry.get("conda"):
            kind, location, legacy = "conda", entry["conda"], False
        elif entry.get("pypi"):
            kind, location, legacy = "pypi", entry["pypi"], False
        else:
            raise self.fail(
                f"`packages` entry #{index + 1} has neither `conda:` nor `pypi:` "
                f"(nor `kind:`); keys: {', '.join(map(str, entry)) or 'none'}"
            )
        if not location:
            raise self.fail(f"`packages` entry #{index + 1} ({kind}) has no `url` or `path`")
        location = str(location)
        sha256 = self.digest(entry.get("sha256"), 64, "sha256", location)
        md5 = self.digest(entry.get("md5"), 32, "md5", location)
        if kind == "pypi" and sha256 is None and isinstance(entry.get("hash"), dict):
            sha256 = self.digest(entry["hash"].get("sha256"), 64, "sha256", location)
            md5 = md5 or self.digest(entry["hash"].get("md5"), 32, "md5", location)
        if kind == "conda":
            return self.conda(entry, location, sha256, md5, legacy)
        return LockedPackage(
            kind="pypi",
            url=location,
            sha256=sha256,
            md5=md5,
            size=self.uint(entry, "size", location),
            name=str(entry.get("name") or ""),
            version=_str(entry.get("version")),
            requires_dist=self.strings(entry, "requires_dist", location),
            requires_python=_str_or_none(entry.get("requires_python")),
            editable=bool(entry.get("editable", False)),
            raw=entry,
        )

    def uint(self, entry: dict[str, Any], key: str, location: str) -> int | None:
        """A non-negative integer field (``size``, ``build_number``, ``timestamp``), as
        rattler reads it (an unsigned 64-bit number), or ``None`` when absent."""
        value = entry.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
            shown = repr(value) if not isinstance(value, int) else str(value)[:20]
            raise self.fail(
                f"{location}: `{key}` must be a whole number of 0 or more, not {shown[:60]}"
            )
        return value

    def strings(self, entry: dict[str, Any], key: str, location: str) -> list[str]:
        """A list-of-strings field (``depends``...); absent is empty."""
        value = entry.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            raise self.fail(f"{location}: `{key}` must be a list of strings, not {_type_name(value)}")
        return [str(v) for v in value]

    def conda(
        self,
        entry: dict[str, Any],
        location: str,
        sha256: str | None,
        md5: str | None,
        legacy: bool,
    ) -> LockedPackage:
        filename = location.rstrip("/").rsplit("/", 1)[-1]
        stem = _archive_stem(filename)
        d_name = d_version = d_build = None
        if stem is not None:
            parts = stem.rsplit("-", 2)
            if len(parts) == 3:
                d_name, d_version, d_build = parts
        d_subdir = _url_subdir(location) if stem is not None else None

        name = _str_or_none(entry.get("name")) or d_name
        version = _str_or_none(entry.get("version")) or d_version
        if not name or not version:
            missing = "name" if not name else "version"
            raise self.fail(f"conda entry {location} has no `{missing}` and none can be derived")
        build = _str_or_none(entry.get("build")) or d_build or ""
        build_number = self.uint(entry, "build_number", location)
        if build_number is None:
            m = _TRAILING_DIGITS.search(build)
            build_number = int(m.group(1)) if m else 0
        subdir = _str_or_none(entry.get("subdir")) or d_subdir or ""
        if "noarch" in entry:
            noarch = _noarch(entry["noarch"])
        elif (d_subdir or subdir) == "noarch":  # rattler's heuristic
            noarch = "python" if "py" in (d_build or build) else "generic"
        else:
            noarch = None
        return LockedPackage(
            kind="conda",
            url=location,
            sha256=sha256,
            md5=md5,
            size=self.uint(entry, "size", location),
            name=name,
            version=version,
            build=build,
            build_number=build_number,
            subdir=subdir,
            depends=self.strings(entry, "depends", location),
            constrains=self.strings(entry, "constrains", location),
            noarch=noarch,
            license=_str_or_none(entry.get("license")),
            timestamp=self.uint(entry, "timestamp", location),
            raw=entry,
        )

    def digest(self, value: Any, length: int, label: str, location: str) -> str | None:
        if value is None or value == "":
            return None
        text = str(value).strip().lower()
        if len(text) != length or not all(c in "0123456789abcdef" for c in text):
            raise self.fail(
                f"entry {location} has a malformed {label} {str(value)!r} "
                f"(expected {length} hexadecimal digits)"
            )
        return text

    def check_duplicates(self, packages: Iterable[LockedPackage]) -> None:
        seen: dict[tuple[str, str], str] = {}
        for pkg in packages:
            if not pkg.sha256:
                continue
            key = (pkg.kind, pkg.url)
            other = seen.setdefault(key, pkg.sha256)
            if other != pkg.sha256:
                raise self.fail(
                    f"{pkg.kind} package {pkg.url} is listed twice with different digests: "
                    f"sha256 {other} and sha256 {pkg.sha256}; the lock is inconsistent, "
                    "re-create it with `pixi lock`"
                )


# --------------------------------------------------------------------------- helpers


def _scheme(location: str) -> str:
    if "://" not in location:
        return ""
    return urlsplit(location).scheme.lower()


def _archive_stem(filename: str) -> str | None:
    for ext in _CONDA_EXTS:
        if filename.endswith(ext) and len(filename) > len(ext):
            return filename[: -len(ext)]
    return None


def _url_subdir(location: str) -> str | None:
    """The subdir rattler derives from ``scheme://.../<subdir>/<archive>``."""
    if _scheme(location) not in _FETCH_SCHEMES:
        return None
    segments = urlsplit(location).path.split("/")
    if len(segments) < 2:
        return None
    subdir = segments[-2]
    return subdir if subdir in KNOWN_SUBDIRS else None


def _noarch(value: Any) -> str | None:
    if value is None or value is False:
        return None
    if value is True:  # very old records wrote `noarch: true` for generic
        return "generic"
    return str(value)


def _int_or_none(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _names(mapping: Iterable[str]) -> str:
    return ", ".join(str(k) for k in mapping)


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    names: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)
