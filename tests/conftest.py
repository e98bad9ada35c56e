import os
import tempfile

# One persistent XLA compilation cache for the whole session, in-process and in subprocesses
# (they inherit the environment): many tests compile the same small ResNet programs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="bn_jax_xla_cache_"))

import numpy as np
import pytest
from PIL import Image

from bn_jax import datasets

# CI's Python 3.11 leg installs PyTorch (.ci/run): there a missing torch must fail the PyTorch
# tests, not skip them. Its Python 3.12 leg has no CPU build of torch and says so.
TORCH_REQUIRED = bool(os.environ.get("CI")) and not os.environ.get("BN_JAX_WITHOUT_TORCH")



def need(module: str):
    """``module``, or skip the test where it is not installed; under CI, which installs it, fail."""
    if os.environ.get("CI"):
        import importlib
        return importlib.import_module(module)
    return pytest.importorskip(module)


SHARED_CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-jpg.tar.gz")


random_dataset = datasets.random_dataset


def write_image_folder(root, classes=("cat", "dog", "frog"), per_class=(6, 2), size=8, fmt="png", seed=0):
    """A tiny image-folder dataset whose pixels encode (split, class, index), for exact checks."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(os.path.join(root, split, c, f"{i:04d}.{fmt}"))
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(str(tmp_path / "data"))
