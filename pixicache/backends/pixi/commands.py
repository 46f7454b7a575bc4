"""The Pixi command lines and process environment pixicache uses (Pixi 0.79's CLI).

* :func:`pixi_install_argv`: ``pixi install --frozen ... --config-file <mirrors>``;
* :func:`pixi_run_argv`: ``pixi run --frozen --no-install`` (Pixi's ``--as-is``);
* :func:`pixi_environment`: the process environment for ``pixi install``.

See :mod:`pixicache.installers.pixi` for why each flag is there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from pixicache.backends.pixi.binary import VerifiedPixi

__all__ = ["PixiLike", "pixi_environment", "pixi_install_argv", "pixi_run_argv"]

PixiLike = Union["VerifiedPixi", str, "os.PathLike[str]"]

_DROPPED_ENV = ("PIXI_FROZEN", "PIXI_LOCKED", "PIXI_CONFIG_FILE", "PIXI_NO_CONFIG")
_LOCAL_HOSTS = ("127.0.0.1", "localhost")


def _exe(pixi: PixiLike) -> str:
    path = pixi.path if hasattr(pixi, "path") else pixi
    return os.fspath(path)


def pixi_install_argv(
    pixi: PixiLike,
    manifest: str | os.PathLike[str],
    environment: str,
    config_file: str | os.PathLike[str],
) -> list[str]:
    """The ``pixi install`` command line the installer runs (see the module doc)."""
    return [
        _exe(pixi),
        "install",
        "--frozen",
        "--manifest-path",
        os.fspath(manifest),
        "-e",
        environment,
        "--config-file",
        os.fspath(config_file),
    ]


def pixi_run_argv(
    verified_pixi: PixiLike,
    manifest: str | os.PathLike[str],
    env: str,
    task: str,
    args: Sequence[str] = (),
) -> list[str]:
    """``pixi run`` for a task in an environment that is already installed.

    ``--frozen`` keeps Pixi from updating the lock and ``--no-install`` from
    touching the prefix (together: Pixi's ``--as-is``), so the task starts on
    exactly what pixicache installed. ``args`` follow the task name and are
    passed to the task.
    """
    return [
        _exe(verified_pixi),
        "run",
        "--frozen",
        "--no-install",
        "--manifest-path",
        os.fspath(manifest),
        "-e",
        env,
        task,
        *args,
    ]


def pixi_environment(
    package_cache: str | os.PathLike[str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The process environment for ``pixi install`` (see :mod:`pixicache.installers.pixi`).

    Pixi keeps extracted conda packages in ``$PIXI_CACHE_DIR/pkgs`` (rattler's
    ``PACKAGE_CACHE_DIR``), so the cache root handed to Pixi is the parent of the
    node's package cache ``.../pkgs``: Pixi and the rattler installer share one
    package cache per node (and user).
    """
    env = dict(os.environ if base is None else base)
    for key in _DROPPED_ENV:
        env.pop(key, None)
    pkgs = Path(package_cache)
    cache = os.fspath(pkgs.parent if pkgs.name == "pkgs" else pkgs)
    env["PIXI_CACHE_DIR"] = cache
    env["RATTLER_CACHE_DIR"] = cache
    env["PIXI_NO_PROGRESS"] = "1"
    for key in ("NO_PROXY", "no_proxy"):
        have = [h.strip() for h in env.get(key, "").split(",") if h.strip()]
        env[key] = ",".join([*have, *(h for h in _LOCAL_HOSTS if h not in have)])
    return env
