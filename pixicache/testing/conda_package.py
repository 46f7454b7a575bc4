"""Write real conda packages (``.conda`` and ``.tar.bz2``) with the standard library.

The packages are what conda, rattler and Pixi install: an ``info/`` directory
(``index.json``, ``paths.json``, ``files``, and ``link.json`` for ``noarch:
python`` packages with entry points) beside the files that go into the prefix.
A file that holds the build prefix is recorded in ``paths.json`` with its
``prefix_placeholder`` and ``file_mode`` (``text`` or ``binary``), so the
installer rewrites it to the real prefix, exactly as for a conda-build package.

Output is deterministic: for the same :class:`PackageSpec` the archive has the
same bytes (fixed modification times, sorted entries, no user names), hence the
same SHA-256, on every build and every machine.

Formats:

* ``.conda``: a stored (uncompressed) zip holding ``metadata.json``, then
  ``pkg-<stem>.tar.zst`` (the prefix files), then ``info-<stem>.tar.zst``, as
  conda-package-handling 2.x writes it.
* ``.tar.bz2``: one bzip2 tarball, ``info/`` first.

Example::

    spec = PackageSpec("hello", "1.0", "h0_0", files={"bin/hello": FileSpec(b"...", mode=0o755)})
    built = build_conda_package(tmp_path, spec)            # tmp_path/hello-1.0-h0_0.conda
    built.sha256, built.size, built.record["depends"]
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Union

import zstandard

__all__ = [
    "BINARY_PLACEHOLDER",
    "DEFAULT_TIMESTAMP",
    "PLACEHOLDER",
    "TEXT_PLACEHOLDER",
    "BuiltPackage",
    "FileSpec",
    "PackageSpec",
    "build_conda_package",
    "package_filename",
]

PLACEHOLDER_ROOT = "/opt/anaconda1anaconda2anaconda3"
"""The historical conda placeholder prefix."""

PLACEHOLDER = (PLACEHOLDER_ROOT + "_placehold" * 30)[:255]
"""The build prefix recorded in packages: 255 characters, padded with ``_placehold``
as conda-build pads its host prefix, so a binary file has room for any real
prefix shorter than 255 bytes."""

TEXT_PLACEHOLDER = PLACEHOLDER
"""Placeholder used for ``file_mode: text`` files (the same long prefix)."""

BINARY_PLACEHOLDER = PLACEHOLDER
"""Placeholder used for ``file_mode: binary`` files (the same long prefix)."""

DEFAULT_TIMESTAMP = 1_700_000_000_000
"""``index.json`` timestamp (milliseconds) used unless a spec gives one."""

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_COPY_CHUNK = 1 << 20

Content = Union[bytes, str, "FileSpec"]


@dataclass(frozen=True)
class FileSpec:
    """One file of a package.

    Exactly one of ``data``, ``source`` and ``link`` gives the content: ``data`` as
    bytes (or ``str``, encoded as UTF-8), ``source`` as a path on disk that is
    streamed (for payloads too large to hold in memory), ``link`` as the target
    of a symbolic link (``path_type: softlink`` in ``paths.json``).

    Attributes:
        data: the file's bytes.
        source: a file whose bytes are copied (read at build time).
        mode: the permission bits in the archive (``0o755`` for executables).
        file_mode: ``"text"`` or ``"binary"`` to record a prefix placeholder;
            ``None`` detects it: a file holding :attr:`placeholder` is recorded
            as ``binary`` if it contains a NUL byte, else ``text``.
        placeholder: the prefix string the installer replaces.
        no_link: record ``no_link`` (the installer copies the file instead of
            hard-linking it).
    """

    data: bytes | str | None = None
    source: Path | str | None = None
    mode: int = 0o644
    file_mode: str | None = None
    placeholder: str = PLACEHOLDER
    no_link: bool = False
    link: str | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.data, self.source, self.link)) != 1:
            raise ValueError("FileSpec needs exactly one of data=, source= or link=")
        if self.file_mode not in (None, "text", "binary"):
            raise ValueError(f"file_mode must be 'text', 'binary' or None, not {self.file_mode!r}")
        if self.source is not None and self.file_mode is not None:
            raise ValueError("a streamed FileSpec(source=...) cannot carry a prefix placeholder")

    @property
    def content(self) -> bytes | None:
        """The bytes of an in-memory file (``None`` for a streamed one)."""
        if self.data is None:
            return None
        return self.data.encode() if isinstance(self.data, str) else self.data

    @property
    def source_path(self) -> Path:
        """The file a streamed ``FileSpec(source=...)`` copies."""
        if self.source is None:
            raise ValueError("this FileSpec holds its data in memory (no source=)")
        return Path(self.source)

    @property
    def size(self) -> int:
        """The file's size in bytes (0 for a link)."""
        if self.link is not None:
            return 0
        data = self.content
        return len(data) if data is not None else self.source_path.stat().st_size

    def effective_file_mode(self) -> str | None:
        """``"text"``/``"binary"`` if the file is recorded with a placeholder, else ``None``."""
        if self.file_mode is not None:
            return self.file_mode
        data = self.content
        if data is None or self.placeholder.encode() not in data:
            return None
        return "binary" if b"\0" in data else "text"


