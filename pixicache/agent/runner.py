"""Running a task of the manifest in an installed environment, forwarding signals.

With a verified Pixi, the task runs through ``pixi run --frozen --no-install``
(:func:`~pixicache.installers.pixi.pixi_run_argv`): Pixi neither
re-solves nor re-installs, and runs the task as it always does.

Without Pixi, the **native runner** runs what Pixi would, for the task
features :mod:`pixicache.model.manifest` accepts:

* the ``depends-on`` tasks first (depth first, in order, each once), each
  in its own process; the first that fails stops the run with its exit code;
* each command runs with ``bash -c`` (Pixi's shell is deno_task_shell, a
  subset of a Bourne shell; bash is the documented approximation), after
  the prefix's activation script (py-rattler's ``rattler.shell.activate``:
  ``PATH``, ``CONDA_PREFIX``, ``etc/conda/activate.d`` — computed in a child
  process and cached in ``conda-meta/pixicache-activation``), the
  manifest's ``[activation]`` env and scripts, and the task's ``env``
  (exported last, so it wins; values may use ``$VAR``);
* in ``cwd`` relative to the workspace (default: the workspace root), with
  ``PIXI_PROJECT_ROOT``, ``PIXI_PROJECT_NAME``, ``PIXI_PROJECT_MANIFEST``,
  ``PIXI_PROJECT_VERSION``, ``PIXI_ENVIRONMENT_NAME``, ``PIXI_ENVIRONMENT_PLATFORMS``,
  ``PIXI_PROMPT`` and ``CONDA_DEFAULT_ENV`` set as Pixi sets them;
* task arguments bound to declared ``args`` (``{{ name }}`` substituted), or
  appended, quoted, when the task declares none.

Signals: every process runs in its own process group (a new session).
SIGTERM, SIGINT and SIGHUP received by the agent are forwarded to that group
(HTCondor sends SIGTERM on eviction), the agent waits for the task, and
returns its exit code — ``128 + N`` if it was killed by signal N, as bash
reports it. The bash wrapper traps those signals with ``exit $?``, so it
waits for the task and ends with the task's own code, and runs nothing
after it. A signal that arrives between two ``depends-on`` steps stops the
run (exit ``128 + N``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pixicache.backends.rattler.child import ACTIVATION_FILE, prefix_fingerprint
from pixicache.errors import TaskError
from pixicache.model.manifest import Manifest, Step

__all__ = [
    "FORWARDED_SIGNALS",
    "TaskOutcome",
    "activation_script",
    "exit_code_of",
    "run_process",
    "run_task",
    "task_script",
]

FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""The signals the agent forwards to the task's process group."""

_TRAP = "trap 'exit $?' TERM INT HUP"


@dataclass
class TaskOutcome:
    """What running a task did.

    Attributes:
        task: the task asked for.
        runner: ``"native"`` or ``"pixi"``.
        exit_code: the exit code to report (``128 + N`` for death by signal N).
        steps: the tasks that ran, in order (``depends-on`` first).
        signal: the name of the signal that killed the last process, if any.
        forwarded: the signals forwarded to the task, by name, in order.
        seconds: wall time from the first process start to the last exit.
        notes: what the native runner ignored (``inputs``/``outputs``).
    """

    task: str
    runner: str
    exit_code: int
    steps: list[str] = field(default_factory=list)
    signal: str | None = None
    forwarded: list[str] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.task,
            "runner": self.runner,
            "exit_code": self.exit_code,
            "steps": self.steps,
            "signal": self.signal,
            "forwarded_signals": self.forwarded,
            "seconds": round(self.seconds, 3),
            "notes": self.notes,
        }


def exit_code_of(returncode: int) -> int:
    """A ``Popen.returncode`` as a shell reports it (``-15`` → ``143``)."""
    return 128 - returncode if returncode < 0 else returncode


