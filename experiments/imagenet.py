"""The paper's ImageNet experiment: ``python -m experiments.imagenet --bn_only --model resnet50``.

The defaults are the paper's code base's (open_lth ``imagenet_resnet_50``): batch 1024, SGD with
momentum 0.9, lr 0.4 after 5 warm-up epochs, ×0.1 at epochs 30, 60 and 80 of 90, weight decay
1e-4, RandomResizedCrop(224) and flips, ImageNet mean/std. Data: an ImageNet folder
(``--data_dir`` with ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``) or, without
``--data_dir``, a prepared TFDS ``imagenet2012`` (read without TensorFlow). Images stream from
the hosts through grain (``bn_jax.streaming``); everything else (flags, outputs, resume, exit
codes, multi-host) is ``experiments.cifar``'s.
"""

import sys

from experiments import cifar

# open_lth's imagenet_resnet_50 hyperparameters (the paper's ImageNet runs).
RECIPE = {"model": "resnet50", "dataset": "imagenet2012", "epochs": 90, "batch_size": 1024, "lr": 0.4,
          "warmup_epochs": 5.0, "schedule": "imagenet", "momentum": 0.9, "weight_decay": 1e-4,
          "normalize": "imagenet", "eval_batch_size": 1000}

DESCRIPTION = ("Train an ImageNet ResNet (resnet18, 34, 50, 101, 152, 200) with all weights or only "
               "BatchNorm's γ and β (--bn_only), streaming images from an ImageNet folder (--data_dir "
               "with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG) or a prepared TFDS imagenet2012. "
               "Defaults are the paper's ImageNet recipe (Frankle et al., ICLR 2021; open_lth).")


def build_parser():
    return cifar.build_parser(prog="python -m experiments.imagenet", description=DESCRIPTION, defaults=RECIPE)


if __name__ == "__main__":
    sys.exit(cifar.run_main(parser=build_parser()))
