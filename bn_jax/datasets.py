"""Datasets held in memory as uint8 arrays (CIFAR fits), and what is wrong with bad data.

A ``Dataset`` comes from TFDS (``load_tfds``: downloaded and cached by TFDS; needs TensorFlow,
imported there only), from an image folder or archive (``bn_jax.image_folders``), or as noise of
a given shape for checks (``random_dataset``). ``train.open_data`` picks the source a run names.
"""

import dataclasses
from typing import Dict, List, Optional

import numpy as np

from bn_jax import hashing

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
    """Bad input data; the message names the offending file or folder."""


@dataclasses.dataclass
class Dataset:
    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def image_shape(self):
        return self.train_images.shape[1:]

    def class_counts(self) -> Dict[str, Dict[str, int]]:
        """Images per class in each split (logged and saved in summary.json: nothing lost unseen)."""
        return {split: dict(zip(self.class_names, np.bincount(labels, minlength=self.num_classes).tolist()))
                for split, labels in (("train", self.train_labels), ("test", self.test_labels))}

    def fingerprint(self) -> str:
        """What ties a checkpoint to these data: a hash of every array (the files may move)."""
        return hashing.hash_arrays([("train_images", self.train_images), ("train_labels", self.train_labels),
                                    ("test_images", self.test_images), ("test_labels", self.test_labels)])

    def describe(self) -> str:
        def one(split, counts):
            values = set(counts.values())
            per = f"{values.pop():,} per class" if len(values) == 1 else \
                ", ".join(f"{c} {n:,}" for c, n in counts.items())
            return f"{split} {sum(counts.values()):,} ({per})"
        return f"{self.num_classes} classes; " + "; ".join(one(s, c) for s, c in self.class_counts().items())

    def subset(self, max_train: Optional[int], max_test: Optional[int]) -> "Dataset":
        """A fixed random subset (independent of the run's seed, so every run sees the same)."""
        def take(images, labels, n):
            if n is None or n >= len(labels):
                return images, labels
            keep = np.sort(np.random.default_rng(0).permutation(len(labels))[:n])
            return images[keep], labels[keep]
        return Dataset(*take(self.train_images, self.train_labels, max_train),
                       *take(self.test_images, self.test_labels, max_test), self.class_names)


def random_dataset(n_train=256, n_test=64, num_classes=10, size=32, seed=0) -> Dataset:
    """Uniform-noise images and labels: for checks and tests that need data of a shape, not content."""
    rng = np.random.default_rng(seed)
    return Dataset(rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8),
                   rng.integers(0, num_classes, n_train).astype(np.int32),
                   rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8),
                   rng.integers(0, num_classes, n_test).astype(np.int32),
                   [f"class{i}" for i in range(num_classes)])


def load_tfds(name: str) -> Dataset:
    try:
        import tensorflow_datasets as tfds
        import tensorflow  # noqa: F401  (tfds.load needs it; only this path does)
    except ImportError as e:
        raise DataError(f"loading {name!r} through TFDS needs tensorflow and tensorflow-datasets "
                        f"({e}); install them (pip install tensorflow) or pass --data_dir "
                        "with an image folder or .tar.gz") from e
    builder = tfds.builder(name)
    builder.download_and_prepare()
    arrays = {split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
              for split in SPLITS}
    names = builder.info.features["label"].names
    (tri, trl), (tei, tel) = arrays["train"], arrays["test"]
    return Dataset(tri.astype(np.uint8), trl.astype(np.int32), tei.astype(np.uint8),
                   tel.astype(np.int32), list(names))
