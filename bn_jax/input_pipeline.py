"""Datasets as uint8 arrays in memory (CIFAR fits), and augmentation that runs on the device.

Two sources: a TFDS name (downloaded and cached by TFDS; needs TensorFlow, imported lazily
there only), or an image folder / tarball in the layout ``train/<class>/*.{jpg,png}`` and
``test/<class>/*`` decoded with Pillow, with no TensorFlow at all.
"""

import bz2
import concurrent.futures
import dataclasses
import functools
import gzip
import io
import lzma
import os
import tarfile
import zlib
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from bn_jax import hashing, names

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


_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))
_CORRUPT = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


def _open_archive(path: str):
    """The archive's decompressed bytes. Read to the end, gzip, bzip2 and xz verify their checksums."""
    with open(path, "rb") as f:
        magic = f.read(6)
    opener = next((o for prefix, o in _COMPRESSED if magic.startswith(prefix)), open)
    return opener(path, "rb")


def _read_tar(path: str) -> Dict[str, bytes]:
    """Every file member of the archive, read and checked to the archive's very end.

    ``tarfile`` stops quietly at a header it cannot parse, and a compressed stream is only checked
    when read to its end; either would silently drop images. So this reads past tarfile's end
    (only zero padding may follow) and to the end of the compressed stream.
    """
    member = None
    try:
        with _open_archive(path) as stream:
            tar = tarfile.open(fileobj=stream, mode="r:")
            members = tar.getmembers()
            end = tar.offset
            contents = {}
            for member in (m for m in members if m.isfile()):
                contents[member.name] = tar.extractfile(member).read()
            member = None
            stream.seek(end)
            while chunk := stream.read(1 << 20):
                if chunk.strip(b"\0"):
                    raise DataError(f"{path}: corrupt member header after "
                                    f"{members[-1].name if members else 'the start'}; the members after it "
                                    "cannot be read")
    except _CORRUPT as e:
        where = f"member {member.name}" if member else "archive"
        raise DataError(f"{path}: unreadable {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                        "(not a complete tar, .tar.gz, .tar.bz2 or .tar.xz)") from e
    return contents


def _list_tar(path: str):
    """Index a tarball; one optional top-level folder above train/ and test/ is allowed."""
    files = {split: {} for split in SPLITS}
    tops = set()
    for name, data in _read_tar(path).items():
        parts = name.lstrip("./").split("/")
        top = ""
        if len(parts) == 4 and parts[1] in SPLITS:
            top, parts = parts[0], parts[1:]
        if len(parts) != 3 or parts[0] not in SPLITS:
            raise DataError(f"{path}: unexpected member {name} (expected train/<class>/<image> "
                            "or test/<class>/<image>)")
        tops.add(top)
        split, c, _ = parts
        files[split].setdefault(c, {})[f"{path}:{name}"] = (lambda d=data: d)
    if len(tops) > 1:
        where = ", ".join(f"{t}/" if t else "the archive's top" for t in sorted(tops))
        raise DataError(f"{path}: train/ and test/ found in more than one place ({where}); "
                        "pack one dataset per archive")
    for split in SPLITS:
        if not files[split]:
            raise DataError(f"{path}: no {split}/<class>/ images in the archive")
    return files


def _check_layout(files, path) -> List[str]:
    classes = sorted(files["train"])
    if len(classes) < 2:
        raise DataError(f"{path}: train/ holds {len(classes)} class folder{'s' if len(classes) != 1 else ''} "
                        f"({', '.join(classes) or 'none'}); a classifier needs at least 2")
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

NORMALIZATIONS = names.NORMALIZATIONS
# The paper's code (open_lth datasets/cifar10.py) normalises CIFAR-10 with ImageNet's statistics.
IMAGENET_MEAN_STD = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))


def normalization(kind: str, train_images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) on the 0-1 scale: the training set's own, or ImageNet's."""
    if kind == "imagenet":
        return IMAGENET_MEAN_STD
    if kind == "dataset":
        return channel_stats(train_images)
    raise ValueError(f"unknown normalization {kind!r}; known: {', '.join(NORMALIZATIONS)}")


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
