#!/usr/bin/env python3
"""Baseline: MNIST trained the way the classic PyTorch example does it.

The reference point for ``train_mnist.py``'s speed: the same data, trained like
``pytorch/examples/mnist/main.py`` — its ``Net`` (2 conv + 2 fc, dropout, log-softmax),
a ``Dataset`` that transforms one sample at a time, a ``DataLoader`` (batch 64, shuffled,
one worker and pinned memory on CUDA), fp32, Adadelta (lr 1.0) with StepLR (gamma 0.7),
and ``loss.item()`` every 10 batches, as the example's ``log_interval`` logging does
(the reported train loss is the mean of those samples).

It is torchvision-free: the per-sample transform is ToTensor + Normalize written out on
the IDX tensors, without the PIL round trip the original does, so if anything this
baseline is a little faster than the real example.

Prints a table of epoch times and test accuracy; ``--json PATH`` writes them as JSON
with the same shape as ``train_mnist.py --json-metrics`` (``epochs`` list).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_mnist import MNIST_MEAN, MNIST_STD, TrainError, load_mnist


class Net(nn.Module):
    """The classic example's network, unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


class IdxMNIST(Dataset):
    """One (image, label) at a time, transformed per sample like ToTensor + Normalize."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        img = self.images[i].unsqueeze(0).float().div(255.0)
        return (img - MNIST_MEAN) / MNIST_STD, int(self.labels[i])


def train_epoch(model, device, loader, optimizer, log_interval: int = 10) -> float:
    """One epoch; like the example, reads loss.item() every ``log_interval`` batches."""
    model.train()
    logged: list[float] = []
    for batch_idx, (data, target) in enumerate(loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        if batch_idx % log_interval == 0:
            logged.append(loss.item())
    return sum(logged) / len(logged)


def test(model, device, loader):
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for data, target in loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            loss += F.nll_loss(output, target, reduction="sum").item()
            correct += output.argmax(dim=1).eq(target).sum().item()
    n = len(loader.dataset)
    return loss / n, correct / n


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--test-batch-size", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = p.parse_args(argv)

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        print("ERROR: --device cuda but CUDA is not available", file=sys.stderr)
        return 3
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.manual_seed(args.seed)
    try:
        data = load_mnist(args.data_dir)
    except TrainError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    train_kwargs: dict = {"batch_size": args.batch_size, "shuffle": True}
    test_kwargs: dict = {"batch_size": args.test_batch_size}
    if use_cuda:
        train_kwargs.update(num_workers=1, pin_memory=True)
        test_kwargs.update(num_workers=1, pin_memory=True)
    train_loader = DataLoader(IdxMNIST(data["train_images"], data["train_labels"]), **train_kwargs)
    test_loader = DataLoader(IdxMNIST(data["test_images"], data["test_labels"]), **test_kwargs)

    model = Net().to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)
    name = torch.cuda.get_device_name(device) if use_cuda else "cpu"
    print(
        f"baseline (classic example) | torch {torch.__version__} | {name} | {torch.get_num_threads()} threads"
    )
    print("| epoch | train s | img/s | train loss | test acc |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    history = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        train_loss = train_epoch(model, device, train_loader, optimizer)
        if use_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        test_loss, acc = test(model, device, test_loader)
        scheduler.step()
        n = len(train_loader.dataset)
        history.append(
            {
                "epoch": epoch,
                "time_s": round(dt, 4),
                "images_per_s": round(n / dt, 1),
                "train_loss": train_loss,
                "test_loss": test_loss,
                "test_accuracy": acc,
            }
        )
        print(
            f"| {epoch} | {dt:.2f} | {n / dt:.0f} | {train_loss:.4f} | {100 * acc:.2f}% |",
            flush=True,
        )
    total = sum(h["time_s"] for h in history)
    print(
        f"total train time {total:.2f} s | final test accuracy {100 * history[-1]['test_accuracy']:.2f}%"
    )
    if args.json:
        report = {
            "device": name,
            "torch": torch.__version__,
            "epochs": history,
            "final_test_accuracy": history[-1]["test_accuracy"],
            "train_time_s": total,
        }
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
