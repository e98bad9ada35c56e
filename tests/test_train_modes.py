"""Masked (BN-only and friends) against unmasked updates, on a small ResNet."""


import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_jax import roofline, train, train_modes
from bn_jax.config import ExperimentConfig

from conftest import random_dataset

DATA = random_dataset(n_train=64, n_test=8)
MEAN, STD = jnp.full(3, 0.5), jnp.full(3, 0.25)


def make_state(mode, model="resnet8", lr=0.1, weight_decay=1e-3, k=2, seed=0):
    config = ExperimentConfig(model=model, train_mode=mode, lr=lr, weight_decay=weight_decay, schedule="constant",
                    epochs=1, seed=seed, k=k)
    return train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=4)


def run_steps(state, n):
    step = jax.jit(train.train_step)
    for i in range(n):
        sl = slice(16 * (i % 4), 16 * (i % 4 + 1))
        state, _ = step(state, DATA.train_images[sl], DATA.train_labels[sl], jax.random.key(i), MEAN, STD)
    return state


def leaves_by_role(state):
    return [(jax.tree_util.keystr(p), role, np.asarray(x))
            for p, role, x in train_modes.role_leaves(train_modes.variables_of(state))]


@pytest.mark.parametrize("mode", ["bn", "bn_output", "output", "gamma_only", "beta_only", "full"])
def test_exactly_the_trainable_leaves_move(mode):
    start = make_state(mode)
    end = run_steps(start, 4)
    mask = jax.tree_util.tree_leaves(train_modes.trainable_mask(train_modes.variables_of(start), mode))
    for (name, role, before), (_, _, after), trainable in zip(
            leaves_by_role(start), leaves_by_role(end), mask):
        assert trainable == (role in EXPECTED_ROLES[mode]), name  # written out below, not from MODES
        if trainable:
            assert not np.array_equal(before, after), f"{name} should have moved"
        else:
            assert before.tobytes() == after.tobytes(), f"frozen {name} changed"


def test_first_masked_step_equals_unmasked_step_on_bn_leaves():
    masked = make_state("bn")
    unmasked_tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))
    unmasked = masked.replace(tx=unmasked_tx, opt_state=unmasked_tx.init(masked.params))
    a, b = run_steps(masked, 1), run_steps(unmasked, 1)
    for (name, role, x), (_, _, y) in zip(leaves_by_role(a), leaves_by_role(b)):
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
    bn_size = train_modes.count(train_modes.variables_of(state), "bn")[0]
    state_size = sum(np.size(x) for x in jax.tree_util.tree_leaves(state.opt_state)
                     if np.ndim(x) > 0)
    assert state_size == bn_size  # one momentum entry per trainable scalar, nothing else
    full_state = make_state("full").opt_state
    assert sum(np.size(x) for x in jax.tree_util.tree_leaves(full_state) if np.ndim(x) > 0) == \
        train_modes.count(train_modes.variables_of(state), "full")[1]


def test_weight_decay_reaches_only_trainable_leaves():
    # With zero gradient signal impossible to arrange, compare decay on/off: frozen leaves are equal
    # bit for bit both ways, trainable ones differ.
    a = run_steps(make_state("bn", weight_decay=0.0), 2)
    b = run_steps(make_state("bn", weight_decay=0.5), 2)
    for (name, role, x), (_, _, y) in zip(leaves_by_role(a), leaves_by_role(b)):
        assert np.array_equal(x, y) != role.startswith("bn_"), name


def count_convolutions(mode):
    state = make_state(mode)
    step = jax.jit(train.train_step)
    hlo = step.lower(state, DATA.train_images[:8], DATA.train_labels[:8], jax.random.key(0),
                     MEAN, STD).compile().as_text()
    return sum(roofline.convolution_counts(hlo).values())


def test_bn_only_step_drops_weight_gradient_convolutions():
    convs = len([r for _, r, _ in leaves_by_role(make_state("full")) if r == "conv"])
    full, bn = count_convolutions("full"), count_convolutions("bn")
    # forward (convs) + input gradients (convs - 1, none for the image) + weight gradients (convs)
    assert full == 3 * convs - 1
    assert bn == 2 * convs - 1


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown train mode"):
        make_state("everything")


# What each mode should train, written out independently of train_modes.MODES.
ALL_ROLES = {"conv", "bn_scale", "bn_bias", "head_kernel", "head_bias"}
EXPECTED_ROLES = {
    "full": ALL_ROLES, "no_affine": {"conv", "head_kernel", "head_bias"},
    "bn": {"bn_scale", "bn_bias"}, "bn_output": {"bn_scale", "bn_bias", "head_kernel", "head_bias"},
    "output": {"head_kernel", "head_bias"}, "gamma_only": {"bn_scale"}, "beta_only": {"bn_bias"},
    "random_k": {"conv", "head_kernel", "head_bias"},  # conv: k entries per output channel only
}


