"""``pixicache cache``: inspect and maintain the node store."""

from __future__ import annotations

import json
import sys

import click

from pixicache.cli.common import (
    cache_dir_option,
    handle_errors,
    open_store,
    settings_from,
)
from pixicache.config import parse_size
from pixicache.progress import human_bytes

__all__ = ["cache"]


# -- cache -----------------------------------------------------------------
@click.group()
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


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = value.strip().lower()
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration (e.g. 3600, 90m, 7d)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise click.BadParameter(f"{value!r} is not a finite, non-negative duration")
    return seconds


@cache.command("verify")
@click.option(
    "--max-age", callback=_duration, metavar="DURATION", default=None,
    help="Only blobs not verified for this long (e.g. 7d), or whose file changed since "
    "(inode, size, mtime, ctime); default: every blob.",
)
@click.option(
    "--sample", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="FRACTION",
    help="Hash only this fraction (0-1] of the blobs due, picked at random: a bounded pass.",
)
@cache_dir_option
@click.pass_context
@handle_errors
def cache_verify(ctx: click.Context, max_age: float | None, sample: float | None) -> None:
    """Re-hash blobs; quarantine the bad ones (exit 4 if any).

    \b
    A scheduled pass (see docs/threat-model.md for a systemd timer):
      pixicache cache verify --max-age 7d --sample 0.1
    """
    store = open_store(settings_from(ctx))
    rep = store.verify(max_age=max_age, sample=sample)
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
