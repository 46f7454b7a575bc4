"""The data pixicache works on: artifacts, locks, manifests and the plan.

- :mod:`~pixicache.model.artifact` — :class:`Artifact`, a file pinned by digest;
- :mod:`~pixicache.model.lockfile` — :class:`Lock`, a ``pixi.lock`` read into artifacts;
- :mod:`~pixicache.model.manifest` — :class:`Manifest`, a ``pixi.toml`` (tasks, environments);
- :mod:`~pixicache.model.plan` — :class:`Plan`, what locks need and what a store holds.

Nothing here touches the network or a store's files (the plan only asks a store
which digests it has).
"""
