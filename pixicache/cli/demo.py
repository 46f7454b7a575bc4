"""``pixicache demo``: the whole flow offline (:mod:`pixicache.demo`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pixicache.cli.common import handle_errors, require_extras

__all__ = ["demo"]


# -- demo ------------------------------------------------------------------
@click.command()
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None, help="Work in this directory and keep it.")
@handle_errors
def demo(keep: Path | None) -> None:
    """Run the whole flow offline on a small channel of real packages built on the spot."""
    require_extras("rattler", "aiohttp", "prometheus_client")
    from pixicache.demo import run_demo

    sys.exit(run_demo(keep))
