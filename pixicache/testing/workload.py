"""Size-faithful synthetic workloads made from a real ``pixi.lock``.

A workload has the artifact names, URLs and (scaled) sizes of a real lock, by
default the GPU PyTorch lock shipped with pixicache (121 conda packages, 3.71 GB
at scale 1.0), laid out under ``root`` exactly as upstream serves them
(``root/conda-forge/<subdir>/<file>``), plus a new ``pixi.lock`` (format 6)
whose entries carry the synthetic files' SHA-256, MD5 and size at the same
upstream URLs. Serve ``root`` with :class:`~pixicache.testing.server.UpstreamServer`
and point a mirror or source at it.

Two flavours:

* :func:`make_blob_workload`: every artifact is a file of
  ``max(1, round(size * scale))`` pseudo-random bytes. For transfer and store
  benchmarks; the files are not packages.
* :func:`make_package_workload`: every artifact is a REAL installable conda
  package with the lock's name, version, build and subdir, no dependencies,
  ``noarch: generic`` for ``noarch`` packages, carrying one payload file of
  ``max(1, round(size * scale))`` random bytes (the archive adds ~1-2 KiB), and
  ``repodata.json`` per subdir. For install benchmarks: rattler installs it.

The bytes are incompressible pseudo-random data (not cryptographic), generated
at several hundred MB/s, and depend only on ``seed`` and the artifact's URL:
the same call gives the same files and lock. Nothing is cached outside
``out_root``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import random
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from pixicache.model.artifact import Artifact
from pixicache.testing.channel import Channel
from pixicache.testing.conda_package import FileSpec, PackageSpec, build_conda_package
from pixicache.testing.locks import LockPackage, render_lock

__all__ = [
    "Workload",
    "WorkloadArtifact",
    "default_lock_path",
    "make_blob_workload",
    "make_package_workload",
    "random_bytes",
    "write_random_file",
]

_CHUNK = 1 << 20
_POOL = 4 << 20
_POOLS: dict[int, bytes] = {}
_IN_MEMORY_PAYLOAD = 8 << 20


def default_lock_path() -> Path:
    """The GPU PyTorch ``pixi.lock`` shipped in the package (``pixicache/data``)."""
    ref = importlib.resources.files("pixicache").joinpath("data/gpu-pytorch-pixi.lock")
    return Path(str(ref))


# -- random bytes ----------------------------------------------------------------------------


def _pool(seed: int) -> bytes:
    pool = _POOLS.get(seed)
    if pool is None:
        pool = random.Random(seed).randbytes(_POOL + _CHUNK)
        _POOLS.clear()
        _POOLS[seed] = pool
    return pool


def _random_chunks(size: int, seed: int, key: str) -> Iterator[bytes]:
    """``size`` pseudo-random bytes for ``(seed, key)``, in chunks of up to 1 MiB.

    Chunk ``i`` is a window of a seeded random pool at an offset chosen by a hash
    of ``(seed, key, i)``, passed through a byte permutation chosen by the same
    hash: no two chunks are alike, nothing compresses (zstd and xz ratios are
    1.0), and it runs at a few hundred MB/s in pure Python.
    """
    pool = _pool(seed)
    done = 0
    index = 0
    while done < size:
        digest = hashlib.blake2b(f"{seed}\0{key}\0{index}".encode(), digest_size=16).digest()
        offset = int.from_bytes(digest[:8], "little") % _POOL
        table = bytes(random.Random(digest[8:]).sample(range(256), 256))
        n = min(_CHUNK, size - done)
        yield pool[offset : offset + n].translate(table)
        done += n
        index += 1


def random_bytes(size: int, seed: int = 0, key: str = "") -> bytes:
    """``size`` deterministic pseudo-random bytes for ``(seed, key)`` (in memory)."""
    return b"".join(_random_chunks(size, seed, key))


def write_random_file(path: Path | str, size: int, seed: int = 0, key: str = "") -> tuple[str, str]:
    """Write ``size`` pseudo-random bytes for ``(seed, key)`` to ``path``; return (sha256, md5)."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as fh:
        if size <= 4 * _CHUNK:
            for chunk in _random_chunks(size, seed, key):
                sha.update(chunk)
                md5.update(chunk)
                fh.write(chunk)
            return sha.hexdigest(), md5.hexdigest()

        def consume(chunk: bytes) -> None:
            sha.update(chunk)  # hashlib and write release the GIL: this thread
            md5.update(chunk)  # runs while the next chunk is generated
            fh.write(chunk)

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: deque[Future[None]] = deque()
            for chunk in _random_chunks(size, seed, key):
                pending.append(pool.submit(consume, chunk))
                if len(pending) > 8:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
    return sha.hexdigest(), md5.hexdigest()


