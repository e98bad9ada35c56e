"""Masked (BN-only and friends) against unmasked updates, on a small ResNet."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax import train, train_modes
from bn_jax.config import Config

from conftest import random_dataset

DATA = random_dataset(n_train=64, n_test=8)
MEAN, STD = jnp.full(3, 0.5), jnp.full(3, 0.25)


def make_state(mode, model="resnet8", lr=0.1, weight_decay=1e-3):
    config = Config(model=model, train_mode=mode, lr=lr, weight_decay=weight_decay, schedule="constant",
                    epochs=1, seed=0)
    return train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=4)


def run_steps(state, n):
    step = jax.jit(train.train_step)
    for i in range(n):
        sl = slice(16 * (i % 4), 16 * (i % 4 + 1))
        state, _ = step(state, DATA.train_images[sl], DATA.train_labels[sl], jax.random.key(i), MEAN, STD)
    return state


def leaves_by_role(tree):
    return [(jax.tree_util.keystr(p), train_modes.leaf_role(p), np.asarray(x))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.parametrize("mode", ["bn", "bn_output", "output", "gamma_only", "beta_only", "full"])
def test_exactly_the_trainable_leaves_move(mode):
    start = make_state(mode)
    end = run_steps(start, 4)
    mask = jax.tree_util.tree_leaves(train_modes.trainable_mask(start.params, mode))
    for (name, role, before), (_, _, after), trainable in zip(
            leaves_by_role(start.params), leaves_by_role(end.params), mask):
        assert trainable == train_modes.MODES[mode](role)
        if trainable:
            assert not np.array_equal(before, after), f"{name} should have moved"
        else:
            assert before.tobytes() == after.tobytes(), f"frozen {name} changed"


def test_first_masked_step_equals_unmasked_step_on_bn_leaves():
    masked = make_state("bn")
    unmasked_tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
    unmasked = masked.replace(tx=unmasked_tx, opt_state=unmasked_tx.init(masked.params))
    a, b = run_steps(masked, 1), run_steps(unmasked, 1)
    for (name, role, x), (_, _, y) in zip(leaves_by_role(a.params), leaves_by_role(b.params)):
        if role.startswith("bn_"):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=name)
    # ... and the unmasked optimizer did move the convolutions, so the comparison means something.
    assert not np.array_equal(a.params["Conv_0"]["kernel"], b.params["Conv_0"]["kernel"])


@pytest.mark.parametrize("mode", ["bn", "full"])
def test_batch_stats_update_in_every_mode(mode):
    start = make_state(mode)
    end = run_steps(start, 1)
    for x, y in zip(jax.tree_util.tree_leaves(start.batch_stats), jax.tree_util.tree_leaves(end.batch_stats)):
        assert not np.array_equal(x, y)


def test_optimizer_state_has_no_momentum_for_frozen_leaves():
    state = run_steps(make_state("bn"), 2)
    bn_size = train_modes.count(state.params, "bn")[0]
    state_size = sum(np.size(x) for x in jax.tree_util.tree_leaves(state.opt_state)
                     if np.ndim(x) > 0)
    assert state_size == bn_size  # one momentum entry per trainable scalar, nothing else
    full_state = make_state("full").opt_state
    assert sum(np.size(x) for x in jax.tree_util.tree_leaves(full_state) if np.ndim(x) > 0) == \
        train_modes.count(state.params, "full")[1]


def test_weight_decay_reaches_only_trainable_leaves():
    # With zero gradient signal impossible to arrange, compare decay on/off: frozen leaves are equal
    # bit for bit both ways, trainable ones differ.
    a = run_steps(make_state("bn", weight_decay=0.0), 2)
    b = run_steps(make_state("bn", weight_decay=0.5), 2)
    for (name, role, x), (_, _, y) in zip(leaves_by_role(a.params), leaves_by_role(b.params)):
        assert np.array_equal(x, y) != role.startswith("bn_"), name


def count_convolutions(mode):
    state = make_state(mode)
    step = jax.jit(train.train_step)
    hlo = step.lower(state, DATA.train_images[:8], DATA.train_labels[:8], jax.random.key(0),
                     MEAN, STD).compile().as_text()
    return hlo.count(" convolution(")


def test_bn_only_step_drops_weight_gradient_convolutions():
    convs = len([r for _, r, _ in leaves_by_role(make_state("full").params) if r == "conv"])
    full, bn = count_convolutions("full"), count_convolutions("bn")
    # forward (convs) + input gradients (convs - 1, none for the image) + weight gradients (convs)
    assert full == 3 * convs - 1
    assert bn == 2 * convs - 1


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown train mode"):
        make_state("everything")
