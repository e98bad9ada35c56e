"""The paper's ImageNet experiment: ``python -m experiments.imagenet --bn_only --model resnet50``.

The defaults are the paper's code base's (open_lth ``imagenet_resnet_50``): batch 1024, SGD with
momentum 0.9, lr 0.4 after 5 warm-up epochs, ×0.1 at epochs 30, 60 and 80 of 90, weight decay
1e-4, RandomResizedCrop(224) and flips, ImageNet mean/std. Data: an ImageNet folder
(``--data_dir`` with ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``) or, without
``--data_dir``, a prepared TFDS ``imagenet2012`` (read without TensorFlow). Images stream from
the hosts through grain (``bn_jax.streaming``); flags, outputs, resume, exit codes and
multi-host are the trainer's (``bn_jax.cli``; docs/imagenet.md).
"""

import sys

from bn_jax import cli
from bn_jax.config import ExperimentConfig

RECIPE = cli.Recipe(
    prog="python -m experiments.imagenet",
    description="Train an ImageNet ResNet (resnet18, 34, 50, 101, 152, 200) with all weights or only "
                "BatchNorm's γ and β (--bn_only), streaming images from an ImageNet folder (--data_dir "
                "with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG) or a prepared TFDS imagenet2012. "
                "Defaults are the paper's ImageNet recipe (Frankle et al., ICLR 2021; open_lth).",
    defaults=ExperimentConfig(model="imagenet_resnet50", dataset="imagenet2012", epochs=90, batch_size=1024,
                              lr=0.4, warmup_epochs=5.0, schedule="imagenet", momentum=0.9, weight_decay=1e-4,
                              normalize="imagenet"),
    streamed=True)


def main(argv=None) -> int:
    return cli.run_main(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
