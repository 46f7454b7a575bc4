"""The worker agent: ``pixicache install`` and ``pixicache run`` as a library.

:func:`install` is one step per phase of the :class:`~pixicache.agent.report.RunReport`:

1. **plan** (:func:`_plan`) — the lock beside the manifest; the
   :class:`~pixicache.model.plan.Plan` of the environment for this platform;
2. **preflight** (:func:`_preflight`) — :func:`pixicache.agent.preflight.preflight`:
   platform, system requirements (CUDA driver...), free disk, the mirror answers
   (only when something must be downloaded);
3. **pixi verify** (:func:`_verify_pixi`) — a verified Pixi (``--trust-pixi``,
   ``--pixi``, one on ``PATH`` whose digest is pinned, or the pinned one already in
   the store; with ``--installer pixi`` the pinned one is fetched if needed);
4. **fetch** (:func:`_fetch`) — every artifact the store lacks, through the
   source chain (skipped when the installer says the prefix is already current);
5. **install** (:func:`_install`) — the installer
   :func:`~pixicache.installers.registry.choose_installer` picks. When it fails
   naming artifacts it found bad (:attr:`InstallError.suspects`), or a blob
   changed under it (a neighbour quarantined it), exactly those blobs are
   re-verified and fetched again, and the install is retried once.

:func:`run` installs, then runs the task (:func:`pixicache.agent.runner.run_task`)
and returns the task's exit code. The command-line wrappers are in
:mod:`pixicache.agent.main`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixicache.agent.options import AgentOptions
from pixicache.agent.report import RunReport
from pixicache.agent.signals import interruptible
from pixicache.bundle.runtime import resume_collection
from pixicache.errors import FetchError, InstallError, IntegrityError, LockError, StoreError
from pixicache.installers import registry
from pixicache.installers.base import Installer, InstallRequest, InstallResult
from pixicache.model.lockfile import Lock
from pixicache.model.manifest import DEFAULT_ENVIRONMENT, Manifest
from pixicache.model.plan import Plan, environment_plan
from pixicache.store import Store

if TYPE_CHECKING:
    from pixicache.fetch import FetchReport
    from pixicache.sources.base import Source

#: How long a failed install waits for a neighbour to stop reading a blob
#: before it re-hashes it (the store view pins a blob only while sending it).
_VERIFY_WAIT_S = 30.0

__all__ = ["InstallOutcome", "install", "run"]


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


class _Meanwhile:
    """Work of the job's that may run while the installer waits (it becomes the
    request's :attr:`~pixicache.installers.base.InstallRequest.meanwhile`): the first
    call runs everything added so far, once; an error is kept, never raised into the
    installer, and :meth:`finish` (after the install) runs what is left and raises it."""

    def __init__(self) -> None:
        self._work: list[Callable[[], None]] = []
        self._error: Exception | None = None

    def add(self, work: Callable[[], None]) -> None:
        self._work.append(work)

    def __call__(self) -> None:
        while self._work:
            work = self._work.pop(0)
            try:
                work()
            except Exception as exc:  # for finish(): the install goes on
                if self._error is None:
                    self._error = exc

    def finish(self) -> None:
        self()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class _Sources:
    """The settings' sources, parsed on first use (a warm node never needs them)."""

    def __init__(self, specs: Sequence[str]) -> None:
        self.specs = list(specs)
        self._parsed: list[Source] | None = None

    def get(self) -> list[Source]:
        if self._parsed is None:
            from pixicache.sources import parse_sources

            self._parsed = parse_sources(self.specs)
        return self._parsed


@dataclass
class _Job:
    """The state one :func:`install` builds up, step by step."""

    manifest: Manifest
    environment: str
    options: AgentOptions
    report: RunReport
    sources: _Sources
    store: Store
    lock: Lock | None = None
    platform: str = ""
    plan: Plan | None = None
    lock_problem: LockError | None = None
    pixi: Any = None
    meanwhile: _Meanwhile = field(default_factory=_Meanwhile)

    @property
    def prefix(self) -> Path:
        return (self.manifest.workspace / ".pixi" / "envs" / self.environment).absolute()

    @property
    def artifacts(self) -> list[Any]:
        return self.plan.artifacts if self.plan is not None else []

    def missing(self) -> list[Any]:
        """The artifacts the store lacks right now."""
        return [a for a in self.artifacts if not self.store.has_artifact(a)]

    def fetcher(self) -> Any:
        from pixicache.fetch import Fetcher

        return Fetcher(self.store, self.sources.get(), jobs=self.options.settings.jobs)