def test_every_mode_is_specified_here():
    assert set(EXPECTED_ROLES) == set(train_modes.MODES)


@pytest.mark.parametrize("mode", ["random_k", "no_affine"])
def test_new_modes_move_exactly_the_intended_leaves(mode):
    start = make_state(mode)
    end = run_steps(start, 4)
    roles = {role for _, role, _ in leaves_by_role(start)}
    assert ("bn_scale" in roles) == (mode != "no_affine")  # no_affine: the model has no γ/β at all
    for (name, role, before), (_, _, after) in zip(leaves_by_role(start), leaves_by_role(end)):
        if role not in EXPECTED_ROLES[mode]:
            assert before.tobytes() == after.tobytes(), f"frozen {name} changed"
        elif not (mode == "random_k" and role == "conv"):
            assert (before != after).all(), f"every entry of {name} should have moved"


def conv_kernels(state):
    return [(name, x) for name, role, x in leaves_by_role(state) if role == "conv"]


@pytest.mark.parametrize("k", [1, 2, 5])
def test_random_k_moves_exactly_k_entries_per_output_channel(k):
    start = make_state("random_k", k=k)
    end = run_steps(start, 3)  # weight decay 1e-3 is on: it must not reach masked-out entries
    for (name, before), (_, after) in zip(conv_kernels(start), conv_kernels(end)):
        moved = (before != after).reshape(-1, before.shape[-1])
        assert (moved.sum(axis=0) == min(k, moved.shape[0])).all(), name
        frozen = ~moved
        assert before.reshape(moved.shape)[frozen].tobytes() == after.reshape(moved.shape)[frozen].tobytes()


def test_random_k_selection_is_a_function_of_the_seed():
    def moved(seed):
        a = make_state("random_k", seed=seed)
        b = run_steps(a, 1)
        return np.asarray(a.params["Conv_0"]["kernel"]) != np.asarray(b.params["Conv_0"]["kernel"])
    assert np.array_equal(moved(0), moved(0))
    assert not np.array_equal(moved(0), moved(1))


def test_random_k_masked_entries_carry_zero_momentum():
    state = run_steps(make_state("random_k"), 2)
    masks = train_modes.entry_masks(train_modes.variables_of(state), "random_k", 2, 0)
    traces = [s for s in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(s) == 4 and s.dtype != bool]
    kernels = [m for m in jax.tree_util.tree_leaves(masks) if np.ndim(m) == 4]
    assert len(traces) == len(kernels) > 0
    for trace, mask in zip(traces, kernels):
        assert (np.asarray(trace)[~np.asarray(mask)] == 0).all()
        assert (np.asarray(trace)[np.asarray(mask)] != 0).all()


# Trainable counts worked out from the architecture (not from the code under test).
def resnet_convs(depth, width=1):
    """(fan_in, out_channels) of every conv in a CIFAR ResNet-(6n+2)."""
    n = (depth - 2) // 6
    convs, c_in = [(27, 16 * width)], 16 * width
    for seg, c in enumerate([16 * width, 32 * width, 64 * width]):
        for i in range(n):
            convs += [(9 * c_in, c), (9 * c, c)]
            if c_in != c:
                convs.append((c_in, c))  # 1×1 shortcut
            c_in = c
    return convs


def expected_counts(depth, k=2):
    convs = resnet_convs(depth)
    conv = sum(f * c for f, c in convs)
    features = sum(c for _, c in convs)  # one BN per conv
    head = 64 * 10 + 10
    total = conv + 2 * features + head
    return {"full": total, "no_affine": total - 2 * features, "bn": 2 * features,
            "bn_output": 2 * features + head, "output": head, "gamma_only": features,
            "beta_only": features, "random_k": sum(min(k, f) * c for f, c in convs) + head}


@pytest.mark.parametrize("depth", [20, 110])
@pytest.mark.parametrize("mode", list(EXPECTED_ROLES))
def test_exact_trainable_counts(depth, mode):
    config = ExperimentConfig(model=f"resnet{depth}", train_mode=mode)
    variables = jax.eval_shape(lambda key: config.create_model().init(key, jnp.zeros((1, 32, 32, 3))),
                               jax.random.key(0))
    assert train_modes.count(variables, mode, k=2)[0] == expected_counts(depth)[mode]


def test_hand_counts_match_the_papers_figures():
    # Sanity of the hand computation itself: ResNet-110 has 1,730,714 parameters, 8,288 in BN (0.48%).
    c = expected_counts(110)
    assert (c["full"], c["bn"], c["random_k"]) == (1_730_714, 8_288, 8_288 + 650)  # k=2: one conv weight per γ and β


# ---- roles come from structure, not names ----------------------------------------------------

