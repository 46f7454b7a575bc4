"""The ``pixicache`` command line: a thin layer over the library API.

One module per command (or group), each only parsing options and printing:
:mod:`~pixicache.cli.fetch` (``plan``, ``prefetch``), :mod:`~pixicache.cli.cache`,
:mod:`~pixicache.cli.agent` (``install``, ``run``), :mod:`~pixicache.cli.serve`,
:mod:`~pixicache.cli.pixi`, :mod:`~pixicache.cli.bundle`, :mod:`~pixicache.cli.plugins`,
:mod:`~pixicache.cli.demo`; options and error handling they share are in
:mod:`~pixicache.cli.common`. Heavy modules are imported inside the commands,
so ``pixicache --help`` stays fast.

Every failure pixicache anticipates is a :class:`~pixicache.errors.PixicacheError`;
the CLI prints its message (no traceback) and exits with the error's
documented code (see :mod:`pixicache.errors`).
"""

from __future__ import annotations

import click

from pixicache import __version__
from pixicache.cli.agent import install_command, run_command
from pixicache.cli.bundle import bundle_command
from pixicache.cli.cache import cache
from pixicache.cli.common import cache_dir_option
from pixicache.cli.demo import demo
from pixicache.cli.fetch import plan, prefetch
from pixicache.cli.pixi import pixi_group
from pixicache.cli.plugins import plugins_command
from pixicache.cli.serve import serve_command
from pixicache.errors import EXIT_CODES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pixicache")
@cache_dir_option
@click.pass_context
def main(ctx: click.Context) -> None:
    """pixicache: verified, cached Pixi environments for HTCondor GPU pools."""
    ctx.obj = dict(ctx.obj or {})


main.help = (main.help or "") + "\n\n\b\nExit codes:" + "".join(
    f"\n  {code:>3}  {what}" for what, code in EXIT_CODES.items()
)


for _command in (
    plan,
    prefetch,
    cache,
    install_command,
    run_command,
    serve_command,
    pixi_group,
    bundle_command,
    plugins_command,
    demo,
):
    main.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    main()
