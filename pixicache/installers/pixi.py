"""The ``pixi`` installer: the verified Pixi binary installs the lock from the node store.

What it runs (Pixi 0.79; flags checked against Pixi's CLI reference)::

    pixi install --frozen --manifest-path <manifest> -e <env> --config-file <tmp>/config.toml

* ``--frozen`` ("install the environment as defined in the lockfile, doesn't
  update lockfile if it isn't up-to-date with the manifest file", env
  ``PIXI_FROZEN``): the lock is the contract of the job; Pixi neither solves nor
  fetches repodata. ``--locked`` is not used: it *checks* the lock against the
  manifest and aborts when they disagree, which can need channel metadata (a
  network access) and would turn a harmless manifest edit into a failed job.
* ``--config-file`` (env ``PIXI_CONFIG_FILE``, Pixi >= 0.72): "load
  configuration from this file instead of searching system and user-level
  paths". The file holds only a ``[mirrors]`` table that maps every channel of
  the lock to the :class:`~pixicache.store.view.StoreView` of the node store, so
  Pixi downloads every package from ``127.0.0.1`` and nothing from outside.
  User-level mirrors cannot redirect it elsewhere; a workspace-local
  ``.pixi/config.toml`` is still merged on top by Pixi (reported as a note
  when it has its own ``[mirrors]``).
* environment: ``PIXI_CACHE_DIR`` and ``RATTLER_CACHE_DIR`` = the parent of the
  node's package cache (Pixi extracts packages into ``$PIXI_CACHE_DIR/pkgs``:
  the very directory the rattler installer uses, one package cache per node and
  user); ``PIXI_NO_PROGRESS=1``; ``127.0.0.1`` added to ``NO_PROXY`` so a
  site proxy is not asked for the store view; ``PIXI_FROZEN``, ``PIXI_LOCKED``,
  ``PIXI_CONFIG_FILE`` and ``PIXI_NO_CONFIG`` from the caller are dropped (the
  command line says what is meant).

The ``[mirrors]`` table covers the lock's PyPI entries too, as Pixi's configuration
reference describes for uv: each index URL the lock records (its ``indexes``) and
the origin of every PyPI file it pins (PyPI's file host, for one) are mapped to the
store view, which serves the files and, for each index, project pages listing the
lock's files (:class:`~pixicache.store.view.StoreView`).

:func:`pixi_run_argv` builds the command a runner uses to run a task through
Pixi without re-solving or re-installing: ``pixi run --frozen --no-install``
(``--as-is`` is Pixi's shorthand for exactly these two since 0.53).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pixicache.backends.pixi.commands import pixi_environment, pixi_install_argv
from pixicache.errors import InstallError
from pixicache.installers.base import InstallRequest, InstallResult

if TYPE_CHECKING:
    pass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["PixiInstaller", "mirror_config_toml"]

_TAIL_LINES = 30


def mirror_config_toml(mirrors: Mapping[str, Sequence[str]]) -> str:
    """A Pixi ``config.toml`` holding only a ``[mirrors]`` table."""
    lines = [
        "# Written by pixicache for one `pixi install`: every channel of the lock is",
        "# served from the node store by a localhost view (see pixicache.store.view).",
        "[mirrors]",
    ]
    for channel in sorted(mirrors):
        urls = ", ".join(json.dumps(u) for u in mirrors[channel])
        lines.append(f"{json.dumps(channel)} = [{urls}]")
    return "\n".join(lines) + "\n"


def _snapshot(prefix: Path) -> dict[str, tuple[int, int]]:
    meta = prefix / "conda-meta"
    out: dict[str, tuple[int, int]] = {}
    try:
        entries = list(os.scandir(meta))
    except OSError:
        return out
    for entry in entries:
        try:
            st = entry.stat()
        except OSError:
            continue
        out[entry.name] = (st.st_size, st.st_mtime_ns)
    return out


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[-_TAIL_LINES:])


def _local_mirrors(workspace: Path) -> bool:
    cfg = workspace / ".pixi" / "config.toml"
    try:
        return "mirrors" in tomllib.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


class PixiInstaller:
    """Install with the verified Pixi binary, every package from the node store."""

    name: ClassVar[str] = "pixi"

    def __init__(self, *, timeout: float | None = None) -> None:
        self.timeout = timeout

    @classmethod
    def available(cls, request: InstallRequest) -> tuple[bool, str]:
        """Available when ``request.pixi`` is an executable and the prefix is the
        one Pixi uses (``<workspace>/.pixi/envs/<env>``)."""
        if request.pixi is None:
            return False, (
                "no verified Pixi binary is available (`pixicache pixi fetch` obtains the "
                "pinned one; --pixi PATH uses one whose SHA-256 matches a pin)"
            )
        exe = Path(request.pixi)
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            return False, f"the Pixi binary {exe} is not an executable file"
        expected = (request.workspace / ".pixi" / "envs" / request.environment).absolute()
        if Path(request.prefix).absolute() != expected:
            return False, (
                f"Pixi installs environment '{request.environment}' into {expected}, "
                f"not into the requested prefix {request.prefix}"
            )
        return True, f"a verified Pixi binary is available ({exe})"

    def up_to_date(self, request: InstallRequest) -> bool:
        """Never claimed: ``pixi install`` itself decides what is current (and is
        quick when nothing changed), so the agent always lets it run."""
        return False

    def install(self, request: InstallRequest) -> InstallResult:
        """Run ``pixi install --frozen`` with every channel mirrored to the store view.

        Raises:
            InstallError: Pixi is not available, fails, or leaves no prefix; the
                message has the command, Pixi's last output lines and what the
                store view could not serve.
        """
        ok, why = self.available(request)
        if not ok:
            raise InstallError(f"the pixi installer cannot run: {why}")
        assert request.pixi is not None
        start = time.monotonic()
        prefix = Path(request.prefix)
        before = _snapshot(prefix)
        artifacts = request.lock.artifacts(request.environment, request.platform)
        packages = request.lock.packages(request.environment, request.platform)
        notes: list[str] = []
        pypi = request.pypi_prefixes()
        if pypi:
            notes.append("PyPI mirrored to the node store: " + ", ".join(pypi))
        if _local_mirrors(request.workspace):
            notes.append(
                f"{request.workspace}/.pixi/config.toml has a [mirrors] table, which Pixi "
                "merges over pixicache's: packages may not come from the node store"
            )
        request.make_package_cache()
        import shutil  # only when Pixi installs: not at every agent start (plugins load this)
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="pixicache-pixi-"))
        try:
            indexes = request.lock.environment(request.environment).indexes
            from pixicache.store.view import StoreView  # http.server: only when Pixi installs

            with StoreView(request.store, artifacts, indexes=indexes) as view:
                mirrors = view.mirrors(request.channels(), pypi)
                config_file = tmp / "config.toml"
                config_file.write_text(mirror_config_toml(mirrors))
                argv = pixi_install_argv(
                    request.pixi, request.manifest, request.environment, config_file
                )
                env = pixi_environment(request.package_cache)
                try:
                    proc = subprocess.run(
                        argv,
                        cwd=request.workspace,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        capture_output=True,
                        text=True,
                        timeout=self.timeout,
                    )
                except subprocess.TimeoutExpired:
                    raise InstallError(
                        f"`{' '.join(argv)}` did not finish within {self.timeout:g} s"
                    ) from None
                except OSError as exc:
                    raise InstallError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
                misses = view.misses
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if proc.returncode != 0:
            lines = [
                f"`pixi install` failed with exit code {proc.returncode}",
                f"command: {' '.join(argv)}",
            ]
            if misses:
                lines.append("the node store view could not serve:")
                lines.extend(f"  {m.path}: {m.reason}" for m in misses[:10])
            output = _tail((proc.stderr or "") + "\n" + (proc.stdout or ""))
            if output:
                lines.append("pixi said:")
                lines.extend(f"  {line}" for line in output.splitlines())
            raise InstallError("\n".join(lines))
        if not (prefix / "conda-meta").is_dir():
            raise InstallError(
                f"`pixi install` succeeded but left no environment at {prefix}; is "
                "`detached-environments` set in the workspace's .pixi/config.toml?"
            )
        if misses:
            notes.append(f"the store view answered {len(misses)} request(s) with 404")
        return InstallResult(
            installer=self.name,
            prefix=prefix,
            seconds=time.monotonic() - start,
            changed=_snapshot(prefix) != before,
            packages=len(packages),
            notes=notes,
        )
