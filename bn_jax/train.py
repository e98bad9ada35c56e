"""Training and evaluation: pure, jitted step functions and the loop that drives them.

Everything random is a function of ``config.seed`` and the step number (init key, epoch order,
augmentation key), so a run is reproducible and can be replayed from any step.
"""

import functools
import json
import os
import time
from typing import Any, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

from bn_jax import checkpoints, input_pipeline, models, train_modes
from bn_jax.config import Config


class TrainState(train_state.TrainState):
    batch_stats: Any


def run_keys(seed: int):
    """(init key, augmentation key) of a run."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "step":  # the paper's: ×0.1 at epochs 80 and 120 of 160
        main = optax.piecewise_constant_schedule(
            config.lr, {int(0.5 * total) - warmup: 0.1, int(0.75 * total) - warmup: 0.1})
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, max(1, total - warmup))
    else:
        main = optax.constant_schedule(config.lr)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), main], [warmup])


def create_train_state(config: Config, num_classes: int, image_shape, steps_per_epoch: int) -> TrainState:
    model = config.create_model(num_classes)
    init_key, _ = run_keys(config.seed)
    variables = models.init_variables(model, init_key, image_shape)
    params = variables["params"]
    tx = train_modes.make_optimizer(params, config.train_mode, make_schedule(config, steps_per_epoch),
                                    config.momentum, config.weight_decay, k=config.k, seed=config.seed)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             batch_stats=variables["batch_stats"])


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, images, labels, key, mean, std, augment: bool = True):
    """One SGD step on a uint8 batch; returns the new state and the batch's summed metrics."""
    if augment:
        images = input_pipeline.augment(key, images)
    x = input_pipeline.normalize(images, mean, std)

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                         train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels).mean(), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss * labels.shape[0],
               "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
               "count": labels.shape[0]}
    return state, metrics


def eval_step(state: TrainState, images, labels, valid, mean, std):
    """Summed loss and correct predictions over the valid (non-padding) examples of a batch."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            input_pipeline.normalize(images, mean, std), train=False)
    return {"loss": jnp.sum(cross_entropy(logits, labels) * valid),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * valid),
            "count": jnp.sum(valid)}


def jit_train_step(augment: bool):
    return jax.jit(functools.partial(train_step, augment=augment), donate_argnums=0)


jit_eval_step = jax.jit(eval_step)


def _sum(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def evaluate(state, test_batches, mean, std) -> Dict[str, float]:
    totals = None
    for images, labels, valid in test_batches:
        m = jit_eval_step(state, images, labels, valid, mean, std)
        totals = m if totals is None else _sum(totals, m)
    totals = jax.device_get(totals)
    return {"loss": float(totals["loss"] / totals["count"]),
            "accuracy": float(totals["correct"] / totals["count"])}


def pad_batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
    """Test batches of a fixed shape (one compilation); padding is masked out by ``valid``."""
    n = len(labels)
    padded = -(-n // batch_size) * batch_size
    valid = np.arange(padded) < n
    images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(padded - n, labels.dtype)])
    return [(jax.device_put(images[i:i + batch_size]), jax.device_put(labels[i:i + batch_size]),
             jax.device_put(valid[i:i + batch_size].astype(np.float32)))
            for i in range(0, padded, batch_size)]


def device_summary() -> Dict[str, Any]:
    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": len(devices)}


def train_and_evaluate(config: Config, workdir: str, data: Optional[input_pipeline.Dataset] = None,
                       log=print) -> Dict[str, Any]:
    """Train, evaluate every epoch, and write config/metrics/summary/checkpoint into workdir."""
    config.validate()
    os.makedirs(workdir, exist_ok=True)
    config.save(os.path.join(workdir, "config.json"))
    if data is None:
        data = input_pipeline.load(config.dataset, config.data_dir)
    data = data.subset(config.max_train_examples, config.max_test_examples)
    n_train = len(data.train_labels)
    if n_train < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {n_train} training examples")
    steps_per_epoch = n_train // config.batch_size  # the remainder of each epoch's order is dropped

    state = create_train_state(config, data.num_classes, data.train_images.shape[1:], steps_per_epoch)
    trainable, total = train_modes.count(state.params, config.train_mode, config.k)
    log(f"{config.model} ×{config.width}, mode {config.train_mode}: "
        f"{train_modes.describe(state.params, config.train_mode, config.k)}")

    mean, std = (jnp.asarray(a) for a in input_pipeline.channel_stats(data.train_images))
    train_images = jax.device_put(data.train_images)
    train_labels = jax.device_put(data.train_labels)
    test_batches = pad_batches(data.test_images, data.test_labels, config.eval_batch_size)
    step_fn = jit_train_step(config.augment)
    _, augment_key = run_keys(config.seed)

    history = []
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    open(metrics_path, "w").close()
    start = time.time()
    for epoch in range(config.epochs):
        order = input_pipeline.epoch_order(config.seed, epoch, n_train)
        totals, epoch_start = None, time.time()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   dynamic_ncols=True)
        for i in bar:
            step = epoch * steps_per_epoch + i
            idx = jax.device_put(order[i * config.batch_size:(i + 1) * config.batch_size])
            state, m = step_fn(state, train_images[idx], train_labels[idx],
                               jax.random.fold_in(augment_key, step), mean, std)
            totals = m if totals is None else _sum(totals, m)
            if i % 20 == 19 or i == steps_per_epoch - 1:
                t = jax.device_get(totals)
                bar.set_postfix(loss=f"{t['loss'] / t['count']:.3f}", acc=f"{t['correct'] / t['count']:.3f}",
                                img_s=f"{t['count'] / (time.time() - epoch_start):.0f}")
        totals = jax.device_get(totals)
        train_seconds = time.time() - epoch_start
        test = evaluate(state, test_batches, mean, std)
        record = {"epoch": epoch + 1, "step": int(state.step),
                  "train_loss": float(totals["loss"] / totals["count"]),
                  "train_accuracy": float(totals["correct"] / totals["count"]),
                  "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                  "images_per_second": float(totals["count"] / train_seconds),
                  "wall_time": time.time() - start}
        if not np.isfinite(record["train_loss"]):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1} (step {int(state.step)})")
        history.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
            f"test loss {test['loss']:.4f} acc {test['accuracy']:.4f} | {record['images_per_second']:.0f} img/s")

    final = history[-1] if history else {"test_accuracy": evaluate(state, test_batches, mean, std)["accuracy"]}
    speeds = [r["images_per_second"] for r in history[1:] or history]
    summary = {"model": config.model, "width": config.width, "train_mode": config.train_mode,
               "dataset": config.data_dir or config.dataset,
               "total_params": total, "trainable_params": trainable,
               "trainable_fraction": trainable / total,
               "final_test_accuracy": final["test_accuracy"],
               "best_test_accuracy": max([r["test_accuracy"] for r in history] or [final["test_accuracy"]]),
               "epochs": config.epochs, "steps": int(state.step),
               "images_per_second": float(np.mean(speeds)) if speeds else None,
               "wall_time": time.time() - start, **device_summary()}
    checkpoints.save_final(workdir, state)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
