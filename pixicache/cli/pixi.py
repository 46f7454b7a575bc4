"""``pixicache pixi ...``: obtain, list and verify pinned Pixi binaries.

Registered in :data:`pixicache.cli.COMMANDS` (imported when the command runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pixicache.cli.common import handle_errors, open_store, settings_from, source_option

PINS_HELP = """\
Sites extend or override the pin table without changing code (later wins for
the same version and target):

\b
  1. the table shipped with pixicache;
  2. [[pixi.pin]] entries in the pixicache config file ($PIXICACHE_CONFIG);
  3. a TOML file named by PIXICACHE_PIXI_PINS, with [[pin]] entries.

\b
Each entry has version, target (a Rust target triple, e.g.
x86_64-unknown-linux-musl), sha256 (of the release archive) and optionally
url (default: the GitHub release URL); a file may also set default_version:

\b
  default_version = "0.79.0"
  [[pin]]
  version = "0.79.0"
  target = "x86_64-unknown-linux-musl"
  sha256 = "b9b6dd2b..."
  url = "https://mirror.example.org/pixi/pixi-x86_64-unknown-linux-musl.tar.gz"
"""


@click.group("pixi")
def pixi_group() -> None:
    """Pinned, verified Pixi binaries."""


@pixi_group.command("fetch")
@click.option(
    "--version", "version", default=None, help="Pixi version (default: the pin table's default)."
)
@source_option
@click.pass_context
@handle_errors
def pixi_fetch(ctx: click.Context, version: str | None, sources: tuple[str, ...]) -> None:
    """Fetch, verify, unpack and smoke-run the pinned Pixi; print its path.

    The archive comes through the source chain (node store, mirror,
    upstream) and must match its pinned SHA-256; the binary must report the
    pinned version.
    """
    from pixicache.backends.pixi.binary import obtain_pixi
    from pixicache.sources import parse_sources

    settings = settings_from(ctx, sources)
    store = open_store(settings)
    v = obtain_pixi(store, parse_sources(settings.sources), version=version, config=settings.file)
    click.echo(
        f"pixi {v.version} verified (binary sha256 {v.sha256}, archive {v.archive_sha256})",
        err=True,
    )
    click.echo(str(v.path))


@pixi_group.command("pins", epilog=PINS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the pins as JSON.")
@click.pass_context
@handle_errors
def pixi_pins(ctx: click.Context, as_json: bool) -> None:
    """List the Pixi pins in force (version, target, archive SHA-256, URL)."""
    from pixicache.backends.pixi.pins import load_pins, this_target
    from pixicache.errors import ConfigError

    settings = settings_from(ctx)
    pins, default = load_pins(settings.file)
    try:
        here: str | None = this_target()
    except ConfigError:
        here = None
    pins = sorted(pins, key=lambda p: (p.version, p.target))
    if as_json:
        data = {
            "default_version": default,
            "this_target": here,
            "pins": [
                {"version": p.version, "target": p.target, "sha256": p.sha256, "url": p.url}
                for p in pins
            ],
        }
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"default version: {default}; this machine: {here or 'no Pixi build target'}")
    for p in pins:
        mark = "*" if p.version == default and p.target == here else " "
        click.echo(f"{mark} {p.version:<10} {p.target:<28} {p.sha256}  {p.url}")
    click.echo("(* = the pin `pixicache pixi fetch` uses here; see --help to add pins)")


@pixi_group.command("verify")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--fetch/--no-fetch",
    default=True,
    show_default=True,
    help="Fetch the pinned archive to learn its binary digest if the store has none yet.",
)
@source_option
@click.pass_context
@handle_errors
def pixi_verify(ctx: click.Context, path: Path, fetch: bool, sources: tuple[str, ...]) -> None:
    """Check that PATH is the binary of a pinned Pixi archive (exit 4 if not)."""
    from pixicache.backends.pixi.binary import verify_pixi_executable
    from pixicache.sources import parse_sources

    settings = settings_from(ctx, sources)
    store = open_store(settings)
    srcs = parse_sources(settings.sources) if fetch else None
    v = verify_pixi_executable(path, store=store, sources=srcs, config=settings.file)
    click.echo(
        f"{v.path}: pixi {v.version}, sha256 {v.sha256} matches the pinned archive {v.archive_sha256}"
    )
