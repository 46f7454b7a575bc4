#!/usr/bin/env python3
"""Run ``train_mnist.py`` and the classic-example baseline for N epochs; print a markdown table.

Both run as subprocesses of the same interpreter on the same device, one after the other,
from a scratch directory (so no checkpoint is resumed). Times are training time summed
over epochs (evaluation excluded, the same definition in both scripts); wall time is the
whole process, start-up and data loading included. The ratio is baseline / train_mnist.

    python benchmarks/mnist_compare.py --epochs 20 --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


def unpacked(data_dir: Path, work: Path) -> Path:
    """``data_dir`` if it holds ``MNIST/raw``, else where the repo's
    ``MNIST_data.tar.gz`` unpacks in ``work`` (as bootstrap.sh does in a job)."""
    if (data_dir / "MNIST" / "raw").is_dir():
        return data_dir
    archive = data_dir / "MNIST_data.tar.gz"
    if not archive.is_file():
        raise SystemExit(f"mnist_compare: neither {data_dir}/MNIST/raw nor {archive} exists")
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    for root in (work / "data", work):  # the repo's archive holds data/MNIST/raw/
        if (root / "MNIST" / "raw").is_dir():
            return root
    raise SystemExit(f"mnist_compare: {archive} holds no MNIST/raw/ directory")


def run(cmd: list[str], cwd: Path) -> float:
    """Run ``cmd`` streaming its output; return its wall time. Raises on failure."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True)
    return time.perf_counter() - t0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=ROOT / "data",
        help="holds MNIST/raw/ or MNIST_data.tar.gz (unpacked into a scratch dir)",
    )
    p.add_argument("--train-args", default="", help="extra arguments for train_mnist.py (quoted)")
    args = p.parse_args(argv)
    data_dir = args.data_dir.resolve()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mnist-compare-") as tmp:
        work = Path(tmp)
        data_dir = unpacked(data_dir, work)
        fast_json, base_json = work / "fast.json", work / "baseline.json"
        fast_cmd = [
            sys.executable,
            str(ROOT / "train_mnist.py"),
            "--data-dir",
            str(data_dir),
            "--epochs",
            str(args.epochs),
            "--device",
            args.device,
            "--checkpoint",
            str(work / "ckpt.pt"),
            "--json-metrics",
            str(fast_json),
            *args.train_args.split(),
        ]
        base_cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "mnist_baseline.py"),
            "--data-dir",
            str(data_dir),
            "--epochs",
            str(args.epochs),
            "--device",
            args.device,
            "--json",
            str(base_json),
        ]
        for name, cmd, out in (
            ("train_mnist.py", fast_cmd, fast_json),
            ("baseline (classic example)", base_cmd, base_json),
        ):
            wall = run(cmd, work)
            report = json.loads(out.read_text())
            report["wall_s"] = wall
            results[name] = report
    fast, base = results["train_mnist.py"], results["baseline (classic example)"]
    device = fast["device"][-1] if isinstance(fast["device"], list) else fast["device"]
    print()
    print(f"MNIST, {args.epochs} epoch(s), {device}")
    print()
    print("| script | train time (s) | per epoch (s) | wall (s) | final test acc |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(
            f"| {name} | {r['train_time_s']:.2f} | {r['train_time_s'] / args.epochs:.2f} "
            f"| {r['wall_s']:.2f} | {100 * r['final_test_accuracy']:.2f}% |"
        )
    print(
        f"| **ratio baseline / train_mnist** | **{base['train_time_s'] / fast['train_time_s']:.2f}x** "
        f"| | **{base['wall_s'] / fast['wall_s']:.2f}x** | |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
