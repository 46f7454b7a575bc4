"""The manifest's tasks and the native runner: depends-on, cwd, env, args, refusals, signals.

Most tests run tasks in a hand-made prefix whose activation script is in the
runner's cache (``conda-meta/pixicache-activation``); one computes it with
py-rattler in its child process. Signal tests run the runner in a separate
interpreter and signal that process, as HTCondor would signal the agent.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pixicache.agent.runner import activation_script, exit_code_of, run_task
from pixicache.backends.rattler.child import ACTIVATION_FILE, prefix_fingerprint
from pixicache.errors import LockError, TaskError
from pixicache.model.manifest import Manifest, Task, render_command

MANIFEST = """
[workspace]
name = "demo"
version = "1.2.3"
channels = ["conda-forge"]
platforms = ["linux-64"]

[activation.env]
FROM_ACTIVATION = "act"

[tasks]
hello = "tool"
listed = { cmd = ["echo", "one", "two"], description = "a list cmd" }
greet = { cmd = "echo Hello, {{ name }} from {{ place }}!", args = ["name", { arg = "place", default = "home" }] }
prep = { cmd = "pwd > ../prep.txt && echo prep >> ../order.txt", cwd = "sub" }
left = { cmd = "echo left >> order.txt", depends-on = ["prep"] }
right = { cmd = "echo right >> order.txt", depends-on = ["prep"] }
top = { cmd = "echo top $MYVAR $FROM_ACTIVATION $PIXI_PROJECT_NAME >> order.txt", depends-on = ["left", "right"], env = { MYVAR = "v:$CONDA_PREFIX" } }
fail = { cmd = "exit 7" }
after-fail = { cmd = "echo never >> order.txt", depends-on = ["fail"] }
with-args = { cmd = "echo dep {{ what }} >> order.txt", args = ["what"] }
calls-with-args = { cmd = "echo caller {{ x }} >> order.txt", args = [{ arg = "x", default = "X" }], depends-on = [{ task = "with-args", args = ["from-{{ x }}"] }] }
alias = ["left", { task = "with-args", args = ["aliased"] }]
cached = { cmd = "echo cached >> order.txt", inputs = ["*.py"], outputs = ["out"] }
clean = { cmd = "true", clean-env = true }
jinja = { cmd = "echo {{ name | upper }}", args = ["name"] }
loop = { cmd = "{% for n in names %}echo {{ n }};{% endfor %}", args = ["names"] }
other-env = [{ task = "hello", environment = "cuda" }]
strange = { cmd = "true", frobnicate = 1 }
cycle-a = { cmd = "true", depends-on = ["cycle-b"] }
cycle-b = { cmd = "true", depends-on = ["cycle-a"] }

[feature.cuda.tasks]
train = "echo train"
hello = "echo cuda-hello"

