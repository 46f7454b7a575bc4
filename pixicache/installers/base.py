"""The :class:`Installer` protocol: how a locked environment becomes a prefix.

Installers are plugins registered under the entry-point group
``pixicache.installers`` (built in: ``rattler``, ``pixi``; ``auto`` picks one).
Each must produce the prefix Pixi itself would (``<workspace>/.pixi/envs/<env>``)
from artifacts that are already verified in the node store, without network
access to anything but the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable

    from pixicache.model.lockfile import Lock
    from pixicache.model.manifest import Manifest
    from pixicache.store import Store


@dataclass
class InstallRequest:
    """Everything an installer needs.

    Attributes:
        workspace: the directory holding ``pixi.toml`` and ``pixi.lock``.
        manifest: the manifest path.
        lock: the parsed lock.
        environment: the environment name (``default``).
        platform: the platform to install (``linux-64``).
        prefix: where the environment goes (``workspace/.pixi/envs/<env>``).
        store: the node store; every artifact of the environment is present.
        package_cache: the node's extracted-package cache directory.
        pixi: a verified Pixi executable, if one is available.
        parsed_manifest: the parsed manifest, when the caller has it (its
            ``[system-requirements]`` go into Pixi's environment file).
        build_index_url: a PyPI index for the build requirements of sdists
            built on the node (the site mirror's), or ``None`` (``--no-index``).
        meanwhile: the caller's own work that may run while the installer waits
            (the store's record of this job's use of its artifacts): an installer
            may call it once, while its child process installs; it never raises
            and may be ignored (the caller then runs it after the install).
    """

    workspace: Path
    manifest: Path
    lock: Lock
    environment: str
    platform: str
    prefix: Path
    store: Store
    package_cache: Path
    pixi: Path | None = None
    parsed_manifest: Manifest | None = None
    build_index_url: str | None = None
    meanwhile: Callable[[], None] | None = None

    def make_package_cache(self) -> Path:
        """Create the package cache (in the node store) if needed and return it, absolute;
        one this user cannot create is a :class:`~pixicache.errors.StoreError` naming it."""
        cache = Path(self.package_cache).absolute()
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self.store.os_error(exc, f"creating the package cache {cache}") from exc
        return cache

    def channels(self) -> list[str]:
        """Every conda channel the environment's packages come from (the lock's
        channel list plus the channel of each artifact), in a stable order."""
        seen: dict[str, None] = {}
        for ch in self.lock.environment(self.environment).channels:
            seen.setdefault(ch.rstrip("/"), None)
        for a in self.lock.artifacts(self.environment, self.platform):
            if a.kind == "conda" and a.channel:
                seen.setdefault(a.channel.rstrip("/"), None)
        return list(seen)

    def pypi_prefixes(self) -> list[str]:
        """The PyPI URL prefixes an installer must be kept from: the lock's index URLs
        and the origin (``scheme://host``) of every PyPI file it pins — all from the
        lock, so no index host is assumed."""
        from urllib.parse import urlsplit

        seen: dict[str, None] = {}
        for index in self.lock.environment(self.environment).indexes:
            seen.setdefault(index.rstrip("/"), None)
        for a in self.lock.artifacts(self.environment, self.platform):
            if a.kind == "pypi":
                parts = urlsplit(a.url)
                if parts.scheme in ("http", "https") and parts.netloc:
                    seen.setdefault(f"{parts.scheme}://{parts.netloc}", None)
        return list(seen)


@dataclass
class InstallResult:
    """What an installer did."""

    installer: str
    prefix: Path
    seconds: float
    changed: bool  # False: the prefix was already up to date (a no-op)
    packages: int
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class Installer(Protocol):
    """Installs a locked environment from the node store into a prefix."""

    name: ClassVar[str]

    @classmethod
    def available(cls, request: InstallRequest) -> tuple[bool, str]:
        """Whether this installer can run here, and why (or why not)."""
        ...

    def up_to_date(self, request: InstallRequest) -> bool:
        """Whether :meth:`install` would change nothing: the prefix already holds
        exactly the lock's environment. Cheap (no network, no hashing): the agent
        asks before fetching, so a warm job fetches nothing at all."""
        ...

    def install(self, request: InstallRequest) -> InstallResult:
        """Make ``request.prefix`` hold exactly the lock's environment.

        Raises:
            InstallError: with a message a user can act on; ``suspects`` names
                the artifacts (by SHA-256) the installer found bad, if any.
        """
        ...
