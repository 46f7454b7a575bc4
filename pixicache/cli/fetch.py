"""``pixicache plan`` and ``pixicache prefetch``: what locks need, fetched ahead of the jobs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pixicache.cli.common import (
    cache_dir_option,
    env_option,
    format_summary,
    handle_errors,
    jobs_option,
    open_store,
    platform_option,
    require_sha256_option,
    settings_from,
    source_option,
)
from pixicache.progress import human_bytes

__all__ = ["plan", "prefetch"]


# -- plan ------------------------------------------------------------------
@click.command()
@click.argument("locks", nargs=-1, required=True, type=click.Path(path_type=Path))
@env_option
@platform_option
@require_sha256_option
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
    from pixicache.model.plan import make_plan

    store = None if no_store else open_store(settings_from(ctx))
    p = make_plan(
        list(locks), environment=environment, platform=platform, store=store,
        require_sha256=settings_from(ctx).require_sha256,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(p.to_json(), indent=2))
        return
    for a in p.artifacts:
        mark = "" if store is None else ("present " if a.key in p.present else "missing ")
        pin = a.sha256 or f"md5:{a.md5}".ljust(64)
        click.echo(f"{mark}{pin}  {a.size or 0:>12}  {a.url}")
    click.echo(f"{p.count} artifacts, {p.bytes:,} bytes ({human_bytes(p.bytes)})")
    pypi = sum(1 for a in p.artifacts if a.kind == "pypi")
    md5 = sum(1 for a in p.artifacts if a.md5_only)
    if pypi:
        click.echo(f"{pypi} of them PyPI files (wheels, sdists)")
    if md5:
        click.echo(
            f"{md5} pinned by md5 alone (md5:...): verified by md5 and size, their SHA-256 "
            "computed on download and recorded in the store (--require-sha256 refuses them)"
        )
    if store is not None:
        click.echo(
            f"in the store {store.root}: {len(p.present)} present "
            f"({human_bytes(p.present_bytes)}), {len(p.missing)} missing "
            f"({human_bytes(p.bytes - p.present_bytes)})"
        )


# -- prefetch --------------------------------------------------------------
@click.command()
@click.argument("locks", nargs=-1, required=True, type=click.Path(path_type=Path))
@env_option
@platform_option
@require_sha256_option
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
    from pixicache.fetch import Fetcher
    from pixicache.model.plan import make_plan
    from pixicache.progress import make_progress
    from pixicache.sources import parse_sources

    if to_mirror:
        _warm(locks, environment, platform, to_mirror, token, jobs, progress_mode, json_path)
        return
    settings = settings_from(ctx, sources, jobs)
    store = open_store(settings)
    srcs = parse_sources(settings.sources)
    p = make_plan(
        list(locks), environment=environment, platform=platform, store=store,
        require_sha256=settings.require_sha256,
    )  # fmt: skip
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
    from pixicache.config import DEFAULT_JOBS
    from pixicache.fetch.warm import warm_mirror
    from pixicache.model.plan import make_plan
    from pixicache.progress import make_progress

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
