"""Starting the installer's slow part ahead of need.

The rattler installer's child process spends most of a warm install starting Python,
importing py-rattler and reading the lock. Started when the command starts, it does
that on another core while the agent imports its own modules, plans and checks the
store; the install then hands it the request (see
:func:`pixicache.backends.rattler.process.start_ahead`). When the install turns out to
be a no-op or another installer runs, the child is ended before the task starts
(:func:`end_installer_ahead`), or at the agent's exit.
"""

from __future__ import annotations

from pathlib import Path

from pixicache.agent.options import AgentOptions

__all__ = ["end_installer_ahead", "start_installer_ahead"]


def start_installer_ahead(options: AgentOptions, manifest: Path) -> bool:
    """Start the py-rattler child if the rattler installer may run; whether one started.

    It may run when asked for, or for ``auto`` without a Pixi given (a verified Pixi
    already in the store would still win: the child is then unused), and only where
    py-rattler can be used at all.
    """
    if not options.may_use_rattler:
        return False
    from pixicache.backends.rattler.probe import rattler_available

    if not rattler_available()[0]:
        return False
    from pixicache.backends.rattler.process import start_ahead

    lock = manifest.absolute().parent / "pixi.lock"
    return start_ahead(lock if lock.is_file() else None)


def end_installer_ahead() -> None:
    """End the child :func:`start_installer_ahead` started if the install did not use
    it (a no-op, or another installer): ``run`` calls this before the task starts."""
    from pixicache.backends.rattler.process import discard_ahead

    discard_ahead()
