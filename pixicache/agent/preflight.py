"""Preflight: what can be known cheaply before downloading gigabytes.

:func:`preflight` checks, for one environment and platform of a lock:

``platform``
    the lock has the platform for the environment (and it is this node's);
``cuda`` / ``glibc`` / ``linux`` / ``osx``
    the environment's system requirements — ``[system-requirements]`` of the
    manifest (its features included) and the virtual packages its records
    depend on (``__cuda >=12.9``, ``__glibc >=2.17``) — against this node.
    The CUDA version the driver supports comes from ``CONDA_OVERRIDE_CUDA`` if
    set (empty means "no CUDA", as in conda), else NVML
    (``nvmlSystemGetCudaDriverVersion_v2`` in ``libnvidia-ml.so.1`` through
    ctypes: no dependency, the same source rattler's virtual-package detection
    uses), else ``nvidia-smi``. ``CONDA_OVERRIDE_GLIBC``, ``CONDA_OVERRIDE_LINUX``
    and ``CONDA_OVERRIDE_OSX`` are honoured likewise;
``disk``
    free space for the missing artifacts in the store and for the prefix
    (installed size estimated as :data:`INSTALL_FACTOR` x archive bytes unless
    the caller knows better), on the file system of each;
``mirror``
    each mirror source answers (``HEAD <mirror>/healthz``, 3 s) — only when
    the store lacks something, so a warm node makes no request at all.

Each check ends ``ok``, ``warning``, ``error`` or ``skipped``. Errors raise
:class:`~pixicache.errors.PreflightError` (exit code 8) with one line per
problem that says what to do, e.g. "this node's NVIDIA driver supports CUDA
12.2; the environment needs 12.9 — add ``requirements = (GPUs_DriverVersion >=
12.9)`` to the submit file".
"""

from __future__ import annotations

import os
import platform as _platform
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixicache.errors import PreflightError

if TYPE_CHECKING:
    import httpx

    from pixicache.model.artifact import Artifact
    from pixicache.model.lockfile import Lock
    from pixicache.model.manifest import Manifest
    from pixicache.sources.base import Source
    from pixicache.store import Store


__all__ = [
    "INSTALL_FACTOR",
    "Check",
    "CudaDriver",
    "PreflightReport",
    "Requirement",
    "detect_cuda_driver",
    "preflight",
    "system_requirements",
]

INSTALL_FACTOR = 2.5
"""Installed bytes per archive byte, for the disk estimate (conda packages are compressed)."""

MIRROR_TIMEOUT = 3.0
"""Seconds a mirror has to answer the health probe."""

DISK_MARGIN = 1.25
"""Below this multiple of the estimate, free space is a warning."""

NVML_LIBRARIES: tuple[str, ...] = ("libnvidia-ml.so.1", "libnvidia-ml.so")
"""NVML shared libraries tried, in order (tests replace this)."""

NVIDIA_SMI = "nvidia-smi"
"""The ``nvidia-smi`` executable looked up on ``PATH`` (tests replace this)."""

# Minimum Linux driver for each CUDA minor version (CUDA toolkit release notes),
# used only when nvidia-smi prints a driver version without "CUDA Version".
_DRIVER_CUDA = (
    ((580, 65), "13.0"),
    ((575, 51), "12.9"),
    ((570, 26), "12.8"),
    ((560, 28), "12.6"),
    ((555, 42), "12.5"),
    ((550, 54), "12.4"),
    ((545, 23), "12.3"),
    ((535, 54), "12.2"),
    ((530, 30), "12.1"),
    ((525, 60), "12.0"),
    ((520, 61), "11.8"),
    ((515, 43), "11.7"),
    ((510, 39), "11.6"),
    ((495, 29), "11.5"),
    ((470, 42), "11.4"),
    ((465, 19), "11.3"),
    ((460, 27), "11.2"),
    ((455, 23), "11.1"),
    ((450, 36), "11.0"),
)

_VPKG_RE = re.compile(r"^\s*(__[A-Za-z0-9_]+)\s*(.*?)\s*$")
_BOUND_RE = re.compile(r"^(>=|>|==|=|~=)?\s*([0-9][0-9A-Za-z.*_+-]*)$")


# -- the report ---------------------------------------------------------------------------


@dataclass
class Check:
    """One preflight check: ``status`` is ok, warning, error or skipped."""

    name: str
    status: str
    detail: str


@dataclass
class Requirement:
    """A virtual package the environment needs, and why.

    ``minimum`` is ``None`` when any version will do (``__cuda`` alone).
    """

    name: str
    minimum: str | None
    why: str


