"""Choosing an installer: the plugins of ``pixicache.installers``, and ``auto``.

Installers register under the entry-point group ``pixicache.installers``
(built in: ``rattler`` and ``pixi``, declared in ``pyproject.toml``); a site
adds its own the same way::

    [project.entry-points."pixicache.installers"]
    mine = "mypkg.installer:MyInstaller"

``auto`` (the default) picks ``pixi`` when a verified Pixi binary is
available (``request.pixi`` is set and the pixi installer says it can run),
else ``rattler``, and says which and why.
"""

from __future__ import annotations

from typing import Any

from pixicache.errors import InstallError, UsageError
from pixicache.installers.base import Installer, InstallRequest
from pixicache.plugins import PluginGroup, plugins

__all__ = ["GROUP", "choose_installer", "installer_plugins"]

GROUP = PluginGroup("pixicache.installers", "installer", Installer)
"""Installer plugins: classes following :class:`~pixicache.installers.base.Installer`."""


def installer_plugins() -> dict[str, Any]:
    """Every working installer class, by name (broken plugins are skipped with a warning)."""
    return plugins(GROUP).loaded()


def choose_installer(request: InstallRequest, name: str = "auto") -> tuple[Installer, str]:
    """The installer to use for ``request`` and why.

    Args:
        request: what is to be installed (``request.pixi`` is the verified Pixi, if any).
        name: ``"auto"`` or the name of a registered installer.

    Returns:
        ``(installer, reason)``; the reason is one human-readable sentence.

    Raises:
        UsageError: ``name`` is not a registered installer.
        InstallError: the named installer (or, for ``auto``, every candidate)
            cannot run here; the message says why.
    """
    found = plugins(GROUP)
    if name != "auto":
        cls = found.get(name)  # PluginError for a broken plugin of that name
        if cls is None:
            raise UsageError(
                f"unknown installer {name!r}: choose auto or one of {', '.join(found.names())}"
            )
        ok, why = cls.available(request)
        if not ok:
            raise InstallError(f"the {name} installer cannot run here: {why}")
        return cls(), f"{name} (as asked): {why}"
    available = found.loaded()
    reasons: list[str] = []
    pixi_cls = available.get("pixi")
    if pixi_cls is not None:
        ok, why = pixi_cls.available(request)
        if ok:
            return pixi_cls(), f"pixi (auto): {why}"
        reasons.append(why)
    rattler_cls = available.get("rattler")
    if rattler_cls is None:
        raise InstallError("no rattler installer is registered: " + "; ".join(reasons))
    ok, why = rattler_cls.available(request)
    if not ok:
        raise InstallError("no installer can run here: " + "; ".join([*reasons, f"rattler: {why}"]))
    because = f" because {reasons[0]}" if reasons else ""
    return rattler_cls(), f"rattler (auto){because}"
