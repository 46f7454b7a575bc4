"""The ``rattler`` installer: py-rattler installs the lock's environment from the node store.

How a prefix is made (``<workspace>/.pixi/envs/<env>``, where Pixi puts it):

1. **No-op check** (in this process, no rattler): the prefix marker
   ``conda-meta/pixicache-state`` holds the SHA-256 of the environment's record
   set (every conda package's URL and SHA-256, sorted) and the platform. When
   it matches the lock and every package's ``conda-meta/<name>-<version>-<build>.json``
   is present, the install is skipped: a few milliseconds.
2. **Hand-off from the store**: a :class:`~pixicache.store.view.StoreView`
   serves the store's verified blobs on ``127.0.0.1``, and rattler's
   ``MirrorMiddleware`` maps each channel of the lock to it (a URL-prefix
   swap), so rattler downloads every archive from the node store and nothing
   from outside, and verifies each archive's SHA-256 again as it streams over
   HTTP. The records come from rattler's own lock parser, so ``conda-meta``
   keeps the lock's original URLs. (A ``file://`` mirror is rejected by
   rattler's HTTP client — "URL scheme is not allowed" — and pre-seeding
   the package cache would mean re-implementing its layout: both measured,
   both rejected.) When the package cache already has an entry for every
   package (a warm node), no view is started: the child's cache guard checks
   the entries and asks for the view only if one is missing or repaired, and
   the channels point at a port that refuses, so nothing is ever fetched
   past the store (:meth:`RattlerInstaller._install_from_cache`).
3. **Install in a child process** (``python -m pixicache.backends.rattler.child``),
   which exits with ``os._exit``: py-rattler can crash at interpreter exit.
   ``rattler.install`` makes the prefix hold exactly the lock's records and
   links or unlinks only what changed.
4. **Node sharing**: the package cache is ``<store>/pkgs`` (the request's
   ``package_cache``), shared by every job on the node; rattler's cache lock
   serializes extraction and linking, so no job sees a half-extracted
   package. Prefix files are hard links into the cache, so the child's
   :class:`~pixicache.backends.rattler.child.CacheGuard` snapshots each
   extracted package and repairs (re-extracts) any whose files a job modified
   through its prefix, before linking it into another prefix.
5. The marker is written last, after the activation script is cached
   (``conda-meta/pixicache-activation``, used by :mod:`pixicache.agent.runner`).

6. PyPI entries are installed after the conda packages, into the environment's own
   interpreter (:mod:`pixicache.installers.pypi`), and the marker covers them too.
   Conda source packages (``conda: .``) are refused by name: only Pixi builds them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pixicache.backends.pixi.envfile import ENVIRONMENT_FILE
from pixicache.backends.rattler.child import STATE_FILE, write_state
from pixicache.backends.rattler.process import run_child
from pixicache.errors import InstallError, LockError
from pixicache.installers.base import InstallRequest, InstallResult
from pixicache.model.artifact import Artifact

if TYPE_CHECKING:
    from collections.abc import Callable

    from pixicache.store.view import StoreView

__all__ = [
    "STATE_SCHEMA",
    "RattlerInstaller",
    "prefix_is_current",
    "read_state",
    "records_digest",
    "run_child",
]

STATE_SCHEMA = "pixicache.prefix-state/1"


def records_digest(request: InstallRequest) -> tuple[str, list[str]]:
    """The SHA-256 of the environment's record set (every conda package's URL and
    digest, then every PyPI entry's), and the dist names (``name-version-build``) its
    ``conda-meta`` must hold."""
    packages = request.lock.packages(request.environment, request.platform)
    rows = sorted(f"{p.url}\0{p.sha256 or p.md5 or ''}" for p in packages if p.kind == "conda")
    rows += sorted(
        f"pypi\0{p.url}\0{p.sha256 or p.md5 or ''}\0{p.editable}" for p in packages if p.kind == "pypi"
    )
    dists = sorted(f"{p.name}-{p.version}-{p.build}" for p in packages if p.kind == "conda")
    digest = hashlib.sha256("\n".join(rows).encode()).hexdigest()
    return digest, dists


def read_state(prefix: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The prefix marker written after the last successful install, if any."""
    try:
        data = json.loads((Path(prefix) / "conda-meta" / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _wanted_state(request: InstallRequest) -> dict[str, Any]:
    digest, dists = records_digest(request)
    return {
        "schema": STATE_SCHEMA,
        "installer": RattlerInstaller.name,
        "environment": request.environment,
        "platform": request.platform,
        "records_sha256": digest,
        "packages": dists,
        "lock": str(request.lock.path),
    }


def prefix_is_current(request: InstallRequest) -> bool:
    """True when the prefix holds exactly what the lock asks for (by its marker),
    with every package record present in ``conda-meta`` (a cheap intactness check)."""
    state = read_state(request.prefix)
    if state is None:
        return False
    wanted = _wanted_state(request)
    for key in ("schema", "platform", "records_sha256"):
        if state.get(key) != wanted[key]:
            return False
    meta = Path(request.prefix) / "conda-meta"
    try:
        present = set(os.listdir(meta))
    except OSError:
        return False
    return all(f"{d}.json" in present for d in wanted["packages"])


def _pixi_environment_file(request: InstallRequest) -> dict[str, Any] | None:
    """The content of Pixi's ``conda-meta/pixi`` for ``request`` (``None``: the manifest
    cannot be read). It depends on the lock and manifest only, so it can be computed
    while the child installs."""
    from pixicache.backends.pixi.envfile import environment_file
    from pixicache.backends.pixi.pins import load_pins
    from pixicache.model.manifest import Manifest

    manifest = request.parsed_manifest
    if manifest is None:
        try:
            manifest = Manifest.load(request.manifest)
        except LockError:
            return None
    return environment_file(
        manifest, request.lock, request.environment, request.platform, load_pins()[1]
    )


def _write_pixi_environment_file(
    request: InstallRequest, content: dict[str, Any] | None = None
) -> str:
    """Write Pixi's ``conda-meta/pixi`` (``content``: as computed before, else computed
    now) so a later ``pixi run`` sees the prefix as current."""
    from pixicache.backends.pixi.envfile import write_environment_file

    if content is None:
        content = _pixi_environment_file(request)
    if content is None:
        return "no conda-meta/pixi written: the manifest cannot be read"
    write_environment_file(request.prefix, content)
    return f"wrote conda-meta/pixi (Pixi's environment file, hash {content['environment_lock_file_hash']})"


def _explained(exc: InstallError, view: StoreView, artifacts: list[Artifact]) -> InstallError:
    """The child's failure, with what the store view could not serve, and the
    artifacts it names (by digest or file name) as :attr:`InstallError.suspects`."""
    message = str(exc)
    misses = view.misses
    if misses:
        lines = [message, "the node store view could not serve:"]
        lines += [f"  {m.path}: {m.reason}" for m in misses[:10]]
        message = "\n".join(lines)
    suspects = {m.sha256 for m in misses if m.sha256}
    for a in artifacts:
        if (a.sha256 and a.sha256 in message) or a.filename in message:
            sha = view.store.blob_of(a)
            if sha is not None:
                suspects.add(sha)
    return InstallError(message, suspects=sorted(suspects))


def install_pypi(request: InstallRequest) -> Any:
    """Install the environment's PyPI entries (:mod:`pixicache.installers.pypi`)."""
    from pixicache.installers.pypi import Wanted, classify, refuse_git, sync_pypi, target_scheme

    prefix = Path(request.prefix).absolute()
    scheme = target_scheme(prefix)
    arts = {a.url: a for a in request.lock.artifacts(request.environment, request.platform)}
    wanted: list[Wanted] = []
    built: list[str] = []
    pypi = [p for p in request.lock.packages(request.environment, request.platform) if p.kind == "pypi"]
    kinds = [(pkg, *classify(pkg, request.workspace)) for pkg in pypi]
    for pkg, kind, _ in kinds:
        if kind == "git":
            raise refuse_git(pkg)
    store = request.store
    import shutil  # PyPI entries only: not imported by a conda-only install
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="pypi-", dir=store.private_dir(store.user_dir / "builds")))
    try:
        for pkg, kind, local in kinds:
            wanted.append(_wanted_wheel(request, pkg, kind, local, arts.get(pkg.url), scheme, built, scratch))
        plan = sync_pypi(prefix, wanted, scheme)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    plan.built = built
    return plan


