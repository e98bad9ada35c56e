"""The name tables every layer shares: train modes, BN inits, precisions, normalisations, model
families, schedules, loops, checkpoint units and formats.

Each table is written here once. ``bn_jax.config`` builds its flags' choices from them, and the
libraries that give the names a meaning (``train_modes``, ``models``, ``augmentation``) key
their tables by them, so a name cannot be known to one and missing from another. This module
imports no JAX, so that ``--help`` answers at once.
"""

TRAIN_MODES = ("full", "bn", "bn_output", "output", "gamma_only", "beta_only", "random_k", "no_affine")
BN_INITS = ("uniform", "ones")
PRECISIONS = ("float32", "bfloat16")
NORMALIZATIONS = ("dataset", "imagenet")
SCHEDULES = ("step", "imagenet", "cosine", "constant")
BN_PLACEMENTS = ("before", "after")  # BatchNorm before (paper, He et al. 2016) or after the ReLU
LOOPS = ("auto", "fused", "step")
CHECKPOINT_UNITS = ("epochs", "steps")
CHECKPOINT_FORMATS = ("full", "small")

# Model families of the registry (bn_jax.models), as their names begin: resnet<6n+2> and vgg<d>
# for CIFAR, imagenet_resnet<d> for ImageNet.
MODEL_FAMILIES = ("resnet", "vgg", "imagenet_resnet")
VGG_DEPTHS = (11, 13, 16, 19)
IMAGENET_DEPTHS = (18, 34, 50, 101, 152, 200)
DEFAULT_IMAGE_SIZE = 224  # a streamed run's crop when --image_size is not given (the paper's ImageNet crop)
MODEL_NAMES = ("resnet<6n+2> (e.g. resnet20, resnet56, resnet110, resnet866), vgg11, vgg13, vgg16, vgg19; "
               "ImageNet (--dataset imagenet2012): resnet18, 34, 50, 101, 152, 200")


def check_keys(table, names, what: str) -> None:
    """Raise at import if a library's table is keyed otherwise than the shared names."""
    if tuple(table) != tuple(names):
        raise AssertionError(f"{what}: {tuple(table)} differ from bn_jax.names {tuple(names)}")
