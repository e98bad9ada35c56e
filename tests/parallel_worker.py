"""Run a few train steps over 1 and over N simulated CPU devices in one process; save the results.

Used by tests/test_parallel.py in a subprocess, because the device count must be fixed (by
XLA_FLAGS) before JAX starts.
"""

import sys

import jax
import numpy as np

from bn_jax import input_pipeline, parallel, roofline, train, train_modes
from bn_jax.config import Config

from conftest import random_dataset


def count_convolutions(mode: str, n: int) -> int:
    """Convolutions in the compiled sharded step (per-device program)."""
    config = Config(model="resnet8", train_mode=mode, batch_size=16, num_devices=n)
    mesh = parallel.make_mesh(n)
    state = parallel.replicate(train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=4), mesh)
    x = parallel.shard_global(np.zeros((16, 32, 32, 3), np.uint8), mesh)
    y = parallel.shard_global(np.zeros(16, np.int32), mesh)
    hlo = train.jit_train_step(True, mesh).lower(state, x, y, jax.random.key(0), np.zeros(3, np.float32),
                                                 np.ones(3, np.float32)).compile().as_text()
    return sum(roofline.convolution_counts(hlo).values())


MEAN, STD = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)


def ghost_train_step(state, images, labels, key, mean, std, groups: int):
    """``train.train_step`` with "ghost" BatchNorm: statistics over each of ``groups`` slices of the
    batch, as per-device BN would compute them on ``groups`` devices (gradients still summed)."""
    x = input_pipeline.normalize(input_pipeline.augment(key, images), mean, std)
    x = x.reshape(groups, -1, *x.shape[1:])

    def loss_fn(params):
        def apply(xs):
            return state.apply_fn({"params": params, "batch_stats": state.batch_stats}, xs, train=True,
                                  mutable=["batch_stats"])
        logits, updates = jax.vmap(apply)(x)
        stats = jax.tree_util.tree_map(lambda s: s.mean(0), updates["batch_stats"])
        return train.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels).mean(), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=stats), {"loss": loss * labels.shape[0]}


def run(mode: str, num_devices: int, steps: int = 3, ghost_groups: int = 0):
    """``steps`` steps of ResNet-8 on ``num_devices``; ``ghost_groups`` > 0 computes BN statistics
    per group instead (one device)."""
    data = random_dataset(n_train=64, n_test=8)
    config = Config(model="resnet8", train_mode=mode, batch_size=16, lr=0.1, schedule="constant",
                    num_devices=num_devices)
    mesh = parallel.make_mesh(num_devices)
    state = parallel.replicate(train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=4), mesh)
    mean, std = parallel.replicate((MEAN, STD), mesh)
    step = train.jit_train_step(True, mesh)
    if ghost_groups:
        step = jax.jit(lambda *a: ghost_train_step(*a, groups=ghost_groups))
    losses = []
    for i in range(steps):
        batch = slice(16 * i, 16 * (i + 1))
        x, y = (parallel.shard_global(a[batch], mesh) for a in (data.train_images, data.train_labels))
        state, m = step(state, x, y, jax.random.key(i), mean, std)
        losses.append(float(m["loss"]) / 16)
    return state, np.array(losses)


def save_leaves(results, key, state, losses):
    results[f"{key}/loss"] = losses
    for path, leaf in jax.tree_util.tree_leaves_with_path({"params": state.params,
                                                           "batch_stats": state.batch_stats}):
        results[f"{key}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)


def replicas_identical(tree) -> bool:
    return all(all(np.asarray(s.data).tobytes() == np.asarray(leaf.addressable_shards[0].data).tobytes()
                   for s in leaf.addressable_shards) for leaf in jax.tree_util.tree_leaves(tree))


def main(out_path: str, n: int):
    results = {}
    for mode in ("full", "bn"):
        initial = train.create_train_state(Config(model="resnet8", train_mode=mode), 10, (32, 32, 3), 4)
        save_leaves(results, f"{mode}/initial", initial, np.zeros(0))
        mask = jax.tree_util.tree_leaves(train_modes.trainable_mask(train_modes.variables_of(initial), mode))
        for devices in (1, n):
            state, losses = run(mode, devices)
            frozen = [a.tobytes() == np.asarray(b).tobytes() for a, b, trainable in zip(
                jax.tree_util.tree_leaves(initial.params), jax.tree_util.tree_leaves(state.params), mask)
                if not trainable]
            key = f"{mode}/{devices}"
            results[f"{key}/frozen_unchanged"] = np.array(all(frozen) and len(frozen) > 0 or mode == "full")
            save_leaves(results, key, state, losses)
            results[f"{key}/replicated"] = np.array(replicas_identical((state.params, state.batch_stats)))
            results[f"{key}/num_shards"] = np.array(len(state.params["Conv_0"]["kernel"].addressable_shards))
        # What the 8-device tolerance must catch: BN statistics per device (ghost BN over n groups).
        save_leaves(results, f"{mode}/ghost", *run(mode, 1, ghost_groups=n))
        results[f"{mode}/{n}/convolutions"] = np.array(count_convolutions(mode, n))
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
