"""--precision bfloat16: bfloat16 compute, float32 parameters, BatchNorm statistics and optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import models, train, train_modes
from bn_jax.config import ExperimentConfig

from conftest import random_dataset

DATA = random_dataset(n_train=32, n_test=8)
MEAN, STD = jnp.full(3, 0.5), jnp.full(3, 0.25)


def state(precision, mode="bn", model="resnet8"):
    config = ExperimentConfig(model=model, train_mode=mode, precision=precision, schedule="constant", epochs=1)
    return train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=2)


def dtypes(tree):
    return {x.dtype for x in jax.tree_util.tree_leaves(tree)}


def step(s):
    return jax.jit(train.train_step)(s, DATA.train_images[:16], DATA.train_labels[:16], jax.random.key(0),
                                     MEAN, STD)


def test_bfloat16_keeps_parameters_statistics_and_optimizer_state_in_float32():
    s, metrics = step(state("bfloat16"))
    assert dtypes(s.params) == dtypes(s.batch_stats) == {jnp.dtype(jnp.float32)}
    assert dtypes(s.opt_state) <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    assert metrics["loss"].dtype == jnp.float32


@pytest.mark.parametrize("precision, conv_dtype", [("float32", "f32"), ("bfloat16", "bf16")])
def test_convolutions_run_in_the_chosen_precision(precision, conv_dtype):
    s = state(precision)
    hlo = jax.jit(lambda p, x: s.apply_fn({"params": p, "batch_stats": s.batch_stats}, x)).lower(
        s.params, jnp.zeros((2, 32, 32, 3))).as_text()
    convs = [line for line in hlo.splitlines() if "convolution" in line and "=" in line]
    assert convs and all("tensor<2x" in c and f"x{conv_dtype}>" in c.split("->")[-1] for c in convs)


def test_bfloat16_logits_are_float32_and_close_to_float32_logits():
    f32, bf16 = state("float32"), state("bfloat16")
    x = jnp.asarray(DATA.test_images, jnp.float32) / 255.0

    def logits(s):
        return s.apply_fn({"params": s.params, "batch_stats": s.batch_stats}, x, train=True,
                          mutable=["batch_stats"])[0]
    a, b = logits(f32), logits(bf16)
    assert b.dtype == jnp.float32
    assert not np.array_equal(a, b)  # bfloat16 really computed something different ...
    np.testing.assert_allclose(b, a, atol=0.1 * float(jnp.abs(a).max()))  # ... but close


def test_bfloat16_bn_only_still_freezes_every_other_weight_bit_for_bit():
    start = state("bfloat16")
    end, _ = step(step(start)[0])
    mask = jax.tree_util.tree_leaves(train_modes.trainable_mask(train_modes.variables_of(start), "bn"))
    for before, after, trainable in zip(jax.tree_util.tree_leaves(start.params),
                                        jax.tree_util.tree_leaves(end.params), mask):
        assert np.array_equal(before, after) != trainable


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'float16'"):
        models.create_model("resnet8", precision="float16")
    with pytest.raises(ValueError, match="unknown precision"):
        ExperimentConfig(model="resnet8", precision="fp8").validate()