@dataclass(frozen=True)
class PackageSpec:
    """What to build: the ``index.json`` fields and the files.

    Attributes:
        name, version, build: the package's identity (``name-version-build``).
        build_number: the build number.
        subdir: the channel subdir (``linux-64``...); ``noarch`` packages are
            always ``noarch``.
        depends: match specs, e.g. ``["hello-data >=1.0"]``.
        constrains: run constraints.
        noarch: ``None``, ``"generic"`` or ``"python"``.
        files: prefix-relative path -> bytes, str, or :class:`FileSpec`.
            ``noarch: python`` files live under ``site-packages/`` and
            ``python-scripts/`` as in conda-build output.
        entry_points: for ``noarch: python``: ``"cmd = module:function"``
            lines written to ``info/link.json``.
        license: the license string.
        timestamp: ``index.json`` timestamp in milliseconds (also the mtime
            of every archive member, in seconds).
        extra_index: more ``index.json`` fields (``track_features``...).
        fmt: the archive format :func:`build_conda_package` writes by default:
            ``"conda"`` or ``"tar.bz2"``.
    """

    name: str
    version: str
    build: str
    build_number: int = 0
    subdir: str = "linux-64"
    depends: Sequence[str] = ()
    constrains: Sequence[str] = ()
    noarch: str | None = None
    files: Mapping[str, Content] = field(default_factory=dict)
    entry_points: Sequence[str] = ()
    license: str = "BSD-3-Clause"
    timestamp: int = DEFAULT_TIMESTAMP
    extra_index: Mapping[str, Any] = field(default_factory=dict)
    fmt: str = "conda"

    def __post_init__(self) -> None:
        _extension(self.fmt)
        for label, value in (("name", self.name), ("version", self.version), ("build", self.build)):
            if not value or "/" in value or ("-" in value and label != "name"):
                raise ValueError(f"invalid package {label}: {value!r}")
        if self.noarch not in (None, "generic", "python"):
            raise ValueError(f"noarch must be None, 'generic' or 'python', not {self.noarch!r}")
        if self.entry_points and self.noarch != "python":
            raise ValueError("entry_points need noarch='python'")
        for path in self.files:
            if path.startswith(("/", "info/")) or ".." in path.split("/") or not path:
                raise ValueError(f"invalid file path in package {self.name}: {path!r}")

    @property
    def effective_subdir(self) -> str:
        """``noarch`` for noarch packages, else :attr:`subdir`."""
        return "noarch" if self.noarch else self.subdir

    @property
    def dist_name(self) -> str:
        """``name-version-build``."""
        return f"{self.name}-{self.version}-{self.build}"

    def index_json(self) -> dict[str, Any]:
        """The package's ``info/index.json`` content."""
        index: dict[str, Any] = {
            "build": self.build,
            "build_number": self.build_number,
            "depends": list(self.depends),
            "license": self.license,
            "name": self.name,
            "subdir": self.effective_subdir,
            "timestamp": self.timestamp,
            "version": self.version,
        }
        if self.constrains:
            index["constrains"] = list(self.constrains)
        if self.noarch:
            index["noarch"] = self.noarch
        else:
            platform, _, arch = self.subdir.partition("-")
            index["platform"] = platform
            index["arch"] = {"64": "x86_64", "aarch64": "aarch64", "arm64": "arm64"}.get(arch, arch)
        index.update(self.extra_index)
        return index


