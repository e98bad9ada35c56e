"""The ImageNet folder layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG): checks, decoding of odd
images, and the paper's augmentation. No TensorFlow, no TFDS."""

import os

import numpy as np
import pytest
from PIL import Image

from bn_jax import imagenet
from bn_jax.datasets import DataError


def save(path, array, mode=None, fmt="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path, fmt)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = str(tmp_path / "imagenet")
    for split, n in (("train", 3), ("val", 1)):
        for wnid in ("n02", "n01"):
            for i in range(n):
                h, w = (300, 400) if i % 2 else (260, 240)
                save(f"{root}/{split}/{wnid}/{wnid}_{i}.JPEG", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    save(f"{root}/train/n01/gray.JPEG", rng.integers(0, 256, (50, 60), dtype=np.uint8))
    save(f"{root}/train/n01/cmyk.JPEG", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), mode="CMYK")
    save(f"{root}/train/n02/tiny.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), fmt="PNG")
    return root


def test_sources_list_both_splits_with_sorted_classes(folder):
    train, val = imagenet.folder_sources(folder)
    assert train.classes == val.classes == ["n01", "n02"]
    assert (len(train), len(val)) == (3 + 2 + 3 + 1, 2)
    labels = [label for _, label in train.records]
    assert labels == sorted(labels) and set(labels) == {0, 1}
    assert os.path.basename(train.records[0][0]) == "cmyk.JPEG" and train.records[0][1] == 0


def test_grayscale_cmyk_and_png_decode_to_rgb(folder):
    train, _ = imagenet.folder_sources(folder)
    by_name = {os.path.basename(p): i for i, (p, _) in enumerate(train.records)}
    for name, shape in (("gray.JPEG", (50, 60, 3)), ("cmyk.JPEG", (40, 30, 3)), ("tiny.png", (16, 16, 3))):
        image = train[by_name[name]]["image"]
        assert image.shape == shape and image.dtype == np.uint8, name
    gray = train[by_name["gray.JPEG"]]["image"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


@pytest.mark.parametrize("damage, message", [
    (lambda r: __import__("shutil").rmtree(f"{r}/val"), "missing folder val/"),
    (lambda r: os.rename(f"{r}/val/n02", f"{r}/val/n03"), "train/ and val/ hold different classes"),
    (lambda r: [os.remove(f"{r}/val/n01/{f}") for f in os.listdir(f"{r}/val/n01")], "val/n01: no images"),
    (lambda r: __import__("shutil").rmtree(f"{r}/train") or os.makedirs(f"{r}/train"), "train: no class folders"),
])
def test_bad_layouts_are_named(folder, damage, message):
    damage(folder)
    with pytest.raises(DataError, match=message):
        imagenet.folder_sources(folder)


def test_truncated_or_fake_images_are_named(folder):
    path = f"{folder}/train/n02/n02_1.JPEG"
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(DataError, match="n02_1.JPEG: cannot decode"):
        imagenet.decode(path)
    with open(path, "w") as f:
        f.write("not an image")
    with pytest.raises(DataError, match="n02_1.JPEG: cannot decode"):
        imagenet.decode(path)


def test_sixteen_bit_grey_keeps_its_values_and_rangeless_images_are_refused(tmp_path):
    # Before: a 16-bit grey PNG came out nearly white and a float TIFF all black, silently.
    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    image = imagenet.decode(str(tmp_path / "g16.png"))
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert (image[..., 0] == grey // 256).all() and (image[..., 2] == image[..., 0]).all()
    Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)).save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match="f.tiff: a floating-point image has no defined 8-bit range"):
        imagenet.decode(str(tmp_path / "f.tiff"))


def test_an_image_beyond_the_pixel_limit_is_undecodable_before_its_pixels_are_read(tmp_path, monkeypatch):
    from bn_jax import images
    save(str(tmp_path / "big.png"), np.zeros((40, 50, 3), np.uint8), fmt="PNG")
    monkeypatch.setattr(images, "MAX_PIXELS", 1999)  # (a 13000² PNG: 2.5 GB to decode at the real limit)
    with pytest.raises(DataError, match="big.png: 50×40 pixels exceeds the 1,999 an image may have"):
        imagenet.decode(str(tmp_path / "big.png"))


def test_class_folders_differing_only_in_case_are_refused(folder):
    save(f"{folder}/train/N01/x.JPEG", np.zeros((8, 8, 3), np.uint8))
    save(f"{folder}/val/N01/x.JPEG", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="class folders N01 and n01 differ only in case"):
        imagenet.folder_sources(folder)


def test_random_resized_crop_of_the_whole_image_is_its_resize():
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR))
    outs = [imagenet.random_resized_crop(image, np.random.default_rng(s), 32, scale=(1, 1), ratio=(1, 1))
            for s in range(8)]
    assert all(np.array_equal(o, whole) or np.array_equal(o, whole[:, ::-1]) for o in outs)
    assert any(np.array_equal(o, whole) for o in outs) and any(np.array_equal(o, whole[:, ::-1]) for o in outs)


def test_random_resized_crop_is_a_function_of_the_rng_and_fits_any_image():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    a = imagenet.random_resized_crop(image, np.random.default_rng(5))
    b = imagenet.random_resized_crop(image, np.random.default_rng(5))
    c = imagenet.random_resized_crop(image, np.random.default_rng(6))
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for shape in ((16, 16, 3), (2000, 10, 3)):  # smaller than the crop; no box of allowed ratio fits
        assert imagenet.random_resized_crop(rng.integers(0, 256, shape, dtype=np.uint8), rng).shape == (224, 224, 3)


def test_eval_crop_is_the_centre_of_the_256_resize_and_enlarges_small_images():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(image).resize((427, 256), Image.BILINEAR))  # shorter side 256
    np.testing.assert_array_equal(imagenet.eval_crop(image), resized[16:240, 101:325])
    assert imagenet.eval_crop(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).shape == (224, 224, 3)