@dataclass
class CudaDriver:
    """What this node offers for ``__cuda``: ``version`` is ``None`` for no driver."""

    version: str | None
    source: str


@dataclass
class PreflightReport:
    """The outcome of :func:`preflight`."""

    environment: str
    platform: str
    checks: list[Check] = field(default_factory=list)
    requirements: list[Requirement] = field(default_factory=list)
    cuda: CudaDriver | None = None
    seconds: float = 0.0

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if c.status == "error"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    def summary(self) -> str:
        """One line per check (for the human summary on stderr)."""
        return "\n".join(f"  {c.status:<8} {c.name:<8} {c.detail}" for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "environment": self.environment,
            "platform": self.platform,
            "seconds": round(self.seconds, 3),
            "checks": [
                {"name": c.name, "status": c.status, "detail": c.detail} for c in self.checks
            ],
            "requirements": [
                {"name": r.name, "minimum": r.minimum, "why": r.why} for r in self.requirements
            ],
            "cuda_driver": None
            if self.cuda is None
            else {"version": self.cuda.version, "source": self.cuda.source},
        }


# -- versions -----------------------------------------------------------------------------


def _vtuple(version: str) -> tuple[int, ...]:
    parts = []
    for seg in re.split(r"[.]", version.strip()):
        m = re.match(r"\d+", seg)
        if not m:
            break
        parts.append(int(m.group()))
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _at_least(have: str, need: str) -> bool:
    h, n = _vtuple(have), _vtuple(need)
    width = max(len(h), len(n))
    return h + (0,) * (width - len(h)) >= n + (0,) * (width - len(n))


def _lower_bound(constraint: str) -> str | None:
    """The least version a constraint like ``>=2.17,<3.0.a0`` admits, or ``None``."""
    best: str | None = None
    for alt in constraint.split("|")[:1]:
        for part in alt.split(","):
            part = part.strip()
            if not part or part.startswith(("<", "!")):
                continue
            m = _BOUND_RE.match(part)
            if not m:
                continue
            version = m.group(2).rstrip("*").rstrip(".")
            if version and (best is None or not _at_least(best, version)):
                best = version
    return best


# -- requirements -------------------------------------------------------------------------


def system_requirements(
    lock: Lock, environment: str, platform: str, manifest: Manifest | None = None
) -> list[Requirement]:
    """The virtual packages the environment needs: from the manifest's
    ``[system-requirements]`` (default feature and the environment's features)
    and from the lock's records (``depends`` on ``__cuda``, ``__glibc``...).
    For each name, the highest minimum wins."""
    found: list[Requirement] = []
    if manifest is not None:
        for where, table in manifest.system_requirement_tables(environment):
            found.extend(_manifest_requirements(manifest.path.name, where, table))
    for pkg in lock.packages(environment, platform):
        for dep in pkg.depends:
            m = _VPKG_RE.match(dep)
            if not m:
                continue
            name, constraint = m.group(1).lower(), m.group(2)
            found.append(
                Requirement(
                    name,
                    _lower_bound(constraint),
                    f"{pkg.name} {pkg.version} depends on {dep.strip()}",
                )
            )
    merged: dict[str, Requirement] = {}
    for req in found:
        have = merged.get(req.name)
        stronger = req.minimum is not None and (
            have is None or have.minimum is None or not _at_least(have.minimum, req.minimum)
        )
        if have is None or stronger:
            merged[req.name] = req
    return list(merged.values())


def _manifest_requirements(name: str, where: str, table: dict[str, Any]) -> list[Requirement]:
    out: list[Requirement] = []
    for key, value in table.items():
        vpkg = {"libc": "__glibc", "macos": "__osx"}.get(key, f"__{key}")
        if isinstance(value, dict):
            if key == "libc" and str(value.get("family", "glibc")).lower() != "glibc":
                continue
            value = value.get("version")
        if value is None:
            continue
        out.append(Requirement(vpkg, str(value), f'{name} {where} {key} = "{value}"'))
    return out


# -- this node ----------------------------------------------------------------------------


def _nvml_cuda() -> str | None:
    import ctypes  # only for a lock that asks for CUDA (start-up time)

    for name in NVML_LIBRARIES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            init = getattr(lib, "nvmlInit_v2", None) or lib.nvmlInit
            if init() != 0:
                continue
            try:
                value = ctypes.c_int(0)
                get = getattr(lib, "nvmlSystemGetCudaDriverVersion_v2", None) or getattr(
                    lib, "nvmlSystemGetCudaDriverVersion", None
                )
                if get is None or get(ctypes.byref(value)) != 0 or value.value <= 0:
                    continue
                return f"{value.value // 1000}.{(value.value % 1000) // 10}"
            finally:
                lib.nvmlShutdown()
        except (AttributeError, OSError):
            continue
    return None


