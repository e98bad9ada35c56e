"""Datasets as uint8 arrays in memory (CIFAR fits), and augmentation that runs on the device.

Two sources: a TFDS name (downloaded and cached by TFDS; needs TensorFlow, imported lazily
there only), or an image folder / tarball in the layout ``train/<class>/*.{jpg,png}`` and
``test/<class>/*`` decoded with Pillow, with no TensorFlow at all.
"""

import concurrent.futures
import dataclasses
import functools
import io
import os
import tarfile
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

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

    def subset(self, max_train: Optional[int], max_test: Optional[int]) -> "Dataset":
        """A fixed random subset (independent of the run's seed, so every run sees the same)."""
        def take(images, labels, n):
            if n is None or n >= len(labels):
                return images, labels
            keep = np.sort(np.random.default_rng(0).permutation(len(labels))[:n])
            return images[keep], labels[keep]
        return Dataset(*take(self.train_images, self.train_labels, max_train),
                       *take(self.test_images, self.test_labels, max_test), self.class_names)


def load(dataset: str = "cifar10", data_dir: Optional[str] = None) -> Dataset:
    if data_dir:
        return load_image_folder(data_dir)
    return load_tfds(dataset)


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


def load_image_folder(path: str) -> Dataset:
    """Read ``train/<class>/*`` and ``test/<class>/*`` from a folder or a .tar/.tar.gz."""
    if not os.path.exists(path):
        raise DataError(f"data path does not exist: {path}")
    files = _list_tar(path) if os.path.isfile(path) else _list_folder(path)
    classes = _check_layout(files, path)
    splits = {}
    for split in SPLITS:
        items = [(c, name, read) for c in classes for name, read in sorted(files[split][c].items())]
        images = _decode_all([(name, read) for _, name, read in items])
        labels = np.array([classes.index(c) for c, _, _ in items], np.int32)
        splits[split] = (images, labels)
    return Dataset(*splits["train"], *splits["test"], classes)


def _list_folder(root: str) -> Dict[str, Dict[str, Dict[str, callable]]]:
    files = {}
    for split in SPLITS:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise DataError(f"{root}: missing folder {split}/ (expected train/<class>/*.jpg and test/<class>/*.jpg)")
        files[split] = {}
        for c in sorted(os.listdir(split_dir)):
            class_dir = os.path.join(split_dir, c)
            if not os.path.isdir(class_dir):
                raise DataError(f"{class_dir}: expected a class folder, found a file")
            files[split][c] = {os.path.join(class_dir, f): _file_reader(os.path.join(class_dir, f))
                               for f in os.listdir(class_dir)}
    return files


def _file_reader(path):
    def read():
        with open(path, "rb") as f:
            return f.read()
    return read


def _list_tar(path: str):
    """Index a tarball; an optional single top-level folder above train/ and test/ is allowed."""
    try:
        tar = tarfile.open(path)
        members = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable folder or tar archive ({e})") from e
    contents = {}
    for m in members:
        f = tar.extractfile(m)
        contents[m.name] = f.read()
    files = {split: {} for split in SPLITS}
    for name, data in contents.items():
        parts = name.lstrip("./").split("/")
        if len(parts) == 4 and parts[1] in SPLITS:
            parts = parts[1:]
        if len(parts) != 3 or parts[0] not in SPLITS:
            raise DataError(f"{path}: unexpected member {name} (expected train/<class>/<image> "
                            "or test/<class>/<image>)")
        split, c, _ = parts
        files[split].setdefault(c, {})[f"{path}:{name}"] = (lambda d=data: d)
    for split in SPLITS:
        if not files[split]:
            raise DataError(f"{path}: no {split}/<class>/ images in the archive")
    return files


def _check_layout(files, path) -> List[str]:
    classes = sorted(files["train"])
    if not classes:
        raise DataError(f"{path}: train/ holds no class folders")
    if sorted(files["test"]) != classes:
        raise DataError(f"{path}: train/ classes {classes} differ from test/ classes {sorted(files['test'])}")
    for split in SPLITS:
        for c in classes:
            if not files[split][c]:
                raise DataError(f"{path}: class folder {split}/{c} is empty")
            for name in files[split][c]:
                if not name.lower().endswith(IMAGE_SUFFIXES):
                    raise DataError(f"{name}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
    return classes


def _decode(name: str, read) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(read())) as img:
            return np.asarray(img.convert("RGB"), np.uint8)
    except Exception as e:  # Pillow raises several types for corrupt data
        raise DataError(f"{name}: cannot decode image ({e})") from e


def _decode_all(items: List[Tuple[str, callable]]) -> np.ndarray:
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda item: _decode(*item), items))
    first = images[0].shape
    for (name, _), img in zip(items, images):
        if img.shape != first:
            raise DataError(f"{name}: image size {img.shape[:2]} differs from {first[:2]} of {items[0][0]}")
    return np.stack(images)


# ---- on the device --------------------------------------------------------------------------

def channel_stats(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the training images, on the 0-1 scale."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return x.mean(0).astype(np.float32), x.std(0).astype(np.float32)


def normalize(images, mean, std):
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def augment(key, images, pad: int = 4):
    """Random crop after zero padding by ``pad`` pixels, and random horizontal flip."""
    n, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * pad + 1)
    crops = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (n,))
    return jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)


@functools.partial(jax.jit, static_argnums=2)
def epoch_order(key, epoch, n: int):
    """The training order of one epoch, drawn on the device: a pure function of (key, epoch), so a
    resume replays it and the host never shuffles or copies indices."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)
