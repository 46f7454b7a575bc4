"""The upstream's files: the size-faithful synthetic GPU environment plus the ``pool-task`` package."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import CHANNEL, STAMP, TASK_PACKAGE, TEMPLATE_BASE


@dataclass
class PreparedWorkload:
    """The upstream's files: the synthetic GPU environment and the task package.

    Attributes:
        root: the directory the upstream serves (``root/conda-forge/<subdir>/<file>``).
        lock_template: a ``pixi.lock`` for every package, with
            ``https://conda.anaconda.org/conda-forge`` URLs (see :meth:`write_lock`).
        packages: ``[(subdir, filename, sha256, size)]``, the task package included.
        scale, seed: how the workload was made.
    """

    root: Path
    lock_template: Path
    packages: list[tuple[str, str, str, int]]
    scale: float
    seed: int

    @property
    def env_bytes(self) -> int:
        """The environment's bytes (the sum of its archives' sizes)."""
        return sum(p[3] for p in self.packages)

    @property
    def paths(self) -> list[str]:
        """The archives' URL paths on the upstream (``/conda-forge/<subdir>/<file>``)."""
        return [f"/{CHANNEL}/{sub}/{name}" for sub, name, _, _ in self.packages]

    def largest(self, ext: str = ".conda") -> tuple[str, str, str, int]:
        """The largest package archive whose name ends with ``ext``."""
        return max((p for p in self.packages if p[1].endswith(ext)), key=lambda p: p[3])

    def write_lock(self, path: Path, upstream_url: str) -> Path:
        """The lock with the upstream's URLs (so the ``upstream`` source reaches it)."""
        text = self.lock_template.read_text()
        path.write_text(text.replace(TEMPLATE_BASE, upstream_url.rstrip("/") + "/" + CHANNEL))
        return path


def task_package_spec() -> Any:
    """``pool-task``: a real package whose ``bin/pool-task`` stamps when the task started."""
    from pixicache.testing import PLACEHOLDER, FileSpec, PackageSpec, current_subdir

    script = (
        "#!/bin/sh\n"
        "# pool-task: the pool benchmark's task. Stamps the time it started (the\n"
        "# end of time-to-task) in the job's scratch dir, then says where it runs.\n"
        f'stamp="${{_CONDOR_SCRATCH_DIR:-.}}/{STAMP}"\n'
        'date +%s.%N > "$stamp.tmp" && mv -f "$stamp.tmp" "$stamp"\n'
        f'echo "pool-task: environment ready in {PLACEHOLDER}"\n'
    )
    return PackageSpec(
        TASK_PACKAGE,
        "1.0.0",
        "h0_0",
        subdir=current_subdir(),
        files={f"bin/{TASK_PACKAGE}": FileSpec(script, mode=0o755)},
    )


def prepare_workload(root: Path, scale: float, seed: int = 0) -> PreparedWorkload:
    """Build (or reuse, if ``root`` holds the same scale and seed) the upstream's files."""
    from pixicache.testing import make_package_workload

    root = Path(root).resolve()
    marker = root / "pool-workload.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if meta.get("scale") == scale and meta.get("seed") == seed:
            return PreparedWorkload(
                root,
                root / "pool.lock.template",
                [tuple(p) for p in meta["packages"]],  # type: ignore[misc]
                scale,
                seed,
            )
    if root.exists():
        shutil.rmtree(root)
    wl = make_package_workload(root, scale=scale, seed=seed)
    if len(wl.channels) != 1 or wl.channels[0].name != CHANNEL:
        raise RuntimeError(f"expected one channel named {CHANNEL}, got {wl.channels}")
    channel = wl.channels[0]
    channel.add([task_package_spec()])
    template = root / "pool.lock.template"
    template.write_text(channel.render_lock(TEMPLATE_BASE))
    packages = [(p.subdir, p.filename, p.sha256, p.size) for p in channel.packages]
    marker.write_text(json.dumps({"scale": scale, "seed": seed, "packages": packages}))
    return PreparedWorkload(root, template, packages, scale, seed)  # type: ignore[arg-type]
