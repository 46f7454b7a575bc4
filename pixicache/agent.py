"""The worker agent: ``pixicache install`` and ``pixicache run`` as a library.

:func:`install` is, in order (each a phase of the :class:`~pixicache.report.RunReport`):

1. **plan** — read the manifest and the lock beside it; list the artifacts of
   the environment for this platform;
2. **preflight** — :func:`pixicache.preflight.preflight`: platform, system
   requirements (CUDA driver...), free disk, the mirror answers (only when
   something must be downloaded);
3. **pixi verify** — find a verified Pixi (``--trust-pixi``, ``--pixi``, one on
   ``PATH`` whose digest is pinned, or the pinned one already in the store;
   with ``--installer pixi`` the pinned one is fetched if needed);
4. **fetch** — every artifact the store lacks, through the source chain
   (skipped when the installer says the prefix is already current);
5. **install** — the installer :func:`~pixicache.installers.auto.choose_installer`
   picks (``auto``: pixi with a verified Pixi, else rattler).

:func:`run` installs, then runs the task (:func:`pixicache.runner.run_task`)
and returns the task's exit code. :func:`main_install` / :func:`main_run` wrap
both for the command line: they turn every failure into its documented exit
code (:mod:`pixicache.errors`: 2 bad lock or manifest, 3 fetch failed, 4
verification failed, 5 install failed, 6 task could not start, 8 preflight
failed), and always write the report.

Signals: during plan, fetch and install, SIGTERM / SIGINT / SIGHUP stop the
agent cleanly (:class:`AgentInterrupted`, exit ``128 + N``, the report still
written); while the task runs they are forwarded to it (see :mod:`pixicache.runner`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .errors import FetchError, InstallError, IntegrityError, LockError, PixicacheError
from .installers.base import InstallRequest, InstallResult
from .manifest import DEFAULT_ENVIRONMENT, Manifest
from .report import RunReport

if TYPE_CHECKING:
    from .artifact import Artifact
    from .config import Settings
    from .fetch import FetchReport
    from .lockfile import Lock
    from .sources.base import Source
    from .store import Store

#: How long a failed install waits for a neighbour to stop reading a blob
#: before it re-hashes it (the store view pins a blob only while sending it).
_VERIFY_WAIT_S = 30.0

__all__ = [
    "AgentInterrupted",
    "InstallOutcome",
    "install",
    "main_install",
    "main_run",
    "run",
]


class AgentInterrupted(PixicacheError):
    """A signal stopped the agent before the task started (exit code ``128 + N``)."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} before the task started")
        self.signum = signum
        self.exit_code = 128 + signum


@dataclass
class InstallOutcome:
    """What :func:`install` did.

    Attributes:
        manifest: the parsed manifest.
        lock: the parsed lock.
        environment, platform: what was installed.
        prefix: where (``<workspace>/.pixi/envs/<env>``).
        installer: the installer's name; ``reason``: why it was chosen.
        result: the installer's :class:`~pixicache.installers.base.InstallResult`.
        pixi: the verified Pixi (``VerifiedPixi``), if one was found.
        fetch: the :class:`~pixicache.fetch.FetchReport`, or ``None`` when
            nothing had to be fetched.
    """

    manifest: Manifest
    lock: Lock
    environment: str
    platform: str
    prefix: Path
    installer: str
    reason: str
    result: InstallResult
    pixi: Any = None
    fetch: FetchReport | None = None
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Turn SIGTERM/SIGINT/SIGHUP into :class:`AgentInterrupted` (main thread only)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise AgentInterrupted(signum)

    old: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for signum, prev in old.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, prev)


class _Sources:
    """The settings' sources, parsed on first use (a warm node never needs them)."""

    def __init__(self, specs: Sequence[str]) -> None:
        self.specs = list(specs)
        self._parsed: list[Source] | None = None

    def get(self) -> list[Source]:
        if self._parsed is None:
            from .sources import parse_sources

            self._parsed = parse_sources(self.specs)
        return self._parsed


def _this_platform() -> str:
    from .preflight import this_subdir

    return this_subdir()


def _fetch_error(fetch_report: FetchReport) -> FetchError:
    missing = fetch_report.missing
    lines = [f"{len(missing)} artifact(s) could not be fetched:"]
    for r in missing[:20]:
        lines.append(f"  {r.artifact.filename} (sha256 {r.artifact.sha256})")
        lines.extend(f"    - {a}" for a in (r.attempts or ["no source could serve it"]))
    text = "\n".join(lines)
    if any(isinstance(r.error, IntegrityError) for r in missing):
        return IntegrityError(text)
    return FetchError(text)


