"""Pieces every ``pixicache`` subcommand shares: options, settings, error handling.

Subcommands defined in other modules (``pixicache.cli.pixi``, ``pixicache.cli.agent``,
``pixicache.serve``...) import from here, not from :mod:`pixicache.cli`, which
imports them to register them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from pixicache.config import Settings, resolve_settings
from pixicache.errors import MissingExtra, PixicacheError
from pixicache.progress import human_bytes, human_rate

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> None:
    click.echo(f"pixicache: error: {message}", err=True)
    sys.exit(code)


EXTRAS: dict[str, str] = {
    "aiohttp": "serve",
    "prometheus_client": "serve",
    "rattler": "rattler",
    "torch": "train",
    "matplotlib": "bench",
}
"""The optional extra (``pip install 'pixicache[EXTRA]'``) each optional import comes from."""


def missing_extra(exc: ModuleNotFoundError) -> MissingExtra | None:
    """The :class:`MissingExtra` for a failed import of an optional dependency, else ``None``."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    command = " ".join(click.get_current_context().command_path.split()[1:]) or "this command"
    return MissingExtra(
        f"`pixicache {command}` needs the optional '{extra}' extra, which is not installed "
        f"(no module {top!r}): pip install 'pixicache[{extra}]'"
    )


def require_extras(*modules: str) -> None:
    """Raise :class:`MissingExtra` (exit 2) naming the extra of the first of
    ``modules`` that cannot be imported (found, not imported: cheap)."""
    import importlib.util

    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            extra = missing_extra(ModuleNotFoundError(f"No module named {module!r}", name=module))
            raise extra or MissingExtra(f"the optional module {module!r} is not installed")


def handle_errors(func: F) -> F:
    """Turn :class:`PixicacheError` into a message and its exit code; a missing
    optional dependency into one line naming the extra to install (exit 2)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PixicacheError as exc:
            _fail(str(exc), exc.exit_code)
        except ModuleNotFoundError as exc:
            extra = missing_extra(exc)
            if extra is None:
                raise
            _fail(str(extra), extra.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # a bug: one line and exit 1; the traceback kept in a file
            _internal_error(exc)

    return wrapper  # type: ignore[return-value]


def _internal_error(exc: Exception) -> None:
    """Report a bug as one line (exit 1), the traceback written to a private file
    (printed instead with ``PIXICACHE_DEBUG=1``)."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if os.environ.get("PIXICACHE_DEBUG") == "1":
        sys.stderr.write(text)
        where = "above"
    else:
        try:
            fd, where = tempfile.mkstemp(prefix="pixicache-traceback-", suffix=".txt")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
        except OSError:
            sys.stderr.write(text)
            where = "above"
    _fail(
        f"internal error (a bug in pixicache {_version()}; please report it with the "
        f"traceback, which is {'above' if where == 'above' else 'in ' + where}): "
        f"{type(exc).__name__}: {exc}",
        1,
    )


def _version() -> str:
    from pixicache import __version__

    return __version__


def settings_from(ctx: click.Context, sources: tuple[str, ...] = (), jobs: int | None = None) -> Settings:
    obj = ctx.find_root().obj or {}
    return resolve_settings(
        cache_dir=obj.get("cache_dir"),
        sources=list(sources) or None,
        jobs=jobs,
        require_sha256=obj.get("require_sha256"),
    )


def open_store(settings: Settings) -> Any:
    from pixicache.store import Store

    return Store(settings.cache_dir)


def _set_cache_dir(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        root = ctx.find_root()
        root.obj = dict(root.obj or {}, cache_dir=value)


def _set_require_sha256(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        root = ctx.find_root()
        root.obj = dict(root.obj or {}, require_sha256=True)


require_sha256_option = click.option(
    "--require-sha256",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_require_sha256,
    help="Refuse lock entries pinned by MD5 alone (default: verify them by MD5 and size; "
    "also PIXICACHE_REQUIRE_SHA256=1 or require_sha256 = true in the config file).",
)

cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    expose_value=False,
    is_eager=True,
    callback=_set_cache_dir,
    help="The node store (default: $PIXICACHE_CACHE_DIR, the config file, else the user cache dir).",
)
"""``--cache-dir``, accepted before or after the subcommand name."""

source_option = click.option(
    "--source",
    "sources",
    multiple=True,
    metavar="SPEC",
    help="A source to try, in order (repeatable; comma lists allowed): "
    "mirror=URL, digest=URL, dir=PATH, upstream, or a bare URL/path. "
    "Default: $PIXICACHE_SOURCES, the config file, else 'upstream'.",
)
jobs_option = click.option(
    "-j", "--jobs", type=click.IntRange(1, 256), default=None, help="Parallel downloads (default 8)."
)
env_option = click.option(
    "-e", "--environment", "environment", default=None, help="Environment of the lock (default: all)."
)
platform_option = click.option(
    "-p", "--platform", default=None, help="Platform, e.g. linux-64 (default: all in the lock)."
)


def format_summary(report: Any) -> str:
    """The human summary of a :class:`~pixicache.fetch.FetchReport`."""
    lines = [
        f"{len(report.results)} artifacts, {human_bytes(report.total_bytes)} in "
        f"{report.seconds:.1f} s ({human_rate(sum(r.bytes for r in report.results), report.seconds)} transferred)"
    ]
    for label, slot in sorted(report.by_source().items()):
        verb = {"node store": "hits", "missing": "not fetched"}.get(label, "fetched")
        noun = "artifact " if slot["artifacts"] == 1 else "artifacts"
        lines.append(f"  {label:<40} {slot['artifacts']:>5} {noun} {human_bytes(slot['bytes']):>10} {verb}")
    lines.extend(f"  note: {line}" for line in report.failover())
    missing = report.missing
    if missing:
        lines.append(f"MISSING: {len(missing)} artifact(s) could not be fetched:")
        for r in missing:
            lines.append(f"  {r.artifact.filename} ({r.artifact.pin})")
            for attempt in r.attempts or ["no source could serve it"]:
                lines.append(f"    - {attempt}")
    else:
        lines.append("all artifacts present and verified")
    return "\n".join(lines)
