"""An HTCondor job's execute side, as the starter sets it up, for tests and
benchmarks that run the real ``bootstrap.sh`` without a pool.

* :func:`write_ads` writes the ``.job.ad`` / ``.machine.ad`` a starter leaves
  in the scratch directory;
* :func:`starter_environment` is the environment the starter gives the job
  (``_CONDOR_*``, a scratch ``TMPDIR``, thread counts of ``request_cpus``, a
  ``PATH`` with no virtualenv on it);
* :func:`job_python` finds the system ``python3`` such a job would run the
  agent with.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["JOB_PATH", "job_python", "starter_environment", "write_ads"]

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
