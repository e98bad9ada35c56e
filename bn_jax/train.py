"""Training and evaluation: pure, jitted step functions and the loop that drives them.

Everything random is a function of ``config.seed`` and the step number (init key, epoch order,
augmentation key), so a run is reproducible and can be replayed from any step.

The whole training set lives on the device as uint8. Each epoch's order is drawn there, and a
step gathers its batch, augments it and trains without the host touching the data. The ``fused``
loop runs ``steps_per_call`` such steps as one compiled ``fori_loop``, so the host only wakes
between calls (progress bar, signals, checkpoints); the ``step`` loop makes one jitted call per
step. Both trace the same step function (``train_step_at``). ``auto`` picks ``step`` on CPU only,
where XLA compiles convolutions inside a loop body to much slower code (jax-ml/jax#12868; see
docs/performance.md for the measurement).
"""

import contextlib
import functools
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

from bn_jax import checkpoints, input_pipeline, metrics_log, models, parallel, preemption, provenance, train_modes
from bn_jax import workdir as workdir_lib
from bn_jax.config import Config


class TrainState(train_state.TrainState):
    batch_stats: Any


def run_keys(seed: int):
    """(init key, augmentation key, data-order key) of a run (train_modes' masks use tag 2)."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1), jax.random.fold_in(root, 3)


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule == "step":  # the paper's: ×0.1 at epochs 80 and 120 of 160
        drops = {}
        for fraction in (0.5, 0.75):  # steps counted from the end of warm-up
            boundary = int(fraction * total) - warmup
            drops[boundary] = drops.get(boundary, 1.0) * 0.1  # both drops may land on one step
        main = optax.piecewise_constant_schedule(config.lr, drops)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, max(1, total - warmup))
    else:
        main = optax.constant_schedule(config.lr)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), main], [warmup])


def create_train_state(config: Config, num_classes: int, image_shape, steps_per_epoch: int) -> TrainState:
    model = config.create_model(num_classes)
    init_key, _, _ = run_keys(config.seed)
    variables = models.init_variables(model, init_key, image_shape)
    params = variables["params"]
    tx = train_modes.make_optimizer(variables, config.train_mode, make_schedule(config, steps_per_epoch),
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


def train_step_at(state: TrainState, totals, data, order, i, step, key, mean, std, *,
                  batch_size: int, augment: bool, sharding=None):
    """Step ``i`` of an epoch whose shuffled order is ``order`` (global step ``step``).

    Gathers the batch from the device-resident ``data`` (images, labels), trains on it and adds
    its metrics to ``totals``; ``i`` and ``step`` may be traced, so one compilation serves all.
    """
    idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
    images, labels = data[0][idx], data[1][idx]
    if sharding is not None:
        images, labels = jax.lax.with_sharding_constraint((images, labels), sharding)
    state, metrics = train_step(state, images, labels, jax.random.fold_in(key, step), mean, std, augment)
    return state, accumulate(totals, metrics, step)


def train_steps(state: TrainState, totals, data, order, start, stop, epoch_step, key, mean, std, **kw):
    """Steps ``start``…``stop - 1`` of an epoch as one ``fori_loop`` (``epoch_step``: its first step)."""
    def body(i, carry):
        return train_step_at(*carry, data, order, i, epoch_step + i, key, mean, std, **kw)
    return jax.lax.fori_loop(start, stop, body, (state, totals))


def resolve_loop(loop: str, platform: str) -> str:
    if loop != "auto":
        return loop
    return "step" if platform == "cpu" else "fused"


def loop_for(config: Config, mesh=None) -> str:
    """The loop ``config.loop`` means on the mesh's devices (or the default device)."""
    return resolve_loop(config.loop, (jax.devices() if mesh is None else mesh.devices.flat)[0].platform)


def epoch_order_fn(n: int, mesh=None):
    """``order(key, epoch)``: the jitted epoch permutation, replicated over ``mesh`` if given."""
    out = None if mesh is None else parallel.replicated(mesh)
    return jax.jit(functools.partial(input_pipeline.epoch_order, n=n), out_shardings=out)


