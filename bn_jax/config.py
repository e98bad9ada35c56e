"""A run's configuration: one flat dataclass, saved as JSON next to the run's results.

Defaults are the paper's CIFAR-10 ResNet recipe (open_lth ``cifar_resnet``): batch 128,
SGD with momentum 0.9, lr 0.1 dropped ×0.1 at 50% and 75% of training (epochs 80 and 120 of
160), coupled L2 weight decay 1e-4 on the trainable leaves.
"""

import dataclasses
import json
import math
import os
from typing import Optional

from bn_jax import input_pipeline, models, train_modes

SCHEDULES = ("step", "cosine", "constant")
# fused: a chunk of an epoch as one compiled loop; step: one jitted call per step; auto: fused
# except on CPU, where XLA runs convolutions inside loops far slower (jax-ml/jax#12868).
LOOPS = ("auto", "fused", "step")
BN_PLACEMENTS = ("before", "after")  # BatchNorm before (paper, He et al. 2016) or after the ReLU


MAX_SEED = 2**31 - 1  # jax.random.key and NumPy take any such int; larger ones overflow somewhere


# ---- validation rules, declared with the fields they check ------------------------------------
# A rule takes (name, value) and returns a one-line complaint, or None when the value is fine.

def at_least(low):
    def rule(name, value):
        if value is None:
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name} must be a finite number, got {value}"
        return None if value >= low else f"{name} must be >= {low}, got {value}"
    return rule


def at_most(high):
    def rule(name, value):
        return None if value is None or value <= high else f"{name} must be <= {high}, got {value}"
    return rule


def one_of(choices):
    def rule(name, value):
        return None if value in choices else f"unknown {name} {value!r}; known: {', '.join(choices)}"
    return rule


def param(default, *rules):
    """A Config field with its validation rules beside it."""
    return dataclasses.field(default=default, metadata={"rules": rules})


@dataclasses.dataclass
class Config:
    model: str = "resnet110"
    width: int = param(1, at_least(1))
    bn_init: str = "uniform"
    bn_placement: str = param("before", one_of(BN_PLACEMENTS))
    train_mode: str = "full"
    k: int = param(2, at_least(1))  # random_k: trainable weights per output channel of each conv
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    max_train_examples: Optional[int] = param(None, at_least(1))
    max_test_examples: Optional[int] = param(None, at_least(1))
    epochs: int = param(160, at_least(0), at_most(1_000_000))
    batch_size: int = param(128, at_least(1))
    eval_batch_size: int = param(1000, at_least(1))  # larger than the test set: one batch of it
    lr: float = param(0.1, at_least(0.0))
    schedule: str = param("step", one_of(SCHEDULES))
    warmup_epochs: float = param(0.0, at_least(0.0))
    momentum: float = param(0.9, at_least(0.0))
    weight_decay: float = param(1e-4, at_least(0.0))
    augment: bool = True
    # per-channel input normalisation: the training set's own statistics, or ImageNet's as the
    # paper's code does (a documented deviation: runs saved before this option used "dataset")
    normalize: str = param("dataset", one_of(input_pipeline.NORMALIZATIONS))
    seed: int = param(0, at_least(0), at_most(MAX_SEED))
    num_devices: Optional[int] = param(None, at_least(1))  # None: every visible device; results do not depend on it
    precision: str = "float32"  # compute dtype; "bfloat16" keeps float32 params, BN stats, optimizer
    loop: str = param("auto", one_of(LOOPS))
    steps_per_call: int = param(100, at_least(1))  # fused loop: steps per compiled call (progress, signals in between)

    def validate(self) -> "Config":
        """Raise ValueError with one readable line for anything that cannot run."""
        for field in dataclasses.fields(self):
            for rule in field.metadata.get("rules", ()):
                problem = rule(field.name, getattr(self, field.name))
                if problem:
                    raise ValueError(problem)
        train_modes.check_mode(self.train_mode)
        if self.model.startswith("imagenet_"):
            raise ValueError(f"{self.model} is an ImageNet definition (see bn_jax.imagenet); this trainer "
                             "takes 32×32 models: resnet<6n+2>, vgg11/13/16/19")
        self.create_model()
        if self.data_dir is not None and not os.path.exists(self.data_dir):
            raise ValueError(f"data_dir does not exist: {self.data_dir}")
        return self

    def create_model(self, num_classes: int = 10):
        """The model this config describes (architecture, BN placement, and what the mode implies)."""
        return models.create_model(self.model, width=self.width, num_classes=num_classes,
                                   bn_init=self.bn_init, bn_before_relu=self.bn_placement == "before",
                                   precision=self.precision,
                                   **train_modes.model_options(self.train_mode))

    def to_dict(self):
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True, allow_nan=False)