def _driver_to_cuda(driver: str) -> str | None:
    have = _vtuple(driver)[:2]
    for minimum, cuda in _DRIVER_CUDA:
        if have >= minimum:
            return cuda
    return None


def _smi_cuda() -> tuple[str | None, str]:
    import shutil

    exe = shutil.which(NVIDIA_SMI)
    if exe is None:
        return None, ""
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=15).stdout
        m = re.search(r"CUDA Version:\s*(\d+\.\d+)", out)
        if m:
            return m.group(1), "nvidia-smi"
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None, ""
    drivers = [line.strip() for line in out.splitlines() if re.match(r"^\d+\.\d+", line.strip())]
    if drivers:
        cuda = _driver_to_cuda(min(drivers, key=_vtuple))
        if cuda:
            return cuda, f"nvidia-smi driver {drivers[0]}"
    return None, ""


def detect_cuda_driver() -> CudaDriver:
    """The CUDA version this node's NVIDIA driver supports (``version=None``: none)."""
    override = os.environ.get("CONDA_OVERRIDE_CUDA")
    if override is not None:
        value = override.strip()
        return CudaDriver(
            value or None, "CONDA_OVERRIDE_CUDA" if value else "CONDA_OVERRIDE_CUDA is empty"
        )
    version = _nvml_cuda()
    if version:
        return CudaDriver(version, "NVML")
    version, source = _smi_cuda()
    if version:
        return CudaDriver(version, source)
    return CudaDriver(None, "no libnvidia-ml / nvidia-smi")


def _glibc() -> tuple[str | None, str]:
    if "CONDA_OVERRIDE_GLIBC" in os.environ:
        return os.environ["CONDA_OVERRIDE_GLIBC"].strip() or None, "CONDA_OVERRIDE_GLIBC"
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        text = ""
    if text.startswith("glibc "):
        return text.split()[1], "confstr"
    _lib, version = _platform.libc_ver()
    return (version or None), "platform.libc_ver"


def _kernel(var: str, value: str) -> tuple[str | None, str]:
    if var in os.environ:
        return os.environ[var].strip() or None, var
    m = re.match(r"\d+(?:\.\d+)*", value)
    return (m.group() if m else None), "uname"


def this_subdir() -> str:
    """The conda subdir of this machine (``linux-64``, ``osx-arm64``...)."""
    system = {"linux": "linux", "darwin": "osx", "win32": "win"}.get(sys.platform, sys.platform)
    machine = _platform.machine().lower()
    arch = {
        "x86_64": "64",
        "amd64": "64",
        "aarch64": "aarch64",
        "arm64": "arm64",
        "ppc64le": "ppc64le",
    }.get(machine, machine)
    if system == "linux" and arch == "arm64":
        arch = "aarch64"
    if system == "osx" and arch == "aarch64":
        arch = "arm64"
    return f"{system}-{arch}"


# -- the checks ---------------------------------------------------------------------------


def _check_platform(report: PreflightReport, lock: Lock, environment: str, platform: str) -> bool:
    platforms = lock.platforms(environment)
    if platform not in platforms:
        report.add(
            "platform",
            "error",
            f"the lock {lock.path} has no platform '{platform}' for environment '{environment}' "
            f"(it has: {', '.join(platforms) or 'none'}); add it to the manifest "
            f"(`pixi workspace platform add {platform}`), re-lock and resubmit",
        )
        return False
    here = this_subdir()
    subdir = lock.platform_subdir(platform)
    if subdir not in (here, "noarch"):
        report.add(
            "platform",
            "warning",
            f"installing platform '{platform}' ({subdir}) on a {here} node: its programs may not run here",
        )
    else:
        report.add("platform", "ok", f"the lock has '{platform}' for environment '{environment}'")
    return True