def jit_epoch_steps(config: Config, mesh=None):
    """The loop's jitted step function: ``fused`` runs a range of steps, ``step`` exactly one.

    Both take ``(state, totals, data, order, start, epoch_step, key, mean, std)`` plus ``stop``
    for the fused one; state is donated, so its buffers are reused in place.
    """
    kw = dict(batch_size=config.batch_size, augment=config.augment,
              sharding=None if mesh is None else parallel.sharded(mesh))
    out = None if mesh is None else parallel.replicated(mesh)
    if loop_for(config, mesh) == "fused":
        return jax.jit(functools.partial(train_steps, **kw), donate_argnums=0, out_shardings=out)
    step = jax.jit(functools.partial(train_step_at, **kw), donate_argnums=0, out_shardings=out)
    return lambda state, totals, data, order, start, stop, epoch_step, key, mean, std: step(
        state, totals, data, order, start, epoch_step + start, key, mean, std)


def eval_step(state: TrainState, images, labels, valid, mean, std):
    """Summed loss and correct predictions over the valid (non-padding) examples of a batch."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            input_pipeline.normalize(images, mean, std), train=False)
    return {"loss": jnp.sum(cross_entropy(logits, labels) * valid),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * valid),
            "count": jnp.sum(valid)}


def jit_train_step(augment: bool, mesh=None):
    """The jitted step; over a mesh the state stays replicated and batches arrive sharded."""
    out = None if mesh is None else parallel.replicated(mesh)
    return jax.jit(functools.partial(train_step, augment=augment), donate_argnums=0, out_shardings=out)


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


def pad_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, mesh):
    """Test batches of one fixed shape, sharded over the mesh; padding is masked out by ``valid``."""
    devices, n = mesh.devices.size, len(labels)
    batch_size = -(-min(batch_size, n) // devices) * devices  # a batch beyond the test set is all padding
    padded = -(-n // batch_size) * batch_size
    valid = (np.arange(padded) < n).astype(np.float32)
    images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(padded - n, labels.dtype)])
    return [tuple(parallel.shard_global(a[i:i + batch_size], mesh) for a in (images, labels, valid))
            for i in range(0, padded, batch_size)]


def device_summary(mesh, batch_size: int) -> Dict[str, Any]:
    devices = mesh.devices.flatten()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": len(devices), "process_count": jax.process_count(),
            "per_device_batch_size": batch_size // len(devices)}


def zero_totals():
    """Per-epoch train metric sums; ``nonfinite_step`` is the first step whose loss was NaN/Inf."""
    return {"loss": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.int32),
            "count": jnp.zeros((), jnp.int32), "nonfinite_step": jnp.full((), -1, jnp.int32)}


@jax.jit
def accumulate(totals, metrics, step):
    """Add a step's metrics to the epoch sums on the device (no host sync)."""
    bad = (totals["nonfinite_step"] < 0) & ~jnp.isfinite(metrics["loss"])
    return {"loss": totals["loss"] + metrics["loss"], "correct": totals["correct"] + metrics["correct"],
            "count": totals["count"] + metrics["count"],
            "nonfinite_step": jnp.where(bad, step, totals["nonfinite_step"])}


def check_finite(totals, epoch: int, last_good=None) -> None:
    """Raise FloatingPointError naming the first step with a NaN/Inf loss (``totals`` on host)."""
    if totals["nonfinite_step"] >= 0 or not np.isfinite(totals["loss"]):
        raise FloatingPointError(f"non-finite training loss at step {int(totals['nonfinite_step'])} "
                                 f"(epoch {epoch + 1}); stopped without saving this state "
                                 f"(last good checkpoint: step {last_good})")