class _Forwarder:
    """Installs handlers that forward signals to a process group while it runs."""

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.signals = list(signals)
        self.received: list[int] = []
        self.pgid: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signum)

    def __enter__(self) -> _Forwarder:
        for sig in self.signals:
            with contextlib.suppress(ValueError, OSError):  # not the main thread: no forwarding
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def attach(self, pgid: int) -> None:
        """Start forwarding to ``pgid``; deliver what arrived while it was starting."""
        self.pgid = pgid
        for signum in list(self.received):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signum)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, old)
        self.pgid = None


def run_process(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    signals: Sequence[signal.Signals] = FORWARDED_SIGNALS,
    forwarder: _Forwarder | None = None,
) -> tuple[int, list[int]]:
    """Run ``argv`` in its own process group, forwarding ``signals`` to it.

    Returns:
        ``(exit code as a shell reports it, signals forwarded)``.

    Raises:
        TaskError: the program cannot be started.
    """
    own = forwarder is None
    fwd = forwarder or _Forwarder(signals)
    if own:
        fwd.__enter__()
    try:
        before = len(fwd.received)
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        except OSError as exc:
            raise TaskError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        fwd.attach(proc.pid)
        try:
            rc = proc.wait()
        finally:
            fwd.pgid = None
        return exit_code_of(rc), fwd.received[before:]
    finally:
        if own:
            fwd.__exit__(None, None, None)


# -- activation ----------------------------------------------------------------------------


def activation_script(prefix: str | os.PathLike[str]) -> str:
    """The bash activation script of ``prefix`` (py-rattler's), from the cache in
    ``conda-meta`` when it is for the prefix's current packages, else computed
    in a child process (py-rattler may crash at exit) and cached.

    Raises:
        TaskError: the prefix is not an environment, or activation failed.
    """
    prefix = Path(prefix)
    if not (prefix / "conda-meta").is_dir():
        raise TaskError(f"{prefix} is not an installed environment (no conda-meta)")
    fingerprint = prefix_fingerprint(prefix)
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads((prefix / "conda-meta" / ACTIVATION_FILE).read_text())
        if cached.get("fingerprint") == fingerprint and isinstance(cached.get("script"), str):
            return str(cached["script"])
    from pixicache.backends.rattler.process import run_child
    from pixicache.errors import InstallError

    try:
        answer = run_child(
            "activate", {"prefix": str(prefix.absolute()), "save": True}, timeout=120
        )
    except InstallError as exc:
        raise TaskError(f"cannot activate {prefix}: {exc}") from None
    return str(answer["script"])


