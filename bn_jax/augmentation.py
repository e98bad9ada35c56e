"""What runs on the device to every batch: normalisation and the paper's augmentation (random
crop after zero padding, horizontal flip), and each epoch's order drawn there."""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax import names

# The paper's code (open_lth datasets/cifar10.py) normalises CIFAR-10 with ImageNet's statistics.
IMAGENET_MEAN_STD = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))


def channel_stats(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the training images, on the 0-1 scale."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return x.mean(0).astype(np.float32), x.std(0).astype(np.float32)


# --normalize: (mean, std) from the training images (None where a dataset streams)
NORMALIZERS = {"dataset": channel_stats, "imagenet": lambda train_images: IMAGENET_MEAN_STD}
names.check_keys(NORMALIZERS, names.NORMALIZATIONS, "augmentation.NORMALIZERS")


def normalization(kind: str, train_images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) on the 0-1 scale: the training set's own, or ImageNet's."""
    if kind not in NORMALIZERS:
        raise ValueError(f"unknown normalization {kind!r}; known: {', '.join(NORMALIZERS)}")
    return NORMALIZERS[kind](train_images)


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
