"""mnist_gpu.sub, parsed by HTCondor's own Python bindings and matched against slot ads.

The job ads come from ``htcondor.Submit(...).jobs()``, the bindings' way to make the ads
condor_submit would send, without a schedd. That call exists in the version-1 module
(``htcondor``, shipped in the PyPI wheel up to 24.x); ``htcondor2.Submit.jobs()`` raises
NotImplementedError (checked in 24.12 and 25.14), so the test environment pins
``htcondor>=24,<25``. The ads are then evaluated with ``classad2``: the job's
``Requirements`` (with the GPU clause condor_submit generates from request_gpus and the
gpus_minimum_* commands) with MY = job and TARGET = a synthetic partitionable GPU slot.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

with warnings.catch_warnings():
    # The bindings warn "CONDOR_CONFIG is unset ... Using /dev/null" (as wanted here) from C
    # code the first time a ClassAd is parsed; were that warning an error (-W error), the
    # process would crash, so trigger it once now, with warnings ignored.
    warnings.simplefilter("ignore")
    classad2 = pytest.importorskip(
        "classad2", reason="HTCondor bindings: pip install 'htcondor>=24,<25'"
    )
    classad2.parseOne("[ warm_up = true ]")

REPO = Path(__file__).resolve().parent.parent
SUBMIT_FILE = REPO / "mnist_gpu.sub"
# Paths in transfer_input_files that are build outputs, not files in git (`pixicache
# bundle -o pixicache.pyz` makes the agent). They must be git-ignored instead.
BUILT_BY_MAKE = {"pixicache.pyz"}


def _import_htcondor_v1() -> Any:
    """The version-1 bindings, read with an empty configuration (no site config leaks in)."""
    old = os.environ.get("CONDOR_CONFIG")
    os.environ["CONDOR_CONFIG"] = os.devnull
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import htcondor
    except ImportError as exc:
        pytest.fail(
            f"needs the version-1 HTCondor bindings (`import htcondor`, in the PyPI wheel "
            f"htcondor<25; htcondor2 cannot make job ads without a schedd): {exc}"
        )
    finally:
        if old is None:
            del os.environ["CONDOR_CONFIG"]
        else:
            os.environ["CONDOR_CONFIG"] = old
    return htcondor


def make_jobs(monkeypatch: pytest.MonkeyPatch, prefix: str = "N = 3") -> list[Any]:
    """Job ads for the submit file, with ``prefix`` lines placed before it exactly as
    ``condor_submit N=3 mnist_gpu.sub`` does with command-line variables."""
    htcondor = _import_htcondor_v1()
    monkeypatch.chdir(REPO)  # Iwd and relative paths resolve like a submit from the repo
    submit = htcondor.Submit(prefix + "\n" + SUBMIT_FILE.read_text())
    return [classad2.parseOne(str(ad)) for ad in submit.jobs()]


@pytest.fixture
def jobs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return make_jobs(monkeypatch)


def submit_macro(name: str) -> str:
    """The default value of a ``NAME = value`` macro at the top of the submit file."""
    for line in SUBMIT_FILE.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == name:
            return value.strip()
    raise AssertionError(f"macro {name} not found in {SUBMIT_FILE.name}")


def gpu_slot(
    capability: float = 8.0,
    memory_mb: int = 40339,
    cuda: str = "12.9",
    *,
    arch: str = "X86_64",
    cpus: int = 32,
    slot_memory_mb: int = 256_000,
    disk_kib: int = 900_000_000,
    gpus: int = 1,
) -> Any:
    """A partitionable execute slot with one NVIDIA GPU, as an HTCondor 23+ startd
    advertises it (the GPU's properties in a nested ad named by AvailableGPUs)."""
    major, minor = (int(x) for x in cuda.split("."))
    gpu = (
        f'[ Id = "GPU-3e2b0a54"; DeviceName = "NVIDIA Test GPU"; Capability = {capability}; '
        f"GlobalMemoryMb = {memory_mb}; DriverVersion = {cuda}; "
        f"MaxSupportedVersion = {major * 1000 + minor * 10}; ClockMhz = 1410.0; ECCEnabled = true ]"
    )
    available = "{ GPUs_GPU_3e2b0a54 }" if gpus else "{ }"
    return classad2.ClassAd(
        textwrap.dedent(
            f"""[
            MyType = "Machine"; Name = "slot1@gpu-node.example.org"; SlotType = "Partitionable";
            Machine = "gpu-node.example.org";
            OpSys = "LINUX"; Arch = "{arch}"; HasFileTransfer = true;
            Cpus = {cpus}; Memory = {slot_memory_mb}; Disk = {disk_kib};
            GPUs = {gpus}; TotalGPUs = {gpus}; AvailableGPUs = {available};
            GPUs_GPU_3e2b0a54 = {gpu};
            START = true; Requirements = START
            ]"""
        )
    )


def job_matches(job: Any, machine: Any) -> bool:
    """The job's Requirements with MY = job and TARGET = machine, cross-checked against
    classad2's own two-way match."""
    value = job["Requirements"].eval(scope=job, target=machine)
    assert job.symmetricMatch(machine) is (value is True)
    return value is True


def test_queue_count_comes_from_n_and_defaults_to_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(make_jobs(monkeypatch, prefix="")) == 1
    ads = make_jobs(monkeypatch, prefix="N = 3")
    assert [ad["ProcId"] for ad in ads] == [0, 1, 2]


def test_job_ad_basics(jobs: list[Any]) -> None:
    job = jobs[0]
    assert job["JobUniverse"] == 5  # vanilla
    assert Path(job["Cmd"]).name == "bootstrap.sh"
    assert job["RequestGPUs"] == 1
    assert job["RequestCpus"] >= 1
    assert job["RequestMemory"] >= 4096  # MiB
    assert job["RequestDisk"] >= 12 * 2**20  # KiB: the installed prefix alone is ~9-11 GB
    assert job["ShouldTransferFiles"] == "YES"
    # the directory bootstrap.sh always creates (the model and the report inside it):
    # a failed job is never held for a missing output file
    assert job["TransferOutput"] == "out"


def test_each_job_has_its_own_logs_and_outputs(jobs: list[Any]) -> None:
    for attr in ("UserLog", "Out", "Err", "TransferOutputRemaps"):
        values = [ad[attr] for ad in jobs]
        assert len(set(values)) == len(jobs), f"{attr} is shared between jobs: {values}"
    assert all(Path(ad["Out"]).parent.name == "logs" for ad in jobs)
    assert jobs[2]["TransferOutputRemaps"] == "out = results/1.2"


def test_environment_carries_the_mirror_from_one_macro(
    monkeypatch: pytest.MonkeyPatch, jobs: list[Any]
) -> None:
    default = submit_macro("MIRROR")
    env = dict(item.split("=", 1) for item in jobs[0]["Environment"].split())
    assert env["PIXICACHE_MIRROR"] == default
    assert env["PIXICACHE_SOURCES"] == f"mirror={default}"
    # condor_submit MIRROR=... overrides it everywhere at once
    other = make_jobs(monkeypatch, prefix="MIRROR = http://squid.site.test:3128")
    env = dict(item.split("=", 1) for item in other[0]["Environment"].split())
    assert env == {
        "PIXICACHE_MIRROR": "http://squid.site.test:3128",
        "PIXICACHE_SOURCES": "mirror=http://squid.site.test:3128",
    }


def test_every_transferred_input_exists(jobs: list[Any]) -> None:
    inputs = [p.strip() for p in jobs[0]["TransferInput"].split(",") if p.strip()]
    assert set(inputs) >= {
        "pixi.toml",
        "pixi.lock",
        "train_mnist.py",
        "data/MNIST_data.tar.gz",
        "pixicache.pyz",
    }
    missing = [p for p in inputs if p not in BUILT_BY_MAKE and not (REPO / p).is_file()]
    assert not missing, f"transfer_input_files names files that are not in the repo: {missing}"
    ignored = (REPO / ".gitignore").read_text().split()
    for built in BUILT_BY_MAKE & set(inputs):
        assert f"/{built}" in ignored or built in ignored, (
            f"{built} is built, so it must be git-ignored"
        )


def test_executable_exists_and_is_executable(jobs: list[Any]) -> None:
    exe = Path(jobs[0]["Cmd"])
    assert exe.is_file(), f"the job's executable {exe} is missing"
    assert os.access(exe, os.X_OK), f"{exe} is not executable (chmod +x)"


def test_gpu_requirements_come_from_the_manifest(jobs: list[Any]) -> None:
    manifest = tomllib.loads((REPO / "pixi.toml").read_text())
    major, minor = (int(x) for x in manifest["system-requirements"]["cuda"].split("."))
    job = jobs[0]
    assert job["GPUsMinRuntime"] == major * 1000 + minor * 10
    assert job["GPUsMinCapability"] == float(submit_macro("GPU_MIN_CAPABILITY"))
    assert job["GPUsMinMemory"] == int(submit_macro("GPU_MIN_MEMORY"))
    # the clause condor_submit generates from request_gpus + gpus_minimum_*
    assert "countMatches(MY.RequireGPUs,TARGET.AvailableGPUs)" in str(job["Requirements"]).replace(
        " ", ""
    )


def test_matches_a_modern_gpu_node(jobs: list[Any]) -> None:
    for job in jobs:
        assert job_matches(job, gpu_slot(capability=8.0, memory_mb=40339, cuda="12.9"))
    assert job_matches(jobs[0], gpu_slot(capability=9.0, memory_mb=81559, cuda="13.0"))


@pytest.mark.parametrize(
    ("why", "slot"),
    [
        ("driver supports only CUDA 12.2", dict(cuda="12.2")),
        ("driver supports only CUDA 12.8", dict(cuda="12.8")),
        ("Kepler GPU (capability 3.7), which CUDA 12 dropped", dict(capability=3.7)),
        ("4 GB of GPU memory", dict(memory_mb=4096)),
        ("no GPU in the slot", dict(gpus=0)),
        ("aarch64 node", dict(arch="aarch64")),
        ("too little host memory", dict(slot_memory_mb=2048)),
        ("too little disk", dict(disk_kib=5 * 2**20)),
    ],
)
def test_rejects_unsuitable_nodes(jobs: list[Any], why: str, slot: dict[str, Any]) -> None:
    assert not job_matches(jobs[0], gpu_slot(**slot)), f"matched a node with {why}"


def test_capability_and_memory_floors_are_where_the_macros_say(jobs: list[Any]) -> None:
    cap, mem = float(submit_macro("GPU_MIN_CAPABILITY")), int(submit_macro("GPU_MIN_MEMORY"))
    assert job_matches(jobs[0], gpu_slot(capability=cap, memory_mb=mem))
    assert not job_matches(jobs[0], gpu_slot(capability=round(cap - 0.1, 1), memory_mb=mem))
    assert not job_matches(jobs[0], gpu_slot(capability=cap, memory_mb=mem - 1))


LOCK_CHECK = r"""
import os, sys, tomllib
import rattler
manifest = tomllib.load(open(sys.argv[1], "rb"))
lock = rattler.LockFile.from_path(sys.argv[2])
env = dict(lock.environments())["default"]
plats = env.platforms()
records = env.conda_repodata_records_for_platform(plats[0])
print("platforms", *sorted(str(p) for p in plats))
print("channels", *[str(c) for c in env.channels()])
for name, spec in manifest["dependencies"].items():
    ms = rattler.MatchSpec(f"{name} {spec}")
    hits = [f"{r.name.normalized}={r.version}={r.build}" for r in records if ms.matches(r)]
    print("dep", name, *hits)
for r in records:
    if r.name.normalized in ("python", "pytorch"):
        print("pkg", r.name.normalized, r.version, r.build)
sys.stdout.flush()
os._exit(0)
"""


def test_manifest_dependencies_are_satisfied_by_the_lock() -> None:
    """Each manifest dependency matches a locked record (the lock stays valid for it), on
    the manifest's platform and channel. py-rattler runs in a child (see rattler-notes)."""
    pytest.importorskip("rattler", reason="py-rattler comes with the rattler extra")
    out = subprocess.run(
        [sys.executable, "-c", LOCK_CHECK, str(REPO / "pixi.toml"), str(REPO / "pixi.lock")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    lines = [line.split() for line in out.splitlines()]
    manifest = tomllib.loads((REPO / "pixi.toml").read_text())
    assert ["platforms", *manifest["workspace"]["platforms"]] in lines
    channels = next(line[1:] for line in lines if line[0] == "channels")
    assert [c.rstrip("/").rsplit("/", 1)[-1] for c in channels] == manifest["workspace"]["channels"]
    deps = {line[1]: line[2:] for line in lines if line[0] == "dep"}
    assert set(deps) == set(manifest["dependencies"])
    assert all(len(hits) == 1 for hits in deps.values()), deps
    pkgs = {line[1]: line[2:] for line in lines if line[0] == "pkg"}
    assert pkgs["python"][0].startswith("3.13.")
    cuda = manifest["system-requirements"]["cuda"].replace(".", "")
    assert pkgs["pytorch"][1].startswith(f"cuda{cuda}_"), pkgs["pytorch"]


def test_pixi_tasks_run_the_training_program_with_valid_flags() -> None:
    sys.path.insert(0, str(REPO))
    try:
        import train_mnist
    finally:
        sys.path.remove(str(REPO))
    tasks = tomllib.loads((REPO / "pixi.toml").read_text())["tasks"]
    for name in ("train", "gpu-check"):
        cmd = tasks[name]["cmd"] if isinstance(tasks[name], dict) else tasks[name]
        words = cmd.split()
        assert words[:2] == ["python", "train_mnist.py"], cmd
        train_mnist.parse_args(words[2:])  # exits (fails the test) on an unknown flag
    train = tasks["train"]["cmd"].split()
    assert "--require-cuda" in train and "--save-model" in train
    assert "--gpu-check" in tasks["gpu-check"]["cmd"].split()


# -- the exit-code policy ---------------------------------------------------------------------

# Every documented exit code (pixicache/errors.py, the README's table), what the job does.
POLICY = {
    0: "done",
    1: "hold",
    2: "hold",
    3: "retry",
    4: "hold",
    5: "hold",
    6: "hold",
    7: "retry-elsewhere",
    8: "retry-elsewhere",
    9: "hold",
}


def exit_ad(job: Any, code: int | None = None, *, signal: int | None = None, run: int = 1,
            chirp: tuple[str, str] | None = None) -> Any:
    """The job's ad as the shadow has it when a run ends: exit code (or signal),
    NumJobCompletions, the machine, and what bootstrap.sh chirped."""
    ad = classad2.parseOne(str(job))
    ad["ExitBySignal"] = signal is not None
    if signal is not None:
        ad["ExitSignal"] = signal
    else:
        ad["ExitCode"] = code
    ad["NumJobCompletions"] = run
    ad["RemoteHost"] = "slot1_2@node17.example.org"
    if chirp is not None:
        ad["ChirpExitCode"] = 128 + signal if signal is not None else code
        ad["ChirpExitSource"], ad["ChirpExitReason"] = chirp
    return ad


def outcome(ad: Any) -> str:
    """What the shadow does (OnExitHold first, then OnExitRemove: user_job_policy.cpp)."""
    if ad.eval("OnExitHold") is True:
        return "hold"
    return "done" if ad.eval("OnExitRemove") is not False else "requeue"


@pytest.mark.parametrize("code", sorted(POLICY))
def test_every_agent_exit_code_has_a_policy(jobs: list[Any], code: int) -> None:
    job = jobs[0]
    first = outcome(exit_ad(job, code, chirp=("agent", f"what the agent said about {code}")))
    want = POLICY[code]
    if want in ("retry", "retry-elsewhere"):
        assert first == "requeue", code
        limit = {"retry": int(submit_macro("DL_RETRIES")) + 1, "retry-elsewhere": int(submit_macro("NODE_ATTEMPTS"))}[want]
        runs = [outcome(exit_ad(job, code, run=n)) for n in range(1, limit + 1)]
        assert runs == ["requeue"] * (limit - 1) + ["hold"], (code, runs)
    else:
        assert first == want, code
    if first == "hold":
        ad = exit_ad(job, code, chirp=("agent", "1 artifact(s) could not be fetched: x.conda"))
        reason = ad.eval("OnExitHoldReason")
        assert reason.startswith(f"exit code {code}: ") and "on slot1_2@node17.example.org" in reason
        assert reason.endswith("-- 1 artifact(s) could not be fetched: x.conda")
        assert ad.eval("OnExitHoldSubCode") == code


def test_hold_reasons_say_what_each_code_means(jobs: list[Any]) -> None:
    reasons = {c: exit_ad(jobs[0], c).eval("OnExitHoldReason") for c in POLICY if c}
    assert "integrity failure (SHA-256 mismatch)" in reasons[4]
    assert "pixi.toml or pixi.lock cannot be used" in reasons[2]
    assert "internal error in pixicache" in reasons[1]
    assert " -- " not in reasons[4]  # nothing chirped: no agent message to add


def test_a_task_s_own_failure_is_held_even_with_an_agent_like_code(jobs: list[Any]) -> None:
    job = jobs[0]
    assert outcome(exit_ad(job, 42)) == "hold"
    ad = exit_ad(job, 3, chirp=("task", "the task exited 3"))
    assert outcome(ad) == "hold" and "the task failed" in ad.eval("OnExitHoldReason")
    # an agent-like 3 without chirp is taken as a download failure (retried)
    assert outcome(exit_ad(job, 3)) == "requeue"
    # a stale chirp from an earlier run (another code) does not count
    stale = exit_ad(job, 3, chirp=("task", "old"))
    stale["ChirpExitCode"] = 8
    assert outcome(stale) == "requeue"


def test_signals_from_outside_htcondor_are_retried_then_held(jobs: list[Any]) -> None:
    job = jobs[0]
    limit = int(submit_macro("KILL_RETRIES"))
    assert outcome(exit_ad(job, signal=15, run=1)) == "requeue"
    assert outcome(exit_ad(job, signal=15, run=limit)) == "requeue"
    ad = exit_ad(job, signal=9, run=limit + 1)
    assert outcome(ad) == "hold" and ad.eval("OnExitHoldReason").startswith("killed by signal 9")
    assert outcome(exit_ad(job, signal=11)) == "hold"  # a crash (SIGSEGV) is the task's failure


def test_a_node_that_cannot_run_the_job_is_avoided_next_time(jobs: list[Any]) -> None:
    job = exit_ad(jobs[0], 8)
    job["MachineAttrMachine1"] = "gpu-node.example.org"  # the machine of the run that exited 8
    assert not job_matches(job, gpu_slot())  # gpu_slot() is that machine
    other = gpu_slot()
    other["Machine"] = "other-node.example.org"
    assert job_matches(job, other)
    ok = exit_ad(jobs[0], 0)
    ok["MachineAttrMachine1"] = "gpu-node.example.org"
    assert job_matches(ok, gpu_slot())  # only exits 7/8 avoid the last machines
