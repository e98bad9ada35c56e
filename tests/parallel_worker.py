"""Run a few train steps over 1 and over N simulated CPU devices in one process; save the results.

Used by tests/test_parallel.py in a subprocess, because the device count must be fixed (by
XLA_FLAGS) before JAX starts.
"""

import functools
import sys

import jax
import numpy as np

from bn_jax import augmentation, parallel, roofline, train, train_modes
from bn_jax import program as program_lib
from bn_jax.config import ExperimentConfig, RuntimeConfig

from conftest import random_dataset


def experiment(mode: str) -> ExperimentConfig:
    return ExperimentConfig(model="resnet8", train_mode=mode, batch_size=16, lr=0.1, schedule="constant")


def build(mode: str, num_devices: int):
    """The trainer's program for ``mode`` over ``num_devices`` (step loop), and its initial state."""
    program = program_lib.build_program(experiment(mode), RuntimeConfig(num_devices=num_devices, loop="step"),
                                        random_dataset(n_train=64, n_test=8), parallel.make_mesh(num_devices))
    return program, program.put(train.create_train_state(experiment(mode), 10, (32, 32, 3), steps_per_epoch=4))


def count_convolutions(mode: str, n: int) -> int:
    """Convolutions in the compiled sharded step the trainer runs (per-device program)."""
    program, state = build(mode, n)
    return sum(roofline.convolution_counts(program.compile(state, program.zero_totals()).as_text()).values())


def ghost_train_step(state, images, labels, key, mean, std, groups: int):
    """``train.train_step`` with "ghost" BatchNorm: statistics over each of ``groups`` slices of the
    batch, as per-device BN would compute them on ``groups`` devices (gradients still summed)."""
    x = augmentation.normalize(augmentation.augment(key, images), mean, std)
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
    """``steps`` steps of ResNet-8 on ``num_devices``, by the program the trainer runs;
    ``ghost_groups`` > 0: the same batches and keys on one device, with BN statistics per group."""
    program, state = build(mode, num_devices)
    totals, ghost = program.zero_totals(), jax.jit(functools.partial(ghost_train_step, groups=ghost_groups))
    losses = []
    for i in range(steps):
        before = float(totals["loss"])
        if ghost_groups:
            idx = program.order(0)[16 * i:16 * (i + 1)]
            state, m = ghost(state, program.train_data[0][idx], program.train_data[1][idx],
                             jax.random.fold_in(program.augment_key, i), program.mean, program.std)
            totals = {**totals, "loss": totals["loss"] + m["loss"]}
        else:
            state, totals = program.run(state, totals, 0, i, i + 1)
        losses.append((float(totals["loss"]) - before) / 16)
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
        initial = train.create_train_state(ExperimentConfig(model="resnet8", train_mode=mode), 10, (32, 32, 3), 4)
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
