"""The lock model (pixicache.model.lockfile) and the lock renderer (pixicache.testing.locks).

The central check: on every lock here (real, rattler-written, and rendered in
each format version 4-7 from realistic package sets) pixicache reads exactly
the records py-rattler reads. py-rattler runs once, in a child process, for all
locks together.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from pixicache.errors import LockError
from pixicache.model import lockyaml
from pixicache.model.lockfile import Lock, LockedPackage, load_lock
from pixicache.testing.locks import LockPackage, render_lock, write_lock

DATA = Path(__file__).resolve().parent / "data" / "locks"
SHARED_LOCK = DATA / "gpu-pytorch-v6.lock"
SHARED_COUNT = 121
SHARED_BYTES = 3_705_969_704


# --------------------------------------------------------------------------- generators


def _hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _digest(rng: random.Random) -> str:
    return hashlib.sha256(rng.randbytes(16)).hexdigest()


# name, version, build kind ("c" compiled, "py" python extension, "pyh" noarch python,
# "py_" old-style noarch python, "g" noarch generic, "gpy" noarch generic whose build
# says "py", like cpython; "mutex" a build number not at the end of the build string), depends
_CONDA_SPECS = [
    ("_openmp_mutex", "4.5", "mutex", ["libgomp >=7.5.0"]),
    (
        "python",
        "3.12.7",
        "c",
        ["bzip2 >=1.0.8,<2.0a0", "libzlib >=1.3.1,<2.0a0", "openssl >=3.4.0,<4.0a0"],
    ),
    ("bzip2", "1.0.8", "c", []),
    ("libzlib", "1.3.1", "c", []),
    ("openssl", "3.4.0", "c", ["ca-certificates"]),
    ("libffi", "3.4.6", "c", []),
    ("ncurses", "6.5", "c", []),
    ("libsqlite", "3.47.2", "c", ["libzlib >=1.3.1,<2.0a0"]),
    ("numpy", "2.1.3", "py", ["python >=3.12,<3.13.0a0", "libblas >=3.9.0,<4.0a0"]),
    ("libblas", "3.9.0", "c", []),
    ("pyyaml", "6.0.2", "py", ["python >=3.12,<3.13.0a0", "yaml >=0.2.5,<0.3.0a0"]),
    ("yaml", "0.2.5", "c", []),
    ("ca-certificates", "2024.12.14", "g", ["__unix"]),
    ("tzdata", "2024b", "g", []),
    ("pip", "24.3.1", "pyh", ["python >=3.9", "setuptools", "wheel"]),
    ("setuptools", "75.6.0", "pyh", ["python >=3.9"]),
    ("wheel", "0.45.1", "pyh", ["python >=3.8"]),
    ("requests", "2.32.3", "pyh", ["python >=3.8", "idna >=2.5,<4"]),
    ("idna", "3.10", "pyh", ["python >=3.6"]),
    ("toolz", "0.11.1", "py_", ["python >=3.5"]),
    ("cpython", "3.12.7", "gpy", ["python 3.12.7.*"]),
]
_CUDA_SPECS = [
    ("cuda-version", "12.6", "g", []),
    ("cuda-cudart", "12.6.77", "c", ["cuda-version >=12.6,<12.7.0a0"]),
    ("libcublas", "12.6.4.1", "c", ["cuda-version >=12.6,<12.7.0a0"]),
    ("cudnn", "9.3.0.75", "c", ["libcublas", "cuda-version >=12,<13.0a0"]),
    ("pytorch", "2.5.1", "py", ["python >=3.12,<3.13.0a0", "cudnn >=9.3.0.75,<10.0a0"]),
]
_TEST_SPECS = [
    ("pytest", "8.3.4", "pyh", ["python >=3.9", "pluggy <2,>=1.5"]),
    ("pluggy", "1.5.0", "pyh", ["python >=3.8"]),
    ("iniconfig", "2.0.0", "pyh", ["python >=3.7"]),
]
# name, version, pure-python?
_PYPI_SPECS = [
    ("tqdm", "4.67.1", True),
    ("safetensors", "0.4.5", False),
    ("tokenizers", "0.21.0", False),
    ("huggingface-hub", "0.27.0", True),
    ("regex", "2024.11.6", False),
]
_WHEEL_TAGS = {
    "linux-64": "cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64",
    "linux-aarch64": "cp312-cp312-manylinux_2_17_aarch64.manylinux2014_aarch64",
    "osx-arm64": "cp312-cp312-macosx_11_0_arm64",
    "osx-64": "cp312-cp312-macosx_10_13_x86_64",
    "win-64": "cp312-cp312-win_amd64",
}
CF = "https://conda.anaconda.org/conda-forge"


class PackageFactory:
    """Realistic conda/PyPI packages with seeded random builds, digests and sizes.

    The same (name, subdir) always yields the same package, so a noarch package
    shared by several platforms and environments is one entry.
    """

    def __init__(self, seed: int, tar_bz2_every: int = 4) -> None:
        self.rng = random.Random(seed)
        self.tar_bz2_every = tar_bz2_every
        self.cache: dict[tuple[str, str, str], LockPackage] = {}
        self.count = 0

    def conda(self, spec: tuple[str, str, str, list[str]], platform: str) -> LockPackage:
        name, version, style, depends = spec
        subdir = "noarch" if style in ("pyh", "py_", "g", "gpy") else platform
        key = ("conda", name, subdir)
        if key in self.cache:
            return self.cache[key]
        rng = self.rng
        number = rng.choice([0, 0, 1, 2, 3, 100]) if style != "mutex" else rng.choice([1, 2])
        build = {
            "c": f"h{_hex(rng, 7)}_{number}",
            "py": f"py312h{_hex(rng, 7)}_{number}",
            "pyh": f"pyh{_hex(rng, 7)}_{number}",
            "py_": f"py_{number}",
            "mutex": f"{number}_gnu",
            "g": f"h{_hex(rng, 7)}_{number}",
            "gpy": f"py312h{_hex(rng, 7)}_{number}",
        }[style]
        self.count += 1
        ext = ".tar.bz2" if self.count % self.tar_bz2_every == 0 else ".conda"
        pkg = LockPackage(
            kind="conda",
            url=f"{CF}/{subdir}/{name}-{version}-{build}{ext}",
            sha256=_digest(rng),
            md5=_hex(rng, 32),
            name=name,
            version=version,
            build=build,
            build_number=number,
            depends=list(depends),
            noarch={"pyh": "python", "py_": "python", "g": "generic", "gpy": "generic"}.get(style),
            license=rng.choice(["MIT", "BSD-3-Clause", "Apache-2.0", "PSF-2.0"]),
            size=rng.randint(5_000, 40_000_000),
            timestamp=1_700_000_000_000 + rng.randint(0, 10**10),
        )
        self.cache[key] = pkg
        return pkg

    def wheel(self, spec: tuple[str, str, bool], platform: str) -> LockPackage:
        name, version, pure = spec
        tag = "py3-none-any" if pure else _WHEEL_TAGS[platform]
        key = ("pypi", name, tag)
        if key in self.cache:
            return self.cache[key]
        rng = self.rng
        dist = name.replace("-", "_")
        pkg = LockPackage(
            kind="pypi",
            url=(
                f"https://pypi-files.example.org/packages/{_hex(rng, 2)}/{_hex(rng, 2)}/"
                f"{_hex(rng, 60)}/{dist}-{version}-{tag}.whl"
            ),
            sha256=_digest(rng),
            name=name,
            version=version,
            requires_dist=[
                "packaging>=20.9",
                "typing-extensions>=3.7.4.3 ; python_full_version < '3.8'",
            ],
            requires_python=">=3.8",
        )
        self.cache[key] = pkg
        return pkg

    def environment(
        self, platforms: list[str], specs: list[Any], pypi: list[Any] | None = None
    ) -> dict[str, list[LockPackage]]:
        return {
            plat: [self.conda(s, plat) for s in specs] + [self.wheel(w, plat) for w in pypi or []]
            for plat in platforms
        }


_PYPI_KINDS = [
    LockPackage(
        kind="pypi",
        url="https://pypi-files.example.org/packages/1f/2e/3d/antlr4-python3-runtime-4.9.3.tar.gz",
        sha256="f224469b4168294902bb1efa80a8bf7855f24c99aef99cbefc1bcd3cce77f04b",
        name="antlr4-python3-runtime",
        version="4.9.3",
    ),
    LockPackage(kind="pypi", url="./vendor/helper-0.1-py3-none-any.whl", sha256=None, name="helper", version="0.1"),
    LockPackage(kind="pypi", url=".", sha256=None, name="myproject", version="0.1.0", editable=True),
    LockPackage(
        kind="pypi",
        url="git+https://git.example.org/lab/tool.git?rev=main#5f9c5cbd1fd0b1d7e8e1f2a3b4c5d6e7f8091a2b",
        sha256=None,
        name="tool",
        version="1.2.0",
    ),
]


def _md5_only(
    env: dict[str, list[LockPackage]], every: int
) -> dict[str, list[LockPackage]]:
    """``env`` with every ``every``-th conda package pinned by md5 alone."""
    import dataclasses

    out = {}
    for plat, pkgs in env.items():
        out[plat] = [
            dataclasses.replace(p, sha256=None) if p.kind == "conda" and i % every == 0 else p
            for i, p in enumerate(pkgs)
        ]
    return out


def _from_locked(pkg: LockedPackage) -> LockPackage:
    return LockPackage(
        kind=pkg.kind,
        url=pkg.url,
        sha256=pkg.sha256,
        name=pkg.name,
        version=pkg.version,
        md5=pkg.md5,
        size=pkg.size,
        build=pkg.build,
        build_number=pkg.build_number,
        subdir=pkg.subdir,
        depends=list(pkg.depends),
        noarch=pkg.noarch,
        license=pkg.license,
        timestamp=pkg.timestamp,
        requires_dist=list(pkg.requires_dist),
        requires_python=pkg.requires_python,
    )


def _generated_cases() -> dict[str, tuple[int, dict[str, dict[str, list[LockPackage]]]]]:
    """name -> (version, environments) of the rendered, generated locks."""
    cases = {}

    f = PackageFactory(seed=4, tar_bz2_every=2)
    cases["gen-v4-three-platforms"] = (
        4,
        {"default": f.environment(["linux-64", "osx-64", "win-64"], _CONDA_SPECS, _PYPI_SPECS[:3])},
    )

    f = PackageFactory(seed=5)
    cases["gen-v5-default-test"] = (
        5,
        {
            "default": f.environment(["linux-64", "osx-arm64"], _CONDA_SPECS, _PYPI_SPECS),
            "test": f.environment(
                ["linux-64", "osx-arm64"], _CONDA_SPECS + _TEST_SPECS, _PYPI_SPECS[:2]
            ),
        },
    )

    for version in (6, 7):
        f = PackageFactory(seed=version)
        four = ["linux-64", "linux-aarch64", "osx-arm64", "win-64"]
        cases[f"gen-v{version}-default-cuda-test"] = (
            version,
            {
                "default": f.environment(four, _CONDA_SPECS, _PYPI_SPECS[:2]),
                "cuda": f.environment(
                    ["linux-64", "linux-aarch64"], _CONDA_SPECS + _CUDA_SPECS, _PYPI_SPECS
                ),
                "test": f.environment(four, _CONDA_SPECS + _TEST_SPECS),
            },
        )

    # md5-only conda entries (old channels publish no sha256), in every version
    for version in (4, 5, 6, 7):
        f = PackageFactory(seed=70 + version, tar_bz2_every=2)
        env = f.environment(["linux-64"], _CONDA_SPECS, _PYPI_SPECS[:1])
        cases[f"gen-v{version}-md5-only"] = (version, {"default": _md5_only(env, every=3)})

    # every kind of PyPI entry: wheels, an sdist, a path, an editable path, git
    f = PackageFactory(seed=80)
    env = f.environment(["linux-64", "osx-arm64"], _CONDA_SPECS[:6], _PYPI_SPECS[:2])
    for plat in env:
        env[plat] = env[plat] + _PYPI_KINDS
    cases["gen-v6-pypi-kinds"] = (6, {"default": env})

    f = PackageFactory(seed=61, tar_bz2_every=3)
    cases["gen-v6-pypi-heavy"] = (
        6,
        {
            "default": f.environment(
                ["linux-64", "win-64"], _CONDA_SPECS[:4] + _TEST_SPECS, _PYPI_SPECS
            )
        },
    )
    return cases


# --------------------------------------------------------------------------- rattler side

_RATTLER_DUMP = r"""
import json, os, sys
import rattler
from rattler.lock.package import CondaLockedBinaryPackage, PypiLockedPackage

