"""A run's configuration: one flat dataclass, saved as JSON next to the run's results.

Defaults are the paper's CIFAR-10 ResNet recipe (open_lth ``cifar_resnet``): batch 128,
SGD with momentum 0.9, lr 0.1 dropped ×0.1 at 50% and 75% of training (epochs 80 and 120 of
160), coupled L2 weight decay 1e-4 on the trainable leaves.
"""

import dataclasses
import json
import os
from typing import Optional

from bn_jax import models, train_modes

SCHEDULES = ("step", "cosine", "constant")
# fused: a chunk of an epoch as one compiled loop; step: one jitted call per step; auto: fused
# except on CPU, where XLA runs convolutions inside loops far slower (jax-ml/jax#12868).
LOOPS = ("auto", "fused", "step")
BN_PLACEMENTS = ("before", "after")  # BatchNorm before (paper, He et al. 2016) or after the ReLU


@dataclasses.dataclass
class Config:
    model: str = "resnet110"
    width: int = 1
    bn_init: str = "uniform"
    bn_placement: str = "before"
    train_mode: str = "full"
    k: int = 2  # random_k: trainable weights per output channel of each conv
    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    max_train_examples: Optional[int] = None
    max_test_examples: Optional[int] = None
    epochs: int = 160
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 0.1
    schedule: str = "step"
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: bool = True
    seed: int = 0
    num_devices: Optional[int] = None  # None: every visible device; results do not depend on it
    precision: str = "float32"  # compute dtype; "bfloat16" keeps float32 params, BN stats, optimizer
    loop: str = "auto"
    steps_per_call: int = 100  # fused loop: steps per compiled call (progress, signals in between)

    def validate(self) -> "Config":
        """Raise ValueError with one readable line for anything that cannot run."""
        if self.bn_placement not in BN_PLACEMENTS:
            raise ValueError(f"unknown bn_placement {self.bn_placement!r}; known: {', '.join(BN_PLACEMENTS)}")
        train_modes.check_mode(self.train_mode)
        if self.model.startswith("imagenet_"):
            raise ValueError(f"{self.model} is an ImageNet definition (see bn_jax.imagenet); this trainer "
                             "takes 32×32 models: resnet<6n+2>, vgg11/13/16/19")
        self.create_model()
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.loop not in LOOPS:
            raise ValueError(f"unknown loop {self.loop!r}; known: {', '.join(LOOPS)}")
        positive = {"batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                    "steps_per_call": self.steps_per_call}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("max_train_examples", "max_test_examples", "num_devices"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
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
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