def _wanted_wheel(
    request: InstallRequest, pkg: Any, kind: str, local: Path | None, art: Artifact | None,
    scheme: Any, built: list[str], scratch: Path,
) -> Any:
    """The wheel that installs one PyPI entry: a store blob, a workspace file, or a build."""
    from pixicache.installers.pypi import Wanted, build_wheel, built_wheel

    store = request.store
    if kind in ("wheel", "sdist"):
        assert art is not None
        sha = store.blob_of(art)
        if sha is None or not store.has(sha, art.size):
            raise InstallError(f"{art.filename} ({art.pin}) is not in the node store", suspects=[])
        if kind == "wheel":
            return Wanted(pkg, store.path_for(sha), art.filename, sha256=sha)
        with _named_copy(scratch, store.path_for(sha), art.filename, sha) as named:
            path, name, now = built_wheel(
                store, sha, named, scheme, index_url=request.build_index_url, name=pkg.name
            )
        if now:
            built.append(pkg.name)
        return Wanted(pkg, path, name, sha256=path.name)
    assert local is not None
    url = local.as_uri()
    if kind == "path-dir":  # what uv writes: dir_info, "editable" only when it is
        direct: dict[str, Any] = {"url": url, "dir_info": {"editable": True} if pkg.editable else {}}
        if pkg.editable:
            return Wanted(pkg, None, local.name, direct, editable=local, index_url=request.build_index_url)
    else:
        direct = {"url": url, "archive_info": {}}
    if kind == "path-wheel":
        return Wanted(pkg, local, local.name, direct)
    wheel = build_wheel(local, scheme, scratch / pkg.name, index_url=request.build_index_url, name=pkg.name)
    built.append(pkg.name)
    return Wanted(pkg, wheel, wheel.name, direct)


