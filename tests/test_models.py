import flax.linen as nn
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
    trainable, total = train_modes.count(shapes(models.create_model(name)), "bn")
    assert (total, trainable) == COUNTS[name]


def test_resnet110_trainable_fraction_is_the_papers():
    variables = shapes(models.create_model("resnet110"))
    assert "trainable 8,288 of 1,730,714 (0.48%)" == train_modes.describe(variables, "bn")


def test_width_multiplies_channels():
    v = shapes(models.create_model("resnet14", width=4))
    assert v["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 64)
    assert v["params"]["head"]["kernel"].shape == (256, 10)


def test_batch_stats_collection_exists():
    v = shapes(models.create_model("resnet20"))
    stats = jax.tree_util.tree_leaves(v["batch_stats"])
    assert len(stats) == 2 * 19 + 2 * 2  # mean and var of 19 main + 2 shortcut BNs


@pytest.mark.parametrize("bad", ["resnet21", "resnet4", "vgg11x", "resnet", "vgg12"])
def test_bad_model_names(bad):
    with pytest.raises(ValueError):
        models.create_model(bad)


@pytest.mark.slow
def test_initialisation_matches_open_lth():
    variables = models.init_variables(models.create_model("resnet20", width=2), jax.random.key(3))
    params = variables["params"]
    kernel = np.asarray(params["Block_8"]["Conv_1"]["kernel"])  # 3×3×128×128
    fan_in = 3 * 3 * 128
    std = np.sqrt(2.0 / fan_in)
    assert abs(kernel.std() / std - 1) < 0.02
    # Not truncated: a normal of 147k draws has values beyond 3 std; he_normal's truncation stops at 2.
    assert np.abs(kernel).max() > 3 * std
    gammas = [np.asarray(p) for _, role, p in train_modes.role_leaves(variables) if role == "bn_scale"]
    betas = [np.asarray(p) for _, role, p in train_modes.role_leaves(variables) if role == "bn_bias"]
    g = np.concatenate(gammas)
    assert g.min() >= 0 and g.max() < 1 and 0.45 < g.mean() < 0.55
    assert all((b == 0).all() for b in betas)
    ones = models.init_variables(models.create_model("resnet8", bn_init="ones"), jax.random.key(0))
    assert all((np.asarray(p) == 1).all() for _, role, p in train_modes.role_leaves(ones) if role == "bn_scale")


def test_init_is_a_function_of_the_key():
    model = models.create_model("resnet8")
    a = models.init_variables(model, jax.random.key(1))
    b = models.init_variables(model, jax.random.key(1))
    c = models.init_variables(model, jax.random.key(2))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert not np.array_equal(a["params"]["Conv_0"]["kernel"], c["params"]["Conv_0"]["kernel"])


# open_lth cifar_vgg plans, written out here: conv channels, "M" = max-pool.
PLANS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512],
}


def vgg_hand_count(plan):
    """(conv+fc weights, conv biases, BN γ+β, fc bias) by hand."""
    channels = [c for c in plan if c != "M"]
    c_in = [3] + channels[:-1]
    weights = sum(9 * a * b for a, b in zip(c_in, channels)) + 512 * 10
    return weights, sum(channels), 2 * sum(channels), 10


@pytest.mark.parametrize("name", list(PLANS))
def test_vgg_parameter_counts(name):
    variables = shapes(models.create_model(name))
    weights, conv_bias, bn, fc_bias = vgg_hand_count(PLANS[name])
    assert train_modes.count(variables, "full")[1] == weights + conv_bias + bn + fc_bias
    assert train_modes.count(variables, "bn")[0] == bn
    roles = [role for _, role, _ in train_modes.role_leaves(variables)]
    assert roles.count("conv_bias") == roles.count("conv") == len([c for c in PLANS[name] if c != "M"])


def test_vgg19_has_the_published_20m_weights():
    # Frankle & Carbin (ICLR 2019), Figure 2: VGG-19 for CIFAR-10 has 20.0M weights (conv + fc).
    weights = sum(x.size for _, role, x in train_modes.role_leaves(shapes(models.create_model("vgg19")))
                  if role in ("conv", "head_kernel"))
    assert round(weights / 1e6, 1) == 20.0


def test_vgg_forward_shape_and_random_k_freezes_conv_biases():
    model = models.create_model("vgg11", num_classes=7)
    variables = models.init_variables(model, jax.random.key(0))
    assert model.apply(variables, jnp.zeros((2, 32, 32, 3))).shape == (2, 7)
    trainable = train_modes.trainable_mask(variables, "random_k")
    assert not any(jax.tree_util.tree_leaves(trainable["Conv_0"]["bias"]))


