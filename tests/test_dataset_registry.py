"""The dataset registry: one entry per dataset, asked by the config's checks, the loader, the
program builder and the analysis."""

import dataclasses

import pytest

from bn_jax import dataset_registry, program, streaming
from bn_jax.config import ExperimentConfig, RuntimeConfig

from conftest import need, random_dataset


def test_entries_say_what_each_dataset_is():
    cifar, imagenet = dataset_registry.lookup("cifar10"), dataset_registry.lookup("imagenet2012")
    assert (cifar.num_classes, cifar.streamed, cifar.program) == (10, False, "device_resident")
    assert (imagenet.num_classes, imagenet.streamed, imagenet.program) == (1000, True, "streaming")
    assert imagenet.normalizations == ("imagenet",) and imagenet.model_families == ("imagenet_resnet",)
    assert dataset_registry.STREAMED == ("imagenet2012",)
    other = dataset_registry.lookup("my_folder")  # any other name: in memory, classes from the data
    assert (other.name, other.streamed, other.num_classes) == ("my_folder", False, None)


def test_the_config_checks_follow_the_entry():
    base = ExperimentConfig(model="imagenet_resnet18", dataset="imagenet2012", normalize="imagenet")
    base.validate()
    with pytest.raises(ValueError, match="needs the training set in memory"):
        dataclasses.replace(base, normalize="dataset").validate()
    with pytest.raises(ValueError, match="takes the ImageNet ResNets"):
        dataclasses.replace(base, model="resnet20").validate()
    with pytest.raises(ValueError, match="unknown model"):  # not a family at all: the registry's word
        dataclasses.replace(base, model="resnext9").validate()
    ExperimentConfig(model="vgg11", dataset="my_folder").validate()


def test_each_entry_opens_its_data_and_build_program_builds_the_program_it_names():
    config = ExperimentConfig(model="resnet8", batch_size=8)
    built = program.build_program(config, RuntimeConfig(loop="step"), random_dataset(16, 8), None)
    assert isinstance(built, program.DeviceResidentProgram)
    tfds = need("tensorflow_datasets")
    need("grain")
    entry = dataset_registry.lookup("imagenet2012")
    with tfds.testing.mock_data(num_examples=8):  # TFDS's mock imagenet2012: no download
        data = entry.open(None, image_size=32)
    assert isinstance(data, streaming.StreamData) and data.num_classes == entry.num_classes
    assert data.image_shape == (32, 32, 3)
    config = ExperimentConfig(model="imagenet_resnet18", dataset="imagenet2012", normalize="imagenet",
                              image_size=32, batch_size=4)
    built = program.build_program(config, RuntimeConfig(workers=0), data, None)
    try:
        assert isinstance(built, program.StreamingProgram) and built.steps_per_epoch == 2
    finally:
        built.close()