def _this_platform() -> str:
    from pixicache.agent.preflight import this_subdir

    return this_subdir()


def _fetch_error(fetch_report: FetchReport) -> FetchError:
    missing = fetch_report.missing
    lines = [f"{len(missing)} artifact(s) could not be fetched:"]
    for r in missing[:20]:
        lines.append(f"  {r.artifact.filename} ({r.artifact.pin})")
        lines.extend(f"    - {a}" for a in (r.attempts or ["no source could serve it"]))
    text = "\n".join(lines)
    if any(isinstance(r.error, IntegrityError) for r in missing):
        return IntegrityError(text)
    return FetchError(text)


# -- the steps -------------------------------------------------------------------------------


def _plan(job: _Job) -> None:
    """Read the lock beside the manifest and plan the environment for this platform."""
    m, rep = job.manifest, job.report
    lock_path = m.lock_path
    if not lock_path.is_file():
        raise LockError(
            f"{lock_path}: no lock beside the manifest {m.path}; create it with `pixi lock` "
            "and ship it with the job"
        )
    job.lock = lock = Lock.load_cached(lock_path, _lock_cache(job.store))
    job.platform = job.options.platform or _this_platform()
    lock.environment(job.environment)  # an unknown environment is a LockError (2)
    if job.options.may_use_rattler:  # its cache guard checks while this process goes on
        from pixicache.agent.ahead import prepare_installer_ahead

        prepare_installer_ahead(lock_path, job.environment, job.platform, job.store.package_cache)
    try:
        job.plan = environment_plan(
            lock, job.environment, job.platform, job.store,
            require_sha256=job.options.settings.require_sha256,
        )  # fmt: skip
    except LockError as exc:
        if not job.options.preflight:
            raise
        job.lock_problem = exc  # preflight explains a missing platform first
    rep.set(
        manifest=m.path,
        lock=lock_path,
        environment=job.environment,
        platform=job.platform,
        prefix=job.prefix,
        store=job.store.root,
        package_cache=job.store.package_cache,
        sources=list(job.options.settings.sources),
    )
    rep.record_host_platform(_this_platform())
    rep.record_artifacts(job.artifacts)
    if job.plan is not None:
        _check_lock_is_current(job)


def _lock_cache(store: Store) -> Path | None:
    """This user's cache of parsed locks in the store (``None``: it cannot be had)."""
    try:
        return store.private_dir(store.user_dir / "parsed-locks")
    except (StoreError, OSError):
        return None


def _check_lock_is_current(job: _Job) -> None:
    """Warn (never fail) when the manifest asks for what the lock does not hold."""
    from pixicache.model.satisfy import unsatisfied

    assert job.lock is not None
    try:
        problems = unsatisfied(job.manifest, job.lock, job.environment, job.platform)
    except LockError:  # the manifest does not define the environment: Pixi's business
        return
    for problem in problems:
        text = (
            f"{problem}: pixi.lock is older than {job.manifest.path.name}; this job runs what "
            "the lock pins. Run `pixi lock` and ship the new pixi.lock"
        )
        job.report.note(f"warning: {text}")
        sys.stderr.write(f"pixicache: warning: {text}\n")


def _preflight(job: _Job) -> None:
    """Check that this node can run the environment (raises ``PreflightError``)."""
    from pixicache.agent.preflight import preflight

    assert job.lock is not None
    missing = job.plan.missing if job.plan is not None else []  # as the plan just found it
    report = preflight(
        job.lock,
        job.environment,
        job.platform,
        prefix=job.prefix,
        store=job.store,
        sources=job.sources.get() if missing else [],
        manifest=job.manifest,
    )
    job.report.record_preflight(report)


