"""The exception hierarchy of pixicache and the exit code of each failure.

Every error a user can act on derives from :class:`PixicacheError`. The CLI maps
each class to one documented exit code (:data:`EXIT_CODES`), so scripts and
HTCondor ``on_exit_hold`` expressions can tell the failures apart:

====  ==========================================================
code  meaning
====  ==========================================================
0     success (or the task's own exit code for ``pixicache run``)
1     an unexpected internal error (a bug: please report it)
2     usage error or a lock/manifest that cannot be used
3     fetch failed: an artifact could not be obtained from any source
4     integrity failure: bytes did not match the recorded SHA-256
5     install failed
6     the task could not be started
7     the store is unusable (permissions, corrupt index, disk full)
8     preflight failed: this node cannot run the environment
9     configuration error
====  ==========================================================
"""

from __future__ import annotations

from collections.abc import Iterable


class PixicacheError(Exception):
    """Base class of every error pixicache raises on purpose.

    ``str(err)`` is a message meant for the user: what was expected, what was
    found, and what to do about it.
    """

    exit_code: int = 1


class Interrupted(PixicacheError):
    """A signal asked pixicache to stop (the agent's SIGTERM/SIGINT/SIGHUP handler raises a
    subclass, from wherever the main thread is). Code that catches broad exceptions on
    purpose (a plugin failing to import) must let it through."""


class UsageError(PixicacheError):
    """The command line or its arguments are wrong."""

    exit_code = 2


class LockError(PixicacheError):
    """A ``pixi.lock`` (or manifest) cannot be used.

    The message names the file and, where it applies, the environment,
    platform and entry at fault.
    """

    exit_code = 2


class ConfigError(PixicacheError):
    """A configuration file, environment variable or option is invalid."""

    exit_code = 9


class FetchError(PixicacheError):
    """An artifact could not be obtained from any source.

    ``attempts`` lists one human-readable line per source tried.
    """

    exit_code = 3

    def __init__(self, message: str, attempts: list[str] | None = None) -> None:
        super().__init__(message)
        self.attempts: list[str] = list(attempts or [])

    def __str__(self) -> str:
        base = super().__str__()
        if not self.attempts:
            return base
        return base + "".join(f"\n  - {a}" for a in self.attempts)


class SourceUnavailable(FetchError):
    """One source could not deliver an artifact this time (refused, timed out, 5xx...).

    Raised by sources; the fetcher decides by type and attributes what to do:

    * ``transient``: retrying the same source may help (timeouts, resets, 5xx);
    * ``unreachable``: the source's host cannot be reached at all (it does not
      resolve, refuses connections): it is not asked again in this run;
    * ``retry_after``: how long the source asked to be left alone (seconds,
      from an HTTP ``Retry-After``), if it said.
    """

    def __init__(
        self,
        message: str,
        *,
        transient: bool = False,
        unreachable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.unreachable = unreachable
        self.retry_after = retry_after


class SourceNotFound(SourceUnavailable):
    """The source answered, and does not have the artifact (HTTP 404/410, no such file)."""


class IntegrityError(FetchError):
    """Bytes did not match the SHA-256 (or size) the lock records."""

    exit_code = 4

    def __init__(self, message: str, *, expected: str = "", actual: str = "") -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class StoreError(PixicacheError):
    """The content-addressed store cannot be used (permissions, disk full...)."""

    exit_code = 7


class StoreFull(StoreError):
    """The store's file system has no space left for a new blob."""


class InstallError(PixicacheError):
    """Installing the environment into its prefix failed.

    ``suspects`` holds the SHA-256 digests of the artifacts the installer found
    bad (a digest mismatch, a blob it could not read): the agent re-verifies
    exactly those in the node store before it retries, never the whole
    environment.
    """

    exit_code = 5

    def __init__(self, message: str, *, suspects: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.suspects: tuple[str, ...] = tuple(suspects)


class PreflightError(PixicacheError):
    """This node cannot run the environment (driver too old, no disk...)."""

    exit_code = 8


class PixiVerificationError(IntegrityError):
    """A Pixi binary or archive does not match any pinned SHA-256."""


class PluginError(ConfigError):
    """A plugin (entry point) cannot be loaded or used.

    The message names the plugin, its entry-point group and the distribution
    that provides it, so a site knows which package to fix or uninstall.
    """


class MissingExtra(UsageError):
    """A command needs an optional part of pixicache that is not installed."""


class TaskError(PixicacheError):
    """The task could not be started (unknown task, unsupported feature...)."""

    exit_code = 6


EXIT_CODES: dict[str, int] = {
    "ok": 0,
    "internal": 1,
    "usage / bad lock": UsageError.exit_code,
    "fetch failed": FetchError.exit_code,
    "integrity (digest mismatch)": IntegrityError.exit_code,
    "install failed": InstallError.exit_code,
    "task could not start": TaskError.exit_code,
    "store unusable": StoreError.exit_code,
    "preflight failed": PreflightError.exit_code,
    "configuration": ConfigError.exit_code,
}
"""Documented exit codes, by failure, as the CLI uses them."""