def install(
    manifest: str | os.PathLike[str] = "pixi.toml",
    environment: str = DEFAULT_ENVIRONMENT,
    *,
    settings: Settings,
    installer: str = "auto",
    pixi: str | os.PathLike[str] | None = None,
    trust_pixi: str | os.PathLike[str] | None = None,
    report: RunReport | None = None,
    platform: str | None = None,
    preflight: bool = True,
) -> InstallOutcome:
    """Install ``environment`` of the lock beside ``manifest`` into its Pixi prefix.

    Args:
        manifest: the ``pixi.toml`` (its ``pixi.lock`` must be beside it).
        environment: the environment name.
        settings: store, sources and jobs (:func:`pixicache.config.resolve_settings`).
        installer: ``auto`` or an installer name (``rattler``, ``pixi``...).
        pixi: a Pixi executable to use; it must match a pin.
        trust_pixi: a Pixi executable to use unverified (logged as a warning).
        report: the report to fill (a new one, not written, if omitted).
        platform: the platform to install (default: this machine's).
        preflight: run the preflight checks.

    Raises:
        LockError: no manifest, no lock, or the lock lacks the environment/platform (2).
        FetchError / IntegrityError: an artifact could not be obtained (3 / 4).
        PixiVerificationError: ``pixi`` does not match a pin (4).
        PreflightError: this node cannot run the environment (8).
        InstallError: the installer failed (5).
    """
    from .installers.auto import choose_installer
    from .lockfile import Lock
    from .store import Store

    rep = report if report is not None else RunReport("install", path=None)
    srcs = _Sources(settings.sources)
    with rep.phase("plan"):
        m = Manifest.load(manifest)
        lock_path = m.lock_path
        if not lock_path.is_file():
            raise LockError(
                f"{lock_path}: no lock beside the manifest {m.path}; create it with `pixi lock` "
                "and ship it with the job"
            )
        lock = Lock.load(lock_path)
        plat = platform or _this_platform()
        lock.environment(environment)  # an unknown environment is a LockError (2)
        try:
            artifacts = lock.artifacts(environment, plat)
        except LockError as exc:
            if not preflight:
                raise
            lock_problem: LockError | None = exc  # preflight explains a missing platform
            artifacts = []
        else:
            lock_problem = None
        store = Store(settings.cache_dir)
        prefix = (m.workspace / ".pixi" / "envs" / environment).absolute()
        rep.set(
            manifest=m.path,
            lock=lock_path,
            environment=environment,
            platform=plat,
            prefix=prefix,
            store=store.root,
            package_cache=store.root / "pkgs",
            sources=list(settings.sources),
        )
        rep.data["host"]["platform"] = _this_platform()
        rep.record_artifacts(artifacts)

    if preflight:
        from .preflight import preflight as run_preflight

        with rep.phase("preflight"):
            missing = [a for a in artifacts if not store.has(a.sha256, a.size)]
            pf = run_preflight(
                lock,
                environment,
                plat,
                prefix=prefix,
                store=store,
                sources=srcs.get() if missing else [],
                manifest=m.path,
            )
            rep.data["preflight"] = pf.to_json()
            for check in pf.warnings:
                rep.note(f"preflight warning: {check.detail}")
    if lock_problem is not None:
        raise lock_problem

    verified = None
    if installer in ("auto", "pixi") or pixi is not None or trust_pixi is not None:
        from .bundle import rattler_available
        from .pixi.binary import locate_pixi

        # auto fetches the pinned Pixi only where rattler cannot install
        # (Python < 3.10, no py-rattler): then Pixi is the installer that works.
        rattler_ok, rattler_why = rattler_available()
        need_pixi = installer == "pixi" or (installer == "auto" and not rattler_ok)
        with rep.phase("pixi_verify"):
            verified, why = locate_pixi(
                store,
                srcs.get() if (need_pixi or pixi is not None) else None,
                pixi=pixi,
                trust_pixi=trust_pixi,
                fetch=need_pixi,
                config=settings.file,
            )
        if need_pixi and installer == "auto":
            why = f"{why} (rattler cannot be used here: {rattler_why})"
        rep.record_pixi(verified, why)

    request = InstallRequest(
        workspace=m.workspace,
        manifest=m.path,
        lock=lock,
        environment=environment,
        platform=plat,
        prefix=prefix,
        store=store,
        package_cache=store.root / "pkgs",
        pixi=verified.path if verified is not None else None,
    )
    inst, reason = choose_installer(request, installer)
    rep.record_installer(inst.name, reason)

    fetch_report = None
    up_to_date = getattr(inst, "up_to_date", None)
    with rep.phase("fetch"):
        if up_to_date is not None and up_to_date(request):
            rep.note("the prefix is already up to date: nothing fetched")
        else:
            missing = [a for a in artifacts if not store.has(a.sha256, a.size)]
            if missing:
                from .fetch import Fetcher

                fetch_report = Fetcher(store, srcs.get(), jobs=settings.jobs).fetch(artifacts)
                rep.record_fetch(fetch_report)
                if not fetch_report.ok:
                    raise _fetch_error(fetch_report)
            else:
                store.touch(artifacts)
                rep.record_store_hits(artifacts)

    before = _blob_identities(store, artifacts)
    with rep.phase("install"):
        try:
            result = inst.install(request)
        except InstallError as exc:
            # A blob that rotted in the node store (size intact, bytes not) is
            # caught by the installer's own digest check: re-hash what the lock
            # uses, quarantine what is bad, fetch what is missing and retry once.
            # A job beside this one may have got there first (quarantined the
            # blob, or already replaced it): retry as well when any blob changed
            # under us; the store's artifact locks keep it one download per node.
            bad = store.verify((a.sha256 for a in artifacts), wait=_VERIFY_WAIT_S).bad
            for sha, why in bad:
                rep.note(f"node store blob {sha} was corrupt ({why}): quarantined and fetched again")
            if not all(store.has(a.sha256, a.size) for a in artifacts):
                from .fetch import Fetcher

                refetch = Fetcher(store, srcs.get(), jobs=settings.jobs).fetch(artifacts)
                rep.record_fetch(refetch)
                if not refetch.ok:
                    raise _fetch_error(refetch) from exc
            if _blob_identities(store, artifacts) == before:
                raise  # not the store's doing: retrying would fail the same way
            rep.note("the install is retried once, with blobs fetched again")
            result = inst.install(request)
    rep.record_installer(inst.name, reason, result)
    return InstallOutcome(
        manifest=m,
        lock=lock,
        environment=environment,
        platform=plat,
        prefix=prefix,
        installer=inst.name,
        reason=reason,
        result=result,
        pixi=verified,
        fetch=fetch_report,
    )