# -- the source lock -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    url: str
    channel: str
    fields: dict[str, Any]

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def subdir(self) -> str:
        return str(self.fields.get("subdir") or self.url.rsplit("/", 2)[-2])

    @property
    def ext(self) -> str:
        return ".tar.bz2" if self.filename.endswith(".tar.bz2") else ".conda"

    @property
    def nvb(self) -> tuple[str, str, str]:
        name, version, build = self.filename[: -len(self.ext)].rsplit("-", 2)
        return name, version, build


def _read_lock(path: Path, environment: str, platform: str | None) -> tuple[list[_Entry], str]:
    """The conda entries of one environment/platform of a v4-v7 lock, and the platform."""
    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    envs = doc.get("environments") or {}
    if environment not in envs:
        raise ValueError(f"{path}: no environment {environment!r} (has {sorted(envs)})")
    env = envs[environment]
    refs_by_platform = env.get("packages") or {}
    if platform is None:
        platform = "linux-64" if "linux-64" in refs_by_platform else sorted(refs_by_platform)[0]
    if platform not in refs_by_platform:
        raise ValueError(f"{path}: environment {environment!r} has no platform {platform!r}")
    channels = [str(c["url"] if isinstance(c, dict) else c) for c in env.get("channels") or []]
    by_url: dict[str, dict[str, Any]] = {}
    for pkg in doc.get("packages") or []:
        url = pkg.get("conda") or (pkg.get("url") if pkg.get("kind") == "conda" else None)
        if url:
            by_url[str(url)] = pkg
    entries = []
    for ref in refs_by_platform[platform]:
        url = ref.get("conda")
        if url is None:
            continue  # PyPI packages are not part of a conda workload
        fields = by_url.get(url)
        if fields is None:
            raise ValueError(
                f"{path}: {url} is listed for {environment}/{platform} but not described"
            )
        channel = next((c.rstrip("/") for c in channels if url.startswith(c.rstrip("/") + "/")), "")
        entries.append(_Entry(url, channel or url.rsplit("/", 2)[0], fields))
    return entries, platform


# -- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadArtifact:
    """One synthetic artifact.

    Attributes:
        url: its upstream URL (as the workload's lock records it).
        filename, subdir: the URL's last two components.
        sha256, md5, size: of the synthetic file.
        path: the file under the workload root.
        original_size: the size the source lock records.
    """

    url: str
    filename: str
    subdir: str
    sha256: str
    md5: str
    size: int
    path: Path
    original_size: int

    def artifact(self) -> Artifact:
        """As a :class:`pixicache.model.artifact.Artifact`."""
        channel = self.url.rsplit("/", 2)[0]
        return Artifact(
            url=self.url,
            sha256=self.sha256,
            size=self.size,
            filename=self.filename,
            kind="conda",
            md5=self.md5,
            channel=channel,
            subdir=self.subdir,
        )


