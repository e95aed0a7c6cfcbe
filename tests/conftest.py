"""Shared fixtures: where the offline test data lives. Module-specific fixtures stay in their test files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _cifar10_jpeg_dir() -> Path | None:
    candidates = [os.environ.get("PROTOCLR_CIFAR10_JPEG", ""), REPO.parent / "shared/datasets/cifar10-jpeg"]
    for c in candidates:
        if c and (Path(c) / "train.zip").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist")
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def cifar10_jpeg_dir() -> Path:
    d = _cifar10_jpeg_dir()
    if d is None:
        pytest.skip("CIFAR-10 JPEG copy not found beside the repo (../shared/datasets/cifar10-jpeg)")
    return d
