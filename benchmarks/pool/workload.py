"""The upstream's files: the size-faithful synthetic GPU environment plus the ``pool-task`` package."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import CHANNEL, PYPI_TEMPLATE_BASE, STAMP, TASK_PACKAGE, TEMPLATE_BASE

# The PyPI side of a typical GPU training workspace ([pypi-dependencies]): wheels and
# their sizes in bytes at scale 1.0 (~300 MB), after the wheels of the real projects.
PYPI_WHEELS: tuple[tuple[str, str, int], ...] = (
    ("transformers", "4.46.3", 10_000_000),
    ("tokenizers", "0.20.3", 3_000_000),
    ("safetensors", "0.4.5", 435_000),
    ("huggingface-hub", "0.26.2", 447_000),
    ("datasets", "3.1.0", 480_000),
    ("accelerate", "1.1.1", 333_000),
    ("pyarrow", "18.0.0", 40_000_000),
    ("pandas", "2.2.3", 13_000_000),
    ("scipy", "1.14.1", 41_000_000),
    ("scikit-learn", "1.5.2", 13_300_000),
    ("llvmlite", "0.43.0", 43_900_000),
    ("numba", "0.60.0", 3_700_000),
    ("opencv-python-headless", "4.10.0.84", 49_900_000),
    ("wandb", "0.18.7", 20_000_000),
    ("tensorboard", "2.18.0", 5_500_000),
    ("grpcio", "1.68.0", 5_900_000),
    ("matplotlib", "3.9.2", 8_300_000),
    ("pillow", "11.0.0", 4_400_000),
    ("sentencepiece", "0.2.0", 1_300_000),
    ("einops", "0.8.0", 43_000),
)


@dataclass
class PreparedWorkload:
    """The upstream's files: the synthetic GPU environment and the task package.

    Attributes:
        root: the directory the upstream serves (``root/conda-forge/<subdir>/<file>``).
        lock_template: a ``pixi.lock`` for every package, with
            ``https://conda.anaconda.org/conda-forge`` URLs (see :meth:`write_lock`).
        packages: ``[(subdir, filename, sha256, size)]``, the task package included.
        scale, seed: how the workload was made.
        pypi: ``[(URL path, filename, sha256, size)]`` of the PyPI wheels (the ``pypi``
            workload; empty otherwise), served under ``/pypi/packages/...``.
    """

    root: Path
    lock_template: Path
    packages: list[tuple[str, str, str, int]]
    scale: float
    seed: int
    pypi: list[tuple[str, str, str, int]] = field(default_factory=list)

    @property
    def count(self) -> int:
        """How many artifacts the environment has (conda and PyPI)."""
        return len(self.packages) + len(self.pypi)

    @property
    def conda_bytes(self) -> int:
        return sum(p[3] for p in self.packages)

    @property
    def pypi_bytes(self) -> int:
        return sum(p[3] for p in self.pypi)

    @property
    def env_bytes(self) -> int:
        """The environment's bytes (the sum of its archives' and wheels' sizes)."""
        return self.conda_bytes + self.pypi_bytes

    @property
    def paths(self) -> list[str]:
        """The archives' URL paths on the upstream (``/conda-forge/<subdir>/<file>``,
        ``/pypi/packages/...``)."""
        return [f"/{CHANNEL}/{sub}/{name}" for sub, name, _, _ in self.packages] + [
            p[0] for p in self.pypi
        ]

    @property
    def sizes(self) -> dict[str, int]:
        """URL path -> size, for every artifact."""
        return dict(zip(self.paths, [p[3] for p in self.packages] + [p[3] for p in self.pypi]))

    def largest(self, ext: str = ".conda") -> tuple[str, str, str, int]:
        """The largest package archive whose name ends with ``ext``."""
        return max((p for p in self.packages if p[1].endswith(ext)), key=lambda p: p[3])

    def write_lock(self, path: Path, upstream_url: str) -> Path:
        """The lock with the upstream's URLs (so the ``upstream`` source reaches it)."""
        text = self.lock_template.read_text()
        base = upstream_url.rstrip("/")
        text = text.replace(TEMPLATE_BASE, base + "/" + CHANNEL)
        path.write_text(text.replace(PYPI_TEMPLATE_BASE, base + "/pypi"))
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


