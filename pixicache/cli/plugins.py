"""``pixicache plugins``: every source and installer plugin, who provides it, whether it loads."""

from __future__ import annotations

import json

import click

from pixicache.cli.common import handle_errors

__all__ = ["plugins_command"]


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@handle_errors
def plugins_command(as_json: bool) -> None:
    """List the source and installer plugins, the distribution of each, and any that fail to load.

    Exits 9 if a plugin is broken (the others still work).
    """
    from pixicache.installers.registry import GROUP as INSTALLERS
    from pixicache.plugins import plugins
    from pixicache.sources.registry import GROUP as SOURCES

    rows = []
    for group in (SOURCES, INSTALLERS):
        for name in plugins(group).names():
            rows.append(plugins(group).entries[name])
    if as_json:
        click.echo(json.dumps([p.to_json() for p in rows], indent=2))
    else:
        for p in rows:
            state = "ok" if p.ok else f"BROKEN: {p.error}"
            click.echo(f"{p.group:<22} {p.name:<10} {p.target:<55} {p.distribution:<24} {state}")
    if any(not p.ok for p in rows):
        raise SystemExit(9)
