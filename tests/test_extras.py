"""Without an optional extra, every command that needs it says which extra to install (exit 2).

The extras' modules are hidden from the import system by a meta-path finder in a
``sitecustomize`` (as if they were not installed), in the CLI's process and in
every process it starts.
"""

from __future__ import annotations

import pytest

from .helpers import run_pixicache

BLOCKER = """\
import sys

BLOCKED = {blocked!r}


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def _without(tmp_path, *modules):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(modules)))
    return {"PYTHONPATH": str(site)}


@pytest.mark.parametrize(
    ("argv", "blocked", "extra"),
    [
        (["serve", "--port", "0"], ("aiohttp",), "serve"),
        (["serve", "--port", "0"], ("prometheus_client",), "serve"),
        (["demo"], ("rattler",), "rattler"),
        (["demo"], ("aiohttp",), "serve"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it_and_exit_2(tmp_path, argv, blocked, extra):
    proc = run_pixicache(*argv, env=_without(tmp_path, *blocked), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"pip install 'pixicache[{extra}]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_commands_that_need_no_extra_still_work_without_them(tmp_path, demo_lock):
    env = _without(tmp_path, "aiohttp", "prometheus_client", "rattler")
    proc = run_pixicache("plan", str(demo_lock), "--no-store", env=env)
    assert proc.returncode == 0, proc.stderr