def prepare_workload(
    root: Path, scale: float, seed: int = 0, *, pypi_python: str | None = None
) -> PreparedWorkload:
    """Build (or reuse, if ``root`` holds the same scale, seed and kind) the upstream's files.

    ``pypi_python``: the ``pypi`` workload, whose jobs' environments are a venv-style
    ``python`` over that interpreter (the workers' python3) with :data:`PYPI_WHEELS`
    (real wheels of scaled random payloads) installed into it, besides the conda
    packages (the GPU lock's ``python`` archive is left out: the venv one stands in).
    """
    from pixicache.testing import make_package_workload

    root = Path(root).resolve()
    marker = root / "pool-workload.json"
    kind = {"scale": scale, "seed": seed, "pypi_python": pypi_python}
    if marker.is_file():
        meta = json.loads(marker.read_text())
        if all(meta.get(k) == v for k, v in kind.items()):
            return PreparedWorkload(
                root,
                root / "pool.lock.template",
                [tuple(p) for p in meta["packages"]],  # type: ignore[misc]
                scale,
                seed,
                [tuple(p) for p in meta.get("pypi", [])],  # type: ignore[misc]
            )
    if root.exists():
        shutil.rmtree(root)
    wl = make_package_workload(root, scale=scale, seed=seed)
    if len(wl.channels) != 1 or wl.channels[0].name != CHANNEL:
        raise RuntimeError(f"expected one channel named {CHANNEL}, got {wl.channels}")
    channel = wl.channels[0]
    channel.add([task_package_spec()])
    template = root / "pool.lock.template"
    pypi: list[tuple[str, str, str, int]] = []
    if pypi_python is None:
        template.write_text(channel.render_lock(TEMPLATE_BASE))
    else:
        pypi = _add_pypi(channel, root, scale, seed, pypi_python, template)
    packages = [(p.subdir, p.filename, p.sha256, p.size) for p in channel.packages]
    marker.write_text(json.dumps({**kind, "packages": packages, "pypi": pypi}))
    return PreparedWorkload(root, template, packages, scale, seed, pypi)  # type: ignore[arg-type]


def _add_pypi(
    channel: Any, root: Path, scale: float, seed: int, python: str, template: Path
) -> list[tuple[str, str, str, int]]:
    """The venv ``python`` into ``channel``, the wheels under ``root/pypi``, the lock."""
    from pixicache.testing.channel import build_venv_python
    from pixicache.testing.locks import LockPackage, render_lock
    from pixicache.testing.pypi import PypiIndex, WheelSpec, build_wheel
    from pixicache.testing.workload import random_bytes

    channel.packages = [p for p in channel.packages if p.spec.name != "python"]
    channel.add([build_venv_python(python)])
    index = PypiIndex(root / "pypi")
    dist = root / "pypi-dist"
    entries = []
    for name, version, size in PYPI_WHEELS:
        module = name.replace("-", "_")
        payload = random_bytes(max(1, round(size * scale)), seed, f"pypi/{name}")
        spec = WheelSpec(
            name, version,
            modules={f"{module}/__init__.py": f"__version__ = {version!r}\n"},
            payload={f"{module}/_payload.bin": payload},
        )  # fmt: skip
        entries.append(index.add(build_wheel(spec, dist), name))
    shutil.rmtree(dist)
    lock_pkgs = channel.lock_packages(TEMPLATE_BASE) + [
        LockPackage(kind="pypi", url=e.url(PYPI_TEMPLATE_BASE), sha256=e.sha256, name=e.project,
                    version=v, requires_python=None)
        for e, (_, v, _) in zip(entries, PYPI_WHEELS)
    ]  # fmt: skip
    platform = channel.platforms[0]
    template.write_text(
        render_lock(
            {"default": {platform: lock_pkgs}},
            channels=[TEMPLATE_BASE + "/"],
            indexes=[PYPI_TEMPLATE_BASE + "/simple"],
        )
    )
    return [(f"/pypi{e.path}", e.filename, e.sha256, e.size) for e in entries]
