import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import models, train_modes

# Published / paper figures: total parameters and BatchNorm γ+β (ResNet-110: 0.48%).
COUNTS = {
    "resnet14": (175_258, 1_120),
    "resnet20": (272_474, 1_568),
    "resnet56": (855_770, 4_256),
    "resnet110": (1_730_714, 8_288),
    "resnet866": (13_979_930, 64_736),
}


def shapes(model):
    # eval_shape traces without compiling or allocating, so even ResNet-866 is cheap.
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False),
                          jax.random.key(0))


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_counts(name):
    params = shapes(models.create_model(name))["params"]
    trainable, total = train_modes.count(params, "bn")
    assert (total, trainable) == COUNTS[name]


def test_resnet110_trainable_fraction_is_the_papers():
    params = shapes(models.create_model("resnet110"))["params"]
    assert "trainable 8,288 of 1,730,714 (0.48%)" == train_modes.describe(params, "bn")


def test_width_multiplies_channels():
    v = shapes(models.create_model("resnet14", width=4))
    assert v["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 64)
    assert v["params"]["head"]["kernel"].shape == (256, 10)


def test_batch_stats_collection_exists():
    v = shapes(models.create_model("resnet20"))
    stats = jax.tree_util.tree_leaves(v["batch_stats"])
    assert len(stats) == 2 * 19 + 2 * 2  # mean and var of 19 main + 2 shortcut BNs


@pytest.mark.parametrize("bad", ["resnet21", "resnet4", "vgg11x", "resnet"])
def test_bad_model_names(bad):
    with pytest.raises(ValueError):
        models.create_model(bad)


def test_initialisation_matches_open_lth():
    params = models.init_variables(models.create_model("resnet20", width=2), jax.random.key(3))["params"]
    kernel = np.asarray(params["Block_8"]["Conv_1"]["kernel"])  # 3×3×128×128
    fan_in = 3 * 3 * 128
    std = np.sqrt(2.0 / fan_in)
    assert abs(kernel.std() / std - 1) < 0.02
    # Not truncated: a normal of 147k draws has values beyond 3 std; he_normal's truncation stops at 2.
    assert np.abs(kernel).max() > 3 * std
    gammas = [np.asarray(p) for path, p in jax.tree_util.tree_leaves_with_path(params)
              if train_modes.leaf_role(path) == "bn_scale"]
    betas = [np.asarray(p) for path, p in jax.tree_util.tree_leaves_with_path(params)
             if train_modes.leaf_role(path) == "bn_bias"]
    g = np.concatenate(gammas)
    assert g.min() >= 0 and g.max() < 1 and 0.45 < g.mean() < 0.55
    assert all((b == 0).all() for b in betas)
    ones = models.init_variables(models.create_model("resnet8", bn_init="ones"), jax.random.key(0))
    assert all((np.asarray(p) == 1).all() for path, p in jax.tree_util.tree_leaves_with_path(ones["params"])
               if train_modes.leaf_role(path) == "bn_scale")


def test_init_is_a_function_of_the_key():
    model = models.create_model("resnet8")
    a = models.init_variables(model, jax.random.key(1))
    b = models.init_variables(model, jax.random.key(1))
    c = models.init_variables(model, jax.random.key(2))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert not np.array_equal(a["params"]["Conv_0"]["kernel"], c["params"]["Conv_0"]["kernel"])
