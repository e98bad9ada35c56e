import os
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from bn_jax import augmentation, image_folders
from bn_jax.datasets import DataError

from conftest import write_image_folder


def expected_arrays(root, split):
    """Re-read the folder independently with Pillow, in sorted class/file order."""
    images, labels = [], []
    for label, c in enumerate(sorted(os.listdir(os.path.join(root, split)))):
        for f in sorted(os.listdir(os.path.join(root, split, c))):
            images.append(np.asarray(Image.open(os.path.join(root, split, c, f)).convert("RGB")))
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_image_folder_is_read_exactly(image_folder):
    data = image_folders.load_image_folder(image_folder)
    assert data.class_names == ["cat", "dog", "frog"]
    for split in ("train", "test"):
        images, labels = expected_arrays(image_folder, split)
        np.testing.assert_array_equal(getattr(data, f"{split}_images"), images)
        np.testing.assert_array_equal(getattr(data, f"{split}_labels"), labels)
    assert data.train_images.dtype == np.uint8 and data.train_images.shape == (18, 8, 8, 3)


def test_tarball_gives_the_same_arrays_as_the_folder(image_folder, tmp_path):
    archive = str(tmp_path / "data.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(os.path.join(image_folder, "train"), arcname="train")
        tar.add(os.path.join(image_folder, "test"), arcname="test")
    a = image_folders.load_image_folder(image_folder)
    b = image_folders.load_image_folder(archive)
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.class_names == b.class_names


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folders.load_image_folder(str(tmp_path / "nope"))


def test_missing_split(image_folder):
    os.rename(os.path.join(image_folder, "test"), os.path.join(image_folder, "val"))
    with pytest.raises(DataError, match="missing folder test/"):
        image_folders.load_image_folder(image_folder)


def test_empty_class(image_folder):
    os.makedirs(os.path.join(image_folder, "train", "zebra"))
    os.makedirs(os.path.join(image_folder, "test", "zebra"))
    with pytest.raises(DataError, match="train/zebra is empty"):
        image_folders.load_image_folder(image_folder)


def test_class_folders_differing_only_in_case_are_one_error(image_folder):
    import shutil
    for split in ("train", "test"):  # (before: Dog and dog became two classes)
        shutil.copytree(os.path.join(image_folder, split, "dog"), os.path.join(image_folder, split, "Dog"))
    with pytest.raises(DataError, match="class folders Dog and dog differ only in case"):
        image_folders.load_image_folder(image_folder)


def test_a_sixteen_bit_grey_png_trains_on_its_values(image_folder):
    import numpy as np
    from PIL import Image
    grey = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(grey).save(os.path.join(image_folder, "train", "dog", "0000.png"))
    data = image_folders.load_image_folder(image_folder)
    image = data.train_images[list(data.train_labels).index(1)]  # dog's first
    assert (image[..., 1] == grey // 256).all()


def test_undecodable_image_is_named(image_folder):
    bad = os.path.join(image_folder, "train", "dog", "0003.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(DataError, match="0003.png: cannot decode"):
        image_folders.load_image_folder(image_folder)


def test_mixed_sizes_are_named(image_folder):
    odd = os.path.join(image_folder, "test", "frog", "0001.png")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(odd)
    with pytest.raises(DataError, match="0001.png: image size"):
        image_folders.load_image_folder(image_folder)


def test_wrong_layout_file_in_split(image_folder):
    with open(os.path.join(image_folder, "train", "stray.jpg"), "wb") as f:
        f.write(b"x")
    with pytest.raises(DataError, match="expected a class folder"):
        image_folders.load_image_folder(image_folder)


def test_class_sets_must_agree(image_folder):
    os.rename(os.path.join(image_folder, "test", "frog"), os.path.join(image_folder, "test", "toad"))
    with pytest.raises(DataError, match="differ"):
        image_folders.load_image_folder(image_folder)


def test_not_an_archive(tmp_path):
    path = tmp_path / "data.tar.gz"
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="data.tar.gz: unreadable archive") as e:
        image_folders.load_image_folder(str(path))
    assert "\n" not in str(e.value)


def pack(image_folder, archive, mode="w:gz", tops=("",)):
    with tarfile.open(archive, mode) as tar:
        for top in tops:
            for split in ("train", "test"):
                tar.add(os.path.join(image_folder, split), arcname=os.path.join(top, split))
    return archive


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz", "w"])
def test_every_compression_reads_like_the_folder(image_folder, tmp_path, mode):
    data = image_folders.load_image_folder(pack(image_folder, str(tmp_path / "d.tar"), mode, tops=("cifar",)))
    np.testing.assert_array_equal(data.train_images, image_folders.load_image_folder(image_folder).train_images)


def test_flipped_bytes_near_the_end_of_a_gzip_are_an_error(image_folder, tmp_path):
    # Before: tarfile stopped at the damage and the lost images went unnoticed.
    archive = pack(image_folder, str(tmp_path / "d.tar.gz"))
    raw = bytearray(open(archive, "rb").read())
    for i in range(len(raw) - 40, len(raw) - 24):
        raw[i] ^= 0xFF
    open(archive, "wb").write(bytes(raw))
    with pytest.raises(DataError, match="d.tar.gz: unreadable"):
        image_folders.load_image_folder(archive)


def test_truncated_gzip_is_an_error(image_folder, tmp_path):
    archive = pack(image_folder, str(tmp_path / "d.tar.gz"))
    raw = open(archive, "rb").read()
    open(archive, "wb").write(raw[:len(raw) * 2 // 3])
    with pytest.raises(DataError, match="d.tar.gz: unreadable"):
        image_folders.load_image_folder(archive)


def test_a_corrupt_member_header_is_an_error_not_a_silent_stop(image_folder, tmp_path):
    archive = pack(image_folder, str(tmp_path / "d.tar"), "w")
    with tarfile.open(archive) as tar:
        fifth = [m for m in tar.getmembers() if m.isfile()][4]
    raw = bytearray(open(archive, "rb").read())
    raw[fifth.offset + 10] ^= 0xFF  # in the member's name: its header checksum no longer matches
    open(archive, "wb").write(bytes(raw))
    with tarfile.open(archive) as tar:  # what tarfile alone does: stops early, quietly
        assert len([m for m in tar.getmembers() if m.isfile()]) == 4
    with pytest.raises(DataError, match="corrupt member header after"):
        image_folders.load_image_folder(archive)


def test_two_datasets_in_one_archive_are_refused(image_folder, tmp_path):
    archive = pack(image_folder, str(tmp_path / "d.tar.gz"), tops=("a", "b"))
    with pytest.raises(DataError, match=r"more than one place \(a/, b/\)"):
        image_folders.load_image_folder(archive)
    archive = pack(image_folder, str(tmp_path / "e.tar.gz"), tops=("", "a"))
    with pytest.raises(DataError, match="more than one place"):
        image_folders.load_image_folder(archive)


def test_one_class_is_refused(tmp_path):
    root = write_image_folder(str(tmp_path / "d"), classes=("cat",))
    with pytest.raises(DataError, match="1 class folder \\(cat\\); a classifier needs at least 2"):
        image_folders.load_image_folder(root)


def test_class_counts_and_description(tmp_path):
    data = image_folders.load_image_folder(write_image_folder(str(tmp_path / "d"), per_class=(6, 2)))
    assert data.class_counts() == {"train": {"cat": 6, "dog": 6, "frog": 6}, "test": {"cat": 2, "dog": 2, "frog": 2}}
    assert data.describe() == "3 classes; train 18 (6 per class); test 6 (2 per class)"
    sub = data.subset(7, None)
    assert sum(sub.class_counts()["train"].values()) == 7


def test_subset_is_a_fixed_seed_independent_choice(tmp_path):
    data = image_folders.load_image_folder(write_image_folder(str(tmp_path / "d"), per_class=(10, 4)))
    a = data.subset(7, 5)
    assert len(a.train_labels) == 7 and len(a.test_labels) == 5
    # The documented choice: the first n of a permutation by default_rng(0), kept in file order.
    keep = np.sort(np.random.default_rng(0).permutation(30)[:7])
    np.testing.assert_array_equal(a.train_images, data.train_images[keep])
    np.testing.assert_array_equal(a.train_labels, data.train_labels[keep])
    keep = np.sort(np.random.default_rng(0).permutation(12)[:5])
    np.testing.assert_array_equal(a.test_images, data.test_images[keep])
    assert data.subset(None, None).train_images is data.train_images


def test_augment_crops_and_flips_within_padding():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (64, 8, 8, 3), dtype=np.uint8)  # no zeros: padding is visible
    out = np.asarray(augmentation.augment(jax.random.key(0), images, pad=2))
    assert out.shape == images.shape and out.dtype == np.uint8
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    flipped = 0
    for img, src in zip(out, padded):
        windows = [src[y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
        plain = any(np.array_equal(img, w) for w in windows)
        mirrored = any(np.array_equal(img[:, ::-1], w) for w in windows)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 10 < flipped < 54  # about half flipped
    assert not np.array_equal(out, images)  # it did something


def test_epoch_order_is_a_permutation_determined_by_key_and_epoch():
    key = jax.random.key(0)
    a = np.asarray(augmentation.epoch_order(key, 3, 100))
    assert sorted(a) == list(range(100))
    np.testing.assert_array_equal(a, augmentation.epoch_order(key, 3, 100))
    assert not np.array_equal(a, augmentation.epoch_order(key, 4, 100))
    assert not np.array_equal(a, augmentation.epoch_order(jax.random.key(1), 3, 100))


def test_channel_stats_match_numpy():
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    mean, std = augmentation.channel_stats(images)
    x = images / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-5)


def test_normalizations():
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    mean, std = augmentation.normalization("imagenet", images)
    # the paper's code (open_lth datasets/cifar10.py) uses ImageNet's statistics
    np.testing.assert_array_equal(mean, np.float32([0.485, 0.456, 0.406]))
    np.testing.assert_array_equal(std, np.float32([0.229, 0.224, 0.225]))
    for got, want in zip(augmentation.normalization("dataset", images), augmentation.channel_stats(images)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="unknown normalization"):
        augmentation.normalization("cifar", images)
