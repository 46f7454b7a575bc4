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
    defined_in: str | None = None

    @property
    def where(self) -> str:
        """Where it is defined, for messages (``[tasks]``, ``[feature.x.tasks]``,
        ``[target.linux-64.tasks]``...)."""
        if self.defined_in:
            return self.defined_in
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


@dataclass
class Feature:
    """One feature of the manifest (``name`` ``None``: the default feature, the top-level tables).

    ``targets`` holds the ``[target.<selector>]`` tables in the order the manifest
    declares them: for a platform, every matching selector applies on top of the
    feature's own tables, a later one over an earlier one (as Pixi does).
    """

    name: str | None
    selector: str | None = None  # set on a [target.<selector>] table
    tasks: dict[str, Task] = field(default_factory=dict)
    activation: dict[str, Any] = field(default_factory=dict)
    system_requirements: dict[str, Any] = field(default_factory=dict)
    dependencies: dict[str, Any] = field(default_factory=dict)
    pypi_dependencies: dict[str, Any] = field(default_factory=dict)
    targets: list[tuple[str, Feature]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "the default feature" if self.name is None else f"feature '{self.name}'"

    def for_platform(self, platform: str | None) -> list[Feature]:
        """This feature's tables, then each target that matches ``platform``, lowest priority first."""
        if platform is None:
            return [self]
        return [self] + [t for sel, t in self.targets if selector_matches(sel, platform)]


_SELECTORS = {
    "unix": lambda p: not p.startswith("win-"),
    "linux": lambda p: p.startswith("linux-"),
    "win": lambda p: p.startswith("win-"),
    "osx": lambda p: p.startswith("osx-"),
}


def selector_matches(selector: str, platform: str) -> bool:
    """Whether a ``[target.<selector>]`` applies to ``platform`` (a platform name, or
    ``unix``, ``linux``, ``win``, ``osx``)."""
    test = _SELECTORS.get(selector)
    return test(platform) if test is not None else selector == platform


MAX_TASK_DEPTH = 256
"""How deep ``depends-on`` chains may nest before the manifest is refused."""


class Manifest:
    """A parsed ``pixi.toml`` (or the ``[tool.pixi]`` tables of a ``pyproject.toml``);
    build it with :meth:`load` or :meth:`parse`."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.workspace = path.parent
        self.is_pyproject = path.name == "pyproject.toml"
        project: dict[str, Any] = {}
        if self.is_pyproject:
            raw_project = data.get("project")
            project = raw_project if isinstance(raw_project, dict) else {}
            tool = data.get("tool")
            pixi = tool.get("pixi") if isinstance(tool, dict) else None
            if not isinstance(pixi, dict):
                raise self._error(
                    "a pyproject.toml manifest needs a [tool.pixi.workspace] table (this one has "
                    "no [tool.pixi]): add it, or pass --manifest pixi.toml"
                )
            data = pixi
        ws = data.get("workspace")
        if ws is None:
            ws = data.get("project")
        if not isinstance(ws, dict):
            where = "[tool.pixi.workspace]" if self.is_pyproject else "[workspace]"
            raise self._error(
                f"not a Pixi manifest: it has no {where} table (or the older [project] one). "
                "Pixi refuses it too; create it with `pixi init`"
            )
        self.table: dict[str, Any] = ws
        where = "[tool.pixi.workspace]" if self.is_pyproject else "[workspace]"
        for key in ("name", "version"):
            if key in ws and not isinstance(ws[key], str):
                raise self._error(f"{where} {key} must be a string, not {type(ws[key]).__name__}")
        self.name: str | None = _opt_str(ws.get("name")) or _opt_str(project.get("name"))
        self.version: str | None = _opt_str(ws.get("version")) or _opt_str(project.get("version"))
        platforms = ws.get("platforms", []) or []
        if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
            raise self._error(f"{where} platforms must be a list of platform names")
        self.platforms: list[str] = list(platforms)
        default = self._feature(None, data)
        if self.is_pyproject:
            self._pyproject_dependencies(default, project)
        self.features: dict[str | None, Feature] = {None: default}
        raw_features = data.get("feature") or {}
        if not isinstance(raw_features, dict):
            raise self._error("[feature] must be a table of features")
        for fname, fdata in raw_features.items():
            if not isinstance(fdata, dict):
                raise self._error(f"[feature.{fname}] must be a table")
            self.features[str(fname)] = self._feature(str(fname), fdata)
        self.environments: dict[str, EnvironmentSpec] = self._environments(data.get("environments"))
        # the default feature's tables, as older callers read them
        self.tasks = default.tasks
        self.activation = default.activation
        self.system_requirements = default.system_requirements

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read ``path`` (a ``pixi.toml`` or ``pyproject.toml``).

        A missing ``pixi.toml`` whose directory has a ``pyproject.toml`` with
        ``[tool.pixi]`` tables reads that instead (Pixi's own discovery order).

        Raises:
            LockError: the file is missing, not UTF-8, not TOML, or not a Pixi
                manifest (exit code 2).
        """
        p = Path(path).absolute()
        if p.name == "pixi.toml" and not p.exists() and (p.parent / "pyproject.toml").is_file():
            p = p.parent / "pyproject.toml"
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise LockError(
                f"{p}: no such manifest; run in the directory holding pixi.toml or pass "
                "--manifest PATH"
            ) from None
        except OSError as exc:
            raise LockError(f"{p}: cannot read the manifest: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LockError(
                f"{p}: not a text file: invalid UTF-8 at byte {exc.start} (TOML files are UTF-8)"
            ) from None
        return cls.parse(text, p)

    @classmethod
    def parse(cls, text: str, path: str | os.PathLike[str] = "pixi.toml") -> Manifest:
        """Parse manifest ``text``; ``path`` locates the workspace (and says whether it
        is a ``pyproject.toml``)."""
        p = Path(path).absolute()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise LockError(f"{p}: not valid TOML: {exc}") from None
        except RecursionError:
            raise LockError(f"{p}: not valid TOML: nested too deeply") from None
        except ValueError as exc:  # an integer of thousands of digits, and the like
            why = "an integer of thousands of digits" if "digits" in str(exc) else str(exc)[:120]
            raise LockError(f"{p}: not valid TOML: {why}") from None
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
            LockError: the manifest defines no such environment (exit 2, as for ``plan``).
        """
        if environment == DEFAULT_ENVIRONMENT and environment not in self.environments:
            return [None]
        spec = self.environments.get(environment)
        if spec is None:
            known = ", ".join(sorted({DEFAULT_ENVIRONMENT, *self.environments}))
            raise LockError(f"{self.path}: no environment '{environment}' (environments: {known})")
        out: list[str | None] = list(spec.features)
        if not spec.no_default_feature:
            out.append(None)
        return out

    def _layers(self, environment: str, platform: str | None) -> list[Feature]:
        """Every table that applies to ``environment`` on ``platform``, lowest priority first."""
        out: list[Feature] = []
        for name in reversed(self.environment_features(environment)):
            out.extend(self.features[name].for_platform(platform))
        return out

    def system_requirement_tables(
        self, environment: str = DEFAULT_ENVIRONMENT, platform: str | None = None
    ) -> list[tuple[str, dict[str, Any]]]:
        """``[system-requirements]`` tables that apply to ``environment``, each with
        where it is written (``"[feature.gpu.system-requirements]"``); the default
        feature's first."""
        return [
            (_where(f, "system-requirements"), f.system_requirements)
            for f in self._layers(environment, platform)
            if f.system_requirements
        ]

    def dependencies(
        self, environment: str = DEFAULT_ENVIRONMENT, platform: str | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The conda and PyPI dependencies ``environment`` asks for on ``platform``
        (name -> spec; a higher-priority table wins)."""
        conda: dict[str, Any] = {}
        pypi: dict[str, Any] = {}
        for f in self._layers(environment, platform):
            conda.update(f.dependencies)
            pypi.update(f.pypi_dependencies)
        return conda, pypi

    def tasks_for(
        self, environment: str = DEFAULT_ENVIRONMENT, platform: str | None = None
    ) -> dict[str, Task]:
        """Every task available in ``environment`` on ``platform``: a feature's task wins
        over the default's, a matching ``[target.<platform>.tasks]`` over ``[tasks]``."""
        out: dict[str, Task] = {}
        for layer in self._layers(environment, platform):
            out.update(layer.tasks)
        return out

    def task(
        self, name: str, environment: str = DEFAULT_ENVIRONMENT, platform: str | None = None
    ) -> Task:
        """The task ``name`` as ``environment`` sees it on ``platform``.

        Raises:
            TaskError: no such task (the message lists the tasks there are, and
                where else it is defined).
        """
        tasks = self.tasks_for(environment, platform)
        task = tasks.get(name)
        if task is None:
            raise TaskError(self._no_task(name, environment, platform, tasks))
        return task

    def _no_task(
        self, name: str, environment: str, platform: str | None, tasks: dict[str, Task]
    ) -> str:
        visible = sorted(t for t in tasks if not t.startswith("_"))
        mine = self.environment_features(environment)
        elsewhere = [
            f for f, feat in self.features.items() if name in feat.tasks and f not in mine and f
        ]
        targets = [
            sel
            for fname in mine
            for sel, t in self.features[fname].targets
            if name in t.tasks and (platform is None or not selector_matches(sel, platform))
        ]
        hint = ""
        if elsewhere:
            envs = [e.name for e in self.environments.values() if set(elsewhere) & set(e.features)]
            hint = f"; it is defined in feature(s) {', '.join(map(str, elsewhere))}" + (
                f": use -e {envs[0]}" if envs else ""
            )
        elif targets:
            hint = f"; it is defined for target(s) {', '.join(targets)} only, not for {platform}"
        return (
            f"{self.path}: no task '{name}' in environment '{environment}'"
            f" (tasks: {', '.join(visible) or 'none'}){hint}"
        )

    def environment_for(self, task: str) -> str:
        """The environment to run ``task`` in when none is given (as Pixi picks it).

        The default environment if it has the task (or the task's
        ``default-environment``), else the one environment that has it.

        Raises:
            TaskError: no environment has the task, or several do (name one with -e).
        """
        found = self._any_platform_tasks(DEFAULT_ENVIRONMENT).get(task)
        if found is not None:
            return found.default_environment or DEFAULT_ENVIRONMENT
        having = [e for e in self.environments if task in self._any_platform_tasks(e)]
        if len(having) == 1:
            return having[0]
        if having:
            raise TaskError(
                f"{self.path}: task '{task}' is in environments {', '.join(having)}: "
                "choose one with -e ENV"
            )
        return DEFAULT_ENVIRONMENT  # let task() report the unknown task

    def _any_platform_tasks(self, environment: str) -> dict[str, Task]:
        out: dict[str, Task] = {}
        for name in reversed(self.environment_features(environment)):
            feat = self.features[name]
            for layer in [feat, *(t for _, t in feat.targets)]:
                out.update(layer.tasks)
        return out

    def activation_env(
        self, environment: str = DEFAULT_ENVIRONMENT, platform: str | None = None
    ) -> dict[str, str]:
        """``[activation.env]`` of the environment's features (default feature first)."""
        out: dict[str, str] = {}
        for layer in self._layers(environment, platform):
            env = layer.activation.get("env") or {}
            if not isinstance(env, dict):
                raise self._error(f"{_where(layer, 'activation')}.env must be a table of strings")
            out.update({str(k): str(v) for k, v in env.items()})
        return out

    def activation_scripts(
        self, environment: str = DEFAULT_ENVIRONMENT, platform: str | None = None
    ) -> list[str]:
        """``[activation] scripts`` of the environment's features, workspace-relative."""
        out: list[str] = []
        for layer in self._layers(environment, platform):
            scripts = layer.activation.get("scripts") or []
            if not isinstance(scripts, list):
                raise self._error(f"{_where(layer, 'activation')} scripts must be a list of paths")
            out.extend(str(s) for s in scripts)
        return out

    def execution_plan(
        self,
        name: str,
        args: Sequence[str] = (),
        environment: str = DEFAULT_ENVIRONMENT,
        platform: str | None = None,
        *,
        supported_only: bool = True,
    ) -> list[Step]:
        """The tasks to run for ``name``: its ``depends-on`` first (depth first, in
        order, each task once), then the task itself with ``args``.
        ``supported_only=False`` skips the native runner's own refusals (a task Pixi
        runs), keeping every check of the task graph and its arguments.

        Raises:
            TaskError: an unknown task, a dependency cycle, bad arguments, or a
                feature the native runner refuses (see the module doc).
            LockError: ``depends-on`` nests deeper than :data:`MAX_TASK_DEPTH`.
        """
        steps: list[Step] = []
        done: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        stack: list[str] = []

        def visit(task_name: str, given: Sequence[str], extra_allowed: bool) -> None:
            if task_name in stack:
                cycle = " -> ".join([*stack[stack.index(task_name) :], task_name])
                raise self._error(f"the tasks depend on each other in a cycle: {cycle}")
            if len(stack) >= MAX_TASK_DEPTH:
                raise self._error(
                    f"task '{name}' depends on a chain of more than {MAX_TASK_DEPTH} tasks "
                    f"(... -> {' -> '.join(stack[-3:])} -> {task_name}): flatten its depends-on"
                )
            task = self.task(task_name, environment, platform)
            if supported_only:
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

    def _feature(self, name: str | None, data: dict[str, Any], target: str | None = None) -> Feature:
        """One feature's tables (or one ``[target.<selector>]`` of it)."""
        prefix = ("" if name is None else f"feature.{name}.") + (
            "" if target is None else f"target.{target}."
        )
        feat = Feature(name, target)
        feat.tasks = self._tasks(data.get("tasks"), name, f"[{prefix}tasks]")
        for key, attr in (
            ("activation", "activation"),
            ("system-requirements", "system_requirements"),
            ("dependencies", "dependencies"),
            ("pypi-dependencies", "pypi_dependencies"),
        ):
            if key in data:
                setattr(feat, attr, _table(data[key], self._error, f"[{prefix}{key}]"))
        _check_system_requirements(feat.system_requirements, self._error, f"[{prefix}system-requirements]")
        targets = data.get("target") or {}
        if target is None and targets:
            if not isinstance(targets, dict):
                raise self._error(f"[{prefix}target] must be a table of platform selectors")
            for sel, tdata in targets.items():
                if not isinstance(tdata, dict):
                    raise self._error(f"[{prefix}target.{sel}] must be a table")
                feat.targets.append((str(sel), self._feature(name, tdata, str(sel))))
        return feat

    def _pyproject_dependencies(self, default: Feature, project: dict[str, Any]) -> None:
        """What Pixi takes from ``[project]``: its dependencies become PyPI dependencies of
        the default feature, ``requires-python`` the conda ``python`` one."""
        for req in project.get("dependencies") or []:
            name = re.split(r"[\s\[<>=!~;@(]", str(req).strip(), maxsplit=1)[0]
            if name:
                default.pypi_dependencies.setdefault(name, str(req)[len(name) :].strip() or "*")
        if "python" not in default.dependencies:
            default.dependencies["python"] = str(project.get("requires-python") or "*")

    def _tasks(self, raw: Any, feature: str | None, where: str) -> dict[str, Task]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise self._error(f"{where} must be a table")
        return {
            str(name): self._task(str(name), value, feature, where) for name, value in raw.items()
        }

    def _task(self, name: str, value: Any, feature: str | None, where: str) -> Task:
        if isinstance(value, str):
            return Task(name, value, feature=feature, defined_in=where)
        if isinstance(value, list):
            return Task(
                name, None, depends_on=self._refs(name, value, where), feature=feature,
                defined_in=where,
            )  # fmt: skip
        if not isinstance(value, dict):
            raise self._error(f"{where} {name}: a task is a string, a list or a table")
        task = Task(name, self._cmd(name, value.get("cmd"), where), feature=feature, defined_in=where)
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
        if raw is not None and not isinstance(raw, dict):
            raise self._error("[environments] must be a table")
        for name, value in (raw or {}).items():
            if isinstance(value, list):
                spec = EnvironmentSpec(name, tuple(str(f) for f in value))
            elif isinstance(value, dict):
                feats = value.get("features") or []
                if not isinstance(feats, list):
                    raise self._error(f"[environments] {name}: features must be a list of names")
                spec = EnvironmentSpec(
                    name, tuple(str(f) for f in feats), bool(value.get("no-default-feature", False))
                )
            else:
                raise self._error(f"[environments] {name}: a list of features or a table")
            missing = [f for f in spec.features if f not in self.features]
            if missing:
                known = ", ".join(sorted(str(f) for f in self.features if f)) or "none"
                raise self._error(
                    f"environment '{name}' uses feature(s) {', '.join(missing)}, which the "
                    f"manifest does not define (features: {known}); Pixi refuses it too"
                )
            out[name] = spec
        return out


def _render_value(task: Task, value: str, values: dict[str, str]) -> str:
    """A ``depends-on`` argument may use the calling task's arguments (``{{ name }}``)."""
    probe = Task(task.name, value, args=task.args)
    rendered = render_command(probe, values)
    return value if rendered is None else rendered


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _check_system_requirements(table: dict[str, Any], error: Any, where: str) -> None:
    """Each value a version: a string, or a whole or finite number; ``libc`` may be a
    table of them (``family``, ``version``)."""
    import math

    def ok(value: Any) -> bool:
        if isinstance(value, bool):
            return False
        if isinstance(value, float):
            return math.isfinite(value) and value >= 0
        return isinstance(value, str) or (isinstance(value, int) and value >= 0)

    for key, value in table.items():
        if isinstance(value, dict) and key == "libc" and all(ok(v) for v in value.values()):
            continue
        if not ok(value):
            raise error(f"{where} {key} = {str(value)[:40]} is not a version (write it as a string, e.g. \"12.0\")")


def _table(value: Any, error: Any, where: str = "[activation]") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise error(f"{where} must be a table")
    return value


def _where(feature: Feature, key: str) -> str:
    """Where a feature's table is written, e.g. ``[feature.gpu.system-requirements]``."""
    target = "" if feature.selector is None else f"target.{feature.selector}."
    base = "" if feature.name is None else f"feature.{feature.name}."
    return f"[{base}{target}{key}]"