job = json.loads(sys.stdin.read())
for src, dst in job["rewrite"]:
    rattler.LockFile.from_path(src).to_path(dst)
out = {}
for name, path in job["dump"].items():
    try:
        lf = rattler.LockFile.from_path(path)
    except BaseException as exc:
        out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    rows = []
    for env_name, env in lf.environments():
        for plat in env.platforms():
            for p in env.packages(plat) or []:
                try:
                    sha = p.hashes.sha256.hex()
                except (AttributeError, TypeError):
                    sha = None
                row = {"env": env_name, "platform": plat.name, "url": p.location, "sha256": sha}
                if isinstance(p, CondaLockedBinaryPackage):
                    r = p.repo_data_record()
                    na = r.noarch
                    row.update(
                        kind="conda", size=r.size, md5=r.md5.hex() if r.md5 else None,
                        name=r.name.normalized, version=str(r.version), build=str(r.build),
                        build_number=r.build_number, subdir=r.subdir,
                        noarch="python" if na.python else "generic" if na.generic else None,
                        depends=list(r.depends), url=r.url,
                        sha256=r.sha256.hex() if r.sha256 else None,
                    )
                elif isinstance(p, PypiLockedPackage):
                    row.update(kind="pypi", name=p.name, version=str(p.version))
                else:
                    row.update(kind="source", name=p.name)
                rows.append(row)
    out[name] = {"rows": rows}