def bn_outputs(bn_placement, train=True):
    model = models.create_model("resnet8", bn_init="ones", bn_before_relu=bn_placement == "before")
    variables = models.init_variables(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    _, state = model.apply(variables, x, train=train, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda m, _: isinstance(m, nn.BatchNorm))
    return np.asarray(state["intermediates"]["Block_0"]["BatchNorm_0"]["__call__"][0])


@pytest.mark.parametrize("placement", ["before", "after"])
def test_bn_placement(placement):
    # After the ReLU, every zeroed activation normalises to the same value: the channel minimum
    # repeats. Before it, BN sees continuous conv outputs and the minimum is unique.
    y = bn_outputs(placement).reshape(-1, 16)
    repeats = (y == y.min(axis=0)).sum(axis=0)
    assert (repeats > 100).all() if placement == "after" else (repeats == 1).all()


def test_no_affine_model_has_no_gamma_beta_but_keeps_running_stats():
    v = shapes(models.create_model("resnet20", affine=False))
    roles = {role for _, role, _ in train_modes.role_leaves(v)}
    assert roles == {"conv", "head_kernel", "head_bias"}
    assert len(jax.tree_util.tree_leaves(v["batch_stats"])) == 2 * 21


TORCHVISION = {  # torchvision's model cards (He et al. 2016 architectures), parameter counts
    "imagenet_resnet18": 11_689_512, "imagenet_resnet34": 21_797_672, "imagenet_resnet50": 25_557_032,
    "imagenet_resnet101": 44_549_160, "imagenet_resnet152": 60_192_808}


def bottleneck_resnet_count(blocks_per_stage, num_classes=1000):
    """Parameters of a bottleneck ImageNet ResNet, counted by hand from He et al. 2016, Table 1:
    a 7×7 stem to 64 channels, then per stage blocks of 1×1 (w), 3×3 (w), 1×1 (4w) convs, each
    with BN (γ, β); a 1×1 conv + BN shortcut where the channels change; a dense head."""
    total, c_in = 7 * 7 * 3 * 64 + 2 * 64, 64
    for stage, n in enumerate(blocks_per_stage):
        w = 64 * 2**stage
        for _ in range(n):
            total += c_in * w + 2 * w + 9 * w * w + 2 * w + w * 4 * w + 2 * 4 * w
            if c_in != 4 * w:
                total += c_in * 4 * w + 2 * 4 * w
            c_in = 4 * w
    return total + c_in * num_classes + num_classes


def test_the_hand_count_matches_torchvision_where_it_publishes():
    assert bottleneck_resnet_count((3, 4, 6, 3)) == TORCHVISION["imagenet_resnet50"]
    assert bottleneck_resnet_count((3, 4, 23, 3)) == TORCHVISION["imagenet_resnet101"]
    assert bottleneck_resnet_count((3, 8, 36, 3)) == TORCHVISION["imagenet_resnet152"]


def test_imagenet_resnet200_has_the_hand_counted_parameters():
    # ResNet-200 (He et al. 2016b, "Identity Mappings"): stages of 3, 24, 36, 3 bottleneck blocks;
    # torchvision has no ResNet-200, so the count is checked by hand (validated above on 50…152).
    model = models.create_model("imagenet_resnet200", num_classes=1000)
    assert train_modes.count(shapes_of(model), "full")[1] == bottleneck_resnet_count((3, 24, 36, 3))


@pytest.mark.parametrize("name, published", list(TORCHVISION.items()))
def test_imagenet_resnet_parameter_counts(name, published):
    model = models.create_model(name, num_classes=1000)
    assert train_modes.count(shapes_of(model), "full")[1] == published
    out = jax.eval_shape(lambda: model.apply(jax.tree_util.tree_map(jnp.zeros_like, shapes_of(model)),
                                             jnp.zeros((2, 224, 224, 3))))
    assert out.shape == (2, 1000)


def shapes_of(model):
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 224, 224, 3))), jax.random.key(0))


@pytest.mark.parametrize("mode", ["full", "bn", "bn_output", "output", "gamma_only", "beta_only", "random_k",
                                  "no_affine"])
def test_every_train_mode_applies_to_the_imagenet_resnets(mode):
    """ResNet-50's roles, found by structure: BN-only trains exactly γ and β of its 53 BatchNorms
    (hand count: 2 × 26,560 channels, as torchvision's ResNet-50), and every mode is accepted."""
    from bn_jax import train_modes
    model = models.create_model("imagenet_resnet50", num_classes=1000, **train_modes.model_options(mode))
    shapes = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), (224, 224, 3)))
    trainable, total = train_modes.count(shapes, mode)
    expected = {"bn": 53_120, "gamma_only": 26_560, "beta_only": 26_560, "output": 2_049_000,
                "bn_output": 53_120 + 2_049_000}
    if mode in expected:
        assert trainable == expected[mode]
    elif mode == "no_affine":
        assert trainable == total == 25_557_032 - 53_120
    else:
        assert 0 < trainable <= total == 25_557_032