[environments]
cuda = ["cuda"]
"""


@pytest.fixture
def workspace(tmp_path):
    """A workspace with the manifest above and a hand-made environment holding ``bin/tool``."""
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "pixi.toml").write_text(MANIFEST)
    prefix = ws / ".pixi" / "envs" / "default"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "conda-meta").mkdir()
    tool = prefix / "bin" / "tool"
    tool.write_text('#!/bin/sh\necho "tool in $CONDA_PREFIX: $*"\nexit "${TOOL_EXIT:-0}"\n')
    tool.chmod(0o755)
    _cache_activation(prefix)
    return ws


def _cache_activation(prefix: Path) -> None:
    script = f'export PATH="{prefix}/bin:${{PATH}}"\nexport CONDA_PREFIX={prefix}\n'
    (prefix / "conda-meta" / ACTIVATION_FILE).write_text(
        json.dumps({"fingerprint": prefix_fingerprint(prefix), "script": script})
    )


def _run(ws: Path, task: str, *args: str, env: str = "default"):
    m = Manifest.load(ws / "pixi.toml")
    return run_task(m, task, list(args), environment=env, prefix=ws / ".pixi" / "envs" / "default")


# -- the manifest ----------------------------------------------------------------------------


def test_manifest_reads_task_forms_and_environments(workspace):
    m = Manifest.load(workspace / "pixi.toml")
    assert m.name == "demo" and m.version == "1.2.3" and m.lock_path == workspace / "pixi.lock"
    assert m.task("hello").cmd == "tool"
    assert m.task("listed").cmd == "echo one two" and m.task("listed").description == "a list cmd"
    assert m.task("alias").cmd is None and [d.task for d in m.task("alias").depends_on] == [
        "left",
        "with-args",
    ]
    assert m.task("hello", "cuda").cmd == "echo cuda-hello"  # the feature's task wins in its env
    assert "train" in m.tasks_for("cuda") and "train" not in m.tasks_for("default")
    with pytest.raises(TaskError, match=r"no task 'train' in environment 'default'.*-e cuda"):
        m.task("train")
    with pytest.raises(LockError, match="no environment 'gpu'"):  # exit 2, as `plan` says it
        m.task("hello", "gpu")


def test_execution_plan_runs_dependencies_first_each_once(workspace):
    m = Manifest.load(workspace / "pixi.toml")
    assert [s.task.name for s in m.execution_plan("top")] == ["prep", "left", "right", "top"]
    plan = m.execution_plan("calls-with-args", ["Y"])
    assert [(s.task.name, s.command) for s in plan] == [
        ("with-args", "echo dep from-Y >> order.txt"),
        ("calls-with-args", "echo caller Y >> order.txt"),
    ]
    with pytest.raises(LockError, match="cycle: cycle-a -> cycle-b -> cycle-a"):
        m.execution_plan("cycle-a")


def test_task_arguments_are_bound_templated_or_appended():
    greet = Task("greet", "echo {{name}} {{ place }}", args=[])
    with pytest.raises(TaskError, match="declares no argument 'name'"):
        render_command(greet, {})
    m = Manifest.parse(MANIFEST, "/ws/pixi.toml")
    assert m.execution_plan("greet", ["Ann"])[-1].command == "echo Hello, Ann from home!"
    assert m.execution_plan("greet", ["Ann", "Rome"])[-1].command == "echo Hello, Ann from Rome!"
    assert m.execution_plan("hello", ["a b", "$x"])[-1].command == "tool 'a b' '$x'"
    with pytest.raises(TaskError, match="needs argument 'name'"):
        m.execution_plan("greet")
    with pytest.raises(TaskError, match="takes 2 argument"):
        m.execution_plan("greet", ["a", "b", "c"])


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ("clean", "clean-env"),
        ("jinja", "MiniJinja expression"),
        ("loop", "MiniJinja blocks"),
        ("other-env", "in environment 'cuda'"),
        ("strange", "frobnicate"),
    ],
)
def test_unsupported_task_features_are_refused_clearly(workspace, task, message):
    with pytest.raises(TaskError, match=message) as info:
        _run(workspace, task, "x")
    assert "--pixi" in str(info.value)


def test_a_bad_manifest_is_a_lock_error(tmp_path):
    with pytest.raises(LockError, match="no such manifest"):
        Manifest.load(tmp_path / "pixi.toml")
    with pytest.raises(LockError, match="not valid TOML"):
        Manifest.parse("[tasks\n", tmp_path / "pixi.toml")
    with pytest.raises(LockError, match="no dashes"):
        Manifest.parse(
            '[workspace]\nname = "w"\n[tasks]\nt = { cmd = "x", args = ["a-b"] }\n',
            tmp_path / "pixi.toml",
        )


# -- the native runner ----------------------------------------------------------------------


def test_native_runner_depends_on_cwd_env_and_activation(workspace, capfd):
    outcome = _run(workspace, "top")
    assert outcome.exit_code == 0 and outcome.runner == "native"
    assert outcome.steps == ["prep", "left", "right", "top"]
    prefix = workspace / ".pixi" / "envs" / "default"
    lines = (workspace / "order.txt").read_text().splitlines()
    assert lines == ["prep", "left", "right", f"top v:{prefix} act demo"]
    assert (workspace / "prep.txt").read_text().strip() == str(workspace / "sub")
    out = _run(workspace, "hello", "a b", "c")
    assert out.exit_code == 0
    assert f"tool in {prefix}: a b c" in capfd.readouterr().out


def test_native_runner_propagates_exit_codes_and_stops_at_a_failure(workspace, monkeypatch):
    assert _run(workspace, "fail").exit_code == 7
    outcome = _run(workspace, "after-fail")
    assert outcome.exit_code == 7 and outcome.steps == ["fail"]
    assert not (workspace / "order.txt").exists()
    monkeypatch.setenv("TOOL_EXIT", "3")
    assert _run(workspace, "hello").exit_code == 3


def test_inputs_outputs_are_ignored_with_a_note(workspace):
    outcome = _run(workspace, "cached")
    assert outcome.exit_code == 0 and any("inputs/outputs" in n for n in outcome.notes)
    assert _run(workspace, "cached").exit_code == 0
    assert (workspace / "order.txt").read_text() == "cached\ncached\n"


def test_activation_comes_from_py_rattler_when_not_cached(workspace):
    prefix = workspace / ".pixi" / "envs" / "default"
    (prefix / "conda-meta" / ACTIVATION_FILE).unlink()
    hook = prefix / "etc" / "conda" / "activate.d"
    hook.mkdir(parents=True)
    (hook / "hook.sh").write_text("export FROM_HOOK=hooked\n")
    script = activation_script(prefix)
    assert f"{prefix}/bin" in script and "CONDA_PREFIX" in script and "hook.sh" in script
    assert "@pixicache" not in script
    cached = json.loads((prefix / "conda-meta" / ACTIVATION_FILE).read_text())
    assert cached["script"] == script and cached["fingerprint"] == prefix_fingerprint(prefix)


def test_pixi_runs_the_task_when_verified(workspace, tmp_path):
    record = tmp_path / "pixi-argv.json"
    fake = tmp_path / "pixi"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\nsys.exit(5)\n"
    )
    fake.chmod(0o755)
    m = Manifest.load(workspace / "pixi.toml")
    outcome = run_task(m, "clean", ["a"], prefix=workspace / ".pixi/envs/default", pixi=fake)
    assert outcome.runner == "pixi" and outcome.exit_code == 5  # clean-env is Pixi's business
    argv = json.loads(record.read_text())
    assert argv[:3] == ["run", "--frozen", "--no-install"] and argv[-2:] == ["clean", "a"]


def test_exit_code_of_signal_deaths():
    assert exit_code_of(-signal.SIGTERM) == 143 and exit_code_of(3) == 3


# -- signals --------------------------------------------------------------------------------

DRIVER = """
import sys
from pixicache.model.manifest import Manifest
from pixicache.agent.runner import run_task
m = Manifest.load(sys.argv[1])
out = run_task(m, sys.argv[2], [], prefix=sys.argv[3])
print("FORWARDED", ",".join(out.forwarded), flush=True)
sys.exit(out.exit_code)
"""


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("sig", "trap", "expected"),
    [
        (signal.SIGTERM, True, 42),  # the task handles TERM and exits with its own code
        (signal.SIGTERM, False, 143),  # the task is killed by TERM: 128 + 15
        (signal.SIGINT, True, 42),
        (signal.SIGHUP, False, 129),
    ],
)
def test_signals_to_the_runner_reach_the_task_and_its_code_is_returned(
    workspace, sig, trap, expected
):
    handler = f"trap 'echo {sig.name} > got.txt; exit 42' {sig.name[3:]}; " if trap else ""
    cmd = f"{handler}echo ready > ready.txt; while true; do sleep 0.05; done"
    manifest = workspace / "pixi.toml"
    manifest.write_text(MANIFEST.replace("[tasks]\n", f"[tasks]\nwaiter = {json.dumps(cmd)}\n", 1))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(DRIVER),
            str(manifest),
            "waiter",
            str(workspace / ".pixi" / "envs" / "default"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(workspace / "ready.txt", proc)
        proc.send_signal(sig)  # to the runner only: it must forward to the task's group
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == expected, err
    assert f"FORWARDED {sig.name}" in out
    if trap:
        assert (workspace / "got.txt").read_text().strip() == sig.name


def test_environment_for_a_task_is_chosen_as_pixi_does(tmp_path):
    text = MANIFEST.replace(
        'hello = "tool"', 'hello = { cmd = "tool", default-environment = "cuda" }'
    )
    m = Manifest.parse(text, tmp_path / "pixi.toml")
    assert m.environment_for("hello") == "cuda"  # its default-environment
    assert m.environment_for("greet") == "default"
    assert m.environment_for("train") == "cuda"  # the only environment that has it
    assert m.environment_for("nope") == "default"  # task() then names the unknown task
