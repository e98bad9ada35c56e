"""Learning-rate schedules, against values written out by hand."""

import pytest

from bn_jax import train
from bn_jax.config import ExperimentConfig


def lr(config, steps_per_epoch, step):
    return float(train.make_schedule(config, steps_per_epoch)(step))


def test_step_schedule_drops_at_half_and_three_quarters():
    config = ExperimentConfig(epochs=160, lr=0.1, schedule="step")  # the paper: epochs 80 and 120 of 160
    spe = 390
    assert lr(config, spe, 0) == pytest.approx(0.1)
    assert lr(config, spe, 80 * spe - 1) == pytest.approx(0.1)
    assert lr(config, spe, 80 * spe + 1) == pytest.approx(0.01)
    assert lr(config, spe, 120 * spe - 1) == pytest.approx(0.01)
    assert lr(config, spe, 120 * spe + 1) == pytest.approx(0.001)


def test_both_drops_on_one_step_still_drop_twice():
    config = ExperimentConfig(epochs=1, lr=0.1, schedule="step")  # 2 steps: int(1.0) == int(1.5) == 1
    assert lr(config, 2, 0) == pytest.approx(0.1)
    assert lr(config, 2, 2) == pytest.approx(0.001)


def test_warmup_then_cosine():
    config = ExperimentConfig(epochs=10, lr=0.2, schedule="cosine", warmup_epochs=1)
    assert lr(config, 10, 0) == pytest.approx(0.0)
    assert lr(config, 10, 5) == pytest.approx(0.1)
    assert lr(config, 10, 10) == pytest.approx(0.2)
    assert lr(config, 10, 55) == pytest.approx(0.1, abs=1e-6)  # half-way through the cosine: lr / 2
    assert lr(config, 10, 100) == pytest.approx(0.0, abs=1e-7)


def test_imagenet_schedule_warms_up_for_5_epochs_then_drops_at_epochs_30_60_80_exactly():
    """open_lth's imagenet_resnet_50: lr 0.4, 5 warm-up epochs, ×0.1 from the first step of epochs
    30, 60 and 80 (0-based) of 90. 30/90 in floating point is a hair under 1/3: a float fraction
    would drop one step early."""
    config = ExperimentConfig(model="imagenet_resnet50", dataset="imagenet2012", normalize="imagenet",
                              epochs=90, lr=0.4, schedule="imagenet", warmup_epochs=5)
    spe = 1251  # 1,281,167 // 1024
    assert lr(config, spe, 0) == 0.0
    assert lr(config, spe, 5 * spe // 2) == pytest.approx(0.2, abs=1e-4)
    for epoch, value in ((30, 0.4), (60, 0.04), (80, 0.004)):
        assert lr(config, spe, epoch * spe - 1) == pytest.approx(value)
        assert lr(config, spe, epoch * spe) == pytest.approx(value / 10)
    assert lr(config, spe, 90 * spe - 1) == pytest.approx(0.0004)