sys.stdout.write(json.dumps(out))
sys.stdout.flush()
os._exit(0)
"""


Rendered = dict[str, dict[tuple[str, str], list[LockPackage]]]


@pytest.fixture(scope="module")
def rendered_inputs() -> Rendered:
    """For each rendered case, what was given to render_lock, by (env, platform)."""
    shared = Lock.load(SHARED_LOCK)
    shared_pkgs = [_from_locked(p) for p in shared.packages()]
    out: Rendered = {
        f"shared-rendered-v{v}": {("default", "linux-64"): shared_pkgs} for v in (4, 5, 7)
    }
    for name, (_, envs) in _generated_cases().items():
        out[name] = {(e, p): pkgs for e, plats in envs.items() for p, pkgs in plats.items()}
    return out


@pytest.fixture(scope="module")
def lock_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every lock of the agreement test, by case name (files on disk)."""
    pytest.importorskip("rattler")  # checked here; the reading itself runs in a child
    tmp = tmp_path_factory.mktemp("locks")
    cases: dict[str, Path] = {
        "shared-v6": SHARED_LOCK,
        "handwritten-v6-source-and-local": DATA / "v6-source-and-local.lock",
        "handwritten-v7-custom-platforms": DATA / "v7-custom-platforms.lock",
    }
    shared = Lock.load(SHARED_LOCK)
    shared_env = {"default": {"linux-64": [_from_locked(p) for p in shared.packages()]}}
    for version in (4, 5, 7):
        cases[f"shared-rendered-v{version}"] = write_lock(
            tmp / f"shared-v{version}.lock", shared_env, version=version
        )
    for name, (version, envs) in _generated_cases().items():
        cases[name] = write_lock(tmp / f"{name}.lock", envs, version=version)
    cases["shared-v7-by-rattler"] = tmp / "shared-v7-by-rattler.lock"
    return cases


