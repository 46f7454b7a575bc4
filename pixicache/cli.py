"""The ``pixicache`` command line: a thin layer over the library API.

Every failure pixicache anticipates is a :class:`~pixicache.errors.PixicacheError`;
the CLI prints its message (no traceback) and exits with the error's
documented code (see :mod:`pixicache.errors`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .cli_common import (
    cache_dir_option,
    env_option,
    format_summary,
    handle_errors,
    jobs_option,
    open_store,
    platform_option,
    settings_from,
    source_option,
)
from .config import parse_size
from .errors import EXIT_CODES
from .progress import human_bytes


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pixicache")
@cache_dir_option
@click.pass_context
def main(ctx: click.Context) -> None:
    """pixicache: verified, cached Pixi environments for HTCondor GPU pools.

    \b
    Exit codes:
    """
    ctx.obj = dict(ctx.obj or {})


main.help = (main.help or "") + "".join(f"\n      {code:>3}  {what}" for what, code in EXIT_CODES.items())


# -- plan ------------------------------------------------------------------
@main.command()
@click.argument("locks", nargs=-1, required=True, type=click.Path(path_type=Path))
@env_option
@platform_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (schema pixicache.plan/1).")
@click.option("--no-store", is_flag=True, help="Do not look at the store.")
@cache_dir_option
@click.pass_context
@handle_errors
def plan(
    ctx: click.Context,
    locks: tuple[Path, ...],
    environment: str | None,
    platform: str | None,
    as_json: bool,
    no_store: bool,
) -> None:
    """Print what LOCKS need: artifacts, bytes, and what the store already has."""
    from .plan import make_plan

    store = None if no_store else open_store(settings_from(ctx))
    p = make_plan(list(locks), environment=environment, platform=platform, store=store)
    if as_json:
        click.echo(json.dumps(p.to_json(), indent=2))
        return
    for a in p.artifacts:
        mark = "" if store is None else ("present " if a.sha256 in p.present else "missing ")
        click.echo(f"{mark}{a.sha256}  {a.size or 0:>12}  {a.url}")
    click.echo(f"{p.count} artifacts, {p.bytes:,} bytes ({human_bytes(p.bytes)})")
    if store is not None:
        click.echo(
            f"in the store {store.root}: {len(p.present)} present "
            f"({human_bytes(p.present_bytes)}), {len(p.missing)} missing "
            f"({human_bytes(p.bytes - p.present_bytes)})"
        )


# -- prefetch --------------------------------------------------------------
@main.command()
@click.argument("locks", nargs=-1, required=True, type=click.Path(path_type=Path))
@env_option
@platform_option
@source_option
@jobs_option
@click.option(
    "--progress",
    "progress_mode",
    type=click.Choice(["auto", "bar", "log", "none"]),
    default="auto",
    show_default=True,
    help="Progress display: a bar on a terminal, log lines otherwise.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the summary as JSON to this file.")
@click.option(
    "--to",
    "to_mirror",
    metavar="URL",
    default=None,
    help="Warm this pixicache mirror instead of the local store: the mirror fetches "
    "what it lacks from its own upstreams (through /sha256), verified.",
)
@click.option(
    "--token",
    envvar="PIXICACHE_SERVE_TOKEN",
    default=None,
    help="Bearer token for a mirror that requires one (--to); default $PIXICACHE_SERVE_TOKEN.",
)
@cache_dir_option
@click.pass_context
@handle_errors
def prefetch(
    ctx: click.Context,
    locks: tuple[Path, ...],
    environment: str | None,
    platform: str | None,
    sources: tuple[str, ...],
    jobs: int | None,
    progress_mode: str,
    json_path: Path | None,
    to_mirror: str | None,
    token: str | None,
) -> None:
    """Fetch every artifact of LOCKS into the store (or a mirror), verified.

    Exits 0 only if every artifact is present and verified; otherwise lists
    what is missing and why, with every source tried.
    """
    from .fetch import Fetcher
    from .plan import make_plan
    from .progress import make_progress
    from .sources import parse_sources

    if to_mirror:
        _warm(locks, environment, platform, to_mirror, token, jobs, progress_mode, json_path)
        return
    settings = settings_from(ctx, sources, jobs)
    store = open_store(settings)
    srcs = parse_sources(settings.sources)
    p = make_plan(list(locks), environment=environment, platform=platform, store=store)
    click.echo(
        f"prefetch: {p.count} artifacts ({human_bytes(p.bytes)}) into {store.root}; "
        f"sources: {', '.join(s.label for s in srcs)}",
        err=True,
    )
    progress = make_progress(progress_mode, label="prefetch")
    report = Fetcher(store, srcs, jobs=settings.jobs, progress=progress).fetch(p.artifacts)
    click.echo(format_summary(report), err=True)
    if json_path:
        json_path.write_text(json.dumps(report.to_json(), indent=2))
    if not report.ok:
        codes = {r.error.exit_code for r in report.missing if r.error}
        sys.exit(max(codes) if codes else 3)


def _warm(
    locks: tuple[Path, ...],
    environment: str | None,
    platform: str | None,
    mirror: str,
    token: str | None,
    jobs: int | None,
    progress_mode: str,
    json_path: Path | None,
) -> None:
    from .config import DEFAULT_JOBS
    from .plan import make_plan
    from .progress import make_progress
    from .warm import warm_mirror

    p = make_plan(list(locks), environment=environment, platform=platform)
    click.echo(f"prefetch --to {mirror}: {p.count} artifacts ({human_bytes(p.bytes)})", err=True)
    progress = make_progress(progress_mode, label="warm")
    if progress is not None:
        progress.begin(p.count, p.bytes)

    def done(result: object) -> None:
        if progress is not None:
            progress.advance(result.artifact.size or 0)  # type: ignore[attr-defined]
            progress.artifact_done(result)  # type: ignore[arg-type]

    report = warm_mirror(mirror, p.artifacts, jobs=jobs or DEFAULT_JOBS, token=token, on_done=done)
    if progress is not None:
        progress.end(report)  # type: ignore[arg-type]
    click.echo(report.summary(), err=True)
    if json_path:
        json_path.write_text(
            json.dumps(
                {
                    "mirror": report.mirror,
                    "ok": report.ok,
                    "seconds": round(report.seconds, 3),
                    "hit": report.count("hit"),
                    "filled": report.count("filled"),
                    "failed": [
                        {"url": r.artifact.url, "sha256": r.artifact.sha256, "error": r.detail}
                        for r in report.results
                        if r.status == "failed"
                    ],
                },
                indent=2,
            )
        )
    if not report.ok:
        sys.exit(3)


# -- cache -----------------------------------------------------------------
@main.group()
def cache() -> None:
    """Inspect and maintain the node store."""


@cache.command("info")
@click.option("--json", "as_json", is_flag=True)
@cache_dir_option
@click.pass_context
@handle_errors
def cache_info(ctx: click.Context, as_json: bool) -> None:
    """Show where the store is and what it holds."""
    store = open_store(settings_from(ctx))
    info = store.info()
    data = {
        "root": str(info.root),
        "blobs": info.blobs,
        "bytes": info.bytes,
        "partial_files": info.partial_files,
        "partial_bytes": info.partial_bytes,
        "quarantined": info.quarantined,
        "urls": info.urls,
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"store:        {info.root}")
    click.echo(f"blobs:        {info.blobs} ({human_bytes(info.bytes)}, {info.bytes:,} bytes)")
    click.echo(f"partial:      {info.partial_files} ({human_bytes(info.partial_bytes)}) resumable downloads")
    click.echo(f"quarantined:  {info.quarantined}")
    click.echo(f"known URLs:   {info.urls}")


@cache.command("verify")
@cache_dir_option
@click.pass_context
@handle_errors
def cache_verify(ctx: click.Context) -> None:
    """Re-hash every blob; quarantine the bad ones (exit 4 if any)."""
    store = open_store(settings_from(ctx))
    rep = store.verify()
    click.echo(f"verified {rep.checked} blobs ({human_bytes(rep.bytes)})")
    for sha, why in rep.bad:
        click.echo(f"  BAD {sha}: {why}; moved to {store.quarantine_dir}")
    if rep.bad:
        sys.exit(4)


@cache.command("gc")
@click.option("--max-size", required=True, metavar="SIZE", help="Byte budget, e.g. 50G.")
@cache_dir_option
@click.pass_context
@handle_errors
def cache_gc(ctx: click.Context, max_size: str) -> None:
    """Remove least recently used blobs until the store fits in --max-size."""
    store = open_store(settings_from(ctx))
    rep = store.gc(parse_size(max_size))
    click.echo(
        f"removed {rep.removed} blobs ({human_bytes(rep.freed)}); "
        f"{rep.kept_in_use} in use were kept; store now {human_bytes(rep.size_after)}"
    )


@cache.command("clear")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@cache_dir_option
@click.pass_context
@handle_errors
def cache_clear(ctx: click.Context, yes: bool) -> None:
    """Delete the whole store (blobs, partial downloads, package cache, index)."""
    store = open_store(settings_from(ctx))
    if not yes:
        click.confirm(f"delete everything under {store.root}?", abort=True, err=True)
    store.clear()
    click.echo(f"removed {store.root}")


# -- demo ------------------------------------------------------------------
@main.command()
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None, help="Work in this directory and keep it.")
@handle_errors
def demo(keep: Path | None) -> None:
    """Run the whole flow offline on a small channel of real packages built on the spot."""
    from .demo import run_demo

    sys.exit(run_demo(keep))


def _register_plugins() -> None:
    """Subcommands that live next to the code they drive."""
    from .agent_cli import install_command, run_command
    from .bundle import bundle_command
    from .pixi.cli import pixi_group
    from .serve import serve_command

    main.add_command(install_command)
    main.add_command(run_command)
    main.add_command(serve_command)
    main.add_command(pixi_group)
    main.add_command(bundle_command)


_register_plugins()

if __name__ == "__main__":  # pragma: no cover
    main()
