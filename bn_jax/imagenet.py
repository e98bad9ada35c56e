"""ImageNet input without TensorFlow: the folder layout and TFDS ``imagenet2012``.

Two random-access sources of {"image", "label"} examples:

* ``FolderSource``: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``, as open_lth and
  torchvision read ImageNet; classes in sorted order. ``folder_sources`` checks the layout
  first (both splits, classes present, the same classes in each) and names what is wrong.
* TFDS: a prepared ``imagenet2012`` through ``tfds.data_source``, which (unlike
  ``tfds.load``) needs no TensorFlow. Preparing it (TFDS's manual download, then ``tfds build
  --file_format array_record``, the format random access reads) is done once elsewhere.

Decoding converts grayscale, CMYK and palette images to RGB; a file that does not decode is a
DataError naming it. Augmentation is the paper's code base's (open_lth ``imagenet``):
RandomResizedCrop(224, scale 0.1–1, ratio 0.8–1.25) and a horizontal flip for training; shorter
side to 256 and the centre 224 crop for evaluation. Images stay uint8 (normalised on the device).

``load`` wraps either as a ``bn_jax.streaming.StreamData``, which ``python -m experiments.imagenet``
trains on through grain.
"""

import functools
import hashlib
import math
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from bn_jax.names import DEFAULT_IMAGE_SIZE
from bn_jax import image_folders, images
from bn_jax.datasets import IMAGE_SUFFIXES, DataError
from bn_jax.streaming import StreamData, UnreadableFile

RESIZE, CROP = 256, DEFAULT_IMAGE_SIZE
NUM_CLASSES = 1000
SPLITS = ("train", "val")
SCALE, RATIO = (0.1, 1.0), (0.8, 1.25)  # open_lth's RandomResizedCrop for ImageNet