@dataclass(frozen=True)
class BuiltPackage:
    """A package written to disk.

    Attributes:
        path: the archive.
        filename: its name (``name-version-build.conda``).
        sha256, md5: hex digests of the archive.
        size: its size in bytes.
        record: the repodata record (``index.json`` + ``md5``, ``sha256``, ``size``).
        spec: what it was built from.
    """

    path: Path
    filename: str
    sha256: str
    md5: str
    size: int
    record: dict[str, Any]
    spec: PackageSpec

    @property
    def subdir(self) -> str:
        """The channel subdir the package belongs in."""
        return self.spec.effective_subdir


def package_filename(spec: PackageSpec, fmt: str | None = None) -> str:
    """``name-version-build.conda`` or ``.tar.bz2`` (``fmt`` defaults to ``spec.fmt``)."""
    return spec.dist_name + _extension(fmt or spec.fmt)


def _extension(fmt: str) -> str:
    if fmt == "conda":
        return ".conda"
    if fmt == "tar.bz2":
        return ".tar.bz2"
    raise ValueError(f"unknown package format {fmt!r}: use 'conda' or 'tar.bz2'")


# -- files ------------------------------------------------------------------------------------


def _as_filespec(value: Content) -> FileSpec:
    if isinstance(value, FileSpec):
        return value
    if isinstance(value, (bytes, str)):
        return FileSpec(data=value)
    raise TypeError(f"file content must be bytes, str or FileSpec, not {type(value).__name__}")


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _paths_entry(path: str, fs: FileSpec) -> dict[str, Any]:
    if fs.link is not None:
        return {"_path": path, "path_type": "softlink"}
    data = fs.content
    if data is not None:
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
    else:
        sha, size = _hash_file(fs.source_path)
    entry: dict[str, Any] = {"_path": path, "path_type": "hardlink", "sha256": sha}
    entry["size_in_bytes"] = size
    mode = fs.effective_file_mode()
    if mode is not None:
        entry["file_mode"] = mode
        entry["prefix_placeholder"] = fs.placeholder
    if fs.no_link:
        entry["no_link"] = True
    return entry


def _info_files(spec: PackageSpec, files: dict[str, FileSpec]) -> dict[str, bytes]:
    paths = [_paths_entry(p, files[p]) for p in sorted(files)]
    info = {
        "info/index.json": _json(spec.index_json()),
        "info/paths.json": _json({"paths": paths, "paths_version": 1}),
        "info/files": "".join(p + "\n" for p in sorted(files)).encode(),
        "info/about.json": _json({"summary": f"{spec.name}, built by pixicache.testing"}),
    }
    if spec.noarch == "python":
        link: dict[str, Any] = {"type": "python"}
        if spec.entry_points:
            link["entry_points"] = list(spec.entry_points)
        info["info/link.json"] = _json({"noarch": link, "package_metadata_version": 1})
    return info


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


# -- tar ----------------------------------------------------------------------------------------