def _check_cuda(report: PreflightReport, req: Requirement, driver: CudaDriver) -> None:
    need = req.minimum
    if driver.version is None:
        report.add(
            "cuda",
            "error",
            f"no NVIDIA driver found on this node ({driver.source}); the environment needs "
            f"CUDA {need or '(any version)'} ({req.why}): request a GPU (`request_gpus = 1`)"
            + (f" with `requirements = (GPUs_DriverVersion >= {need})`" if need else "")
            + " in the submit file",
        )
        return
    if need is not None and not _at_least(driver.version, need):
        override = " (from CONDA_OVERRIDE_CUDA)" if driver.source == "CONDA_OVERRIDE_CUDA" else ""
        report.add(
            "cuda",
            "error",
            f"this node's NVIDIA driver supports CUDA {driver.version}{override}; the environment "
            f"needs {need} ({req.why}) — add `requirements = (GPUs_DriverVersion >= {need})` to "
            "the submit file",
        )
        return
    report.add(
        "cuda",
        "ok",
        f"driver supports CUDA {driver.version} ({driver.source}); needs {need or 'any'}",
    )


def _check_version(
    report: PreflightReport, name: str, req: Requirement, have: str | None, source: str, advice: str
) -> None:
    label = name.lstrip("_")
    if have is None:
        report.add(
            label,
            "error",
            f"this node has no {label} ({source}); the environment needs it ({req.why}) — {advice}",
        )
    elif req.minimum is not None and not _at_least(have, req.minimum):
        report.add(
            label,
            "error",
            f"this node has {label} {have} ({source}); the environment needs {req.minimum} "
            f"({req.why}) — {advice}",
        )
    else:
        report.add(label, "ok", f"{label} {have} ({source}); needs {req.minimum or 'any'}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    """Bytes free to an unprivileged user on the file system of ``path`` (what
    :func:`shutil.disk_usage` calls free; shutil is not imported for it at every start)."""
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize


def _check_disk(
    report: PreflightReport,
    artifacts: list[Artifact],
    missing: list[Artifact],
    prefix: Path,
    store: Store,
    installed_bytes: int | None,
) -> None:
    total = sum(a.size or 0 for a in artifacts)
    store_need = sum(a.size or 0 for a in missing)
    if installed_bytes is not None:
        prefix_need, how = installed_bytes, "as known"
    elif (prefix / "conda-meta").is_dir():
        prefix_need = int(INSTALL_FACTOR * store_need)
        how = (
            f"an update: {INSTALL_FACTOR:g} x the {_human(store_need)} of new packages, an estimate"
        )
    else:
        prefix_need = int(INSTALL_FACTOR * total)
        how = f"{INSTALL_FACTOR:g} x {_human(total)} of packages, an estimate"
    places: dict[int, tuple[Path, int, list[str]]] = {}
    for path, need, what in (
        (
            _existing(store.root),
            store_need,
            f"{_human(store_need)} of downloads into the store {store.root}",
        ),
        (_existing(prefix), prefix_need, f"{_human(prefix_need)} for the prefix {prefix} ({how})"),
    ):
        dev = os.stat(path).st_dev
        where, have_need, whats = places.get(dev, (path, 0, []))
        places[dev] = (where, have_need + need, [*whats, what])
    worst = "ok"
    lines = []
    for where, need, whats in places.values():
        free = free_bytes(where)
        if free < need:
            worst = "error"
            lines.append(
                f"only {_human(free)} free on the file system of {where}; the environment needs "
                f"about {_human(need)} ({' + '.join(whats)}) — ask for more disk "
                f"(`request_disk = {max(1, -(-int(need * DISK_MARGIN) // (1 << 30)))}GB` in the "
                "submit file) or set PIXICACHE_CACHE_DIR / the workspace on a larger file system"
            )
        elif free < need * DISK_MARGIN:
            worst = "warning" if worst == "ok" else worst
            lines.append(f"{_human(free)} free on {where}, little above the ~{_human(need)} needed")
        else:
            lines.append(f"{_human(free)} free on {where}; ~{_human(need)} needed")
    report.add("disk", worst, "; ".join(lines))


def _probe(client: httpx.Client, base: str) -> str | None:
    """``None`` if the mirror answers, else why not."""
    import httpx

    url = base.rstrip("/") + "/healthz"
    try:
        resp = client.head(url, timeout=MIRROR_TIMEOUT)
    except httpx.TimeoutException:
        return f"no answer within {MIRROR_TIMEOUT:g} s"
    except httpx.HTTPError as exc:
        from pixicache.sources.http import transport_failure

        return str(transport_failure(url, exc))
    if resp.status_code >= 500:
        return f"HTTP {resp.status_code} from {url}"
    return None


def _check_mirrors(
    report: PreflightReport,
    sources: list[Source],
    missing: list[Artifact],
    client: httpx.Client | None,
) -> None:
    if not missing:
        report.add("mirror", "skipped", "the node store has every artifact: no source is needed")
        return
    if not sources:
        report.add(
            "mirror",
            "error",
            f"{len(missing)} artifact(s) are not in the node store and no source is configured "
            "(--source, PIXICACHE_SOURCES or the config file)",
        )
        return
    mirrors: list[tuple[int, str]] = [
        (i, str(base))
        for i, s in enumerate(sources)
        if s.tier == "mirror" and (base := getattr(s, "base_url", None))
    ]
    if not mirrors:
        report.add("mirror", "skipped", "no mirror source configured")
        return
    import httpx

    own = client is None
    http = client or httpx.Client(follow_redirects=True, trust_env=True)
    try:
        down = {i: why for i, base in mirrors if (why := _probe(http, base)) is not None}
    finally:
        if own:
            http.close()
    need = _human(sum(a.size or 0 for a in missing))
    for i, base in mirrors:
        if i not in down:
            report.add("mirror", "ok", f"{base} answers")
            continue
        fallback = [s.label for j, s in enumerate(sources) if j > i and j not in down]
        if fallback:
            report.add(
                "mirror",
                "warning",
                f"the mirror {base} does not answer ({down[i]}); falling back to {', '.join(fallback)}",
            )
        else:
            report.add(
                "mirror",
                "error",
                f"the mirror {base} does not answer ({down[i]}) and {len(missing)} artifact(s) "
                f"({need}) are not in the node store: check the mirror URL (--source / "
                "PIXICACHE_SOURCES) and that the mirror is up, or add `upstream` as a fallback",
            )


def preflight(
    lock: Lock,
    environment: str,
    platform: str,
    *,
    prefix: str | os.PathLike[str],
    store: Store,
    sources: Iterable[Source],
    manifest: Manifest | None = None,
    installed_bytes: int | None = None,
    client: httpx.Client | None = None,
    raise_on_error: bool = True,
) -> PreflightReport:
    """Check that this node can run ``environment`` on ``platform`` before fetching it.

    Args:
        lock: the parsed lock.
        environment: the environment name.
        platform: the platform to install (normally this node's).
        prefix: where the environment will be installed.
        store: the node store (what it lacks must be downloaded).
        sources: the source chain (mirrors are probed only if something is missing).
        manifest: the parsed manifest, for its ``[system-requirements]``.
        installed_bytes: the installed size, when known (else estimated).
        client: an httpx client for the mirror probe.
        raise_on_error: raise :class:`PreflightError` when a check fails
            (else return the report with its errors).

    Raises:
        PreflightError: a check failed; one line per problem, each actionable.
        LockError: the lock has no such environment.
    """
    start = time.monotonic()
    report = PreflightReport(environment, platform)
    lock.environment(environment)  # LockError (exit 2) for an unknown environment
    if _check_platform(report, lock, environment, platform):
        reqs = system_requirements(lock, environment, platform, manifest)
        report.requirements = reqs
        for req in reqs:
            if req.name == "__cuda":
                report.cuda = detect_cuda_driver()
                _check_cuda(report, req, report.cuda)
            elif req.name == "__glibc" and platform.startswith("linux"):
                have, src = _glibc()
                advice = (
                    "run on a node with a newer OS (an HTCondor `requirements` on OpSysAndVer) "
                    "or in a container image with a newer glibc"
                )
                _check_version(report, "__glibc", req, have, src, advice)
            elif req.name == "__linux" and platform.startswith("linux"):
                have, src = _kernel("CONDA_OVERRIDE_LINUX", _platform.release())
                _check_version(
                    report, "__linux", req, have, src, "run on a node with a newer kernel"
                )
            elif req.name == "__osx" and platform.startswith("osx"):
                have, src = _kernel("CONDA_OVERRIDE_OSX", _platform.mac_ver()[0])
                _check_version(report, "__osx", req, have, src, "run on a newer macOS")
        artifacts = lock.artifacts(environment, platform)
        missing = [a for a in artifacts if not store.has_artifact(a)]
        _check_disk(report, artifacts, missing, Path(prefix), store, installed_bytes)
        _check_mirrors(report, list(sources), missing, client)
    report.seconds = time.monotonic() - start
    if raise_on_error and report.errors:
        host = os.uname().nodename  # gethostname(2)
        lines = [f"preflight failed on {host} for environment '{environment}' ({platform}):"]
        lines.extend(f"  - {c.detail}" for c in report.errors)
        raise PreflightError("\n".join(lines))
    return report