@dataclass
class Workload:
    """A generated workload.

    Attributes:
        root: the directory to serve (``root/<channel path>/<subdir>/<file>``).
        lock_path: the workload's ``pixi.lock`` (format 6, upstream URLs).
        artifacts: the artifacts, in the source lock's order.
        kind: ``"blob"`` or ``"package"``.
        scale, seed: how it was made.
        environment, platform: what of the source lock it reproduces.
        channels: for package workloads, the channel(s) built (with repodata).
    """

    root: Path
    lock_path: Path
    artifacts: list[WorkloadArtifact]
    kind: str
    scale: float
    seed: int
    environment: str = "default"
    platform: str = "linux-64"
    channels: list[Channel] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """The sum of the artifacts' sizes."""
        return sum(a.size for a in self.artifacts)

    @property
    def urls(self) -> list[str]:
        """The artifacts' upstream URLs."""
        return [a.url for a in self.artifacts]

    def local_url(self, base: str, artifact: WorkloadArtifact) -> str:
        """The artifact's URL on a server serving :attr:`root` at ``base`` (``http://127.0.0.1:P``)."""
        return base.rstrip("/") + urlsplit(artifact.url).path


def _local_path(root: Path, url: str) -> Path:
    parts = [p for p in urlsplit(url).path.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"cannot place {url} under a directory")
    return root.joinpath(*parts)


def _target_size(size: int, scale: float) -> int:
    return max(1, round(size * scale))


def _check(scale: float) -> None:
    if not scale > 0:
        raise ValueError(f"scale must be > 0, not {scale}")


def make_blob_workload(
    out_root: Path | str,
    scale: float = 0.01,
    seed: int = 0,
    *,
    lock_path: Path | str | None = None,
    environment: str = "default",
    platform: str | None = None,
    lock_version: int = 6,
) -> Workload:
    """Write random blobs with the source lock's URLs and scaled sizes, and a lock for them.

    Args:
        out_root: directory to fill (created); files go to ``out_root/<URL path>``
            and the lock to ``out_root/pixi.lock``.
        scale: size factor (1.0 = full size: 3.7 GB for the default lock).
        seed: changes every byte (and so every digest).
        lock_path: the source lock (default: :func:`default_lock_path`).
        environment, platform: what of the source lock to reproduce (platform
            default: ``linux-64`` if present).
        lock_version: the format of the written lock.

    Returns:
        The :class:`Workload` (``kind="blob"``).
    """
    _check(scale)
    root = Path(out_root).resolve()
    source = Path(lock_path) if lock_path else default_lock_path()
    entries, plat = _read_lock(source, environment, platform)
    artifacts: list[WorkloadArtifact] = []
    lock_pkgs: list[LockPackage] = []
    for entry in entries:
        original = int(entry.fields.get("size") or 0)
        size = _target_size(original, scale)
        path = _local_path(root, entry.url)
        sha, md5 = write_random_file(path, size, seed, entry.url)
        artifacts.append(
            WorkloadArtifact(
                entry.url, entry.filename, entry.subdir, sha, md5, size, path, original
            )
        )
        name, version, build = entry.nvb
        f = entry.fields
        lock_pkgs.append(
            LockPackage(
                kind="conda",
                url=entry.url,
                sha256=sha,
                name=str(f.get("name") or name),
                version=str(f.get("version") or version),
                md5=md5,
                size=size,
                build=str(f.get("build") or build),
                build_number=int(f.get("build_number") or _build_number(build)),
                subdir=entry.subdir,
                depends=list(f.get("depends") or []),
                noarch=f.get("noarch"),
                license=f.get("license"),
                timestamp=f.get("timestamp"),
            )
        )
    channels = sorted({e.channel + "/" for e in entries})
    lock = root / "pixi.lock"
    lock.write_text(
        render_lock({environment: {plat: lock_pkgs}}, version=lock_version, channels=channels),
        encoding="utf-8",
    )
    return Workload(root, lock, artifacts, "blob", scale, seed, environment, plat)


def _build_number(build: str) -> int:
    digits = ""
    for ch in reversed(build):
        if not ch.isdigit():
            break
        digits = ch + digits
    return int(digits) if digits else 0


