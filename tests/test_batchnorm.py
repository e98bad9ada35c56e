"""Flax BatchNorm as configured in our models, against a NumPy reference (PyTorch semantics)."""

import numpy as np

from bn_jax import models


def bn_layer(train):
    return models.batch_norm(train)()  # the factory the ResNet builds its BatchNorms with


def test_batchnorm_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (16, 4, 4, 5)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    beta = rng.normal(size=5).astype(np.float32)
    running_mean = rng.normal(size=5).astype(np.float32)
    running_var = rng.uniform(0.5, 2, 5).astype(np.float32)
    variables = {"params": {"scale": gamma, "bias": beta},
                 "batch_stats": {"mean": running_mean, "var": running_var}}

    y, updates = bn_layer(True).apply(variables, x, mutable=["batch_stats"])
    mu = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))  # biased, as PyTorch normalises with
    expected = gamma * (x - mu) / np.sqrt(var + 1e-5) + beta  # no squared variance (the blog's bug)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
    # Running statistics move 10% of the way, as PyTorch's momentum=0.1.
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * running_mean + 0.1 * mu, rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 * running_var + 0.1 * var, rtol=1e-5)

    y_eval = bn_layer(False).apply(variables, x)
    expected_eval = gamma * (x - running_mean) / np.sqrt(running_var + 1e-5) + beta
    np.testing.assert_allclose(np.asarray(y_eval), expected_eval, rtol=1e-4, atol=1e-4)