def _verify_pixi(job: _Job) -> None:
    """Find (or, where Pixi is the installer that works, fetch) a verified Pixi."""
    from pixicache.backends.pixi.binary import locate_pixi
    from pixicache.backends.rattler.probe import rattler_available

    opts = job.options
    # auto fetches the pinned Pixi only where rattler cannot install
    # (no usable py-rattler): then Pixi is the installer that works.
    rattler_ok, rattler_why = rattler_available()
    need_pixi = opts.installer == "pixi" or (opts.installer == "auto" and not rattler_ok)
    because = (
        f"Pixi is needed because the rattler installer cannot be used here: {rattler_why}"
        if opts.installer == "auto"
        else "Pixi is needed because --installer pixi was asked for"
    )
    try:
        job.pixi, why = locate_pixi(
            job.store,
            job.sources.get() if (need_pixi or opts.pixi is not None) else None,
            pixi=opts.pixi,
            trust_pixi=opts.trust_pixi,
            fetch=need_pixi,
            config=opts.settings.file,
        )
    except FetchError as exc:
        if not need_pixi:
            raise
        job.report.record_pixi(None, because)
        raise type(exc)(
            f"{because}; but the pinned Pixi could not be obtained: {exc}\n"
            "Fix: run the agent with a Python that loads py-rattler (>= 3.8 with the bundle), "
            "or let the mirror serve Pixi releases (`pixicache serve` has the `pixi` upstream "
            "unless --only-upstreams is given)"
        ) from exc
    if need_pixi and opts.installer == "auto":
        why = f"{why} ({because})"
    job.report.record_pixi(job.pixi, why)


def _request(job: _Job) -> InstallRequest:
    assert job.lock is not None
    return InstallRequest(
        workspace=job.manifest.workspace,
        manifest=job.manifest.path,
        lock=job.lock,
        environment=job.environment,
        platform=job.platform,
        prefix=job.prefix,
        store=job.store,
        package_cache=job.store.package_cache,
        pixi=job.pixi.path if job.pixi is not None else None,
        parsed_manifest=job.manifest,
        build_index_url=_build_index_url(job),
        meanwhile=job.meanwhile,
    )


def _build_index_url(job: _Job) -> str | None:
    """Where an sdist's build requirements come from: the first mirror's PyPI index
    (``<mirror>/pypi/``), else the lock's own index when upstream is a source; ``None``
    (offline builds only) when the lock has no sdist or directory to build."""
    assert job.lock is not None
    packages = job.lock.packages(job.environment, job.platform)
    if not any(p.kind == "pypi" and not p.url.endswith(".whl") for p in packages):
        return None
    from pixicache.sources.http import MirrorSource, UpstreamSource  # httpx: only if needed

    sources = job.sources.get()
    for source in sources:
        if isinstance(source, MirrorSource):
            return source.base_url + "/pypi/"
    indexes = job.lock.environment(job.environment).indexes
    if indexes and any(isinstance(s, UpstreamSource) for s in sources):
        return indexes[0].rstrip("/") + "/"
    return None


def _fetch(job: _Job, inst: Installer, request: InstallRequest) -> FetchReport | None:
    """Fetch what the store lacks, unless the installer says the prefix is current."""
    rep = job.report
    if inst.up_to_date(request):
        rep.note("the prefix is already up to date: nothing fetched")
        return None
    if not job.missing():
        # the record of this use (one index transaction) waits for the installer
        store, artifacts = job.store, job.artifacts
        job.meanwhile.add(lambda: store.touch(artifacts))
        rep.record_store_hits(job.artifacts)
        return None
    resume_collection()  # a download is the job's long part
    fetch_report: FetchReport = job.fetcher().fetch(job.artifacts)
    rep.record_fetch(fetch_report)
    if not fetch_report.ok:
        raise _fetch_error(fetch_report)
    return fetch_report


def _install(job: _Job, inst: Installer, request: InstallRequest) -> InstallResult:
    """Install; after a failure the store can explain, repair those blobs and retry once."""
    before = _blob_identities(job.store, job.artifacts)
    try:
        return inst.install(request)
    except InstallError as exc:
        if not _repair(job, exc, before):
            raise
        job.report.note("the install is retried once, with blobs fetched again")
        return inst.install(request)


def _repair(job: _Job, exc: InstallError, before: dict[str, tuple[int, int] | None]) -> bool:
    """Re-verify the blobs the installer reported bad or that changed under it
    (never the whole environment), quarantine what is corrupt, fetch what is
    missing. True if a blob was replaced, so a retry can succeed.

    A blob that rotted in the node store (size intact, bytes not) is caught by the
    installer's own digest check; a job beside this one may have got there first
    (quarantined it, or already replaced it). The store's artifact locks keep it
    one download per node.
    """
    store, rep = job.store, job.report
    known = {sha for a in job.artifacts if (sha := store.blob_of(a))}
    changed = {sha for sha, ident in _blob_identities(store, job.artifacts).items() if ident != before.get(sha)}
    suspects = (set(exc.suspects) & known) | changed
    if not suspects:
        return False
    for sha, why in store.verify(sorted(suspects), wait=_VERIFY_WAIT_S).bad:
        rep.note(f"node store blob {sha} was corrupt ({why}): quarantined and fetched again")
    if job.missing():
        resume_collection()  # a download is the job's long part
        refetch = job.fetcher().fetch(job.artifacts)
        rep.record_fetch(refetch)
        if not refetch.ok:
            raise _fetch_error(refetch) from exc
    return _blob_identities(store, job.artifacts) != before


