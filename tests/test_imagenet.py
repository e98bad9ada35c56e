"""The TF-free imagenet2012 path on TFDS mock data (random images of random sizes)."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from bn_jax import imagenet  # noqa: E402


@pytest.fixture
def src():
    with tfds.testing.mock_data(num_examples=10):
        yield imagenet.source("train")


def test_train_batches_are_cropped_shuffled_and_reproducible(src):
    first = list(imagenet.batches(src, 4, seed=0, epoch=0, crop=32))
    assert [b[0].shape for b in first] == [(4, 32, 32, 3)] * 2  # 10 examples: last partial batch dropped
    assert all(b[0].dtype == np.uint8 and b[1].dtype == np.int32 for b in first)
    assert all(((0 <= b[1]) & (b[1] < imagenet.NUM_CLASSES)).all() for b in first)
    again = list(imagenet.batches(src, 4, seed=0, epoch=0, crop=32))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    other = list(imagenet.batches(src, 4, seed=0, epoch=1, crop=32))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_eval_batches_cover_every_example_in_order_with_centre_crops(src):
    batches = list(imagenet.batches(src, 4, seed=0, epoch=0, train=False))
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    assert batches[0][0].shape[1:] == (224, 224, 3)
    labels = np.concatenate([labels for _, labels in batches])
    assert labels.tolist() == [int(src[i]["label"]) for i in range(10)]
    expected = imagenet.resize_shorter(np.asarray(src[0]["image"]))
    h, w = expected.shape[:2]
    assert min(h, w) == 256
    np.testing.assert_array_equal(batches[0][0][0], expected[(h - 224) // 2:(h - 224) // 2 + 224,
                                                               (w - 224) // 2:(w - 224) // 2 + 224])
