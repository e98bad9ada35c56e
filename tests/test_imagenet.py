"""The TF-free TFDS imagenet2012 path, on TFDS mock data (random images of random sizes)."""

import numpy as np
import pytest

from conftest import need

tfds = need("tensorflow_datasets")
need("grain")

from bn_jax import imagenet, streaming  # noqa: E402


@pytest.fixture
def data():
    with tfds.testing.mock_data(num_examples=10):
        yield imagenet.load(crop=32)


def test_tfds_imagenet_is_read_as_a_stream_of_the_1000_classes(data):
    assert data.num_classes == imagenet.NUM_CLASSES and (data.num_train, data.num_test) == (10, 10)
    assert data.image_shape == (32, 32, 3)
    example = data.train[3]
    assert example["image"].ndim == 3 and 0 <= int(example["label"]) < imagenet.NUM_CLASSES


def test_train_batches_are_random_crops_of_the_epoch_order_and_reproducible(data):
    ds = streaming.train_dataset(data, seed=0, batch_size=4, epochs=2, augment=True)
    assert len(ds) == 4  # 2 epochs of 10 // 4 = 2 steps: each epoch's last partial batch dropped
    first = ds[0]
    assert first["image"].shape == (4, 32, 32, 3) and first["image"].dtype == np.uint8
    order = streaming.epoch_order(0, 0, 10)
    assert first["label"].tolist() == [int(data.train[int(i)]["label"]) for i in order[:4]]
    np.testing.assert_array_equal(first["image"], streaming.train_dataset(data, 0, 4, 2, True)[0]["image"])
    assert not np.array_equal(first["image"], streaming.train_dataset(data, 1, 4, 2, True)[0]["image"])
    epoch2 = ds[2]
    assert epoch2["index"].tolist() == [8, 9, 10, 11]
    assert epoch2["label"].tolist() == [int(data.train[int(i)]["label"]) for i in streaming.epoch_order(0, 1, 10)[:4]]


def test_eval_batches_cover_every_example_in_order_with_centre_crops(data):
    ds = streaming.eval_dataset(data, batch_size=4)
    batches = [ds[i] for i in range(len(ds))]
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.tolist() == [1] * 10 + [0] * 2  # padded to whole batches, padding masked
    labels = np.concatenate([b["label"] for b in batches])[:10]
    assert labels.tolist() == [int(data.test[i]["label"]) for i in range(10)]
    np.testing.assert_array_equal(batches[0]["image"][1],
                                  imagenet.eval_crop(np.asarray(data.test[1]["image"]), resize=37, crop=32))


def test_an_unprepared_tfds_imagenet_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(imagenet.DataError, match="not prepared.*tfds build imagenet2012"):
        imagenet.load()