@contextlib.contextmanager
def _named_copy(scratch: Path, blob: Path, filename: str, sha: str) -> Any:
    """A store blob under its own file name (pip reads an sdist's kind from its name),
    the copy checked against ``sha`` (the store is written by other users too)."""
    import shutil
    import tempfile

    from pixicache.installers.pypi import check_digest
    from pixicache.store.files import open_regular

    tmp = Path(tempfile.mkdtemp(prefix="sdist-", dir=scratch))
    try:
        with os.fdopen(open_regular(blob), "rb") as src, open(tmp / filename, "wb") as dst:
            shutil.copyfileobj(src, dst)
        with open(tmp / filename, "rb") as fh:
            check_digest(fh, sha, filename)
        yield tmp / filename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refuse_conda_sources(packages: list[Any]) -> None:
    """Conda source packages (``conda: .``) must be built, which only Pixi does."""
    sources = [p for p in packages if p.kind == "conda" and not p.fetchable]
    if sources:
        names = ", ".join(f"{p.name or '?'} ({p.url})" for p in sources)
        raise InstallError(
            f"the lock has conda source package(s) that must be built: {names}. The rattler "
            "installer installs archives only: use the pixi installer (a verified Pixi, "
            "`--installer pixi`), or build the package and lock its archive"
        )


def _cache_holds(cache: Path, packages: list[Any]) -> bool:
    """Whether rattler's package cache has an entry (``name-version-build/``) for every
    conda package: then the install needs no archive (the child's cache guard still
    checks each entry against its snapshot before linking)."""
    try:
        present = set(os.listdir(cache))
    except OSError:
        return False
    return all(
        f"{p.name}-{p.version}-{p.build}" in present for p in packages if p.kind == "conda"
    )