def _blob_identities(
    store: Store, artifacts: Sequence[Any]
) -> dict[str, tuple[int, int] | None]:
    """Inode and mtime of each artifact's blob (``None`` if absent): a blob that
    was quarantined or replaced shows up as a changed identity."""
    ids: dict[str, tuple[int, int] | None] = {}
    for a in artifacts:
        sha = store.blob_of(a)
        if sha is None:
            continue
        try:
            st = os.lstat(store.path_for(sha))
        except FileNotFoundError:
            ids[sha] = None
        else:
            ids[sha] = (st.st_ino, st.st_mtime_ns)
    return ids


# -- the API ---------------------------------------------------------------------------------


def install(
    manifest: str | os.PathLike[str] | Manifest = "pixi.toml",
    environment: str = DEFAULT_ENVIRONMENT,
    *,
    options: AgentOptions,
    report: RunReport | None = None,
) -> InstallOutcome:
    """Install ``environment`` of the lock beside ``manifest`` into its Pixi prefix.

    Args:
        manifest: the ``pixi.toml`` (its ``pixi.lock`` must be beside it), or the
            parsed :class:`~pixicache.model.manifest.Manifest`.
        environment: the environment name.
        options: settings and choices (:class:`~pixicache.agent.options.AgentOptions`).
        report: the report to fill (a new one, not written, if omitted).

    Raises:
        LockError: no manifest, no lock, or the lock lacks the environment/platform (2).
        FetchError / IntegrityError: an artifact could not be obtained (3 / 4).
        PixiVerificationError: ``options.pixi`` does not match a pin (4).
        PreflightError: this node cannot run the environment (8).
        InstallError: the installer failed (5).
        StoreError: the node store cannot be used (7).
    """
    rep = report if report is not None else RunReport("install", path=None)
    with rep.phase("plan"):
        m = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        job = _Job(
            m, environment, options, rep, _Sources(options.settings.sources),
            Store(options.settings.cache_dir),
        )
        _plan(job)
    if options.preflight:
        with rep.phase("preflight"):
            _preflight(job)
    if job.lock_problem is not None:
        raise job.lock_problem
    if options.wants_pixi:
        with rep.phase("pixi_verify"):
            _verify_pixi(job)
    request = _request(job)
    inst, reason = registry.choose_installer(request, options.installer)
    rep.record_installer(inst.name, reason)
    with rep.phase("fetch"):
        fetch_report = _fetch(job, inst, request)
    with rep.phase("install"):
        try:
            result = _install(job, inst, request)
        except Exception:
            job.meanwhile.finish()  # its error first: a store this user cannot write
            raise
        finally:
            resume_collection()  # the start is over (the launcher held it off)
        job.meanwhile.finish()
    rep.record_installer(inst.name, reason, result)
    assert job.lock is not None
    return InstallOutcome(
        manifest=m,
        lock=job.lock,
        environment=environment,
        platform=job.platform,
        prefix=job.prefix,
        installer=inst.name,
        reason=reason,
        result=result,
        pixi=job.pixi,
        fetch=fetch_report,
    )


def run(
    manifest: str | os.PathLike[str] | Manifest,
    task: str,
    args: Sequence[str] = (),
    *,
    environment: str | None = None,
    options: AgentOptions,
    report: RunReport | None = None,
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
    from pixicache.agent.ahead import end_installer_ahead
    from pixicache.agent.runner import run_task

    rep = report if report is not None else RunReport("run", path=None)
    m = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    env = environment or m.environment_for(task)
    # an unknown task, a cycle or a too deep depends-on, bad arguments: before installing
    m.execution_plan(task, args, env, options.platform or _this_platform(), supported_only=False)
    with interruptible():
        outcome = install(m, env, options=options, report=rep)
    end_installer_ahead()  # an unused child must not sit beside a task for hours
    with rep.phase("task"):
        result = run_task(
            outcome.manifest,
            task,
            args,
            environment=env,
            prefix=outcome.prefix,
            pixi=outcome.pixi,
            on_start=rep.mark_task_start,
            platform=outcome.platform,
        )
    rep.record_task(result, list(args))
    for note in result.notes:
        rep.note(note)
    return result.exit_code
