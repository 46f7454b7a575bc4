"""An HTCondor job's execute side, as the starter sets it up, for tests and
benchmarks that run the real ``bootstrap.sh`` without a pool.

* :func:`write_ads` writes the ``.job.ad`` / ``.machine.ad`` a starter leaves
  in the scratch directory;
* :func:`starter_environment` is the environment the starter gives the job
  (``_CONDOR_*``, a scratch ``TMPDIR``, thread counts of ``request_cpus``, a
  ``PATH`` with no virtualenv on it);
* :func:`job_python` finds the system ``python3`` such a job would run the
  agent with; :func:`pyenv_python` a pyenv interpreter of a given version
  (EL9's 3.9) and :func:`node_path` a ``PATH`` on which it is *the* ``python3``;
* :func:`as_user` runs a command as another Unix user (``setpriv``, no passwd
  entry needed) and :func:`traversable` lets such users reach the files they need.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "JOB_PATH",
    "as_user",
    "job_python",
    "node_path",
    "pyenv_python",
    "starter_environment",
    "traversable",
    "write_ads",
]

JOB_PATH = "/usr/local/bin:/usr/bin:/bin"
"""The ``PATH`` a job gets: no virtualenv, no pyenv."""

_JOB_AD = """\
ClusterId = {cluster}
ProcId = {proc}
Cmd = "bootstrap.sh"
RequestCpus = {cpus}
RequestGpus = 0
JobUniverse = 5
"""
_MACHINE_AD = """\
Machine = "{machine}"
Arch = "X86_64"
OpSys = "LINUX"
"""
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def write_ads(sandbox: Path, *, cluster: int, proc: int, machine: str, cpus: int = 1) -> None:
    """Write the job and machine ads the starter puts in ``sandbox``."""
    (sandbox / ".job.ad").write_text(_JOB_AD.format(cluster=cluster, proc=proc, cpus=cpus))
    (sandbox / ".machine.ad").write_text(_MACHINE_AD.format(machine=machine))


def starter_environment(
    sandbox: Path, *, home: Path, slot: int = 1, cpus: int = 1
) -> dict[str, str]:
    """The environment HTCondor's starter gives a job running in ``sandbox``
    (no GPU assigned); callers add the submit file's ``environment``."""
    env = {
        "PATH": JOB_PATH,
        "HOME": str(home),
        "_CONDOR_SCRATCH_DIR": str(sandbox),
        "_CONDOR_SLOT": f"slot1_{slot}",
        "_CONDOR_JOB_AD": str(sandbox / ".job.ad"),
        "_CONDOR_MACHINE_AD": str(sandbox / ".machine.ad"),
        "_CONDOR_JOB_IWD": str(sandbox),
        "_CONDOR_AssignedGPUs": "",
        "CUDA_VISIBLE_DEVICES": "",
        "BATCH_SYSTEM": "HTCondor",
        "TMPDIR": str(sandbox),
        "TEMP": str(sandbox),
        "TMP": str(sandbox),
    }
    for var in _THREAD_VARS:
        env[var] = str(cpus)  # HTCondor sets these to request_cpus
    return env


def python_version(exe: str) -> tuple[int, int] | None:
    """``(major, minor)`` of the interpreter ``exe``, or ``None`` if it does not run."""
    try:
        out = subprocess.run(
            [exe, "-I", "-S", "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        major, minor = out.split()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return int(major), int(minor)


def job_python(minimum: tuple[int, int] = (3, 10)) -> tuple[str, bool] | None:
    """The python3 a job runs the agent with: ``(path, override)``.

    ``python3`` on :data:`JOB_PATH` if it is at least ``minimum``
    (``override`` False: ``bootstrap.sh`` finds it itself); else this
    interpreter's base, never a virtualenv (``override`` True: tell
    ``bootstrap.sh`` through ``PIXICACHE_PYTHON``); ``None`` if neither is
    new enough.
    """
    system = shutil.which("python3", path=JOB_PATH)
    if system and (python_version(system) or (0, 0)) >= minimum:
        return system, False
    base = getattr(sys, "_base_executable", None) or sys.executable
    if (python_version(base) or (0, 0)) >= minimum:
        return base, True
    return None


def pyenv_python(version: str) -> str | None:
    """pyenv's newest CPython ``version`` (``"3.9"``) on this machine, or ``None``."""
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    found = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"))
    return found[-1] if found else None


def node_path(bindir: Path, python: str) -> str:
    """A ``PATH`` like an execute node's (EL9's): the system tools, with ``python3`` (and
    ``python3.X``) being ``python`` and no other Python on it. ``bindir`` is filled with
    links to the tools; the result is just ``bindir``."""
    bindir.mkdir(parents=True, exist_ok=True)
    version = Path(python).name.removeprefix("python")
    for sysdir in JOB_PATH.split(":"):
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(sysdir):
                if name.startswith("python") or (bindir / name).exists():
                    continue
                (bindir / name).symlink_to(os.path.join(sysdir, name))
    for name in {"python3", f"python{version}"}:
        if not (bindir / name).exists():
            (bindir / name).symlink_to(python)
    return str(bindir)


def as_user(uid: int, gid: int, argv: list[str], *, umask: str | None = None) -> list[str]:
    """``argv`` run as ``uid:gid`` (supplementary group ``gid`` only), optionally under a umask."""
    inner = ["bash", "-c", f'umask {umask} && exec "$@"', "as-user", *argv] if umask else argv
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", f"--groups={gid}", *inner]


_TRAVERSE_STATE = Path("/tmp/pixicache-traversable.json")


@contextlib.contextmanager
def traversable(*paths: Path) -> Iterator[None]:
    """Let other users reach ``paths`` (o+x on each ancestor directory that lacks it),
    and undo it afterwards. pyenv's interpreters live under ``/root`` (0700) on a build
    machine; on a real node python3 is in ``/usr/bin``.

    Several test processes may need the same directory at once (``pytest -n``): who
    widened what is counted in one state file under a lock, and a directory gets its
    mode back only when the last of them is done.
    """
    import fcntl
    import json

    dirs = sorted({str(d) for p in paths for d in [p, *p.parents] if d.is_dir()})

    def update(step: int) -> None:
        with open(f"{_TRAVERSE_STATE}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(_TRAVERSE_STATE.read_text())
            except (OSError, ValueError):
                state = {}
            for d in dirs:
                mode = stat.S_IMODE(os.stat(d).st_mode)
                entry = state.get(d)
                if step > 0 and entry is None and mode & stat.S_IXOTH:
                    continue  # reachable already, by itself
                if step > 0:
                    entry = entry or {"mode": mode, "count": 0}
                    entry["count"] += 1
                    state[d] = entry
                    os.chmod(d, mode | stat.S_IXOTH)
                elif entry is not None:
                    entry["count"] -= 1
                    if entry["count"] <= 0:
                        os.chmod(d, entry["mode"])
                        del state[d]
            _TRAVERSE_STATE.write_text(json.dumps(state))

    update(+1)
    try:
        yield
    finally:
        update(-1)
