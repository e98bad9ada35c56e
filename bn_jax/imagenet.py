"""ImageNet (TFDS ``imagenet2012``) batches without TensorFlow, through ``tfds.data_source``.

``tfds.load`` needs TensorFlow; ``tfds.data_source`` reads the prepared ArrayRecord files with
random access and does not, so it suits a JAX-only environment. Preparing imagenet2012 itself
(TFDS's manual download of the ILSVRC tars, then ``tfds build``) is done once elsewhere.
Preprocessing is the standard ResNet one: shorter side to 256, then a random 224 crop and
horizontal flip for training, or the centre crop for evaluation; images stay uint8 (normalise
on the device as input_pipeline.normalize does).

Not wired into train.py yet: the epoch loop there holds CIFAR in memory and is being rewritten;
a streaming loop can consume ``batches`` directly.
"""

from typing import Iterator, Optional, Tuple

import numpy as np
from PIL import Image

RESIZE, CROP = 256, 224
NUM_CLASSES = 1000


def source(split: str, data_dir: Optional[str] = None):
    """Random-access examples {"image": uint8 HWC, "label": int} of a prepared imagenet2012 split."""
    import tensorflow_datasets as tfds
    return tfds.data_source("imagenet2012", split=split, data_dir=data_dir)


def resize_shorter(image: np.ndarray, size: int = RESIZE) -> np.ndarray:
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))  # PIL takes (width, height)
    return np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))


def preprocess(image: np.ndarray, rng: np.random.Generator, train: bool, crop: int = CROP) -> np.ndarray:
    image = resize_shorter(image, max(crop, round(crop * RESIZE / CROP)))
    h, w = image.shape[:2]
    if train:
        top, left = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
    else:
        top, left = (h - crop) // 2, (w - crop) // 2
    out = image[top:top + crop, left:left + crop]
    return out[:, ::-1] if train and rng.random() < 0.5 else out


def batches(src, batch_size: int, seed: int, epoch: int, train: bool = True,
            crop: int = CROP) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(uint8 images (B, crop, crop, 3), int32 labels (B,)): a shuffled epoch (a function of seed
    and epoch) without its last partial batch for training; every example in order for evaluation."""
    n = len(src)
    order = np.random.default_rng([seed, epoch]).permutation(n) if train else np.arange(n)
    rng = np.random.default_rng([seed, epoch, 1])
    stop = n - n % batch_size if train else n
    for start in range(0, stop, batch_size):
        examples = [src[int(i)] for i in order[start:start + batch_size]]
        images = np.stack([preprocess(np.asarray(e["image"]), rng, train, crop) for e in examples])
        yield images, np.array([e["label"] for e in examples], np.int32)
