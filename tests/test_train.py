"""train_mnist.py on the CPU with the real MNIST data the repo ships.

Training runs in subprocesses (``sys.executable train_mnist.py ...``) exactly as the pixi
task runs it. The resume tests compare final weights bit for bit (``torch.equal`` on
every tensor of the state dict) between an uninterrupted run and runs that were killed
(SIGKILL), evicted (SIGTERM), stopped (--max-steps) or self-checkpointed (exit code 85)
and then resumed. No test needs a GPU: CUDA is hidden where its absence is the point.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="torch comes with the train extra (scripts/test.sh installs it)")

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "train_mnist.py"
ARCHIVE = REPO / "data" / "MNIST_data.tar.gz"
# A short, exactly reproducible CPU run: 6,400 images, batch 64 -> 100 steps per epoch,
# 200 steps in all, crossing an epoch boundary (evaluation, a new permutation).
SHORT = [
    "--device", "cpu", "--deterministic", "--num-threads", "1", "--seed", "7",
    "--train-limit", "6400", "--test-limit", "2000", "--batch-size", "64", "--epochs", "2",
]  # fmt: skip

sys.path.insert(0, str(REPO))
import train_mnist  # noqa: E402

sys.path.remove(str(REPO))


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped archive, unpacked once: ``<tmp>/data/MNIST/raw/*-ubyte``."""
    dest = tmp_path_factory.mktemp("mnist")
    with tarfile.open(ARCHIVE) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python without extraction filters
            tar.extractall(dest)
    assert (dest / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    return dest / "data"


def child_env(*, hide_cuda: bool = False) -> dict[str, str]:
    """The environment for a training child. OpenMP threads sleep instead of spinning
    while they wait, so that a busy (shared) test machine does not slow runs down tenfold."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if hide_cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_train(
    args: list[str], cwd: Path, *, hide_cuda: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN), *args],
        cwd=cwd,
        env=child_env(hide_cuda=hide_cuda),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def short_args(mnist_dir: Path, work: Path, *extra: str) -> list[str]:
    return [
        *SHORT, "--data-dir", str(mnist_dir), "--checkpoint", str(work / "ckpt.pt"),
        "--save-model", "--model-path", str(work / "model.pt"), "--json-metrics", str(work / "metrics.json"),
        *extra,
    ]  # fmt: skip


def load_weights(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ from the uninterrupted run in {different}"


def assert_no_temp_files(work: Path) -> None:
    leftovers = [p.name for p in work.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


@pytest.fixture(scope="module")
def uninterrupted(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the short run from start to end in one process."""
    work = tmp_path_factory.mktemp("uninterrupted")
    proc = run_train(short_args(mnist_dir, work), work)
    assert proc.returncode == 0, proc.stderr
    assert "epoch   2/2" in proc.stdout
    assert not (work / "ckpt.pt").exists(), "a finished run removes its checkpoint"
    return work


# ---- real training -------------------------------------------------------------------


@pytest.mark.slow
def test_one_epoch_on_cpu_reaches_98_percent(mnist_dir: Path, tmp_path: Path) -> None:
    proc = run_train(
        ["--device", "cpu", "--epochs", "1", "--data-dir", str(mnist_dir), "--save-model",
         "--json-metrics", "metrics.json"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("python ") and "torch " in proc.stdout.splitlines()[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    (epoch,) = metrics["epochs"]
    assert epoch["test_accuracy"] >= 0.98, proc.stdout
    assert epoch["images_per_s"] > 0 and epoch["time_s"] > 0
    assert metrics["finished"] is True
    weights = load_weights(tmp_path / "mnist_cnn.pt")
    assert any(k.endswith("running_mean") for k in weights)
    assert_no_temp_files(tmp_path)
    print(f"\n1 epoch on CPU: {epoch['time_s']:.1f} s, {epoch['images_per_s']:.0f} img/s, "
          f"test accuracy {100 * epoch['test_accuracy']:.2f}%")  # fmt: skip


# ---- checkpoint / resume -------------------------------------------------------------


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(
    mnist_dir: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    """SIGKILL right after a mid-epoch checkpoint (checkpoints every few steps), resume."""
    args = short_args(mnist_dir, tmp_path, "--checkpoint-every-seconds", "0.05")
    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), *args],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    killed_after = None
    assert proc.stdout is not None
    for line in proc.stdout:  # synchronise on the program's own report, not on time
        if (
            line.startswith("checkpoint saved")
            and " epoch 2 step " in line
            and " epoch 2 step 0 " not in line
        ):
            proc.send_signal(signal.SIGKILL)
            killed_after = line.strip()
            break
    proc.stdout.close()
    proc.wait(timeout=60)
    assert killed_after is not None, "never saw a mid-epoch checkpoint in epoch 2"
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "model.pt").exists()

    resumed = run_train(short_args(mnist_dir, tmp_path), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "epoch 2" in resumed.stdout.split("resumed from")[1]
    assert_same_weights(uninterrupted / "model.pt", tmp_path / "model.pt")
    a = json.loads((uninterrupted / "metrics.json").read_text())["epochs"]
    b = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    assert [e["test_accuracy"] for e in a] == [e["test_accuracy"] for e in b]
    assert_no_temp_files(tmp_path)


@pytest.mark.slow
def test_htcondor_self_checkpointing_exit_code(
    mnist_dir: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    """checkpoint_exit_code: checkpoint each epoch, exit 85, get restarted, resume."""
    codes = []
    for _ in range(5):
        proc = run_train(
            short_args(
                mnist_dir,
                tmp_path,
                "--checkpoint-every-epochs",
                "1",
                "--checkpoint-exit-code",
                "85",
            ),
            tmp_path,
        )
        codes.append(proc.returncode)
        if proc.returncode != 85:
            break
        assert (tmp_path / "ckpt.pt").is_file(), "exit code 85 promises a checkpoint to transfer"
    assert codes == [85, 0], proc.stderr
    assert_same_weights(uninterrupted / "model.pt", tmp_path / "model.pt")
    assert not (tmp_path / "ckpt.pt").exists()
    assert_no_temp_files(tmp_path)


@pytest.mark.slow
def test_max_steps_sigterm_and_resume(mnist_dir: Path, tmp_path: Path, uninterrupted: Path) -> None:
    """--max-steps stops mid-epoch with a checkpoint; a run with other settings refuses
    it; SIGTERM (HTCondor eviction) checkpoints and exits 143; the last run finishes."""
    stopped = run_train(short_args(mnist_dir, tmp_path, "--max-steps", "130"), tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 30, 130)
    assert set(ckpt["rng"]) == {"torch", "cuda", "python"} and ckpt["device"] == "cpu"
    assert json.loads((tmp_path / "metrics.json").read_text())["finished"] is False

    other = [*short_args(mnist_dir, tmp_path), "--batch-size", "32"]
    mismatch = run_train(other, tmp_path)
    assert mismatch.returncode == 2
    assert "different settings" in mismatch.stderr
    assert (
        torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)["global_step"]
        == 130
    )

    proc = subprocess.Popen(
        [sys.executable, str(TRAIN), *short_args(mnist_dir, tmp_path, "--checkpoint-every-seconds", "0.05")],
        cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("checkpoint saved"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=60)
    if proc.returncode == 0:  # pragma: no cover - finished before the signal landed
        pytest.fail("the run ended before SIGTERM was handled")
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "checkpoint saved (signal 15)" in rest

    final = run_train(short_args(mnist_dir, tmp_path), tmp_path)
    assert final.returncode == 0, final.stderr
    assert_same_weights(uninterrupted / "model.pt", tmp_path / "model.pt")
    assert_no_temp_files(tmp_path)


# ---- failing clearly ------------------------------------------------------------------


def test_require_cuda_without_a_gpu_exits_3(tmp_path: Path) -> None:
    proc = run_train(["--require-cuda", "--data-dir", str(tmp_path)], tmp_path, hide_cuda=True)
    assert proc.returncode == 3
    assert "CUDA is not available" in proc.stderr
    assert "GPU" in proc.stderr and "driver" in proc.stderr
    assert "12.9" in proc.stderr


def test_gpu_check_without_a_gpu_fails(tmp_path: Path) -> None:
    proc = run_train(["--gpu-check"], tmp_path, hide_cuda=True)
    assert proc.returncode == 3
    assert "cuda available: False" in proc.stdout


def test_missing_data_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = train_mnist.main(["--device", "cpu", "--data-dir", str(tmp_path / "nowhere")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "MNIST raw files not found" in err and "tar xzf" in err


# ---- pieces ---------------------------------------------------------------------------


def write_idx(path: Path, data: bytes, dims: tuple[int, ...], *, gz: bool = False) -> Path:
    raw = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx(tmp_path: Path, gz: bool) -> None:
    data = bytes(range(24))
    path = write_idx(tmp_path / "x-idx3-ubyte", data, (2, 3, 4), gz=gz)
    t = train_mnist.read_idx(path)
    assert t.dtype == torch.uint8 and tuple(t.shape) == (2, 3, 4)
    assert t.flatten().tolist() == list(data)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    short = write_idx(tmp_path / "short", bytes(5), (2, 3))
    with pytest.raises(train_mnist.TrainError, match="expected 6 bytes"):
        train_mnist.read_idx(short)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(train_mnist.TrainError, match="not an IDX file"):
        train_mnist.read_idx(tmp_path / "bad")


def test_loads_gzipped_layout(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 3), ("t10k", 2)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", bytes(n * 784), (n, 28, 28), gz=True)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", bytes(range(n)), (n,), gz=True)
    data = train_mnist.load_mnist(tmp_path)
    assert tuple(data["train_images"].shape) == (3, 28, 28)
    assert data["test_labels"].tolist() == [0, 1] and data["test_labels"].dtype == torch.int64


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    train_mnist.atomic_torch_save({"v": torch.tensor([1])}, target)

    def explode(f: Any) -> None:
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        train_mnist.atomic_write(target, explode)
    assert torch.load(target, weights_only=True)["v"].tolist() == [1]
    assert_no_temp_files(tmp_path)


def test_one_cycle_schedule() -> None:
    lrs = [train_mnist.lr_at(s, 100, 1.0) for s in range(101)]
    assert lrs[0] == pytest.approx(1 / 25)
    assert max(lrs) == pytest.approx(1.0) and lrs.index(max(lrs)) == 15
    assert lrs[-1] == pytest.approx(1e-4)
