"""The ``pixicache`` command line: a thin layer over the library API.

One module per command (or group), each only parsing options and printing:
:mod:`~pixicache.cli.fetch` (``plan``, ``prefetch``), :mod:`~pixicache.cli.cache`,
:mod:`~pixicache.cli.agent` (``install``, ``run``), :mod:`~pixicache.cli.serve`,
:mod:`~pixicache.cli.pixi`, :mod:`~pixicache.cli.bundle`, :mod:`~pixicache.cli.plugins`,
:mod:`~pixicache.cli.demo`; options and error handling they share are in
:mod:`~pixicache.cli.common`. A command's module is imported only when that
command runs (:data:`COMMANDS`), and heavy modules inside the commands, so a job's
``pixicache run`` imports the agent's command alone.

Every failure pixicache anticipates is a :class:`~pixicache.errors.PixicacheError`;
the CLI prints its message (no traceback) and exits with the error's
documented code (see :mod:`pixicache.errors`).
"""

from __future__ import annotations

from importlib import import_module
from typing import NoReturn

import click

from pixicache import __version__
from pixicache.cli.common import cache_dir_option
from pixicache.errors import EXIT_CODES

#: Each command's module and object: imported when the command runs (or for --help),
#: so ``pixicache run`` pays for its own module only.
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("pixicache.cli.fetch", "plan"),
    "prefetch": ("pixicache.cli.fetch", "prefetch"),
    "cache": ("pixicache.cli.cache", "cache"),
    "install": ("pixicache.cli.agent", "install_command"),
    "run": ("pixicache.cli.agent", "run_command"),
    "serve": ("pixicache.cli.serve", "serve_command"),
    "pixi": ("pixicache.cli.pixi", "pixi_group"),
    "bundle": ("pixicache.cli.bundle", "bundle_command"),
    "plugins": ("pixicache.cli.plugins", "plugins_command"),
    "demo": ("pixicache.cli.demo", "demo"),
}


class _LazyGroup(click.Group):
    """A group whose commands (:data:`COMMANDS`) are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None and cmd_name in COMMANDS:
            module, name = COMMANDS[cmd_name]
            command = getattr(import_module(module), name)
            assert isinstance(command, click.Command) and command.name == cmd_name
            self.add_command(command)
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pixicache")
@cache_dir_option
@click.pass_context
def main(ctx: click.Context) -> None:
    """pixicache: verified, cached Pixi environments for HTCondor GPU pools."""
    ctx.obj = dict(ctx.obj or {})


main.help = (main.help or "") + "\n\n\b\nExit codes:" + "".join(
    f"\n  {code:>3}  {what}" for what, code in EXIT_CODES.items()
)


def entry() -> NoReturn:
    """Run the CLI as a program (``python -m pixicache``, the bundle, the ``pixicache``
    script) and end the process without the interpreter's teardown.

    Once a command has finished (its report written, its task ended) nothing is left
    to do but freeing ~300 modules, which costs a job 20-30 ms: what the teardown
    does before that still happens (threads are joined, the exit handlers run:
    ``atexit``, the unused py-rattler child, logging), the standard streams are
    flushed, and the process ends with ``os._exit`` and the command's exit code, as
    ``sys.exit`` would give it (``None`` is 0; a message is printed, with 1).
    In-process callers (``main(...)``, click's test runner) are not affected.
    """
    import atexit
    import contextlib
    import os
    import sys

    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()  # what the teardown does first: join the threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code & 0xFF if code >= 0 else 1)


if __name__ == "__main__":  # pragma: no cover
    entry()
