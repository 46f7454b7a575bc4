"""What a caller may choose about one agent run: :class:`AgentOptions`."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pixicache.config import Settings

__all__ = ["AgentOptions"]


@dataclass(frozen=True)
class AgentOptions:
    """How :func:`pixicache.agent.install` and :func:`pixicache.agent.run` work.

    Attributes:
        settings: store, sources and jobs (:func:`pixicache.config.resolve_settings`).
        installer: ``auto`` or an installer plugin's name (``rattler``, ``pixi``...).
        pixi: a Pixi executable to use; it must match a pin.
        trust_pixi: a Pixi executable to use unverified (logged as a warning).
        platform: the platform to install (default: this machine's).
        preflight: run the preflight checks (platform, drivers, disk, mirror).
    """

    settings: Settings
    installer: str = "auto"
    pixi: Path | None = None
    trust_pixi: Path | None = None
    platform: str | None = None
    preflight: bool = True

    @classmethod
    def make(
        cls,
        settings: Settings,
        *,
        pixi: str | os.PathLike[str] | None = None,
        trust_pixi: str | os.PathLike[str] | None = None,
        **rest: Any,
    ) -> AgentOptions:
        """Build options, turning path-like values into :class:`~pathlib.Path`."""
        return cls(
            settings,
            pixi=Path(pixi) if pixi is not None else None,
            trust_pixi=Path(trust_pixi) if trust_pixi is not None else None,
            **rest,
        )

    def with_changes(self, **changes: Any) -> AgentOptions:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @property
    def may_use_rattler(self) -> bool:
        """Whether the rattler installer may run: asked for, or ``auto`` with no Pixi given."""
        return self.installer == "rattler" or (
            self.installer == "auto" and self.pixi is None and self.trust_pixi is None
        )

    @property
    def wants_pixi(self) -> bool:
        """Whether a Pixi binary may be involved at all (``auto``/``pixi``, or one was given)."""
        return (
            self.installer in ("auto", "pixi")
            or self.pixi is not None
            or self.trust_pixi is not None
        )