@pytest.fixture(scope="module")
def rattler_reading(lock_cases: dict[str, Path]) -> dict[str, Any]:
    """py-rattler's records for every case, from one child process."""
    job = {
        "rewrite": [[str(SHARED_LOCK), str(lock_cases["shared-v7-by-rattler"])]],
        "dump": {name: str(path) for name, path in lock_cases.items()},
    }
    proc = subprocess.run(
        [sys.executable, "-c", _RATTLER_DUMP],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


AGREEMENT_CASES = [
    "shared-v6",
    "shared-v7-by-rattler",
    "shared-rendered-v4",
    "shared-rendered-v5",
    "shared-rendered-v7",
    "handwritten-v6-source-and-local",
    "handwritten-v7-custom-platforms",
    *_generated_cases(),
]

_CONDA_FIELDS = ("name", "version", "build", "build_number", "subdir", "noarch", "md5", "depends")


def _fetchable_row(row: dict[str, Any]) -> bool:
    url = row["url"]
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("http", "https", "file"):
        return False
    return row["kind"] == "pypi" or url.endswith((".conda", ".tar.bz2"))


@pytest.mark.parametrize("case", AGREEMENT_CASES)
def test_agrees_with_rattler(
    case: str,
    lock_cases: dict[str, Path],
    rattler_reading: dict[str, Any],
    rendered_inputs: Rendered,
) -> None:
    reading = rattler_reading[case]
    assert "error" not in reading, reading.get("error")
    lock = Lock.load(lock_cases[case])

    theirs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in reading["rows"]:
        theirs[(row["env"], row["platform"])].append(row)
    ours_keys = {(e, p) for e in lock.environments() for p in lock.platforms(e)}
    assert ours_keys == set(theirs)

    all_urls: set[str] = set()
    for (env, plat), rows in sorted(theirs.items()):
        packages = lock.packages(env, plat)
        # every package, sources included
        assert len(packages) == len(rows), (env, plat)
        fetch_rows = [r for r in rows if _fetchable_row(r)]
        arts = lock.artifacts(env, plat)
        assert len(arts) == len(fetch_rows), (env, plat)
        assert Counter((a.kind, a.url, a.sha256, a.size) for a in arts) == Counter(
            (r["kind"], r["url"], r["sha256"], r.get("size")) for r in fetch_rows
        ), (env, plat)
        # full conda records, as an installer would use them
        by_url = {p.url: p for p in packages if p.kind == "conda" and p.fetchable}
        for row in fetch_rows:
            if row["kind"] == "conda":
                ours = by_url[row["url"]]
                assert {f: getattr(ours, f) for f in _CONDA_FIELDS} == {
                    f: row[f] for f in _CONDA_FIELDS
                }
            else:
                pypi = next(p for p in packages if p.url == row["url"])
                assert (pypi.name, pypi.version) == (row["name"], row["version"])
        all_urls.update(r["url"] for r in fetch_rows)
    everything = lock.artifacts(env=None)
    assert len(everything) == len({a.url for a in everything}) == len(all_urls)

    # A rendered lock holds exactly the records it was rendered from.
    for key, given in rendered_inputs.get(case, {}).items():
        by_url = {r["url"]: r for r in theirs[key]}
        assert set(by_url) == {p.url for p in given}, key
        for p in given:
            row = by_url[p.url]
            # py-rattler reads a project directory's version as dynamic (built on install)
            is_dir = p.kind == "pypi" and not p.is_url and not p.url.endswith((".whl", ".tar.gz"))
            assert (row["kind"], row["sha256"], row["name"], row["version"]) == (
                p.kind,
                p.sha256,
                p.name,
                "<dynamic>" if is_dir else p.version,
            )
            if p.kind == "conda":
                assert (row["build"], row["build_number"], row["subdir"], row["noarch"]) == (
                    p.build,
                    p.build_number,
                    p.effective_subdir,
                    p.effective_noarch,
                ), p.url
                assert (row["size"], row["md5"], row["depends"]) == (p.size, p.md5, p.depends)


def test_agreement_covers_what_the_issue_asks(
    lock_cases: dict[str, Path], rattler_reading: dict[str, Any]
) -> None:
    """>= 10 distinct locks; versions 4-7; PyPI; several envs and platforms; both archive kinds."""
    texts = {name: lock_cases[name].read_text() for name in AGREEMENT_CASES}
    assert len(set(texts.values())) >= 10
    locks = {name: Lock.load(lock_cases[name]) for name in AGREEMENT_CASES}
    assert {lock.version for lock in locks.values()} == {4, 5, 6, 7}
    arts = [a for lock in locks.values() for a in lock.artifacts(env=None)]
    assert {a.kind for a in arts} == {"conda", "pypi"}
    md5_only = {lock.version for lock in locks.values() for a in lock.artifacts(env=None) if a.md5_only}
    assert md5_only == {4, 5, 6, 7}
    pypi = [
        p
        for lock in locks.values()
        for e in lock.environments()
        for plat in lock.platforms(e)
        for p in lock.packages(e, plat)
        if p.kind == "pypi"
    ]
    assert any(p.url.endswith(".tar.gz") for p in pypi) and any(p.url.startswith("git+") for p in pypi)
    assert any(p.editable for p in pypi)
    assert any(a.filename.endswith(".tar.bz2") for a in arts)
    assert any(a.filename.endswith(".conda") for a in arts)
    assert {"linux-64", "osx-arm64", "win-64", "linux-aarch64", "noarch"} <= {
        a.subdir for a in arts
    }
    assert max(len(lock.environments()) for lock in locks.values()) >= 3
    assert any(
        p.noarch == "python" for lock in locks.values() for p in lock.packages(platform="linux-64")
    )


# --------------------------------------------------------------------------- the shared lock


def test_shared_gpu_lock() -> None:
    lock = load_lock(SHARED_LOCK)
    assert lock.version == 6
    assert lock.environments() == ["default"]
    assert lock.platforms() == ["linux-64"]
    arts = lock.artifacts()
    assert len(arts) == SHARED_COUNT
    assert sum(a.size or 0 for a in arts) == SHARED_BYTES
    assert len({a.url for a in arts}) == SHARED_COUNT
    first = arts[0]
    assert first.filename == "_openmp_mutex-4.5-5_kmp_llvm.conda"
    assert first.sha256 == "261526e6bc3866db41ad32c6ccfb3694b07fe8a0ab91616a71fa90f8b365154b"
    assert (first.channel, first.subdir, first.size) == (
        "https://conda.anaconda.org/conda-forge",
        "linux-64",
        8250,
    )
    env = lock.environment("default")
    assert env.channels == ("https://conda.anaconda.org/conda-forge/",)
    assert env.platforms == ("linux-64",)
    # env=None / platform=None select the same single env and platform here
    assert lock.artifacts(None, None) == arts == lock.artifacts("default", "linux-64")


def test_shared_lock_parses_fast() -> None:
    text = SHARED_LOCK.read_text()
    best = min(_timed(lambda: Lock.parse(text, str(SHARED_LOCK)).artifacts()) for _ in range(5))
    print(f"parse + artifacts of the 121-package lock: {best * 1000:.1f} ms")
    # what makes it fast is libyaml's C loader under the lock loader (a timing bound
    # here would only measure the CI machine)
    assert issubclass(lockyaml._LockLoader, yaml.CSafeLoader)


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_packages_carry_installer_fields() -> None:
    lock = Lock.load(SHARED_LOCK)
    pkgs = {p.name: p for p in lock.packages("default", "linux-64")}
    mutex = pkgs["_openmp_mutex"]
    assert (mutex.version, mutex.build, mutex.build_number) == ("4.5", "5_kmp_llvm", 5)
    assert mutex.depends == ["llvm-openmp >=9.0.1"]
    assert mutex.raw["license_family"] == "BSD"
    assert pkgs["cpython"].noarch == "generic"  # explicit in the lock
    assert pkgs["filelock"].noarch == "python"  # derived, as rattler does
    assert pkgs["cuda-nvcc-tools"].constrains == ["gcc_impl_linux-64 >=6,<15.0a0"]
    assert lock.packages() == lock.packages("default", "linux-64")  # single platform: optional


# --------------------------------------------------------------------------- selection


@pytest.fixture
def multi_lock(tmp_path: Path) -> Lock:
    _, envs = _generated_cases()["gen-v6-default-cuda-test"]
    return Lock.load(write_lock(tmp_path / "multi.lock", envs, version=6))


def test_selection_and_dedup(multi_lock: Lock) -> None:
    lock = multi_lock
    assert lock.environments() == ["default", "cuda", "test"]
    assert lock.platforms("cuda") == ["linux-64", "linux-aarch64"]
    one = lock.artifacts("default", "linux-64")
    assert len(one) == len(_CONDA_SPECS) + 2
    every_platform = lock.artifacts("default")
    urls = [a.url for a in every_platform]
    assert len(urls) == len(set(urls))  # noarch packages shared by 4 platforms appear once
    assert urls[: len(one)] == [a.url for a in one]  # stable: platforms in lock order
    everything = lock.artifacts(env=None)
    assert {a.url for a in everything} >= set(urls) | {a.url for a in lock.artifacts("cuda")}
    across = lock.artifacts(env=None, platform="linux-aarch64")
    assert {a.subdir for a in across if a.kind == "conda"} == {"linux-aarch64", "noarch"}
    assert lock.artifacts(env=None) == lock.artifacts(env=None)  # deterministic


def test_sources_and_local_packages_are_not_artifacts() -> None:
    lock = Lock.load(DATA / "v6-source-and-local.lock")
    pkgs = lock.packages()
    assert [(p.kind, p.fetchable) for p in pkgs] == [
        ("conda", True),
        ("conda", False),
        ("pypi", False),
        ("pypi", False),
        ("pypi", True),
    ]
    assert pkgs[1].name == "my-project" and pkgs[2].editable
    assert [a.filename for a in lock.artifacts()] == [
        "python-3.12.7-hc5c86c4_0_cpython.conda",
        "requests-2.32.3-py3-none-any.whl",
    ]
    wheel = lock.artifacts()[1]
    assert (wheel.kind, wheel.size, wheel.channel) == ("pypi", None, None)


def test_custom_platform_names_v7() -> None:
    lock = Lock.load(DATA / "v7-custom-platforms.lock")
    assert lock.platforms() == ["linux-64", "linux-64-cuda12", "osx-arm64"]
    assert lock.platform_subdir("linux-64-cuda12") == "linux-64"
    assert [a.filename for a in lock.artifacts(platform="linux-64-cuda12")] == [
        "libzlib-1.3.1-hb9d3cd8_2.conda",
        "cuda-version-12.6-h7480c83_3.conda",
        "tzdata-2025b-h78e105d_0.conda",
    ]
    assert len(lock.artifacts()) == 4


def test_legacy_pypi_hash_mapping_is_read() -> None:
    lock = Lock.parse(
        _lock_text(
            4,
            refs="- pypi: https://pypi-files.example.org/packages/aa/bb/six-1.16.0-py2.py3-none-any.whl",
            packages=f"""
            - kind: pypi
              name: six
              version: 1.16.0
              url: https://pypi-files.example.org/packages/aa/bb/six-1.16.0-py2.py3-none-any.whl
              hash:
                sha256: {"AB" * 32}
            """,
        )
    )
    assert lock.artifacts()[0].sha256 == "ab" * 32


# --------------------------------------------------------------------------- renderer


def test_render_is_deterministic_and_pixi_shaped(tmp_path: Path) -> None:
    _, envs = _generated_cases()["gen-v7-default-cuda-test"]
    text = render_lock(envs, version=7)
    assert text == render_lock(envs, version=7)
    assert text.startswith("version: 7\nplatforms:\n- name: linux-64\n")
    assert (
        "\n  default:\n    channels:\n    - url: https://conda.anaconda.org/conda-forge/\n" in text
    )
    assert "    indexes:\n    - https://pypi-files.example.org/simple\n" in text
    v4 = render_lock(envs, version=4)
    assert "\n- kind: conda\n  name: " in v4 and "indexes" not in v4
    # The shared lock re-rendered as v6 is the shared lock, byte for byte, except
    # the fields LockPackage does not carry (constrains, license_family...).
    shared = Lock.load(SHARED_LOCK)
    rendered = Lock.parse(
        render_lock({"default": {"linux-64": [_from_locked(p) for p in shared.packages()]}})
    )
    assert [a.to_json() for a in rendered.artifacts()] == [a.to_json() for a in shared.artifacts()]
    with pytest.raises(ValueError, match="two different conda packages"):
        pkg = _from_locked(shared.packages()[0])
        other = LockPackage(**{**pkg.__dict__, "sha256": "0" * 64})
        render_lock({"default": {"linux-64": [pkg]}, "b": {"linux-64": [other]}})


# --------------------------------------------------------------------------- errors

_URL = "https://conda.anaconda.org/conda-forge/linux-64/zlib-1.3.1-hb9d3cd8_2.conda"
_SHA = "a" * 64
_SHA2 = "b" * 64


def _lock_text(
    version: int, refs: str = f"- conda: {_URL}", packages: str | None = None, head: str = ""
) -> str:
    if packages is None:
        packages = f"- conda: {_URL}\n  sha256: {_SHA}\n"
    refs = textwrap.indent(textwrap.dedent(refs).strip(), " " * 6)
    return (
        f"version: {version}\n{head}environments:\n  default:\n    channels:\n"
        f"    - url: https://conda.anaconda.org/conda-forge/\n    packages:\n      linux-64:\n"
        f"{refs}\npackages:\n{textwrap.dedent(packages).strip()}\n"
    )


ERROR_CASES: dict[str, tuple[str, Any, list[str]]] = {
    # name: (lock text, action on the loaded lock or None for "load fails", expected in message)
    "yaml": (
        "version: 6\nenvironments:\n  default:\n    channels: [\n  packages: {}\n",
        None,
        ["malformed YAML", "line "],
    ),
    "yaml-indent": (
        "version: 6\nenvironments:\n  default:\n    channels: []\n   packages: {}\n",
        None,
        ["malformed YAML", "line 5, column 4"],
    ),
    "not-a-mapping": ("- just\n- a list\n", None, ["not a pixi lock"]),
    "no-version": (_lock_text(6).replace("version: 6\n", ""), None, ["no `version`", "4, 5, 6, 7"]),
    "old-version": (_lock_text(3), None, ["version 3", "4, 5, 6, 7"]),
    "new-version": (_lock_text(8), None, ["version 8", "newer", "4, 5, 6, 7"]),
    "string-version": (
        _lock_text(6).replace("version: 6", "version: six"),
        None,
        ["'six'", "4, 5, 6, 7"],
    ),
    "no-environments": ("version: 6\npackages: []\n", None, ["missing `environments`"]),
    "no-packages": (_lock_text(6).split("packages:\n- conda")[0], None, ["missing `packages`"]),
    "missing-reference": (
        _lock_text(6, refs=f"- conda: {_URL}\n- conda: {CF}/linux-64/gone-1.0-h0_0.conda"),
        None,
        [f"{CF}/linux-64/gone-1.0-h0_0.conda", "'default'", "'linux-64'", "not in the `packages`"],
    ),
    "duplicate-digests": (
        _lock_text(
            6, packages=f"- conda: {_URL}\n  sha256: {_SHA}\n- conda: {_URL}\n  sha256: {_SHA2}"
        ),
        None,
        [_URL, _SHA, _SHA2],
    ),
    "malformed-digest": (
        _lock_text(6, packages=f"- conda: {_URL}\n  sha256: 1234"),
        None,
        [_URL, "malformed sha256", "'1234'"],
    ),
    "unknown-platform-v6": (
        _lock_text(6).replace("linux-64:\n", "linux-65:\n"),
        None,
        ["'linux-65'", "'default'"],
    ),
    "undeclared-platform-v7": (
        _lock_text(7, head="platforms:\n- name: osx-arm64\n"),
        None,
        ["'linux-64'", "does not declare", "osx-arm64"],
    ),
    "v7-without-platforms": (_lock_text(7), None, ["missing `platforms`"]),
    "v7-wrong-subdir": (
        _lock_text(7, head="platforms:\n- name: linux-64\n- name: osx-arm64\n").replace(
            "linux-64:\n", "osx-arm64:\n", 1
        ),
        None,
        [_URL, "'osx-arm64'", "subdir 'linux-64'"],
    ),
    "bad-entry": (
        _lock_text(6, packages="- name: zlib\n  version: 1"),
        None,
        ["entry #1", "neither `conda:`"],
    ),
    "missing-env": (
        _lock_text(6),
        lambda lock: lock.artifacts("cuda"),
        ["'cuda'", "environments: default"],
    ),
    "missing-env-info": (
        _lock_text(6),
        lambda lock: lock.environment("cuda"),
        ["'cuda'", "default"],
    ),
    "missing-platform": (
        _lock_text(6),
        lambda lock: lock.artifacts("default", "osx-arm64"),
        ["'osx-arm64'", "'default'", "linux-64"],
    ),
    "missing-platform-any-env": (
        _lock_text(6),
        lambda lock: lock.artifacts(None, "win-64"),
        ["'win-64'", "linux-64"],
    ),
    "conda-md5-only-with-sha256-required": (
        _lock_text(6, packages=f"- conda: {_URL}\n  md5: {'c' * 32}\n  size: 10"),
        lambda lock: lock.artifacts(require_sha256=True),
        [_URL, "md5 alone", "--require-sha256", "'default'", "'linux-64'"],
    ),
    "conda-without-any-digest": (
        _lock_text(6, packages=f"- conda: {_URL}\n  size: 10"),
        lambda lock: lock.artifacts(),
        [_URL, "no sha256", "'default'", "'linux-64'"],
    ),
    "pypi-without-sha256": (
        _lock_text(
            5,
            refs="- pypi: https://pypi-files.example.org/packages/aa/bb/six-1.16.0-py2.py3-none-any.whl",
            packages="- kind: pypi\n  name: six\n  version: 1.16.0\n"
            "  url: https://pypi-files.example.org/packages/aa/bb/six-1.16.0-py2.py3-none-any.whl",
        ),
        lambda lock: lock.artifacts(),
        ["six-1.16.0-py2.py3-none-any.whl", "no sha256", "pypi"],
    ),
    "ambiguous-platform": (
        _lock_text(7, head="platforms:\n- name: linux-64\n- name: osx-arm64\n").replace(
            "packages:\n      linux-64:\n", "packages:\n      osx-arm64: []\n      linux-64:\n"
        ),
        lambda lock: lock.packages(),
        ["choose one platform", "osx-arm64, linux-64"],
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_name_file_and_culprit(case: str, tmp_path: Path) -> None:
    text, action, expected = ERROR_CASES[case]
    path = tmp_path / f"{case}.pixi.lock"
    path.write_text(text)
    with pytest.raises(LockError) as info:
        lock = Lock.load(path)
        assert action is not None, "the lock loaded but should not have"
        action(lock)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for part in expected:
        assert part in message, (part, message)
    assert info.value.exit_code == 2


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.lock"
    with pytest.raises(LockError, match=r"nope\.lock: cannot read"):
        Lock.load(missing)
    binary = tmp_path / "binary.lock"
    binary.write_bytes(b"version: 6\n\xff\xfe")
    with pytest.raises(LockError, match=r"binary\.lock: not a text file"):
        Lock.load(binary)


def test_good_versions_parse() -> None:
    """The minimal lock of each error case is valid in every supported version."""
    for version in (4, 5, 6):
        text = _lock_text(version)
        if version < 6:
            text = text.replace(
                f"- conda: {_URL}\n  sha256",
                f"- kind: conda\n  name: zlib\n  version: 1.3.1\n  url: {_URL}\n  sha256",
            )
        assert Lock.parse(text).artifacts()[0].sha256 == _SHA
    v7 = _lock_text(7, head="platforms:\n- name: linux-64\n")
    assert Lock.parse(v7).artifacts()[0].url == _URL
