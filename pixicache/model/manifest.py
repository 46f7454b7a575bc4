"""Read the parts of a ``pixi.toml`` that running a job needs: tasks, environments, activation.

:meth:`Manifest.load` reads the workspace table (``[workspace]``, or the older
``[project]``), the tasks (``[tasks]`` and ``[feature.<name>.tasks]``),
``[environments]``, ``[activation]`` (``env`` and ``scripts``, top level and per
feature) and ``[system-requirements]``. Dependencies are not read: the lock is
the contract of a job, not the manifest.

A task, as Pixi documents it, is one of:

* a string: the command (``hello = "hello --greet"``);
* a list of task names or ``{task, args}`` tables: an alias that only runs
  other tasks (``style = ["fmt", "lint"]``);
* a table with ``cmd`` (a string, or a list of words joined by spaces),
  ``args`` (task arguments: names, or ``{arg, default}`` tables),
  ``depends-on`` (names, or ``{task, args}`` tables), ``cwd`` (relative to the
  workspace), ``env`` (variables exported before the command), ``description``.

The native runner (:mod:`pixicache.agent.runner`) supports exactly that. What it
does not support is refused with a :class:`~pixicache.errors.TaskError` that
says so, when the task is about to run, never silently mis-run:

* ``clean-env = true`` (Pixi's "pixi-only" environment);
* ``depends-on`` entries with an ``environment`` (another environment's task);
* MiniJinja beyond plain ``{{ name }}`` substitution (filters, expressions,
  ``{% ... %}`` blocks) in ``cmd``;
* a table key this module does not know.

``inputs`` / ``outputs`` (Pixi's task cache) are accepted and ignored: the
task always runs, and :attr:`Task.notes` says so. ``default-environment`` is
honoured when no environment is given on the command line.

Example::

    m = Manifest.load("pixi.toml")
    plan = m.execution_plan("train", ["--epochs", "3"], environment="default")
    for step in plan:          # depends-on first, each task once
        print(step.task.name, step.command)
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixicache.errors import LockError, TaskError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_ENVIRONMENT",
    "EnvironmentSpec",
    "Manifest",
    "Step",
    "Task",
    "TaskArg",
    "TaskRef",
    "render_command",
]

DEFAULT_ENVIRONMENT = "default"

_KNOWN_TASK_KEYS = frozenset(
    {
        "cmd",
        "args",
        "depends-on",
        "depends_on",
        "cwd",
        "env",
        "description",
        "inputs",
        "outputs",
        "clean-env",
        "default-environment",
    }
)
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TEMPLATE_RE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)


@dataclass(frozen=True)
class TaskArg:
    """A declared task argument; ``default`` is ``None`` for a required one."""

    name: str
    default: str | None = None


@dataclass(frozen=True)
class TaskRef:
    """A ``depends-on`` entry: a task name with the arguments to pass it."""

    task: str
    args: tuple[str, ...] = ()
    environment: str | None = None


@dataclass
class Task:
    """One task of the manifest (see the module doc for the accepted forms).

    Attributes:
        name: the task's name.
        cmd: the command (a list is already joined by spaces), or ``None`` for
            an alias that only runs its ``depends_on``.
        args: the declared arguments (empty: extra CLI words are appended).
        depends_on: the tasks to run first, in order.
        cwd: the working directory relative to the workspace, if set.
        env: variables exported before the command (values may use ``$VAR``).
        description: the description, if any.
        feature: the feature that defines it (``None``: the top-level ``[tasks]``).
        clean_env: ``clean-env = true`` (refused by the native runner).
        default_environment: Pixi's ``default-environment``, if set.
        notes: what the native runner ignores about it (``inputs``/``outputs``).
        unknown_keys: table keys this module does not know (refused at run time).
    """

    name: str
    cmd: str | None
    args: list[TaskArg] = field(default_factory=list)
    depends_on: list[TaskRef] = field(default_factory=list)
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    description: str | None = None
    feature: str | None = None
    clean_env: bool = False
    default_environment: str | None = None
    notes: list[str] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        """Where it is defined, for messages (``[tasks]`` or ``[feature.x.tasks]``)."""
        return "[tasks]" if self.feature is None else f"[feature.{self.feature}.tasks]"

    def bind_args(self, given: Sequence[str]) -> dict[str, str]:
        """Map the declared arguments to ``given`` values, in order, with defaults.

        Raises:
            TaskError: a required argument is missing, or more values than
                declared arguments were given.
        """
        values: dict[str, str] = {}
        if len(given) > len(self.args):
            extra = " ".join(shlex.quote(g) for g in given[len(self.args) :])
            declared = ", ".join(a.name for a in self.args)
            raise TaskError(
                f"task '{self.name}' takes {len(self.args)} argument(s) ({declared}); "
                f"got {len(given)}: unexpected {extra}"
            )
        for i, arg in enumerate(self.args):
            if i < len(given):
                values[arg.name] = given[i]
            elif arg.default is not None:
                values[arg.name] = arg.default
            else:
                usage = " ".join(
                    f"<{a.name}>" if a.default is None else f"[{a.name}={a.default}]"
                    for a in self.args
                )
                raise TaskError(
                    f"task '{self.name}' needs argument '{arg.name}' "
                    f"(usage: pixicache run {self.name} {usage})"
                )
        return values

    def check_supported(self) -> None:
        """Raise :class:`TaskError` for what the native runner cannot do faithfully."""
        if self.clean_env:
            raise TaskError(
                f"task '{self.name}' ({self.where}) sets clean-env = true, which the native "
                "runner does not support; run it with a verified Pixi (--pixi PATH), or remove "
                "clean-env"
            )
        if self.unknown_keys:
            raise TaskError(
                f"task '{self.name}' ({self.where}) uses {', '.join(sorted(self.unknown_keys))}, "
                "which the native runner does not know; run it with a verified Pixi (--pixi PATH)"
            )
        for dep in self.depends_on:
            if dep.environment is not None:
                raise TaskError(
                    f"task '{self.name}' depends on '{dep.task}' in environment "
                    f"'{dep.environment}'; the native runner runs every task in one "
                    "environment: run it with a verified Pixi (--pixi PATH)"
                )


@dataclass(frozen=True)
class EnvironmentSpec:
    """An ``[environments]`` entry: its features, and whether the default feature is in."""

    name: str
    features: tuple[str, ...] = ()
    no_default_feature: bool = False


@dataclass(frozen=True)
class Step:
    """One task to run, with its rendered command (``None`` for an alias)."""

    task: Task
    command: str | None
    args: dict[str, str]


def render_command(task: Task, values: dict[str, str], extra: Sequence[str] = ()) -> str | None:
    """The command line of ``task`` with its arguments substituted.

    ``{{ name }}`` (spaces optional) becomes the argument's value, as Pixi's
    MiniJinja renders it (the value is inserted as is, not quoted). A task
    without declared arguments gets the ``extra`` words appended, each quoted
    for the shell.

    >>> t = Task("greet", "echo Hello, {{ name }}!", args=[TaskArg("name")])
    >>> render_command(t, {"name": "John"})
    'echo Hello, John!'
    >>> render_command(Task("e", "echo"), {}, ["a b", "c"])
    "echo 'a b' c"

    Raises:
        TaskError: a template uses something other than a declared name.
    """
    if task.cmd is None:
        return None
    cmd = task.cmd
    if "{%" in cmd or "{#" in cmd:
        raise TaskError(
            f"task '{task.name}' uses MiniJinja blocks ({{% ... %}}) in its cmd; the native "
            "runner substitutes only {{ name }}: run it with a verified Pixi (--pixi PATH)"
        )

    def sub(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        if expr in values:
            return values[expr]
        if _NAME_RE.match(expr):
            raise TaskError(
                f"task '{task.name}' uses {{{{ {expr} }}}} but declares no argument '{expr}' "
                f"(declared: {', '.join(a.name for a in task.args) or 'none'})"
            )
        raise TaskError(
            f"task '{task.name}' uses the MiniJinja expression {{{{ {expr} }}}}; the native "
            "runner substitutes only {{ name }}: run it with a verified Pixi (--pixi PATH)"
        )

    cmd = _TEMPLATE_RE.sub(sub, cmd)
    if extra:
        cmd = cmd + " " + " ".join(shlex.quote(e) for e in extra)
    return cmd


class Manifest:
    """A parsed ``pixi.toml``; build it with :meth:`load` or :meth:`parse`."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.workspace = path.parent
        ws = data.get("workspace")
        if ws is None:
            ws = data.get("project")
        self.table: dict[str, Any] = ws if isinstance(ws, dict) else {}
        self.name: str | None = _opt_str(self.table.get("name"))
        self.version: str | None = _opt_str(self.table.get("version"))
        self.platforms: list[str] = [str(p) for p in self.table.get("platforms", []) or []]
        self.tasks: dict[str, Task] = self._tasks(data.get("tasks"), None)
        self.feature_tasks: dict[str, dict[str, Task]] = {}
        self.feature_activation: dict[str, dict[str, Any]] = {}
        self.feature_system_requirements: dict[str, dict[str, Any]] = {}
        features = data.get("feature") or {}
        if not isinstance(features, dict):
            raise self._error("[feature] must be a table of features")
        for fname, fdata in features.items():
            if not isinstance(fdata, dict):
                raise self._error(f"[feature.{fname}] must be a table")
            if "tasks" in fdata:
                self.feature_tasks[fname] = self._tasks(fdata.get("tasks"), fname)
            if "activation" in fdata:
                self.feature_activation[fname] = _table(fdata["activation"], self._error)
            if "system-requirements" in fdata:
                self.feature_system_requirements[fname] = _table(
                    fdata["system-requirements"], self._error
                )
        self.activation: dict[str, Any] = _table(data.get("activation") or {}, self._error)
        self.environments: dict[str, EnvironmentSpec] = self._environments(data.get("environments"))
        self.system_requirements: dict[str, Any] = _table(
            data.get("system-requirements") or {}, self._error
        )

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read ``path`` (a ``pixi.toml``).

        Raises:
            LockError: the file is missing, not TOML, or malformed (exit code 2).
        """
        p = Path(path).absolute()
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise LockError(
                f"{p}: no such manifest; run in the directory holding pixi.toml or pass "
                "--manifest PATH"
            ) from None
        except OSError as exc:
            raise LockError(f"{p}: cannot read the manifest: {exc.strerror or exc}") from None
        return cls.parse(data.decode("utf-8", errors="replace"), p)

    @classmethod
    def parse(cls, text: str, path: str | os.PathLike[str] = "pixi.toml") -> Manifest:
        """Parse manifest ``text``; ``path`` locates the workspace."""
        p = Path(path).absolute()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise LockError(f"{p}: not valid TOML: {exc}") from None
        return cls(p, data)

    # -- queries --------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        """The lock beside the manifest (``pixi.lock``)."""
        return self.workspace / "pixi.lock"

    def environment_features(self, environment: str = DEFAULT_ENVIRONMENT) -> list[str | None]:
        """The features of ``environment`` in priority order (``None`` = the default feature).

        Pixi gives the environment's listed features priority over the default
        feature, the first listed first.

        Raises:
            TaskError: the manifest defines no such environment.
        """
        if environment == DEFAULT_ENVIRONMENT and environment not in self.environments:
            return [None]
        spec = self.environments.get(environment)
        if spec is None:
            known = ", ".join(sorted({DEFAULT_ENVIRONMENT, *self.environments}))
            raise TaskError(f"{self.path}: no environment '{environment}' (environments: {known})")
        out: list[str | None] = list(spec.features)
        if not spec.no_default_feature:
            out.append(None)
        return out

    def system_requirement_tables(
        self, environment: str = DEFAULT_ENVIRONMENT
    ) -> list[tuple[str, dict[str, Any]]]:
        """``[system-requirements]`` tables that apply to ``environment``, each with
        where it is written (``"[feature.gpu.system-requirements]"``); the default
        feature's first. An environment the manifest does not define gets the
        default feature's."""
        spec = self.environments.get(environment)
        features = list(spec.features) if spec is not None else []
        out: list[tuple[str, dict[str, Any]]] = []
        if spec is None or not spec.no_default_feature:
            out.append(("[system-requirements]", self.system_requirements))
        for feat in features:
            table = self.feature_system_requirements.get(feat)
            if table:
                out.append((f"[feature.{feat}.system-requirements]", table))
        return out

    def tasks_for(self, environment: str = DEFAULT_ENVIRONMENT) -> dict[str, Task]:
        """Every task available in ``environment`` (a feature's task wins over the default's)."""
        out: dict[str, Task] = {}
        for feature in reversed(self.environment_features(environment)):
            source = self.tasks if feature is None else self.feature_tasks.get(feature, {})
            out.update(source)
        return out

    def task(self, name: str, environment: str = DEFAULT_ENVIRONMENT) -> Task:
        """The task ``name`` as ``environment`` sees it.

        Raises:
            TaskError: no such task (the message lists the tasks there are).
        """
        tasks = self.tasks_for(environment)
        task = tasks.get(name)
        if task is None:
            visible = sorted(t for t in tasks if not t.startswith("_"))
            elsewhere = [
                f
                for f, ts in self.feature_tasks.items()
                if name in ts and f not in self.environment_features(environment)
            ]
            hint = ""
            if elsewhere:
                envs = [
                    e.name for e in self.environments.values() if set(elsewhere) & set(e.features)
                ]
                hint = f"; it is defined in feature(s) {', '.join(elsewhere)}" + (
                    f": use -e {envs[0]}" if envs else ""
                )
            raise TaskError(
                f"{self.path}: no task '{name}' in environment '{environment}'"
                f" (tasks: {', '.join(visible) or 'none'}){hint}"
            )
        return task

    def environment_for(self, task: str) -> str:
        """The environment to run ``task`` in when none is given (as Pixi picks it).

        The default environment if it has the task (or the task's
        ``default-environment``), else the one environment that has it.

        Raises:
            TaskError: no environment has the task, or several do (name one with -e).
        """
        found = self.tasks_for(DEFAULT_ENVIRONMENT).get(task)
        if found is not None:
            return found.default_environment or DEFAULT_ENVIRONMENT
        having = [e for e in self.environments if task in self.tasks_for(e)]
        if len(having) == 1:
            return having[0]
        if having:
            raise TaskError(
                f"{self.path}: task '{task}' is in environments {', '.join(having)}: "
                "choose one with -e ENV"
            )
        return DEFAULT_ENVIRONMENT  # let task() report the unknown task

    def activation_env(self, environment: str = DEFAULT_ENVIRONMENT) -> dict[str, str]:
        """``[activation.env]`` of the environment's features (default feature first)."""
        out: dict[str, str] = {}
        for feature in reversed(self.environment_features(environment)):
            table = self.activation if feature is None else self.feature_activation.get(feature, {})
            env = table.get("env") or {}
            if not isinstance(env, dict):
                raise self._error("[activation.env] must be a table of strings")
            out.update({str(k): str(v) for k, v in env.items()})
        return out

    def activation_scripts(self, environment: str = DEFAULT_ENVIRONMENT) -> list[str]:
        """``[activation] scripts`` of the environment's features, workspace-relative."""
        out: list[str] = []
        for feature in reversed(self.environment_features(environment)):
            table = self.activation if feature is None else self.feature_activation.get(feature, {})
            scripts = table.get("scripts") or []
            if not isinstance(scripts, list):
                raise self._error("[activation] scripts must be a list of paths")
            out.extend(str(s) for s in scripts)
        return out

    def execution_plan(
        self, name: str, args: Sequence[str] = (), environment: str = DEFAULT_ENVIRONMENT
    ) -> list[Step]:
        """The tasks to run for ``name``: its ``depends-on`` first (depth first, in
        order, each task once), then the task itself with ``args``.

        Raises:
            TaskError: an unknown task, a dependency cycle, bad arguments, or a
                feature the native runner refuses (see the module doc).
        """
        steps: list[Step] = []
        done: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        stack: list[str] = []

        def visit(task_name: str, given: Sequence[str], extra_allowed: bool) -> None:
            if task_name in stack:
                cycle = " -> ".join([*stack[stack.index(task_name) :], task_name])
                raise TaskError(f"{self.path}: the tasks depend on each other in a cycle: {cycle}")
            task = self.task(task_name, environment)
            task.check_supported()
            if task.args or not extra_allowed:
                values = task.bind_args(given)
                extra: Sequence[str] = ()
            else:
                values, extra = {}, given
            key = (task_name, tuple(sorted(values.items())) + tuple(("", e) for e in extra))
            if key in done:
                return
            stack.append(task_name)
            for dep in task.depends_on:
                rendered = [_render_value(task, a, values) for a in dep.args]
                visit(dep.task, rendered, extra_allowed=False)
            stack.pop()
            done.add(key)
            steps.append(Step(task, render_command(task, values, extra), values))

        visit(name, list(args), extra_allowed=True)
        return steps

    # -- parsing --------------------------------------------------------------------------
    def _error(self, message: str) -> LockError:
        return LockError(f"{self.path}: {message}")

    def _tasks(self, raw: Any, feature: str | None) -> dict[str, Task]:
        if raw is None:
            return {}
        where = "[tasks]" if feature is None else f"[feature.{feature}.tasks]"
        if not isinstance(raw, dict):
            raise self._error(f"{where} must be a table")
        return {
            str(name): self._task(str(name), value, feature, where) for name, value in raw.items()
        }

    def _task(self, name: str, value: Any, feature: str | None, where: str) -> Task:
        if isinstance(value, str):
            return Task(name, value, feature=feature)
        if isinstance(value, list):
            return Task(name, None, depends_on=self._refs(name, value, where), feature=feature)
        if not isinstance(value, dict):
            raise self._error(f"{where} {name}: a task is a string, a list or a table")
        task = Task(name, self._cmd(name, value.get("cmd"), where), feature=feature)
        task.args = self._args(name, value.get("args", []), where)
        deps = value.get("depends-on", value.get("depends_on", []))
        if isinstance(deps, str):
            deps = [deps]
        task.depends_on = self._refs(name, deps, where)
        cwd = value.get("cwd")
        task.cwd = None if cwd is None else str(cwd)
        env = value.get("env") or {}
        if not isinstance(env, dict):
            raise self._error(f"{where} {name}: env must be a table of strings")
        task.env = {str(k): str(v) for k, v in env.items()}
        task.description = _opt_str(value.get("description"))
        task.clean_env = bool(value.get("clean-env", False))
        task.default_environment = _opt_str(value.get("default-environment"))
        if "inputs" in value or "outputs" in value:
            task.notes.append(
                "inputs/outputs (Pixi's task cache) are ignored by the native runner: "
                "the task always runs"
            )
        task.unknown_keys = sorted(set(value) - _KNOWN_TASK_KEYS)
        if task.cmd is None and not task.depends_on:
            raise self._error(f"{where} {name}: the task has neither cmd nor depends-on")
        return task

    def _cmd(self, name: str, cmd: Any, where: str) -> str | None:
        if cmd is None or isinstance(cmd, str):
            return cmd
        if isinstance(cmd, list) and all(isinstance(c, str) for c in cmd):
            return " ".join(cmd)
        raise self._error(f"{where} {name}: cmd must be a string or a list of strings")

    def _args(self, name: str, raw: Any, where: str) -> list[TaskArg]:
        if not isinstance(raw, list):
            raise self._error(f"{where} {name}: args must be a list")
        out: list[TaskArg] = []
        for item in raw:
            if isinstance(item, str):
                arg = TaskArg(item)
            elif isinstance(item, dict) and isinstance(item.get("arg"), str):
                default = item.get("default")
                arg = TaskArg(item["arg"], None if default is None else str(default))
            else:
                raise self._error(
                    f"{where} {name}: each arg is a name or {{ arg = ..., default = ... }}"
                )
            if not _NAME_RE.match(arg.name):
                raise self._error(
                    f"{where} {name}: argument name {arg.name!r} must be letters, digits and "
                    "underscores (no dashes: MiniJinja reads them as a minus)"
                )
            out.append(arg)
        return out

    def _refs(self, name: str, raw: Any, where: str) -> list[TaskRef]:
        if not isinstance(raw, list):
            raise self._error(f"{where} {name}: depends-on must be a list")
        out: list[TaskRef] = []
        for item in raw:
            if isinstance(item, str):
                out.append(TaskRef(item))
            elif isinstance(item, dict) and isinstance(item.get("task"), str):
                args = item.get("args") or []
                if not isinstance(args, list):
                    raise self._error(f"{where} {name}: depends-on args must be a list")
                env = item.get("environment")
                out.append(TaskRef(item["task"], tuple(str(a) for a in args), _opt_str(env)))
            else:
                raise self._error(
                    f"{where} {name}: each depends-on entry is a name or {{ task = ... }}"
                )
        return out

    def _environments(self, raw: Any) -> dict[str, EnvironmentSpec]:
        out: dict[str, EnvironmentSpec] = {}
        for name, value in (raw or {}).items():
            if isinstance(value, list):
                out[name] = EnvironmentSpec(name, tuple(str(f) for f in value))
            elif isinstance(value, dict):
                feats = value.get("features") or []
                out[name] = EnvironmentSpec(
                    name, tuple(str(f) for f in feats), bool(value.get("no-default-feature", False))
                )
            else:
                raise self._error(f"[environments] {name}: a list of features or a table")
        return out


def _render_value(task: Task, value: str, values: dict[str, str]) -> str:
    """A ``depends-on`` argument may use the calling task's arguments (``{{ name }}``)."""
    probe = Task(task.name, value, args=task.args)
    rendered = render_command(probe, values)
    return value if rendered is None else rendered


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _table(value: Any, error: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise error("[activation] must be a table")
    return value
