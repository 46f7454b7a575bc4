"""Real PyPI packages for tests: wheels, an sdist with an offline build backend, an index.

* :func:`build_wheel` writes a real wheel (PEP 427: ``.dist-info`` with
  ``METADATA``, ``WHEEL``, ``entry_points.txt`` and a ``RECORD`` of SHA-256s),
  deterministically: the same spec gives the same bytes;
* :func:`build_sdist` writes a real sdist whose ``pyproject.toml`` names an
  in-tree PEP 517 backend (``backend-path``, no build requirements), so
  ``pip wheel`` builds it offline;
* :class:`PypiIndex` lays out what a PyPI-style server serves: the files under
  ``packages/<h1>/<h2>/<hash>/<file>`` (PyPI's file-host layout) and, per
  project, a PEP 503 page (``simple/<name>/index.html``) and a PEP 691 JSON page
  (``simple/<name>/index.json``, chosen by
  :class:`~pixicache.testing.server.UpstreamServer` from the ``Accept`` header).

Nothing here names a real index host: tests serve their own.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BACKEND_NAME",
    "PypiFile",
    "PypiIndex",
    "WheelSpec",
    "build_backend_wheel",
    "build_sdist",
    "build_wheel",
    "normalize",
    "write_project",
]

_EPOCH = (2020, 1, 1, 0, 0, 0)


def normalize(name: str) -> str:
    """PEP 503's normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist(name: str) -> str:
    """The distribution name as it appears in file names (PEP 427)."""
    return re.sub(r"[-_.]+", "_", name)


@dataclass
class WheelSpec:
    """What a test package holds.

    Attributes:
        name, version: the distribution.
        modules: file path inside site-packages -> text (``pkg/__init__.py``...).
        entry_points: ``{"console_scripts": {"hello-wheel": "pkg:main"}}``.
        requires_python: ``Requires-Python``, if any.
        tag: the wheel's tag.
        payload: file path inside site-packages -> bytes, stored uncompressed (a
            size-faithful stand-in for a big wheel's binaries; wheels only).
    """

    name: str
    version: str
    modules: dict[str, str] = field(default_factory=dict)
    payload: dict[str, bytes] = field(default_factory=dict)
    entry_points: dict[str, dict[str, str]] = field(default_factory=dict)
    requires_python: str | None = None
    tag: str = "py3-none-any"

    @property
    def wheel_name(self) -> str:
        return f"{_dist(self.name)}-{self.version}-{self.tag}.whl"

    @property
    def sdist_name(self) -> str:
        return f"{_dist(self.name)}-{self.version}.tar.gz"

    def metadata(self) -> str:
        lines = ["Metadata-Version: 2.1", f"Name: {self.name}", f"Version: {self.version}"]
        if self.requires_python:
            lines.append(f"Requires-Python: {self.requires_python}")
        return "\n".join(lines) + "\n"

    def entry_points_text(self) -> str | None:
        if not self.entry_points:
            return None
        return "".join(
            f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(eps.items())) + "\n"
            for group, eps in sorted(self.entry_points.items())
        )


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel_bytes(spec: WheelSpec) -> bytes:
    info = f"{_dist(spec.name)}-{spec.version}.dist-info"
    files: dict[str, bytes] = {path: text.encode() for path, text in spec.modules.items()}
    files.update(spec.payload)
    files[f"{info}/METADATA"] = spec.metadata().encode()
    files[f"{info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: pixicache.testing\nRoot-Is-Purelib: "
        f"{'true' if spec.tag.endswith('-any') else 'false'}\nTag: {spec.tag}\n"
    ).encode()
    eps = spec.entry_points_text()
    if eps:
        files[f"{info}/entry_points.txt"] = eps.encode()
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path in sorted(files):
        writer.writerow([path, _record_hash(files[path]), len(files[path])])
    writer.writerow([f"{info}/RECORD", "", ""])
    files[f"{info}/RECORD"] = record.getvalue().encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(files):
            zinfo = zipfile.ZipInfo(path, date_time=_EPOCH)
            zinfo.external_attr = 0o100644 << 16
            zinfo.compress_type = zipfile.ZIP_STORED if path in spec.payload else zipfile.ZIP_DEFLATED
            zf.writestr(zinfo, files[path])
    return out.getvalue()