def step_entries(workdir: str) -> List[str]:
    """Names in ``<workdir>/checkpoints`` that look like saved steps (folders, or stray files)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []


def prepare_workdir(workdir: str, config: Config, restart: bool, log=print) -> None:
    """--restart: remove an earlier run's outputs. Otherwise refuse outputs we cannot resume from."""
    outputs = ["checkpoints", "corrupt_checkpoints", "metrics.jsonl", "summary.json", "config.json"]
    if restart:
        for name in outputs:
            path = os.path.join(workdir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        log(f"--restart: removed earlier outputs in {workdir}")
        return
    ckpt_dir = os.path.join(workdir, "checkpoints")
    names = step_entries(workdir)
    stray = sorted(n for n in names if not os.path.isdir(os.path.join(ckpt_dir, n)))
    if stray:  # Orbax would skip them silently
        message = (f"{os.path.join(ckpt_dir, stray[0])} is a file, not a checkpoint folder"
                   + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""))
        if len(stray) == len(names):
            raise checkpoints.CheckpointError(f"{message}, and no checkpoint folder is left; move it away and "
                                              "re-run to start over, or pass --restart")
        log(f"warning: {message}; ignoring it")
    if len(names) > len(stray):
        return  # resume; the checkpoint itself is checked against the config
    quarantine = os.path.join(workdir, "corrupt_checkpoints")
    if os.path.isdir(quarantine) and os.listdir(quarantine):
        raise checkpoints.CheckpointError(f"every checkpoint in {ckpt_dir} was found corrupt and moved to "
                                          f"{quarantine}; pass --restart to start over")
    config_path = os.path.join(workdir, "config.json")
    if os.path.exists(os.path.join(workdir, "summary.json")):
        raise checkpoints.CheckpointError(f"{workdir} holds a finished run without checkpoints; pass "
                                          "--restart to overwrite it or choose another --workdir")
    if os.path.exists(config_path):
        with open(config_path) as f:
            diff = checkpoints.incompatible_keys(json.load(f), config.to_dict())
        if diff:
            raise checkpoints.CheckpointError(
                f"{workdir} holds outputs of a run with different {', '.join(diff)} and no checkpoint; "
                "pass --restart to overwrite them or choose another --workdir")


PREEMPTION_SYNC_STEPS = 20
MAX_STEPS = 2**31 - 1  # the train state's step counter is int32


