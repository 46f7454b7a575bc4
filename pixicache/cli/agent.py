"""The ``pixicache install`` and ``pixicache run`` commands (registered in :mod:`pixicache.cli`).

Both print a summary on stderr and write ``pixicache-report.json`` (see
:mod:`pixicache.agent.report`) in the working directory, whatever happens. ``run``
exits with the task's exit code; an agent failure exits with its documented
code (``pixicache --help`` lists them).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pixicache.agent.options import AgentOptions
from pixicache.agent.report import REPORT_NAME, RunReport
from pixicache.cli.common import (
    cache_dir_option,
    handle_errors,
    jobs_option,
    require_sha256_option,
    settings_from,
    source_option,
)

__all__ = ["install_command", "run_command"]


def _agent_options(func: Callable[..., None]) -> Callable[..., None]:
    """The options ``install`` and ``run`` share, turned into one :class:`AgentOptions`.

    The decorated command receives ``options``, ``manifest``, ``environment`` and
    ``report_path`` (plus its own arguments); a bad setting exits 9.
    """

    @functools.wraps(func)
    @handle_errors
    def wrapper(
        *args: Any,
        installer: str,
        pixi: Path | None,
        trust_pixi: Path | None,
        platform: str | None,
        no_preflight: bool,
        sources: tuple[str, ...],
        jobs: int | None,
        **kwargs: Any,
    ) -> None:
        options = AgentOptions.make(
            settings_from(click.get_current_context(), sources, jobs),
            installer=installer,
            pixi=pixi,
            trust_pixi=trust_pixi,
            platform=platform,
            preflight=not no_preflight,
        )
        from pixicache.agent.ahead import start_installer_ahead

        start_installer_ahead(options, kwargs["manifest"])
        func(*args, options=options, **kwargs)

    options = [
        cache_dir_option,
        click.option(
            "--manifest",
            type=click.Path(dir_okay=False, path_type=Path),
            default=Path("pixi.toml"),
            show_default=True,
            help="The workspace manifest; the lock is the pixi.lock beside it.",
        ),
        click.option(
            "-e",
            "--environment",
            default=None,
            help="The environment (install: default; run: where Pixi would run the task).",
        ),
        click.option(
            "--installer",
            default="auto",
            show_default=True,
            metavar="NAME",
            help="auto (pixi with a verified Pixi, else rattler), rattler, pixi, or a plugin's name.",
        ),
        click.option(
            "--pixi",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Use this Pixi executable; its SHA-256 must match a pin.",
        ),
        click.option(
            "--trust-pixi",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Use this Pixi executable WITHOUT verifying it (logged as a warning).",
        ),
        click.option(
            "--platform", default=None, help="Platform to install (default: this machine's)."
        ),
        click.option("--no-preflight", is_flag=True, help="Skip the preflight checks."),
        require_sha256_option,
        source_option,
        jobs_option,
        click.option(
            "--report",
            "report_path",
            type=click.Path(dir_okay=False, path_type=Path),
            default=Path(REPORT_NAME),
            show_default=True,
            help="Where to write the JSON run report.",
        ),
    ]
    command: Callable[..., None] = wrapper
    for option in reversed(options):
        command = option(command)
    return command


@click.command("install")
@_agent_options
def install_command(
    manifest: Path, environment: str | None, report_path: Path, options: AgentOptions
) -> None:
    """Install an environment of the lock beside the manifest: plan, fetch, install."""
    from pixicache.agent.main import main_install

    report = RunReport("install", report_path)
    sys.exit(main_install(manifest, environment or "default", options=options, report=report))


@click.command(
    "run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@_agent_options
@click.argument("task")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_command(
    manifest: Path,
    environment: str | None,
    report_path: Path,
    options: AgentOptions,
    task: str,
    args: tuple[str, ...],
) -> None:
    """Install the environment, then run TASK of the manifest with ARGS.

    Exits with the task's exit code. SIGTERM, SIGINT and SIGHUP are forwarded
    to the task's process group (HTCondor sends SIGTERM on eviction). A first
    ``--`` after TASK is dropped (``pixicache run train -- --epochs 5``).
    """
    from pixicache.agent.main import main_run

    report = RunReport("run", report_path)
    task_args = list(args[1:] if args[:1] == ("--",) else args)
    sys.exit(
        main_run(manifest, task, task_args, environment=environment, options=options, report=report)
    )