class FolderSource:
    """One split of an ImageNet-style folder: ``(path, label)`` records in sorted order.

    The 1.28M names are one bytes buffer with offsets and the labels one array, so that the
    source pickles to each grain worker process as a few buffers, not a million Python objects."""

    def __init__(self, root: str, split: str, classes: List[str]):
        self.root, self.split, self.classes = root, split, classes
        names, labels = [], []
        for label, c in enumerate(classes):
            for f in sorted(os.listdir(os.path.join(root, split, c))):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    names.append(f"{c}/{f}".encode())
                    labels.append(label)
        self._names = b"".join(names)
        self._ends = np.cumsum([len(n) for n in names], dtype=np.int64)
        self.labels = np.array(labels, np.int32)

    def path(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i else 0
        return os.path.join(self.root, self.split, self._names[start:int(self._ends[i])].decode())

    @property
    def records(self) -> List[Tuple[str, int]]:
        return [(self.path(i), int(label)) for i, label in enumerate(self.labels)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Dict[str, object]:
        return {"image": decode(self.path(i)), "label": int(self.labels[i])}

    def __repr__(self) -> str:
        return f"FolderSource({self.root!r}, {self.split!r}, {len(self.classes)} classes)"


def _classes(root: str, split: str) -> List[str]:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"{root}: missing folder {split}/ (expected train/<class>/*.JPEG and val/<class>/*.JPEG)")
    classes = sorted(c for c in os.listdir(folder) if os.path.isdir(os.path.join(folder, c)))
    if not classes:
        raise DataError(f"{folder}: no class folders")
    image_folders.check_distinct_classes(classes, f"{folder}:")
    empty = [c for c in classes if not any(f.lower().endswith(IMAGE_SUFFIXES)
                                           for f in os.listdir(os.path.join(folder, c)))]
    if empty:
        raise DataError(f"{os.path.join(folder, empty[0])}: no images (.JPEG, .jpg or .png)"
                        + (f", and {len(empty) - 1} more empty classes" if len(empty) > 1 else ""))
    return classes


def folder_sources(root: str) -> Tuple[FolderSource, FolderSource]:
    """(train, val) sources of an ImageNet-style folder; DataError naming what is wrong."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    train, val = (_classes(root, split) for split in SPLITS)
    if train != val:
        only = sorted(set(train) ^ set(val))
        raise DataError(f"{root}: train/ and val/ hold different classes ({len(only)} in one only, e.g. {only[0]})")
    return FolderSource(root, "train", train), FolderSource(root, "val", train)


def decode(path: str) -> np.ndarray:
    """An image file as uint8 RGB (grayscale, CMYK, palette and alpha converted); a file that
    does not decode, or is truncated, is a DataError naming it. A file that cannot be read at all
    (missing, an I/O error of the disk or network filesystem) is an UnreadableFile: not a bad
    image to step over, but a fault that must stop the run."""
    try:
        with Image.open(path) as image:
            images.check_size(image, path)
            image.load()  # (decodes everything: a truncated JPEG fails here, not later)
            return images.to_rgb(image, path)
    except DataError:
        raise
    except OSError as e:
        if e.errno is not None:  # (PIL's decode errors carry no errno; the operating system's do)
            raise UnreadableFile(f"{path}: cannot read ({e.strerror or e})") from None
        raise DataError(f"{path}: cannot decode ({e})") from None
    except (ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode ({e})") from None


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int = CROP,
                        scale=SCALE, ratio=RATIO) -> np.ndarray:
    """torchvision's RandomResizedCrop: a box of random area (``scale`` of the image) and aspect
    ratio (log-uniform in ``ratio``), resized to ``size``²; after 10 misses, the centre crop of
    the nearest allowed ratio. Then a horizontal flip with probability 1/2."""
    h, w = image.shape[:2]
    box = None
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        bw, bh = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < bw <= w and 0 < bh <= h:
            top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            box = (left, top, left + bw, top + bh)
            break
    if box is None:
        aspect = min(max(w / h, ratio[0]), ratio[1])
        bw, bh = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
        bw, bh = min(bw, w), min(bh, h)
        box = ((w - bw) // 2, (h - bh) // 2, (w - bw) // 2 + bw, (h - bh) // 2 + bh)
    out = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))
    return out[:, ::-1] if rng.random() < 0.5 else out


def eval_crop(image: np.ndarray, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """Shorter side to ``resize``, then the centre ``crop``² (an image smaller than that is enlarged)."""
    image = resize_shorter(image, max(resize, crop))
    h, w = image.shape[:2]
    return image[(h - crop) // 2:(h - crop) // 2 + crop, (w - crop) // 2:(w - crop) // 2 + crop]


def _tfds_source(split: str, data_dir: Optional[str]):
    try:
        import tensorflow_datasets as tfds
        # download=False: ImageNet is a manual download, and an unprepared one must not start a build
        return tfds.data_source("imagenet2012", split=split, data_dir=data_dir, download=False)
    except ImportError as e:
        raise DataError(f"reading TFDS imagenet2012 needs tensorflow-datasets ({e})") from None
    except Exception as e:  # noqa: BLE001  (TFDS raises several types for an unprepared dataset)
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        raise DataError(f"TFDS imagenet2012 is not prepared in {where} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}); prepare it once, in the array_record "
                        "format that random access needs: tfds build imagenet2012 --manual_dir DIR "
                        "--file_format array_record; or pass --data_dir with train/<wnid>, val/<wnid> "
                        "folders") from None


def load(data_dir: Optional[str] = None, crop: int = CROP) -> StreamData:
    """ImageNet as a streamed dataset: the folder at ``data_dir``, else TFDS imagenet2012 (from
    ``$TFDS_DATA_DIR`` or TFDS's default folder). DataError naming what is wrong."""
    prepare_train = functools.partial(random_resized_crop, size=crop)
    prepare_test = functools.partial(eval_crop, resize=round(crop * RESIZE / CROP), crop=crop)
    if data_dir:
        train, val = folder_sources(data_dir)
        h = hashlib.sha256()  # the file list: relative names and labels (the data may move)
        for src in (train, val):
            h.update(src._names + b"|" + src._ends.tobytes() + src.labels.tobytes())
        fingerprint = h.hexdigest()
        labels = (train.labels, val.labels)
        return StreamData(data_dir, train, val, train.classes, (crop, crop, 3), prepare_train, prepare_test,
                          fingerprint_text=fingerprint, labels=labels)
    tfds_dir = os.environ.get("TFDS_DATA_DIR")  # (TFDS itself reads it once, at import)
    train, val = _tfds_source("train", tfds_dir), _tfds_source("validation", tfds_dir)
    import tensorflow_datasets as tfds
    info = tfds.builder("imagenet2012", data_dir=tfds_dir).info
    names = list(info.features["label"].names)
    return StreamData("imagenet2012 (TFDS)", train, val, names, (crop, crop, 3), prepare_train, prepare_test,
                      fingerprint_text=f"tfds imagenet2012 {info.version} {len(train)} {len(val)}")


def resize_shorter(image: np.ndarray, size: int = RESIZE) -> np.ndarray:
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))  # PIL takes (width, height)
    return np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))
