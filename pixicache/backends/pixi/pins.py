"""The pin table of Pixi release archives: version + target → URL + SHA-256.

The table shipped with pixicache (``pixicache/data/pixi-pins.toml``) can be
extended or overridden by a site without a code change, in this order (later
wins for the same version and target):

1. the shipped table;
2. ``[[pixi.pin]]`` entries in the pixicache config file;
3. a TOML file named by ``PIXICACHE_PIXI_PINS`` (same format as the shipped one).

An entry may give ``url`` explicitly; by default it is the GitHub release URL.
"""

from __future__ import annotations

import os
import platform as _platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixicache.errors import ConfigError
from pixicache.model.artifact import Artifact, is_sha256

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_SHIPPED = Path(__file__).resolve().parent.parent.parent / "data" / "pixi-pins.toml"
"""The pin table shipped with pixicache (a real file: pixicache runs from files, bundle included)."""

RELEASE_URL = "https://github.com/prefix-dev/pixi/releases/download/v{version}/pixi-{target}.tar.gz"


@dataclass(frozen=True)
class PixiPin:
    """One pinned Pixi release archive."""

    version: str
    target: str
    sha256: str
    url: str

    @property
    def archive(self) -> str:
        """The archive's file name (``pixi-x86_64-unknown-linux-musl.tar.gz``)."""
        return self.url.rsplit("/", 1)[-1]

    def artifact(self) -> Artifact:
        """The pin as an :class:`Artifact` (size unknown: the digest is what counts)."""
        return Artifact(url=self.url, sha256=self.sha256, size=None, filename=self.archive, kind="pixi")


def this_target() -> str:
    """The Rust target triple of Pixi's build for this machine.

    Raises :class:`ConfigError` on a platform Pixi publishes no build for.
    """
    machine = _platform.machine().lower()
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine)
    if sys.platform.startswith("linux"):
        osname = "unknown-linux-musl"
    elif sys.platform == "darwin":
        osname = "apple-darwin"
    else:
        osname = ""
    if not arch or not osname:
        raise ConfigError(
            f"no Pixi build is pinned for this platform ({sys.platform}, {machine}); "
            "add a pin for it (see `pixicache pixi pins`) or use --installer rattler"
        )
    return f"{arch}-{osname}"


def _parse(data: dict[str, Any], origin: str) -> tuple[list[PixiPin], str | None]:
    pins = []
    for i, entry in enumerate(data.get("pin", [])):
        try:
            version, target, sha = str(entry["version"]), str(entry["target"]), str(entry["sha256"]).lower()
        except (KeyError, TypeError):
            raise ConfigError(f"{origin}: pin #{i + 1} needs version, target and sha256") from None
        if not is_sha256(sha):
            raise ConfigError(f"{origin}: pin {version}/{target}: sha256 is not 64 hex digits")
        url = str(entry.get("url") or RELEASE_URL.format(version=version, target=target))
        pins.append(PixiPin(version, target, sha, url))
    default = data.get("default_version")
    return pins, str(default) if default else None


def load_pins(config: dict[str, Any] | None = None) -> tuple[list[PixiPin], str]:
    """All pins in force and the default version.

    Args:
        config: the parsed pixicache config file (its ``[pixi]`` table is used).
    """
    shipped = tomllib.loads(_SHIPPED.read_text())
    layers = [(shipped, "the shipped pin table")]
    if config and isinstance(config.get("pixi"), dict):
        layers.append((config["pixi"], "the config file's [pixi] table"))
    extra = os.environ.get("PIXICACHE_PIXI_PINS")
    if extra:
        try:
            layers.append((tomllib.loads(Path(extra).read_text()), extra))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"PIXICACHE_PIXI_PINS={extra}: {exc}") from exc
    table: dict[tuple[str, str], PixiPin] = {}
    default = "0"
    for data, origin in layers:
        pins, layer_default = _parse(data, origin)
        for pin in pins:
            table[(pin.version, pin.target)] = pin
        default = layer_default or default
    return list(table.values()), default


def find_pin(
    version: str | None = None,
    target: str | None = None,
    *,
    archive: str | None = None,
    config: dict[str, Any] | None = None,
) -> PixiPin | None:
    """The pin for ``version`` (default: the default version) and ``target``
    (default: this machine), or for an ``archive`` file name; ``None`` if none."""
    pins, default = load_pins(config)
    version = version or default
    for pin in pins:
        if pin.version != version:
            continue
        if archive is not None and pin.archive == archive:
            return pin
        if archive is None and pin.target == (target or this_target()):
            return pin
    return None