class _Loop:
    """The epoch loop's fixed parts: data on the device, the step function, checkpoints, signals."""

    def __init__(self, config: Config, data, workdir: str, mesh, ckpt, guard, expected, log):
        self.config, self.ckpt, self.guard, self.expected, self.log = config, ckpt, guard, expected, log
        self.mesh, self.writer = mesh, parallel.is_writer()
        self.n_train = len(data.train_labels)
        self.steps_per_epoch = self.n_train // config.batch_size
        self.mean, self.std = parallel.replicate(input_pipeline.normalization(config.normalize, data.train_images),
                                                 mesh)
        self.train_data = parallel.replicate((data.train_images, data.train_labels), mesh)
        self.test_batches = pad_batches(data.test_images, data.test_labels, config.eval_batch_size, mesh)
        self.steps_fn = jit_epoch_steps(config, mesh)
        self.loop = loop_for(config, mesh)
        _, self.augment_key, self.order_key = run_keys(config.seed)
        self.order_fn = epoch_order_fn(self.n_train, mesh)
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.history = []
        self.past_wall_time = 0.0
        self.session_start = time.time()

    def wall_time(self) -> float:
        return self.past_wall_time + time.time() - self.session_start

    def run_keys_meta(self, epoch: int) -> Dict[str, Any]:
        order = np.asarray(jax.device_get(self.order_fn(self.order_key, epoch)))
        return {"seed": self.config.seed, "epoch": epoch,
                "augment_key_data": np.asarray(jax.random.key_data(self.augment_key)).tolist(),
                "epoch_order_sha256": checkpoints.order_hash(order)}

    def resume(self, state):
        """Restore the newest good checkpoint (if any) into ``state`` and the partial-epoch sums."""
        self.totals = parallel.replicate(zero_totals(), self.mesh)
        restored = self.ckpt.restore_latest(state, zero_totals(), self.expected)
        if restored is None:
            if self.writer:
                metrics_log.write_metrics(self.metrics_path, [])
            return state
        state, totals, meta = restored
        self.totals = parallel.replicate(totals, self.mesh)
        step = int(state.step)
        if meta["rng"] != self.run_keys_meta(step // self.steps_per_epoch):
            raise checkpoints.CheckpointError(
                f"checkpoint step {step}: this JAX/NumPy version derives a different data order or "
                "augmentation key from the seed; an exact resume is impossible (pass --restart)")
        self.history = meta["history"]
        self.past_wall_time = meta["wall_time"]
        if self.writer:
            metrics_log.write_metrics(self.metrics_path, self.history)
        self.log(f"resumed from checkpoint step {step} (epoch {step // self.steps_per_epoch + 1}, "
                 f"step {step % self.steps_per_epoch} of {self.steps_per_epoch}) in {self.ckpt.path}")
        return state

    def save(self, state, totals) -> None:
        step = int(state.step)
        check_finite(jax.device_get(totals), step // self.steps_per_epoch, self.ckpt.latest_saved())
        self.ckpt.save(state, totals, {**self.expected, "epoch": step // self.steps_per_epoch,
                                       "position": step % self.steps_per_epoch,
                                       "steps_per_epoch": self.steps_per_epoch, "history": list(self.history),
                                       "wall_time": self.wall_time(),
                                       "rng": self.run_keys_meta(step // self.steps_per_epoch)})

    def after_step(self, state, totals, step: int, epoch_done: Optional[int] = None) -> None:
        """Checkpoint when due or when a signal asked for it (then raise Preempted).

        ``step`` is the host-side count of steps done (no device sync to read ``state.step``).
        """
        final = step == self.config.epochs * self.steps_per_epoch and epoch_done is not None
        stop = self.stop_requested(step, epoch_done)
        reason = self.guard.reason if self.guard.requested else "another process was signalled"
        if stop:
            self.log(f"{reason}: saving a checkpoint at step {step} and exiting")
        if final or stop or self.ckpt.options.due(step, epoch_done):
            self.save(state, totals)
        if stop:
            self.ckpt.wait()
            raise preemption.Preempted(reason, step, self.ckpt.path)

    def stop_requested(self, step: int, epoch_done: Optional[int]) -> bool:
        """Whether a SIGTERM/SIGINT asks us to checkpoint and exit at this step.

        All processes must stop at the same step (the save and the next step are collective), so
        a multi-host job combines the local flags with an all-gather, every ``PREEMPTION_SYNC_STEPS``
        steps and at epoch ends only, to keep the hot path free of host round trips.
        """
        if jax.process_count() == 1:
            return self.guard.requested
        if self.loop == "step" and step % PREEMPTION_SYNC_STEPS and epoch_done is None:
            return False
        return parallel.any_process(self.guard.requested)

    def call_end(self, epoch: int, i: int) -> int:
        """Where the call starting at step ``i`` of ``epoch`` ends: the epoch's end, ``steps_per_call``
        steps on, or the next step that must reach the host (a checkpoint, a test's fault hook)."""
        if self.loop == "step":
            return i + 1
        spe, base = self.steps_per_epoch, epoch * self.steps_per_epoch
        ends = [spe, i + self.config.steps_per_call]
        due = self.ckpt.options.next_due_step(base + i)
        if due is not None:
            ends.append(due - base)
        if jax.process_count() == 1:  # every process must make the same calls
            ends += [s - base for s in checkpoints.fault_steps()]
        return min(e for e in ends if e > i)

    def train_epoch(self, state, totals, epoch: int):
        """Steps from the epoch's current position to its end; returns (state, totals, images/s)."""
        config, spe = self.config, self.steps_per_epoch
        order = self.order_fn(self.order_key, epoch)
        first = i = int(state.step) - epoch * spe
        epoch_start = time.time()
        bar = tqdm(total=spe, initial=first, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   dynamic_ncols=True, disable=not self.writer)
        while i < spe:
            end = self.call_end(epoch, i)
            state, totals = self.steps_fn(state, totals, self.train_data, order, i, end, epoch * spe,
                                          self.augment_key, self.mean, self.std)
            bar.update(end - i)
            if self.loop == "fused" or end % 20 == 0 or end == spe:  # reading totals waits for the device
                t = jax.device_get(totals)
                check_finite(t, epoch, self.ckpt.latest_saved())
                bar.set_postfix(loss=f"{t['loss'] / t['count']:.3f}", acc=f"{t['correct'] / t['count']:.3f}",
                                img_s=f"{(end - first) * config.batch_size / (time.time() - epoch_start):.0f}")
            for hook in checkpoints.FAULT_HOOKS:
                for done in range(epoch * spe + i + 1, epoch * spe + end + 1):
                    checkpoints.fault_hook(hook, done)
            if end < spe:  # the epoch's last step is checkpointed after its evaluation
                self.after_step(state, totals, epoch * spe + end)
            i = end
        bar.close()
        return state, totals, (spe - first) * config.batch_size / (time.time() - epoch_start)

    def end_epoch(self, state, totals, epoch: int, images_per_second: float) -> None:
        totals = jax.device_get(totals)
        test = evaluate(state, self.test_batches, self.mean, self.std)
        record = {"epoch": epoch + 1, "step": int(state.step),
                  "train_loss": float(totals["loss"] / totals["count"]),
                  "train_accuracy": float(totals["correct"] / totals["count"]),
                  "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                  "images_per_second": images_per_second,
                  "wall_time": self.wall_time()}
        self.history.append(record)
        if self.writer:
            metrics_log.append_metrics(self.metrics_path, record)
        self.log(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
                 f"test loss {test['loss']:.4f} acc {test['accuracy']:.4f} | {record['images_per_second']:.0f} img/s")

    def run(self, state):
        preemption.stop_before_start(self.guard, self.ckpt.path)  # a signal while loading or restoring
        for epoch in range(int(state.step) // self.steps_per_epoch, self.config.epochs):
            # A mid-epoch resume continues the restored partial-epoch sums.
            # (replicated like the step's outputs, so the step compiles once, not twice)
            totals = (self.totals if int(state.step) > epoch * self.steps_per_epoch
                      else parallel.replicate(zero_totals(), self.mesh))
            state, totals, speed = self.train_epoch(state, totals, epoch)
            self.end_epoch(state, totals, epoch, speed)
            self.after_step(state, zero_totals(), (epoch + 1) * self.steps_per_epoch, epoch_done=epoch + 1)
        if self.config.epochs == 0:
            self.save(state, zero_totals())
        return state


def run_summary(config: Config, data, loaded_counts, state, loop: _Loop, devices) -> Dict[str, Any]:
    """summary.json's content (README, "Output files")."""
    history = loop.history
    final = history[-1] if history else {"test_accuracy": evaluate(state, loop.test_batches, loop.mean, loop.std)["accuracy"]}
    speeds = [r["images_per_second"] for r in history[1:] or history]
    trainable, total = train_modes.count(train_modes.variables_of(state), config.train_mode, config.k)
    return {"model": config.model, "width": config.width, "train_mode": config.train_mode,
            "dataset": config.data_dir or config.dataset, "num_classes": data.num_classes,
            "examples_per_class": data.class_counts(), "examples_per_class_loaded": loaded_counts,
            "total_params": total, "trainable_params": trainable, "trainable_fraction": trainable / total,
            "final_test_accuracy": final["test_accuracy"],
            "best_test_accuracy": max([r["test_accuracy"] for r in history] or [final["test_accuracy"]]),
            "epochs": config.epochs, "steps": int(state.step),
            "images_per_second": float(np.mean(speeds)) if speeds else None,
            "wall_time": loop.wall_time(), "checkpoints": loop.ckpt.path, "loop": loop.loop, **devices,
            "provenance": provenance.provenance()}


def train_and_evaluate(config: Config, workdir: str, data: Optional[input_pipeline.Dataset] = None,
                       log=print, checkpointing: Optional[checkpoints.CheckpointOptions] = None,
                       guard: Optional[preemption.PreemptionGuard] = None) -> Dict[str, Any]:
    """Train, evaluate every epoch, and write config/metrics/summary/checkpoints into workdir.

    ``guard``: a PreemptionGuard the caller entered early, so that a signal during start-up
    (data loading, restoring) stops the run at once with Preempted, and whose ``deadline`` may ask
    for a checkpoint and stop at a time; by default one is entered around the training loop.

    Resumes from the newest good checkpoint in ``workdir/checkpoints`` (exactly: same final
    bits as an uninterrupted run); see docs/checkpoints.md.
    """
    config.validate()
    options = (checkpointing or checkpoints.CheckpointOptions()).validate()
    if data is None:
        data = input_pipeline.load(config.dataset, config.data_dir)
    preemption.stop_before_start(guard, workdir)
    loaded = data.class_counts()
    data = data.subset(config.max_train_examples, config.max_test_examples)
    n_train = len(data.train_labels)
    if n_train < config.batch_size:
        raise input_pipeline.DataError(
            f"batch_size {config.batch_size} exceeds the {n_train} training examples")
    steps_per_epoch = n_train // config.batch_size  # the remainder of each epoch's order is dropped
    if config.epochs * steps_per_epoch > MAX_STEPS:
        raise input_pipeline.DataError(
            f"{config.epochs} epochs of {steps_per_epoch} steps exceed the step counter's {MAX_STEPS:,} steps")
    mesh = parallel.make_mesh(config.num_devices)
    parallel.check_batch_size(config.batch_size, mesh)
    devices = device_summary(mesh, config.batch_size)
    writer = parallel.is_writer()
    log = log if writer else (lambda *args: None)
    if options.extend and not any(os.path.isdir(os.path.join(workdir, "checkpoints", n))
                                  for n in step_entries(workdir)):
        raise checkpoints.CheckpointError(f"--extend_to_epochs: {workdir} holds no checkpoint to continue from")
    os.makedirs(workdir, exist_ok=True)  # only now: bad data leaves nothing behind
    with workdir_lib.exclusive(workdir):  # one run per workdir, until its summary is written
        if writer or not options.restart:  # every process refuses alike; one deletes for --restart
            prepare_workdir(workdir, config, options.restart, log)
        parallel.barrier("prepare_workdir")

        state = create_train_state(config, data.num_classes, data.train_images.shape[1:], steps_per_epoch)
        state = parallel.replicate(state, mesh)
        log(f"data: {data.describe()}")
        log(f"{config.model} ×{config.width}, mode {config.train_mode}: "
            f"{train_modes.describe(train_modes.variables_of(state), config.train_mode, config.k)}; {devices['device_count']} "
            f"{devices['platform']} device(s), {devices['per_device_batch_size']} images per device")
        expected = {"config": config.to_dict(), "data_fingerprint": checkpoints.data_fingerprint(data),
                    "frozen_hash": checkpoints.frozen_hash(train_modes.variables_of(state), config.train_mode)}

        with checkpoints.Checkpointer(workdir, options, log) as ckpt, \
                (contextlib.nullcontext(guard) if guard else preemption.PreemptionGuard()) as guard:
            loop = _Loop(config, data, workdir, mesh, ckpt, guard, expected, log)
            state = parallel.replicate(loop.resume(state), mesh)  # restored leaves are host arrays
            if writer:
                config.save(os.path.join(workdir, "config.json"))
            state = loop.run(state)

        summary = run_summary(config, data, loaded, state, loop, devices)
        if writer:
            workdir_lib.write_atomic(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    return summary