def build_wheel(spec: WheelSpec, dest: Path) -> Path:
    """Write ``spec`` as a wheel in ``dest``; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / spec.wheel_name
    path.write_bytes(_wheel_bytes(spec))
    return path


_BACKEND = '''\
"""tinybuild: a PEP 517/660 backend (stdlib only) that builds pixicache.testing's sdists offline.

It reads ``spec.json`` from the source tree (the build's working directory).
"""
import base64, csv, hashlib, io, json, os, zipfile


def _spec():
    with open("spec.json") as fh:
        return json.load(fh)


def get_requires_for_build_wheel(config_settings=None):
    return []


get_requires_for_build_editable = get_requires_for_build_wheel


def _write(wheel_directory, spec, files):
    dist = spec["dist"]
    info = dist + "-" + spec["version"] + ".dist-info"
    files[info + "/METADATA"] = spec["metadata"].encode()
    files[info + "/WHEEL"] = ("Wheel-Version: 1.0\\nGenerator: tinybuild\\nRoot-Is-Purelib: true\\n"
                              "Tag: py3-none-any\\n").encode()
    if spec["entry_points"]:
        files[info + "/entry_points.txt"] = spec["entry_points"].encode()
    rec = io.StringIO()
    w = csv.writer(rec, lineterminator="\\n")
    for p in sorted(files):
        h = base64.urlsafe_b64encode(hashlib.sha256(files[p]).digest()).rstrip(b"=").decode()
        w.writerow([p, "sha256=" + h, len(files[p])])
    w.writerow([info + "/RECORD", "", ""])
    files[info + "/RECORD"] = rec.getvalue().encode()
    name = dist + "-" + spec["version"] + "-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(files):
            zi = zipfile.ZipInfo(p, date_time=(2020, 1, 1, 0, 0, 0))
            zi.external_attr = 0o100644 << 16
            zf.writestr(zi, files[p])
    return name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    spec = _spec()
    files = {}
    for p in spec["modules"]:
        with open(os.path.join("src", p), "rb") as fh:
            files[p] = fh.read()
    return _write(wheel_directory, spec, files)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    spec = _spec()
    pth = os.path.abspath("src") + "\\n"
    return _write(wheel_directory, spec, {"_" + spec["dist"] + "_editable.pth": pth.encode()})
'''

BACKEND_NAME = "tinybuild"
"""The build backend of :func:`build_sdist`; :func:`build_backend_wheel` publishes it."""


def build_backend_wheel(dest: Path) -> Path:
    """The ``tinybuild 1.0`` wheel: the backend of :func:`build_sdist`'s sdists, as a
    project an index serves (an sdist that requires it gets it from the index)."""
    return build_wheel(WheelSpec(BACKEND_NAME, "1.0", modules={"tinybuild.py": _BACKEND}), dest)


def _source_files(spec: WheelSpec, in_tree_backend: bool) -> dict[str, bytes]:
    requires = "[]" if in_tree_backend else f'["{BACKEND_NAME}"]'
    backend_path = 'backend-path = ["."]\n' if in_tree_backend else ""
    files: dict[str, bytes] = {
        "pyproject.toml": (
            f"[build-system]\nrequires = {requires}\nbuild-backend = \"{BACKEND_NAME}\"\n"
            f"{backend_path}\n[project]\nname = \"{spec.name}\"\nversion = \"{spec.version}\"\n"
        ).encode(),
        "spec.json": json.dumps(
            {
                "dist": _dist(spec.name),
                "version": spec.version,
                "modules": sorted(spec.modules),
                "metadata": spec.metadata(),
                "entry_points": spec.entry_points_text() or "",
            },
            indent=1,
            sort_keys=True,
        ).encode(),
        "PKG-INFO": spec.metadata().encode(),
    }
    if in_tree_backend:
        files["tinybuild.py"] = _BACKEND.encode()
    files.update({f"src/{p}": text.encode() for p, text in spec.modules.items()})
    return files


def build_sdist(spec: WheelSpec, dest: Path, *, in_tree_backend: bool = True) -> Path:
    """Write ``spec`` as an sdist built by ``tinybuild``; returns its path.

    With ``in_tree_backend`` (the default) the backend is in the sdist
    (``backend-path``, no build requirements: builds with no index at all);
    otherwise the sdist requires ``tinybuild`` from an index
    (:func:`build_backend_wheel`), as most real sdists require setuptools.
    """
    dest.mkdir(parents=True, exist_ok=True)
    top = f"{_dist(spec.name)}-{spec.version}"
    files = _source_files(spec, in_tree_backend)
    path = dest / spec.sdist_name
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in sorted(files):
            ti = tarfile.TarInfo(f"{top}/{rel}")
            ti.size, ti.mode, ti.mtime = len(files[rel]), 0o644, 1577836800
            tar.addfile(ti, io.BytesIO(files[rel]))
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))  # no name or time: deterministic
    return path


def write_project(spec: WheelSpec, dest: Path, *, in_tree_backend: bool = True) -> Path:
    """Write ``spec`` as a project directory (a path entry of a lock); returns it."""
    for rel, data in _source_files(spec, in_tree_backend).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dest


@dataclass(frozen=True)
class PypiFile:
    """One file of the index: its project, the file's URL path, digest and size."""

    project: str
    filename: str
    path: str  # "/packages/ab/cd/<hash>/<file>"
    sha256: str
    size: int
    requires_python: str | None = None

    def url(self, base: str) -> str:
        return base.rstrip("/") + self.path


class PypiIndex:
    """A PyPI-shaped tree under ``root``: ``packages/...`` files and ``simple/<name>/`` pages."""

    def __init__(self, root: Path, file_base: str | None = None) -> None:
        self.root = root
        self.files: list[PypiFile] = []
        self.file_base = file_base

    def set_file_base(self, file_base: str | None) -> None:
        """Link the files at ``file_base + path`` (another host, as PyPI's file host is),
        or relative to the pages (``None``); rewrites every page."""
        self.file_base = file_base.rstrip("/") if file_base else None
        for project in sorted({f.project for f in self.files}):
            self._write_pages(project)

    def link(self, f: PypiFile) -> str:
        """The URL a project page gives for ``f``."""
        return f"{self.file_base}{f.path}" if self.file_base else f"../../{f.path.lstrip('/')}"

    def add(self, path: Path, project: str, requires_python: str | None = None) -> PypiFile:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        rel = f"packages/{digest[:2]}/{digest[2:4]}/{digest[4:20]}/{path.name}"
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        entry = PypiFile(normalize(project), path.name, "/" + rel, digest, len(data), requires_python)
        self.files.append(entry)
        self._write_pages(entry.project)
        return entry

    def _write_pages(self, project: str) -> None:
        mine = [f for f in self.files if f.project == project]
        page = self.root / "simple" / project
        page.mkdir(parents=True, exist_ok=True)
        links = "".join(
            f'    <a href="{self.link(f)}#sha256={f.sha256}"'
            + (f' data-requires-python="{f.requires_python}"' if f.requires_python else "")
            + f">{f.filename}</a><br/>\n"
            for f in mine
        )
        (page / "index.html").write_text(
            f"<!DOCTYPE html>\n<html><body>\n<h1>Links for {project}</h1>\n{links}</body></html>\n"
        )
        (page / "index.json").write_text(
            json.dumps(
                {
                    "meta": {"api-version": "1.0"},
                    "name": project,
                    "files": [
                        {
                            "filename": f.filename,
                            "url": self.link(f),
                            "hashes": {"sha256": f.sha256},
                            "requires-python": f.requires_python,
                            "size": f.size,
                        }
                        for f in mine
                    ],
                },
                indent=1,
            )
        )