def _export(name: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
    return f'export {name}="{escaped}"'


def task_script(
    step: Step,
    *,
    activation: str,
    activation_env: Mapping[str, str] | None = None,
    activation_scripts: Sequence[str] = (),
    workspace: Path,
) -> str:
    """The bash script that runs one step (see the module doc for its parts)."""
    assert step.command is not None
    lines = [_TRAP, activation.rstrip()]
    lines += [_export(k, v) for k, v in (activation_env or {}).items()]
    for script in activation_scripts:
        path = workspace / script
        lines.append(f'. "{_escape(str(path))}"')
    lines += [_export(k, v) for k, v in step.task.env.items()]
    lines.append(step.command)
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")


def _pixi_env(
    manifest: Manifest, environment: str, prefix: Path, base: Mapping[str, str]
) -> dict[str, str]:
    env = dict(base)
    env.update(
        {
            "PIXI_PROJECT_ROOT": str(manifest.workspace),
            "PIXI_PROJECT_NAME": manifest.name or manifest.workspace.name,
            "PIXI_PROJECT_MANIFEST": str(manifest.path),
            "PIXI_ENVIRONMENT_NAME": environment,
            "PIXI_ENVIRONMENT_PLATFORMS": ",".join(manifest.platforms),
            "PIXI_PROMPT": f"({manifest.name or manifest.workspace.name}) "
            if environment == "default"
            else f"({manifest.name or manifest.workspace.name}:{environment}) ",
            "CONDA_DEFAULT_ENV": f"{manifest.name or manifest.workspace.name}"
            + ("" if environment == "default" else f":{environment}"),
        }
    )
    if manifest.version:
        env["PIXI_PROJECT_VERSION"] = manifest.version
    return env


def _native(
    manifest: Manifest,
    task: str,
    args: Sequence[str],
    environment: str,
    prefix: Path,
    fwd: _Forwarder,
    on_start: Callable[[], None] | None,
    platform: str | None,
) -> TaskOutcome:
    steps = manifest.execution_plan(task, args, environment, platform)
    outcome = TaskOutcome(task, "native", 0)
    for step in steps:
        outcome.notes.extend(n for n in step.task.notes if n not in outcome.notes)
    activation = activation_script(prefix)
    base = _pixi_env(manifest, environment, prefix, os.environ)
    act_env = manifest.activation_env(environment, platform)
    act_scripts = manifest.activation_scripts(environment, platform)
    if on_start is not None:
        on_start()
    start = time.monotonic()
    for step in steps:
        if fwd.received:
            sig = fwd.received[-1]
            outcome.exit_code = 128 + sig
            outcome.signal = signal.Signals(sig).name
            break
        outcome.steps.append(step.task.name)
        if step.command is None:
            continue
        cwd = manifest.workspace / step.task.cwd if step.task.cwd else manifest.workspace
        if not cwd.is_dir():
            raise TaskError(
                f"task '{step.task.name}': its cwd {cwd} is not a directory "
                f"(cwd is relative to the workspace {manifest.workspace})"
            )
        script = task_script(
            step,
            activation=activation,
            activation_env=act_env,
            activation_scripts=act_scripts,
            workspace=manifest.workspace,
        )
        sys.stderr.write(f"pixicache: task ({step.task.name} in {environment}): {step.command}\n")
        sys.stderr.flush()
        code, forwarded = run_process(["bash", "-c", script], cwd=cwd, env=base, forwarder=fwd)
        outcome.forwarded.extend(signal.Signals(s).name for s in forwarded)
        outcome.exit_code = code
        if code > 128 and code - 128 in {s.value for s in signal.Signals}:
            outcome.signal = signal.Signals(code - 128).name
        if code != 0:
            break
    outcome.seconds = time.monotonic() - start
    return outcome


def run_task(
    manifest: Manifest,
    task: str,
    args: Sequence[str] = (),
    *,
    environment: str = "default",
    prefix: str | os.PathLike[str],
    pixi: Any = None,
    on_start: Callable[[], None] | None = None,
    signals: Sequence[signal.Signals] = FORWARDED_SIGNALS,
    platform: str | None = None,
) -> TaskOutcome:
    """Run ``task`` with ``args`` in the installed ``environment``.

    Args:
        manifest: the parsed manifest.
        task: the task name.
        args: the task's arguments (bound to its ``args``, or appended).
        environment: the environment name.
        prefix: the installed environment (``<workspace>/.pixi/envs/<env>``).
        pixi: a verified Pixi (``VerifiedPixi`` or a path): run through ``pixi run``.
        on_start: called just before the first process starts (the report's
            "task" phase starts there).
        signals: the signals to forward.
        platform: the installed platform: ``[target.<platform>]`` tasks and activation apply.

    Returns:
        The :class:`TaskOutcome`; its ``exit_code`` is the task's.

    Raises:
        TaskError: the task cannot be started (unknown task, bad arguments,
            a feature the native runner refuses, no bash).
    """
    prefix = Path(prefix)
    with _Forwarder(signals) as fwd:
        if pixi is not None:
            from pixicache.backends.pixi.commands import pixi_run_argv

            argv = pixi_run_argv(pixi, manifest.path, environment, task, args)
            outcome = TaskOutcome(task, "pixi", 0, steps=[task])
            if on_start is not None:
                on_start()
            start = time.monotonic()
            code, forwarded = run_process(argv, cwd=Path.cwd(), forwarder=fwd)
            outcome.exit_code = code
            outcome.forwarded = [signal.Signals(s).name for s in forwarded]
            outcome.seconds = time.monotonic() - start
            return outcome
        return _native(manifest, task, args, environment, prefix, fwd, on_start, platform)
