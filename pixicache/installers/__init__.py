"""Installers: plugins that turn a locked environment into a prefix."""

from pixicache.installers.base import Installer, InstallRequest, InstallResult

__all__ = ["InstallRequest", "InstallResult", "Installer"]