def make_package_workload(
    out_root: Path | str,
    scale: float = 0.01,
    seed: int = 0,
    fmt: str = "conda",
    *,
    lock_path: Path | str | None = None,
    environment: str = "default",
    platform: str | None = None,
    lock_version: int = 6,
    compression_level: int | None = None,
) -> Workload:
    """Build installable packages shaped like the source lock's, a channel tree and a lock.

    Args:
        out_root: directory to fill (created): the channel tree and ``pixi.lock``.
        scale: payload size factor (1.0 = full size).
        seed: changes every payload byte.
        fmt: ``"conda"`` or ``"tar.bz2"`` for every package, or ``"as-locked"``
            to keep each package's format from the source lock. A changed
            extension changes the URL accordingly (``.tar.bz2`` -> ``.conda``).
        lock_path, environment, platform, lock_version: as for
            :func:`make_blob_workload`.
        compression_level: zstd/bzip2 level (default 1: payloads are random).

    Returns:
        The :class:`Workload` (``kind="package"``); ``channels`` holds the
        built channel(s), each with ``repodata.json`` per subdir.
    """
    _check(scale)
    if fmt not in ("conda", "tar.bz2", "as-locked"):
        raise ValueError(f"fmt must be 'conda', 'tar.bz2' or 'as-locked', not {fmt!r}")
    root = Path(out_root).resolve()
    source = Path(lock_path) if lock_path else default_lock_path()
    entries, plat = _read_lock(source, environment, platform)
    level = 1 if compression_level is None else compression_level
    channels: dict[str, Channel] = {}
    built_for: list[tuple[_Entry, Any, Channel]] = []
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".payload-", dir=root))
    try:
        for entry in entries:
            channel = channels.get(entry.channel)
            if channel is None:
                name = urlsplit(entry.channel).path.strip("/") or "channel"
                channel = channels[entry.channel] = Channel(root, name)
            spec = _package_spec(entry, scale, seed, fmt, scratch)
            built = build_conda_package(
                channel.path / spec.effective_subdir, spec, compression_level=level
            )
            channel.packages.append(built)
            built_for.append((entry, built, channel))
            for leftover in scratch.iterdir():
                leftover.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    artifacts: list[WorkloadArtifact] = []
    lock_pkgs: list[LockPackage] = []
    for entry, built, channel in built_for:
        pkg = channel.lock_package(built, entry.channel)
        lock_pkgs.append(pkg)
        artifacts.append(
            WorkloadArtifact(
                pkg.url,
                built.filename,
                built.subdir,
                built.sha256,
                built.md5,
                built.size,
                built.path,
                int(entry.fields.get("size") or 0),
            )
        )
    for channel in channels.values():
        channel.write_repodata()
    lock = root / "pixi.lock"
    lock.write_text(
        render_lock(
            {environment: {plat: lock_pkgs}},
            version=lock_version,
            channels=sorted(c + "/" for c in channels),
        ),
        encoding="utf-8",
    )
    return Workload(
        root, lock, artifacts, "package", scale, seed, environment, plat, list(channels.values())
    )


def _package_spec(entry: _Entry, scale: float, seed: int, fmt: str, scratch: Path) -> PackageSpec:
    name, version, build = entry.nvb
    f = entry.fields
    size = _target_size(int(f.get("size") or 0), scale)
    payload_name = f"share/pixicache-workload/{name}-{version}-{build}.bin"
    if size <= _IN_MEMORY_PAYLOAD:
        payload = FileSpec(data=random_bytes(size, seed, entry.url))
    else:
        tmp = scratch / "payload.bin"
        write_random_file(tmp, size, seed, entry.url)
        payload = FileSpec(source=tmp)
    noarch = "generic" if entry.subdir == "noarch" else None
    pkg_fmt = {".conda": "conda", ".tar.bz2": "tar.bz2"}[entry.ext] if fmt == "as-locked" else fmt
    return PackageSpec(
        name=str(f.get("name") or name),
        version=str(f.get("version") or version),
        build=str(f.get("build") or build),
        build_number=int(f.get("build_number") or _build_number(build)),
        subdir=entry.subdir if entry.subdir != "noarch" else "linux-64",
        noarch=noarch,
        license=str(f.get("license") or "LicenseRef-synthetic"),
        files={payload_name: payload},
        fmt=pkg_fmt,
        timestamp=int(f.get("timestamp") or 1_700_000_000_000),
    )
