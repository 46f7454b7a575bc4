"""Settings: where the store is, which sources to use, how many parallel jobs.

Each setting is taken from the first place that has it:

1. the command line (``--cache-dir``, ``--source`` (repeatable), ``--jobs``);
2. the environment (``PIXICACHE_CACHE_DIR``, ``PIXICACHE_SOURCES`` as a
   comma-separated list, ``PIXICACHE_JOBS``);
3. the config file: ``$PIXICACHE_CONFIG``, else ``config.toml`` in the
   platformdirs user config dir (``~/.config/pixicache/config.toml`` on Linux)::

       cache_dir = "/scratch/pixicache"
       sources = ["mirror=http://mirror.example.org:8080", "upstream"]
       jobs = 8

       [[pixi.pin]]   # an extra Pixi release pin (see `pixicache pixi pins`)
       version = "0.80.0"
       target = "x86_64-unknown-linux-musl"
       sha256 = "..."

4. defaults: the platformdirs user cache dir, ``["upstream"]``, 8 jobs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixicache.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

APP = "pixicache"
DEFAULT_SOURCES = ["upstream"]
DEFAULT_JOBS = 8
"""Parallel downloads: enough to fill a 1 Gb/s link with conda-forge's latency."""


def config_path() -> Path:
    """The config file in use (it need not exist)."""
    env = os.environ.get("PIXICACHE_CONFIG")
    if env:
        return Path(env).expanduser()
    home = _xdg_config_home()
    if home is not None:
        return Path(home) / APP / "config.toml"
    import platformdirs

    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def _xdg_config_home() -> str | None:
    """On Linux, where platformdirs puts user config (``$XDG_CONFIG_HOME`` when it is an
    absolute path, else ``~/.config``), without importing it: that costs every job start
    about 9 ms. ``None`` (ask platformdirs) elsewhere, or when ``HOME`` is relative (its
    own rules then). A test holds this to platformdirs' answer."""
    if not sys.platform.startswith("linux"):
        return None
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    if os.path.isabs(xdg):
        return xdg
    home = os.environ.get("HOME")
    if home is not None and not os.path.isabs(home):
        return None
    return os.path.expanduser("~/.config")


def load_config_file(path: Path | None = None) -> dict[str, Any]:
    """The parsed config file, ``{}`` if it does not exist."""
    path = path or config_path()
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc


def default_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP))


@dataclass
class Settings:
    """The effective settings, with where each came from (for ``--verbose``).

    ``require_sha256``: refuse lock entries pinned by MD5 alone (``--require-sha256``,
    ``PIXICACHE_REQUIRE_SHA256=1``, ``require_sha256 = true`` in the config file).
    """

    cache_dir: Path
    sources: list[str]
    jobs: int
    file: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    require_sha256: bool = False


def resolve_settings(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    sources: list[str] | tuple[str, ...] | None = None,
    jobs: int | None = None,
    require_sha256: bool | None = None,
) -> Settings:
    """Combine command line, environment, config file and defaults."""
    file = load_config_file()
    origin: dict[str, str] = {}

    if cache_dir:
        cdir, origin["cache_dir"] = Path(cache_dir), "--cache-dir"
    elif os.environ.get("PIXICACHE_CACHE_DIR"):
        cdir, origin["cache_dir"] = Path(os.environ["PIXICACHE_CACHE_DIR"]), "PIXICACHE_CACHE_DIR"
    elif file.get("cache_dir"):
        cdir, origin["cache_dir"] = Path(str(file["cache_dir"])), str(config_path())
    else:
        cdir, origin["cache_dir"] = default_cache_dir(), "default"

    if sources:
        srcs, origin["sources"] = list(sources), "--source"
    elif os.environ.get("PIXICACHE_SOURCES"):
        srcs = [s for s in os.environ["PIXICACHE_SOURCES"].split(",") if s.strip()]
        origin["sources"] = "PIXICACHE_SOURCES"
    elif file.get("sources"):
        raw = file["sources"]
        if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
            raise ConfigError(f"{config_path()}: 'sources' must be a list of strings")
        srcs, origin["sources"] = list(raw), str(config_path())
    else:
        srcs, origin["sources"] = list(DEFAULT_SOURCES), "default"

    if jobs is not None:
        njobs, origin["jobs"] = jobs, "--jobs"
    elif os.environ.get("PIXICACHE_JOBS"):
        try:
            njobs = int(os.environ["PIXICACHE_JOBS"])
        except ValueError:
            raise ConfigError(
                f"PIXICACHE_JOBS must be a whole number, not {os.environ['PIXICACHE_JOBS']!r}"
            ) from None
        origin["jobs"] = "PIXICACHE_JOBS"
    elif "jobs" in file:
        njobs, origin["jobs"] = int(file["jobs"]), str(config_path())
    else:
        njobs, origin["jobs"] = DEFAULT_JOBS, "default"
    if njobs < 1:
        raise ConfigError(f"jobs must be at least 1 (got {njobs} from {origin['jobs']})")
    strict = _require_sha256(require_sha256, file)
    return Settings(
        cache_dir=cdir.expanduser(), sources=srcs, jobs=njobs, file=file, origin=origin,
        require_sha256=strict,
    )  # fmt: skip


def _require_sha256(given: bool | None, file: dict[str, Any]) -> bool:
    if given:
        return True
    env = os.environ.get("PIXICACHE_REQUIRE_SHA256", "").strip().lower()
    if env:
        if env not in ("0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"PIXICACHE_REQUIRE_SHA256 must be 1 or 0, not {env!r}")
        return env in ("1", "true", "yes")
    value = file.get("require_sha256", False)
    if not isinstance(value, bool):
        raise ConfigError(f"{config_path()}: require_sha256 must be true or false")
    return value


def parse_size(text: str) -> int:
    """``"50G"`` → bytes. Accepts K, M, G, T (powers of 1024), optional ``B``/``iB``.

    >>> parse_size("50G")
    53687091200
    >>> parse_size("1024")
    1024
    """
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise ConfigError(f"not a size: {text!r} (examples: 500M, 50G, 1T)") from None
