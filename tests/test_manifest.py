"""The manifest as Pixi reads it: target and feature tasks, pyproject.toml, and refusals.

Bad manifests are refused with one message naming the file and the problem
(exit 2 from the CLI), as Pixi would refuse them; the native runner runs the task
Pixi would pick for the platform.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pixicache.agent.runner import run_task
from pixicache.backends.rattler.child import ACTIVATION_FILE, prefix_fingerprint
from pixicache.errors import LockError
from pixicache.model.manifest import MAX_TASK_DEPTH, Manifest

from .helpers import run_pixicache

TARGETS = """
[workspace]
name = "targets"
channels = ["conda-forge"]
platforms = ["linux-64", "osx-arm64"]

[tasks]
build = "echo generic"
only-here = "echo plain"

[target.unix.tasks]
build = "echo unix"

[target.linux-64.tasks]
build = "echo linux-64"
linux-only = "echo linux-only"

[target.osx-arm64.tasks]
build = "echo osx"

[feature.gpu.tasks]
train = "echo train-generic"

[feature.gpu.target.linux-64.tasks]
train = "echo train-linux"

[feature.gpu.target.linux-64.activation.env]
GPU_FLAVOUR = "cuda"

[environments]
gpu = ["gpu"]
"""


def test_target_tasks_override_for_their_platform_later_selectors_win():
    m = Manifest.parse(TARGETS, "/w/pixi.toml")
    assert m.task("build", "default", "linux-64").cmd == "echo linux-64"  # declared after unix
    assert m.task("build", "default", "osx-arm64").cmd == "echo osx"
    assert m.task("build", "default", "linux-aarch64").cmd == "echo unix"
    assert m.task("build", "default", "win-64").cmd == "echo generic"
    assert m.task("build", "default", "linux-64").where == "[target.linux-64.tasks]"
    assert m.task("train", "gpu", "linux-64").cmd == "echo train-linux"
    assert m.task("train", "gpu", "osx-arm64").cmd == "echo train-generic"
    assert m.activation_env("gpu", "linux-64") == {"GPU_FLAVOUR": "cuda"}
    assert m.activation_env("gpu", "osx-arm64") == {}


def test_a_task_defined_for_another_target_says_so():
    m = Manifest.parse(TARGETS, "/w/pixi.toml")
    with pytest.raises(Exception, match=r"defined for target\(s\) linux-64 only, not for osx-arm64"):
        m.task("linux-only", "default", "osx-arm64")


def _workspace(tmp_path: Path, name: str, text: str) -> Path:
    ws = tmp_path / "ws"
    prefix = ws / ".pixi" / "envs" / "gpu"
    (prefix / "conda-meta").mkdir(parents=True)
    (ws / name).write_text(text)
    script = f'export CONDA_PREFIX={prefix}\n'
    (prefix / "conda-meta" / ACTIVATION_FILE).write_text(
        json.dumps({"fingerprint": prefix_fingerprint(prefix), "script": script})
    )
    return ws


def test_the_native_runner_runs_the_target_task_of_the_installed_platform(tmp_path, capfd):
    ws = _workspace(tmp_path, "pixi.toml", TARGETS.replace('"echo train-linux"', '"echo train-linux $GPU_FLAVOUR"'))
    m = Manifest.load(ws / "pixi.toml")
    outcome = run_task(m, "train", [], environment="gpu", prefix=ws / ".pixi/envs/gpu", platform="linux-64")
    assert outcome.exit_code == 0
    assert capfd.readouterr().out.strip().splitlines()[-1] == "train-linux cuda"


PYPROJECT = """
[project]
name = "ml-project"
version = "0.3.0"
requires-python = ">=3.11"
dependencies = ["numpy>=1.26", "requests"]

[tool.pixi.workspace]
channels = ["conda-forge"]
platforms = ["linux-64"]

[tool.pixi.dependencies]
pytorch = ">=2.4"

[tool.pixi.tasks]
hello = "echo from-pyproject"

[tool.pixi.feature.gpu.tasks]
train = "echo gpu"

