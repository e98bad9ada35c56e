"""The PyTorch baseline of benchmarks.benchmark: same shapes as bn_jax, and the blog's loop."""

import math

import jax
import numpy as np
import pytest

from conftest import TORCH_REQUIRED

if TORCH_REQUIRED:
    import torch  # CI's torch leg must fail loudly, not skip, when torch is missing
else:
    torch = pytest.importorskip("torch")

from bn_jax import models
from benchmarks import torch_reference


def jax_shapes(model, width):
    """(torch-layout shape, is BN) per bn_jax parameter: HWIO kernels → OIHW, (in, out) → (out, in).
    eval_shape traces init_variables without compiling it, which would take seconds per model."""
    net = models.create_model(model, width=width, num_classes=10)
    variables = jax.eval_shape(lambda key: models.init_variables(net, key, (32, 32, 3)), jax.random.key(0))
    leaves = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    to_torch = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}
    return sorted((tuple(np.shape(leaf)[i] for i in to_torch[np.ndim(leaf)]),
                   "BatchNorm" in jax.tree_util.keystr(path)) for path, leaf in leaves)


def torch_shapes(net):
    bn = torch_reference.bn_parameter_names(net)
    return sorted((tuple(p.shape), name in bn) for name, p in net.named_parameters())


@pytest.mark.parametrize("model,width", [("resnet20", 1), ("resnet56", 1), ("resnet20", 2)])
def test_same_parameters_as_bn_jax(model, width):
    net = torch_reference.build_resnet(model, width)
    expected = jax_shapes(model, width)
    assert torch_shapes(net) == expected
    assert torch_reference.count_parameters(net) == sum(math.prod(s) for s, _ in expected)
    assert torch_reference.count_parameters(net, bn_only=True) == sum(math.prod(s) for s, bn in expected if bn)


def snapshot(net):
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def changed(net, before):
    return {name for name, p in net.named_parameters() if not torch.equal(p, before[name])}


def test_bn_runner_trains_everything_on_step_one_then_only_bn():
    run = torch_reference.make_runner("resnet20", 1, 8, "bn", device="cpu")
    net = run.model
    bn = torch_reference.bn_parameter_names(net)
    names = {name for name, _ in net.named_parameters()}
    init = snapshot(net)
    run(1)
    assert changed(net, init) == names  # the blog's flaw: the freeze comes after step 1's update
    assert torch_reference.count_parameters(net, trainable_only=True) == \
        torch_reference.count_parameters(net, bn_only=True)
    after_one = snapshot(net)
    assert math.isfinite(float(run(2)))
    assert changed(net, after_one) == bn
    assert all(p.grad is None for name, p in net.named_parameters() if name not in bn)


def test_full_runner_trains_everything():
    run = torch_reference.make_runner("resnet20", 1, 8, "full", device="cpu")
    init = snapshot(run.model)
    run(2)
    assert changed(run.model, init) == {name for name, _ in run.model.named_parameters()}
    assert torch_reference.count_parameters(run.model, trainable_only=True) == \
        torch_reference.count_parameters(run.model)


@pytest.mark.parametrize("name", ["resnet21", "resnet2", "vgg11", "imagenet_resnet18"])
def test_rejects_other_models(name):
    with pytest.raises(ValueError, match="6n\\+2"):
        torch_reference.build_resnet(name)


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        torch_reference.make_runner("resnet20", 1, 8, "frozen", device="cpu")


@pytest.mark.slow
def test_compiled_bn_runner():
    """Cold, torch.compile takes about a minute here on 2 CPU cores (step 2 recompiles: the
    freeze changes requires_grad); with inductor's on-disk cache warm, seconds."""
    run = torch_reference.make_runner("resnet20", 1, 8, "bn", compile=True, device="cpu")
    bn = torch_reference.bn_parameter_names(run.model)
    eager = torch_reference.make_runner("resnet20", 1, 8, "bn", device="cpu")
    assert float(run(1)) == pytest.approx(float(eager(1)), rel=1e-4)
    after_one = snapshot(run.model)
    assert math.isfinite(float(run(1)))
    assert changed(run.model, after_one) == bn
