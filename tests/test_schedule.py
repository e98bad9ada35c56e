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
