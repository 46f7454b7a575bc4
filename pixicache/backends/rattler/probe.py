"""Can this process use py-rattler? One answer for the agent, the installers and the runner."""

from __future__ import annotations

import sys
from pathlib import Path

from pixicache.bundle.runtime import RATTLER_MIN_PYTHON, bundle_runtime

__all__ = ["rattler_available"]


def rattler_available() -> tuple[bool, str]:
    """Whether py-rattler can be used by this process, and why (one sentence).

    From a bundle: the launcher's decision (Python version, platform, and the
    cached import probe). Otherwise: Python >= 3.8 and ``rattler`` importable
    (found, not imported: importing is left to the installer's child process).
    """
    runtime = bundle_runtime()
    if runtime is not None:
        return runtime.rattler_ok, runtime.rattler_reason
    import importlib.util

    if sys.version_info < RATTLER_MIN_PYTHON:
        version = ".".join(str(v) for v in sys.version_info[:3])
        return False, f"py-rattler needs Python >= 3.8; this is Python {version} ({sys.executable})"
    spec = importlib.util.find_spec("rattler")
    if spec is None:
        return False, "py-rattler is not installed (pip install 'pixicache[rattler]')"
    return True, f"py-rattler from {Path(spec.origin or '').parent}"