class FlaxExampleBlock(nn.Module):
    """The Flax ImageNet example's ResNetBlock naming: BatchNorms called by a partial, the
    shortcut's named ``conv_proj``/``norm_proj``."""

    filters: int

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        conv = functools.partial(nn.Conv, use_bias=False)
        y = nn.relu(norm()(conv(self.filters, (3, 3))(x)))
        y = norm()(conv(self.filters, (3, 3))(y))
        residual = norm(name="norm_proj")(conv(self.filters, (1, 1), name="conv_proj")(x))
        return nn.relu(residual + y)


class FlaxExampleNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn_init")(x))
        x = FlaxExampleBlock(16)(x, train)
        return nn.Dense(10)(x.mean(axis=(1, 2)))  # "Dense_0", not "head"


# Written out from the model above, not computed by train_modes.
NAMED_BN_LEAVES = {"['bn_init']['scale']", "['bn_init']['bias']",
                   "['FlaxExampleBlock_0']['BatchNorm_0']['scale']", "['FlaxExampleBlock_0']['BatchNorm_0']['bias']",
                   "['FlaxExampleBlock_0']['BatchNorm_1']['scale']", "['FlaxExampleBlock_0']['BatchNorm_1']['bias']",
                   "['FlaxExampleBlock_0']['norm_proj']['scale']", "['FlaxExampleBlock_0']['norm_proj']['bias']"}


def test_bn_mode_trains_exactly_the_batchnorms_of_a_model_with_named_batchnorms():
    model = FlaxExampleNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    tx = train_modes.make_optimizer(variables, "bn", 0.1, weight_decay=1e-3)
    start = train.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                    batch_stats=variables["batch_stats"])
    step = jax.jit(functools.partial(train.train_step, augment=False))
    end = start
    for i in range(3):
        end, _ = step(end, DATA.train_images[:16, :16, :16], DATA.train_labels[:16], jax.random.key(i), MEAN, STD)
    moved = set()
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(start.params),
                                     jax.tree_util.tree_leaves(end.params)):
        if np.asarray(before).tobytes() != np.asarray(after).tobytes():
            moved.add(jax.tree_util.keystr(path))
    assert moved == NAMED_BN_LEAVES
    assert train_modes.count(variables, "output")[0] == 16 * 10 + 10  # Dense_0 is the output layer


class WithLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
        return nn.Dense(2)(nn.LayerNorm(name="ln")(x.mean(axis=(1, 2))))


def test_a_parameter_no_rule_knows_is_an_error_naming_it():
    variables = WithLayerNorm().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(train_modes.UnknownParameter, match="parameter ln/(scale|bias) "):
        train_modes.make_optimizer(variables, "bn", 0.1)
    # scale/bias without running statistics is not taken for a BatchNorm either
    no_stats = {"params": {"BatchNorm_0": variables["params"]["BatchNorm_0"]}}
    with pytest.raises(train_modes.UnknownParameter, match="BatchNorm_0/"):
        train_modes.count(no_stats, "bn")


def readme_example() -> str:
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = text.split("<!-- own-model example: tests/test_train_modes.py runs this block -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_own_model_example_trains_only_batchnorm(capsys):
    namespace = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    printed = capsys.readouterr().out.strip()
    # Net: conv 3·3·3·16 = 432, BN γ+β 2·16 = 32, dense 16·10 + 10 = 170; 634 in all.
    assert printed == "trainable 32 of 634 (5.05%)"
    start, end = namespace["variables"]["params"], namespace["state"].params
    assert np.asarray(start["Conv_0"]["kernel"]).tobytes() == np.asarray(end["Conv_0"]["kernel"]).tobytes()
    assert np.asarray(start["Dense_0"]["kernel"]).tobytes() == np.asarray(end["Dense_0"]["kernel"]).tobytes()
    assert not np.array_equal(start["bn_stem"]["scale"], end["bn_stem"]["scale"])
    assert not np.array_equal(start["bn_stem"]["bias"], end["bn_stem"]["bias"])


def test_top_k_correct_on_hand_made_logits():
    from bn_jax import steps
    logits = jnp.array([[0.0, 5.0, 1.0, 2.0, 3.0, 4.0, -1.0],   # top 5: classes 1, 5, 4, 3, 2
                        [9.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])   # top 5: classes 0, 6, 5, 4, 3
    labels = jnp.array([0, 1])  # row 0: logit 0.0 is 6th highest; row 1: logit 0.0 is the lowest
    assert steps.top_k_correct(logits, labels, 5).tolist() == [False, False]
    assert steps.top_k_correct(logits, jnp.array([2, 6]), 5).tolist() == [True, True]
    assert steps.top_k_correct(logits, jnp.array([1, 0]), 1).tolist() == [True, True]
    assert steps.top_k_correct(logits[:, :3], jnp.array([0, 1]), 5).tolist() == [True, True]  # k > classes
