"""Image folders and archives as in-memory datasets, with no TensorFlow: the layout
``train/<class>/*.{jpg,png}`` and ``test/<class>/*`` in a folder or a .tar/.tar.gz/.tar.bz2/.tar.xz,
decoded with Pillow; every image checked, every archive read to its end.
"""

import bz2
import concurrent.futures
import gzip
import io
import lzma
import os
import tarfile
import zlib
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from bn_jax import images
from bn_jax.datasets import IMAGE_SUFFIXES, SPLITS, DataError, Dataset


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
    check_distinct_classes(classes, f"{path}: train/")
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
            images.check_size(img, name)
            img.load()
            return images.to_rgb(img, name)
    except DataError:
        raise
    except Exception as e:  # Pillow raises several types for corrupt data
        raise DataError(f"{name}: cannot decode image ({e})") from e


def check_distinct_classes(classes: List[str], where: str) -> None:
    """Class folders that differ only in case are one class to a person, two to a classifier: refuse them."""
    seen = {}
    for c in classes:
        if c.lower() in seen:
            raise DataError(f"{where} class folders {seen[c.lower()]} and {c} differ only in case; merge or rename one")
        seen[c.lower()] = c


def _decode_all(items: List[Tuple[str, callable]]) -> np.ndarray:
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda item: _decode(*item), items))
    first = images[0].shape
    for (name, _), img in zip(items, images):
        if img.shape != first:
            raise DataError(f"{name}: image size {img.shape[:2]} differs from {first[:2]} of {items[0][0]}")
    return np.stack(images)