[tool.pixi.environments]
gpu = ["gpu"]
"""


def test_a_pyproject_manifest_is_read_from_tool_pixi(tmp_path):
    ws = _workspace(tmp_path, "pyproject.toml", PYPROJECT)
    m = Manifest.load(ws / "pixi.toml")  # pixi.toml absent: pyproject.toml, as Pixi discovers it
    assert m.path.name == "pyproject.toml" and m.name == "ml-project" and m.version == "0.3.0"
    assert m.lock_path == ws / "pixi.lock"
    assert m.task("hello").cmd == "echo from-pyproject"
    assert m.task("train", "gpu").cmd == "echo gpu"
    conda, pypi = m.dependencies("default", "linux-64")
    assert conda == {"pytorch": ">=2.4", "python": ">=3.11"}
    assert pypi == {"numpy": ">=1.26", "requests": "*"}


def test_a_pyproject_without_tool_pixi_is_refused(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(LockError, match=r"pyproject.toml: a pyproject.toml manifest needs a \[tool.pixi.workspace\]"):
        Manifest.load(tmp_path / "pyproject.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[tasks]\nx = "true"\n', r"no \[workspace\] table"),
        ('[workspace]\nname="w"\n[environments]\ngpu = ["cuda"]\n', r"environment 'gpu' uses feature\(s\) cuda, which the manifest does not define"),
        ('[workspace]\nname="w"\nname="again"\n', "not valid TOML"),
        ('[workspace]\nname="w"\n[tasks]\nx = 5\n', "a task is a string, a list or a table"),
        ('[workspace]\nname="w"\n[feature]\nx = 1\n', r"\[feature.x\] must be a table"),
        ('[workspace]\nname="w"\n[target.linux-64]\ntasks = 3\n', r"\[target.linux-64.tasks\] must be a table"),
        ('[workspace]\nname="w"\n[system-requirements]\n', None),
    ],
)
def test_bad_manifests_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "pixi.toml"
    path.write_text(text)
    if message is None:
        Manifest.load(path)  # an empty table is fine
        return
    with pytest.raises(LockError, match=message) as err:
        Manifest.load(path)
    assert str(path) in str(err.value)


def test_a_manifest_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "pixi.toml"
    path.write_bytes(b'[workspace]\nname = "caf\xe9"\n')
    with pytest.raises(LockError, match="invalid UTF-8 at byte 23"):
        Manifest.load(path)


def test_a_depends_on_chain_thousands_deep_is_refused_not_a_crash(tmp_path):
    n = 5000
    tasks = "\n".join(f't{i} = {{ cmd = "true", depends-on = ["t{i + 1}"] }}' for i in range(n))
    path = tmp_path / "pixi.toml"
    path.write_text(f'[workspace]\nname = "w"\n[tasks]\n{tasks}\nt{n} = "true"\n')
    m = Manifest.load(path)
    with pytest.raises(LockError, match=f"more than {MAX_TASK_DEPTH} tasks"):
        m.execution_plan("t0")


def test_the_cli_says_it_in_one_paragraph_with_exit_2(tmp_path):
    (tmp_path / "pixi.toml").write_text('[workspace]\nname="w"\n[environments]\ngpu = ["nope"]\n')
    (tmp_path / "pixi.lock").write_text("version: 6\nenvironments: {}\npackages: []\n")
    proc = run_pixicache("run", "--manifest", str(tmp_path / "pixi.toml"), "x", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "feature(s) nope" in proc.stderr


def test_an_unknown_environment_is_exit_2_for_run_as_for_plan(tmp_path, demo_lock):
    (tmp_path / "pixi.toml").write_text('[workspace]\nname="w"\n[tasks]\nx = "true"\n')
    (tmp_path / "pixi.lock").write_bytes(Path(demo_lock).read_bytes())
    run = run_pixicache("run", "-e", "bad", "--manifest", str(tmp_path / "pixi.toml"), "x", cwd=tmp_path)
    plan = run_pixicache("plan", "-e", "bad", str(tmp_path / "pixi.lock"))
    assert run.returncode == plan.returncode == 2, (run.stderr, plan.stderr)
    assert "no environment 'bad'" in run.stderr


def test_a_manifest_changed_after_the_lock_warns_and_runs_what_the_lock_pins(tmp_path, demo_lock, demo_upstream):
    """A dependency added (and one tightened) without `pixi lock`: a warning, not a failure."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "pixi.toml").write_text(
        '[workspace]\nname="w"\nchannels=["conda-forge"]\nplatforms=["linux-64"]\n'
        '[dependencies]\nhello = ">=2"\nnumpy = "*"\n'
    )
    (ws / "pixi.lock").write_bytes(Path(demo_lock).read_bytes())
    proc = run_pixicache(
        "--cache-dir", str(tmp_path / "store"), "install", "--manifest", str(ws / "pixi.toml"),
        "--no-preflight", "--source", f"mirror={demo_upstream.url}", cwd=ws,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "conda package numpy (environment 'default', linux-64), which the lock does not have" in proc.stderr
    assert "conda package hello >=2" in proc.stderr and "but the lock has hello 1.0.0" in proc.stderr
    assert "Run `pixi lock`" in proc.stderr
    notes = json.loads((ws / "pixicache-report.json").read_text())["notes"]
    assert sum("warning:" in n for n in notes) == 2


def test_version_specs_are_judged_only_when_understood():
    from pixicache.model.satisfy import version_matches

    assert version_matches("2.7.1", ">=2.7.1,<3") is True
    assert version_matches("3.0", ">=2.7.1,<3") is False
    assert version_matches("12.9", "12.9.*") is True and version_matches("12.10", "12.9.*") is False
    assert version_matches("1.0a1", "<1.0") is True
    assert version_matches("1.2.3", "1.2") is True  # conda's fuzzy bare version
    assert version_matches("1.4", "~=1.2") is True and version_matches("2.0", "~=1.2") is False
    assert version_matches("1.0", "1.0|2.0") is True
    assert version_matches("1.0", ">=1.0 [build=x]") is None  # not a plain spec: not judged
