"""The datasets a run can name, each entry saying once how many classes it has, whether it
streams (and so which program trains on it), which models and input normalisations fit it, and
opening it (``DatasetEntry.open``: TFDS or an image folder in memory, ImageNet's sources streamed).

The config's checks, the command line, the trainer's loader (``train.open_data``),
``program.build_program`` and the analysis all ask ``lookup``. A name not in the table is an
in-memory dataset (``FOLDER``): a TFDS name, or the name given to ``--data_dir``'s folder. This
module imports no JAX (the CLI checks flags with it before JAX starts).
"""

import dataclasses
from typing import Optional, Tuple

from bn_jax.names import DEFAULT_IMAGE_SIZE, NORMALIZATIONS
CIFAR_FAMILIES = ("resnet", "vgg")


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    name: str
    streamed: bool                   # read from the hosts as training goes, or held on the device
    num_classes: Optional[int]       # None: as many as the data hold
    model_families: Tuple[str, ...]  # bn_jax.names.MODEL_FAMILIES its models come from
    normalizations: Tuple[str, ...]  # the --normalize values it takes
    source: str                      # where its data come from, in words

    @property
    def program(self) -> str:
        """The program that trains on it (``bn_jax.program``): streamed from the hosts, or device-resident."""
        return "streaming" if self.streamed else "device_resident"

    def open(self, data_dir: Optional[str], image_size: Optional[int] = None):
        """The whole dataset: ``streaming.StreamData`` (its images read as training goes) or an
        in-memory ``datasets.Dataset``; DataError naming what is wrong."""
        if self.streamed:
            from bn_jax import imagenet
            return imagenet.load(data_dir, crop=image_size or DEFAULT_IMAGE_SIZE)
        if data_dir:
            from bn_jax import image_folders
            return image_folders.load_image_folder(data_dir)
        from bn_jax import datasets
        return datasets.load_tfds(self.name)


DATASETS = {
    "cifar10": DatasetEntry("cifar10", False, 10, CIFAR_FAMILIES, NORMALIZATIONS,
                            "TFDS cifar10, or --data_dir with train/<class>/*, test/<class>/*"),
    "cifar100": DatasetEntry("cifar100", False, 100, CIFAR_FAMILIES, NORMALIZATIONS,
                             "TFDS cifar100, or --data_dir with train/<class>/*, test/<class>/*"),
    # normalize "dataset" would need the training set in memory to measure its statistics
    "imagenet2012": DatasetEntry("imagenet2012", True, 1000, ("imagenet_resnet",), ("imagenet",),
                                 "--data_dir with train/<wnid>/*, val/<wnid>/*, or a prepared TFDS imagenet2012"),
}
FOLDER = DatasetEntry("folder", False, None, CIFAR_FAMILIES, NORMALIZATIONS,
                      "any other TFDS name, or --data_dir with train/<class>/*, test/<class>/*")
STREAMED = tuple(name for name, entry in DATASETS.items() if entry.streamed)


def lookup(name: str) -> DatasetEntry:
    """The entry of ``name``; an unknown name is an in-memory dataset (``FOLDER``) of that name."""
    return DATASETS.get(name) or dataclasses.replace(FOLDER, name=name)
