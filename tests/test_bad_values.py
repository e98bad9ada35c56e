"""Values that used to end in a traceback, a huge allocation or invalid JSON."""

import json
import math

import pytest

from bn_jax import datasets, metrics_log, train, workdir
from bn_jax.config import ExperimentConfig, RuntimeConfig

from conftest import random_dataset


def test_eval_batch_beyond_the_test_set_is_one_test_batch(tmp_path):
    # Before: --eval_batch_size 2000000000 asked for a 5.59 TiB padding batch.
    data = random_dataset(n_train=32, n_test=8)
    config = ExperimentConfig(model="resnet8", epochs=1, batch_size=8)
    summary = train.train_and_evaluate(config, str(tmp_path / "run"), data=data, log=lambda *a: None,
                                       runtime=RuntimeConfig(eval_batch_size=2_000_000_000, loop="step"))
    assert summary["steps"] == 4 and 0 <= summary["final_test_accuracy"] <= 1


def test_more_steps_than_the_step_counter_holds_are_refused_before_anything_is_written(tmp_path):
    # Before: an OverflowError at the first step.
    data = random_dataset(n_train=3000, n_test=8)
    config = ExperimentConfig(model="resnet8", epochs=1_000_000, batch_size=1)
    with pytest.raises(datasets.DataError, match="3000 steps exceed the step counter's 2,147,483,647"):
        train.train_and_evaluate(config, str(tmp_path / "run"), data=data, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_warm_up_beyond_the_step_counter_is_refused_before_anything_is_written(tmp_path):
    # Before: OverflowError (an infinite step count) in make_schedule, for a finite huge --warmup_epochs.
    data = random_dataset(n_train=3000, n_test=8)
    config = ExperimentConfig(model="resnet8", epochs=1, warmup_epochs=1_000_000, batch_size=1)
    with pytest.raises(datasets.DataError, match="1e[+]06 warm-up epochs of 3000 steps exceed the step counter"):
        train.train_and_evaluate(config, str(tmp_path / "run"), data=data, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_a_vgg_on_images_too_small_for_its_poolings_is_refused_naming_the_flag(tmp_path):
    # Before: the last average pool of a 16×16 image's 1×1 map was empty, and every logit NaN.
    data = random_dataset(n_train=16, n_test=8, size=16)
    config = ExperimentConfig(model="vgg11", epochs=1, batch_size=8)
    with pytest.raises(datasets.DataError, match="--model vgg11 needs images of at least 32×32 pixels.*16×16"):
        train.train_and_evaluate(config, str(tmp_path / "run"), data=data, log=lambda *a: None)
    assert not (tmp_path / "run").exists()
    from bn_jax import models
    assert models.input_problem("vgg11", (32, 32, 3)) is None and models.input_problem("resnet8", (2, 2, 3)) is None
    with pytest.raises(ValueError, match="no pixel is left for the head"):  # the model itself, used directly
        models.init_variables(models.create_model("vgg11"), __import__("jax").random.key(0), (16, 16, 3))


def strict_json(line):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(line, parse_constant=refuse)


def test_a_nonfinite_metric_is_written_as_null_and_flagged(tmp_path):
    # Before: a diverged test loss was written as a bare NaN, which JSON readers reject.
    path = str(tmp_path / "metrics.jsonl")
    metrics_log.append_metrics(path, {"epoch": 1, "test_loss": math.nan, "train_loss": math.inf, "test_accuracy": 0.1})
    metrics_log.write_metrics(path + "2", [{"epoch": 1, "test_loss": -math.inf}])
    record = strict_json(open(path).read())
    assert record == {"epoch": 1, "test_loss": None, "train_loss": None, "test_accuracy": 0.1,
                      "nonfinite": ["test_loss", "train_loss"]}
    assert strict_json(open(path + "2").read())["nonfinite"] == ["test_loss"]


def test_config_json_refuses_to_hold_a_nan(tmp_path):
    with pytest.raises(ValueError):
        workdir.RunDir(str(tmp_path)).write_config(ExperimentConfig(lr=math.nan), RuntimeConfig(), {})
    assert not (tmp_path / "config.json").exists()
