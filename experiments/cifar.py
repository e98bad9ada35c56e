"""Train a CIFAR ResNet, optionally BatchNorm-only: ``python -m experiments.cifar --bn_only``.

The defaults are the paper's recipe (Frankle et al., ICLR 2021; open_lth ``cifar_resnet``):
ResNet-110, batch 128, SGD with momentum 0.9, lr 0.1 dropped ×0.1 at epochs 80 and 120 of 160,
weight decay 1e-4, random crops and flips. Flags, outputs, resume and exit codes are the
trainer's (``bn_jax.cli``; docs/cli.md).
"""

import sys

from bn_jax import cli
from bn_jax.config import ExperimentConfig

RECIPE = cli.Recipe(
    prog="python -m experiments.cifar",
    description="Train a CIFAR ResNet with all weights (--train_mode full) or only BatchNorm's γ and β "
                "(--bn_only), everything else frozen at its random initialisation. Defaults reproduce the "
                "paper's recipe (Frankle et al., ICLR 2021).",
    defaults=ExperimentConfig())  # (the config's own defaults are this recipe)


def main(argv=None) -> int:
    return cli.run_main(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
