"""The agent for the command line: every failure its documented exit code, the report always written.

:func:`main_install` and :func:`main_run` wrap :func:`~pixicache.agent.pipeline.install`
and :func:`~pixicache.agent.pipeline.run`: they turn every failure into its
documented exit code (:mod:`pixicache.errors`: 2 bad lock or manifest, 3 fetch
failed, 4 verification failed, 5 install failed, 6 task could not start, 7 store
unusable, 8 preflight failed), print the message and the summary on stderr, and
write ``pixicache-report.json`` whatever happens — a bug included (exit 1, with
its traceback after the report is written).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from pixicache.agent.options import AgentOptions
from pixicache.agent.pipeline import install, run
from pixicache.agent.report import RunReport
from pixicache.agent.signals import interruptible
from pixicache.errors import PixicacheError

__all__ = ["main_install", "main_run"]


def _finish(rep: RunReport, code: int, exc: BaseException | None = None) -> int:
    if exc is not None:
        rep.record_error(exc, code)
        sys.stderr.write(f"pixicache: error: {exc}\n")
    rep.finish(code)
    rep.emit()
    return code


def _guarded(rep: RunReport, body: Callable[[], int]) -> int:
    try:
        code = body()
    except PixicacheError as exc:
        return _finish(rep, exc.exit_code, exc)
    except Exception as exc:  # a bug: still leave the report behind, then show the traceback
        rep.record_error(exc, 1)
        rep.finish(1)
        rep.write()
        raise
    return _finish(rep, code)


def main_install(
    manifest: str | os.PathLike[str], environment: str, *, options: AgentOptions, report: RunReport
) -> int:
    """:func:`install` for the CLI: the exit code, the report always written."""

    def body() -> int:
        with interruptible():
            install(manifest, environment, options=options, report=report)
        return 0

    return _guarded(report, body)


def main_run(
    manifest: str | os.PathLike[str],
    task: str,
    args: Sequence[str],
    *,
    environment: str | None,
    options: AgentOptions,
    report: RunReport,
) -> int:
    """:func:`run` for the CLI: the task's exit code (or the agent failure's)."""
    return _guarded(
        report,
        lambda: run(manifest, task, args, environment=environment, options=options, report=report),
    )
