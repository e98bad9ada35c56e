"""End to end on the real CIFAR-10 JPEGs in ../shared/data (marked slow; CI runs it)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import SHARED_CIFAR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHARED_CIFAR), reason="needs ../shared/data/cifar10-jpg.tar.gz")
def test_bn_only_learns_on_real_cifar10(tmp_path):
    workdir = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.cifar", "--bn_only", "--model", "resnet14", "--epochs", "3",
         "--schedule", "cosine", "--max_train_examples", "15000", "--max_test_examples", "2000",
         "--data_dir", SHARED_CIFAR, "--workdir", workdir],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["trainable_params"] == 1_120
    assert summary["final_test_accuracy"] > 0.2  # chance is 0.1


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHARED_CIFAR), reason="needs ../shared/data/cifar10-jpg.tar.gz")
def test_real_archive_with_16_flipped_bytes_is_refused_not_shrunk(tmp_path):
    # Before: 9,717 of the 10,000 test images loaded, and the run reported accuracy on them.
    from bn_jax import datasets, image_folders
    raw = bytearray(open(SHARED_CIFAR, "rb").read())
    for i in range(len(raw) - 2000, len(raw) - 1984):
        raw[i] ^= 0xFF
    damaged = tmp_path / "cifar10-jpg.tar.gz"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(datasets.DataError, match="cifar10-jpg.tar.gz: unreadable"):
        image_folders.load_image_folder(str(damaged))