def _blob_identities(
    store: Store, artifacts: Sequence[Artifact]
) -> dict[str, tuple[int, int] | None]:
    """Inode and mtime of each artifact's blob (``None`` if absent): a blob that
    was quarantined or replaced shows up as a changed identity."""
    ids: dict[str, tuple[int, int] | None] = {}
    for a in artifacts:
        try:
            st = store.path_for(a.sha256).stat()
        except FileNotFoundError:
            ids[a.sha256] = None
        else:
            ids[a.sha256] = (st.st_ino, st.st_mtime_ns)
    return ids


def run(
    manifest: str | os.PathLike[str],
    task: str,
    args: Sequence[str] = (),
    *,
    environment: str | None = None,
    settings: Settings,
    installer: str = "auto",
    pixi: str | os.PathLike[str] | None = None,
    trust_pixi: str | os.PathLike[str] | None = None,
    report: RunReport | None = None,
    platform: str | None = None,
    preflight: bool = True,
) -> int:
    """Install the environment, then run ``task`` with ``args`` in it.

    ``environment=None`` runs the task where Pixi would: the default
    environment (or the task's ``default-environment``), else the only
    environment that has it.

    Returns:
        The task's exit code (``128 + N`` if a signal N killed it).

    Raises:
        TaskError: unknown task, bad arguments, unsupported task feature (6),
        and everything :func:`install` raises.
    """
    from .runner import run_task

    rep = report if report is not None else RunReport("run", path=None)
    m = Manifest.load(manifest)
    env = environment or m.environment_for(task)
    m.task(task, env)  # an unknown task fails before anything is installed
    with _interruptible():
        outcome = install(
            manifest,
            env,
            settings=settings,
            installer=installer,
            pixi=pixi,
            trust_pixi=trust_pixi,
            report=rep,
            platform=platform,
            preflight=preflight,
        )
    with rep.phase("task"):
        result = run_task(
            outcome.manifest,
            task,
            args,
            environment=env,
            prefix=outcome.prefix,
            pixi=outcome.pixi,
            on_start=rep.mark_task_start,
        )
    rep.record_task(result, list(args))
    for note in result.notes:
        rep.note(note)
    return result.exit_code


# -- command-line wrappers -------------------------------------------------------------------


def _finish(rep: RunReport, code: int, exc: BaseException | None = None) -> int:
    if exc is not None:
        rep.record_error(exc, code)
        sys.stderr.write(f"pixicache: error: {exc}\n")
    rep.finish(code)
    rep.emit()
    return code


def main_install(
    manifest: str | os.PathLike[str], environment: str, *, report: RunReport, **kw: Any
) -> int:
    """:func:`install` for the CLI: the exit code, the report always written."""
    try:
        with _interruptible():
            install(manifest, environment, report=report, **kw)
    except PixicacheError as exc:
        return _finish(report, exc.exit_code, exc)
    except Exception as exc:  # a bug: still leave the report behind, then show the traceback
        report.record_error(exc, 1)
        report.finish(1)
        report.write()
        raise
    return _finish(report, 0)


def main_run(
    manifest: str | os.PathLike[str],
    task: str,
    args: Sequence[str],
    *,
    environment: str | None,
    report: RunReport,
    **kw: Any,
) -> int:
    """:func:`run` for the CLI: the task's exit code (or the agent failure's)."""
    try:
        code = run(manifest, task, args, environment=environment, report=report, **kw)
    except PixicacheError as exc:
        return _finish(report, exc.exit_code, exc)
    except Exception as exc:  # a bug: still leave the report behind, then show the traceback
        report.record_error(exc, 1)
        report.finish(1)
        report.write()
        raise
    return _finish(report, code)