def _tarinfo(name: str, size: int, mode: int, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = mode
    ti.mtime = mtime
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def _write_tar(
    fileobj: IO[bytes], members: Iterator[tuple[str, FileSpec]], mtime: int, mode: str = "w|"
) -> None:
    with tarfile.open(fileobj=fileobj, mode=mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for name, fs in members:
            data = fs.content
            if fs.link is not None:
                ti = _tarinfo(name, 0, 0o777, mtime)
                ti.type = tarfile.SYMTYPE
                ti.linkname = fs.link
                tar.addfile(ti)
            elif data is not None:
                tar.addfile(_tarinfo(name, len(data), fs.mode, mtime), io.BytesIO(data))
            else:
                with open(fs.source_path, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    tar.addfile(_tarinfo(name, size, fs.mode, mtime), fh)


def _members(
    info: dict[str, bytes], files: dict[str, FileSpec], with_info: bool, with_pkg: bool
) -> Iterator[tuple[str, FileSpec]]:
    if with_info:
        for name in sorted(info):
            yield name, FileSpec(data=info[name])
    if with_pkg:
        for name in sorted(files):
            yield name, files[name]


# -- archives -----------------------------------------------------------------------------------


def _write_conda(
    dest: Path,
    stem: str,
    info: dict[str, bytes],
    files: dict[str, FileSpec],
    mtime: int,
    level: int,
) -> None:
    payload = sum(fs.size for fs in files.values())
    cctx = zstandard.ZstdCompressor(level=level)
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(_zipinfo("metadata.json"), _json({"conda_pkg_format_version": 2}))
        for prefix, with_info, with_pkg in (("pkg", False, True), ("info", True, False)):
            zinfo = _zipinfo(f"{prefix}-{stem}.tar.zst")
            big = with_pkg and payload > (1 << 31) - (1 << 26)
            with zf.open(zinfo, "w", force_zip64=big) as zw:
                writer = cctx.stream_writer(zw, closefd=False, write_size=_COPY_CHUNK)
                _write_tar(writer, _members(info, files, with_info, with_pkg), mtime)
                writer.close()


def _zipinfo(name: str) -> zipfile.ZipInfo:
    zinfo = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
    zinfo.compress_type = zipfile.ZIP_STORED
    zinfo.external_attr = 0o644 << 16
    zinfo.create_system = 3
    return zinfo


def _write_tar_bz2(
    dest: Path, info: dict[str, bytes], files: dict[str, FileSpec], mtime: int, level: int
) -> None:
    with open(dest, "wb") as raw, bz2.BZ2File(raw, "wb", compresslevel=level) as bz:
        _write_tar(bz, _members(info, files, True, True), mtime)


def build_conda_package(
    out_dir: Path | str,
    spec: PackageSpec,
    fmt: str | None = None,
    *,
    compression_level: int | None = None,
) -> BuiltPackage:
    """Build ``spec`` into ``out_dir/<name>-<version>-<build>.<fmt>``.

    Args:
        out_dir: the directory to write into (created if missing).
        spec: the package.
        fmt: ``"conda"`` or ``"tar.bz2"`` (default: ``spec.fmt``).
        compression_level: zstd level for ``.conda`` (default 3) or bzip2 level
            for ``.tar.bz2`` (default 9). Use 1 for large random payloads.

    Returns:
        The :class:`BuiltPackage`, whose ``record`` is the package's repodata
        entry. The archive is written to a temporary name and renamed, so a
        reader never sees a partial package.

    Raises:
        ValueError: for an unknown format or an invalid spec.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fmt = fmt or spec.fmt
    filename = package_filename(spec, fmt)
    files = {path: _as_filespec(value) for path, value in spec.files.items()}
    info = _info_files(spec, files)
    mtime = spec.timestamp // 1000
    fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", dir=out)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if fmt == "conda":
            level = 3 if compression_level is None else compression_level
            _write_conda(tmp, spec.dist_name, info, files, mtime, level)
        elif fmt == "tar.bz2":
            level = 9 if compression_level is None else compression_level
            _write_tar_bz2(tmp, info, files, mtime, level)
        else:
            raise ValueError(f"unknown package format {fmt!r}: use 'conda' or 'tar.bz2'")
        sha, md5, size = _digests(tmp)
        os.chmod(tmp, 0o644)
        dest = out / filename
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    record = dict(spec.index_json())
    record.update({"md5": md5, "sha256": sha, "size": size})
    return BuiltPackage(dest, filename, sha, md5, size, record, spec)


def _digests(path: Path) -> tuple[str, str, int]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), md5.hexdigest(), size