def _make_envs_dir(envs: Path) -> None:
    """Create the prefix's parent (in the workspace), or say that this user cannot."""
    try:
        envs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InstallError(
            f"cannot create {envs} for the environment's prefix ({exc.strerror}): the job's "
            "workspace must be writable by the job"
        ) from exc


def _child_notes(answer: dict[str, Any]) -> list[str]:
    """The report's notes on what the child's cache guard did, how it started, its timings."""
    notes = []
    if answer.get("evicted"):
        notes.append(
            "repaired package-cache entries modified through a prefix's hard links: "
            + ", ".join(answer["evicted"])
        )
    if answer.get("verified"):
        notes.append(f"verified {len(answer['verified'])} cache entr(ies) extracted by another tool")
    if answer.get("ahead"):
        how = [
            what
            for key, what in (
                ("prewarmed", "pre-warmed by the launcher"),
                ("lock_read_ahead", "the lock read ahead"),
            )
            if answer["ahead"].get(key)
        ]
        notes.append(
            "py-rattler child started ahead of need" + (f" ({'; '.join(how)})" if how else "")
        )
    if answer.get("timings"):
        notes.append(
            "py-rattler child (s): " + ", ".join(f"{k} {v:.3f}" for k, v in answer["timings"].items())
        )
    return notes


def _pypi_count(request: InstallRequest) -> int:
    return sum(
        1 for p in request.lock.packages(request.environment, request.platform) if p.kind == "pypi"
    )


