"""``pixicache bundle``: build the agent as one file (:mod:`pixicache.bundle.build`)."""

from __future__ import annotations

from pathlib import Path

import click

from pixicache.cli.common import handle_errors
from pixicache.errors import ConfigError
from pixicache.progress import human_bytes

__all__ = ["bundle_command"]


@click.command("bundle")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("pixicache.pyz"),
    show_default=True,
    help="The single-file agent to write.",
)
@click.option(
    "--no-rattler",
    is_flag=True,
    help="Leave py-rattler out (the agent then installs with a verified Pixi).",
)
@click.option(
    "--from-installed",
    is_flag=True,
    help="Bundle the packages installed in this Python (offline) instead of the pinned wheels; "
    "workers then need the newest Python any of them requires (printed).",
)
@click.option(
    "--wheelhouse",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the pinned wheels here (downloaded with pip when missing).",
)
@click.option(
    "--python",
    "python_tag",
    default="3.9",
    show_default=True,
    help="The oldest worker Python to support.",
)
@handle_errors
def bundle_command(
    output: Path,
    no_rattler: bool,
    from_installed: bool,
    wheelhouse: Path | None,
    python_tag: str,
) -> None:
    """Build the agent as one file for the workers, and print its SHA-256.

    \b
    Run it on a worker with: python3 -I pixicache.pyz run train
    Pin it in the submit file: environment = "PIXICACHE_AGENT_SHA256=<sha256>"
    """
    if from_installed and wheelhouse is not None:
        raise ConfigError("--wheelhouse and --from-installed exclude each other")
    from pixicache.bundle.build import build_bundle

    info = build_bundle(
        output,
        python_tag=python_tag,
        include_rattler=not no_rattler,
        source="installed" if from_installed else "pypi",
        wheelhouse=wheelhouse,
    )

    click.echo(f"{info.sha256}  {info.path}")
    rattler = (
        "py-rattler " + " and ".join(info.rattler) + " (the newest this Python loads is used)"
        if info.rattler
        else "no py-rattler"
    )
    click.echo(
        f"size {info.size:,} bytes ({human_bytes(info.size)}); build {info.build_id}; "
        f"runs on Python >= {info.min_python}; {rattler}",
        err=True,
    )
    click.echo(
        f'submit file: environment = "PIXICACHE_AGENT_SHA256={info.sha256} ..."', err=True
    )
