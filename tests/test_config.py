"""Settings: where the config file is looked for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pixicache import config


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fast path is Linux's only")
@pytest.mark.parametrize(
    "env",
    [
        {"HOME": "/home/alice"},
        {"HOME": "/home/alice", "XDG_CONFIG_HOME": "/etc/xdg-alice"},
        {"HOME": "/home/alice", "XDG_CONFIG_HOME": "relative/ignored"},
        {"HOME": "/home/alice", "XDG_CONFIG_HOME": ""},
        {"XDG_CONFIG_HOME": "/only/xdg"},
        {},  # no HOME: the password database's home
        {"HOME": "relative-home"},  # platformdirs' own rules
    ],
)
def test_the_config_file_is_where_platformdirs_says(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """config_path() finds ``config.toml`` without importing platformdirs on Linux (about
    9 ms of every job start): the place must be the one platformdirs gives."""
    import platformdirs

    monkeypatch.delenv("PIXICACHE_CONFIG", raising=False)
    for var in ("HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    try:
        expected = Path(platformdirs.user_config_dir(config.APP)) / "config.toml"
    except RuntimeError as exc:  # platformdirs refuses a relative HOME: so does pixicache
        with pytest.raises(RuntimeError):
            config.config_path()
        assert "home directory" in str(exc)
        return
    assert config.config_path() == expected
    if env.get("HOME", "/").startswith("/"):
        assert config._xdg_config_home() is not None  # answered without platformdirs


def test_an_explicit_config_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXICACHE_CONFIG", str(tmp_path / "site.toml"))
    monkeypatch.setenv("XDG_CONFIG_HOME", "/elsewhere")
    assert config.config_path() == tmp_path / "site.toml"