class RattlerInstaller:
    """Install with py-rattler, every archive from the node store (see the module doc).

    Args:
        guard: repair package-cache entries modified through a prefix's hard
            links before linking from them (default on; see
            :class:`~pixicache.backends.rattler.child.CacheGuard`).
        timeout: seconds the install may take (``None``: no limit).
    """

    name: ClassVar[str] = "rattler"

    def __init__(self, *, guard: bool = True, timeout: float | None = None) -> None:
        self.guard = guard
        self.timeout = timeout

    @classmethod
    def available(cls, request: InstallRequest) -> tuple[bool, str]:
        """Available when py-rattler can be used by this process."""
        from pixicache.backends.rattler.probe import rattler_available

        ok, why = rattler_available()
        if not ok:
            return False, why
        pypi = _pypi_count(request)
        extra = f", and its {pypi} PyPI package(s) with pypa/installer" if pypi else ""
        return True, f"py-rattler installs the lock's conda packages from the node store{extra}"

    def up_to_date(self, request: InstallRequest) -> bool:
        """Whether :meth:`install` would be a no-op (see :func:`prefix_is_current`)."""
        return prefix_is_current(request)

    def install(self, request: InstallRequest) -> InstallResult:
        """Make ``request.prefix`` hold exactly the lock's environment.

        Raises:
            InstallError: py-rattler is unavailable or the install failed (the
                message says what the store view could not serve, if anything).
        """
        start = time.monotonic()
        prefix = Path(request.prefix).absolute()
        packages = request.lock.packages(request.environment, request.platform)
        if prefix_is_current(request):
            notes = ["the prefix already holds this lock's environment (marker matches): no-op"]
            if not (prefix / "conda-meta" / ENVIRONMENT_FILE).is_file():
                notes.append(_write_pixi_environment_file(request))
            return InstallResult(
                installer=self.name,
                prefix=prefix,
                seconds=time.monotonic() - start,
                changed=False,
                packages=len(packages),
                notes=notes,
            )
        ok, why = self.available(request)
        if not ok:
            raise InstallError(f"the rattler installer cannot run: {why}")
        _refuse_conda_sources(packages)
        cache = request.make_package_cache()
        _make_envs_dir(prefix.parent)
        payload = {
            "lock": str(Path(request.lock.path).absolute()),
            "environment": request.environment,
            "platform": request.platform,
            "prefix": str(prefix),
            "package_cache": str(cache),
            # with PyPI packages, the marker is written once they are installed too
            "state": None if _pypi_count(request) else _wanted_state(request),
            "guard": self.guard,
        }
        early: dict[str, Any] = {}

        def meanwhile() -> None:  # while the child installs (run_child)
            if request.meanwhile is not None:
                request.meanwhile()  # never raises
            if "envfile" not in early:
                with contextlib.suppress(Exception):  # else computed after, raising then
                    early["envfile"] = _pixi_environment_file(request)

        answer, first, note = None, None, None
        if _cache_holds(cache, packages):
            answer, note = self._install_from_cache(request, payload, meanwhile)
            if answer is not None and answer.get("need_view"):
                first, answer = answer, None
        if answer is None:
            answer, served = self._install_through_view(request, payload, meanwhile)
            where = f"{served} archive(s) from the store view"
            for key in ("evicted", "verified"):  # what the first child's guard did
                answer[key] = [*(first or {}).get(key, []), *answer.get(key, [])]
        else:
            where = "no archive needed: every package was in the package cache (no store view)"
        notes = [f"{answer.get('operations', 0)} link/unlink operation(s); {where}"]
        if note:
            notes.append(note)
        pypi_changed = False
        if _pypi_count(request):
            plan = install_pypi(request)
            notes.append(plan.note())
            pypi_changed = bool(plan.installed or plan.removed)
            write_state(prefix / "conda-meta" / STATE_FILE, _wanted_state(request))
        notes.append(_write_pixi_environment_file(request, early.get("envfile")))
        notes.extend(_child_notes(answer))
        return InstallResult(
            installer=self.name,
            prefix=prefix,
            seconds=time.monotonic() - start,
            changed=bool(answer.get("operations")) or pypi_changed,
            packages=len(packages),
            notes=notes,
        )

    def _install_from_cache(
        self, request: InstallRequest, payload: dict[str, Any], meanwhile: Callable[[], None]
    ) -> tuple[dict[str, Any] | None, str | None]:
        """The install when the package cache has every package: no store view (its
        HTTP server costs ~40 ms to import and start). The child's cache guard checks
        each entry first; if one is missing or was repaired (evicted), it answers
        ``need_view`` without installing. The channels are mapped to a local port
        that refuses connections, so a download rattler still wants fails at once
        and nothing is fetched from anywhere; that failure is ``(None, why)``, and the
        caller installs through the view."""
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as refuse:
            refuse.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
            nowhere = f"http://127.0.0.1:{refuse.getsockname()[1]}/no-downloads"
            mirrors = {ch: [nowhere] for ch in request.channels()}
            try:
                answer = run_child(
                    "install", {**payload, "mirrors": mirrors, "view_if_needed": True},
                    timeout=self.timeout, meanwhile=meanwhile,
                )  # fmt: skip
            except InstallError as exc:
                first = str(exc).splitlines()[0][:300]
                return None, (
                    f"installing from the package cache alone failed ({first}); "
                    "installed through the store view"
                )
        return answer, None

    def _install_through_view(
        self, request: InstallRequest, payload: dict[str, Any], meanwhile: Callable[[], None]
    ) -> tuple[dict[str, Any], int]:
        """The install with every channel mapped to a :class:`StoreView` of the node
        store: the child's answer and how many archives the view served."""
        from pixicache.store.view import StoreView

        artifacts = request.lock.artifacts(request.environment, request.platform)
        view = StoreView(request.store, artifacts).start()
        try:
            try:
                answer = run_child(
                    "install",
                    {**payload, "mirrors": view.mirrors(request.channels())},
                    timeout=self.timeout,
                    meanwhile=meanwhile,
                )
            except InstallError as exc:
                raise _explained(exc, view, artifacts) from None
            return answer, len([r for r in view.requests if r.status == 200])
        finally:
            # StoreView.stop() waits for its server loop's poll interval (0.1 s):
            # nothing needs it any more, so it stops in the background.
            threading.Thread(
                target=view.stop, name="pixicache-store-view-stop", daemon=True
            ).start()
