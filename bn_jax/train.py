"""Training and evaluation: the train state, and the flat loop that drives a run's program.

Read top to bottom: ``create_train_state`` builds the state; ``bn_jax.program`` compiles the
steps and holds the data; ``train_loop`` runs the epochs, evaluates, and hands every call's end
to the hooks (``bn_jax.hooks``: progress bar, finite check, metrics, checkpoints, preemption);
``train_and_evaluate`` sets a run up, resumes it and writes its outputs.
"""

import contextlib
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np
import optax
from flax.training import train_state

from bn_jax import checkpoints, hooks, input_pipeline, metrics_log, models, parallel, preemption, provenance
from bn_jax import program as program_lib
from bn_jax import steps, train_modes
from bn_jax import workdir as workdir_lib
from bn_jax import config as config_lib
from bn_jax.config import ExperimentConfig, RuntimeConfig
from bn_jax.steps import cross_entropy, eval_step, train_step  # noqa: F401  (the Flax examples' names)

MAX_STEPS = 2**31 - 1  # the train state's step counter is int32


class TrainState(train_state.TrainState):
    batch_stats: Any


# ×0.1 at these fractions of training: the paper's CIFAR epochs 80/120 of 160, and its ImageNet
# epochs 30/60/80 of 90 (open_lth's imagenet_resnet milestones). Exact fractions: 1/3 in floating
# point would put the first ImageNet drop a step early.
DROP_FRACTIONS = {"step": ((1, 2), (3, 4)), "imagenet": ((1, 3), (2, 3), (8, 9))}


def make_schedule(config: ExperimentConfig, steps_per_epoch: int) -> optax.Schedule:
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.schedule in DROP_FRACTIONS:
        drops = {}
        for num, den in DROP_FRACTIONS[config.schedule]:  # steps counted from the end of warm-up
            boundary = total * num // den - warmup
            drops[boundary] = drops.get(boundary, 1.0) * 0.1  # two drops may land on one step
        main = optax.piecewise_constant_schedule(config.lr, drops)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(config.lr, max(1, total - warmup))
    else:
        main = optax.constant_schedule(config.lr)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), main], [warmup])


def create_train_state(config: ExperimentConfig, num_classes: int, image_shape, steps_per_epoch: int) -> TrainState:
    model = config.create_model(num_classes)
    init_key, _, _ = program_lib.run_keys(config.seed)
    variables = models.init_variables(model, init_key, image_shape)
    tx = train_modes.make_optimizer(variables, config.train_mode, make_schedule(config, steps_per_epoch),
                                    config.momentum, config.weight_decay, k=config.k, seed=config.seed)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"])


def device_summary(mesh, batch_size: int) -> Dict[str, Any]:
    devices = mesh.devices.flatten()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": len(devices), "process_count": jax.process_count(),
            "per_device_batch_size": batch_size // len(devices)}


def step_entries(workdir: str) -> List[str]:
    """Names in ``<workdir>/checkpoints`` that look like saved steps (folders, or stray files)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []


def prepare_workdir(workdir: str, config: ExperimentConfig, restart: bool, log=print) -> None:
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
            diff = config_lib.different_keys(json.load(f), config)
        if diff:
            raise checkpoints.CheckpointError(
                f"{workdir} holds outputs of a run with different {', '.join(diff)} and no checkpoint; "
                "pass --restart to overwrite them or choose another --workdir")


def resume(ckpt: checkpoints.Checkpointer, program, fresh_state, expected: Dict[str, Any], log):
    """(state, partial-epoch totals, RunRecord) from the newest good checkpoint, or a fresh start."""
    restored = ckpt.restore_latest(fresh_state, steps.zero_totals(), expected)
    if restored is None:
        return fresh_state, program.zero_totals(), hooks.RunRecord()
    state, totals, meta = restored
    step, spe = int(state.step), program.steps_per_epoch
    if meta["rng"] != program.position(step // spe):
        raise checkpoints.CheckpointError(
            f"checkpoint step {step}: this JAX/NumPy version derives a different data order or "
            "augmentation key from the seed; an exact resume is impossible (pass --restart)")
    program.restore_input(ckpt, step, meta, log)
    log(f"resumed from checkpoint step {step} (epoch {step // spe + 1}, step {step % spe} of {spe}) in {ckpt.path}")
    return state, program.put(totals), hooks.RunRecord(meta["history"], meta["wall_time"])


def call_end(program, hook_list, epoch: int, i: int) -> int:
    """Where a call starting at step ``i`` of ``epoch`` ends: the epoch's end, the program's
    longest call, or the next step a hook must see."""
    spe, base = program.steps_per_epoch, epoch * program.steps_per_epoch
    ends = [spe, i + program.max_steps_per_call]
    ends += [s - base for s in (h.next_stop(base + i) for h in hook_list) if s is not None]
    return min(e for e in ends if e > i)


def train_loop(state, totals, program, hook_list: Sequence[hooks.Hook], epochs: int, record: hooks.RunRecord):
    """Train from ``state`` (and a partial epoch's ``totals``) to the end of ``epochs``."""
    spe = program.steps_per_epoch
    for epoch in range(int(state.step) // spe, epochs):
        first = i = int(state.step) - epoch * spe
        totals = totals if first else program.zero_totals()
        for hook in hook_list:
            hook.start_epoch(epoch, first)
        epoch_start = time.time()
        while i < spe:
            end = call_end(program, hook_list, epoch, i)
            state, totals = program.run(state, totals, epoch, i, end)
            synced = program.loop == "fused" or end % hooks.SYNC_STEPS == 0 or end == spe
            tick = hooks.Tick(epoch, epoch * spe + i, epoch * spe + end, end == spe, state, totals,
                              jax.device_get(totals) if synced else None)
            for hook in hook_list:
                hook.after_steps(tick)
            i = end
        speed = (spe - first) * program.batch_size / (time.time() - epoch_start)
        input_report = program.input_report()  # (before the evaluation, which reads input too)
        tick = hooks.Tick(epoch, tick.step, tick.step, True, state, program.zero_totals(), tick.host_totals,
                          epoch_record(epoch, state, tick.host_totals, program.evaluate(state), speed, record,
                                       input_report))
        for hook in hook_list:
            hook.after_epoch(tick)
    return state


def epoch_record(epoch: int, state, totals, test: Dict[str, float], speed: float,
                 record: hooks.RunRecord, input_report: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """An epoch's line of metrics.jsonl (README, "Output files"); a streamed run adds what its
    input could load (images/s) and the share of the epoch training waited for it."""
    return {"epoch": epoch + 1, "step": int(state.step), "train_loss": float(totals["loss"] / totals["count"]),
        "train_accuracy": float(totals["correct"] / totals["count"]),
        "test_loss": test["loss"], "test_accuracy": test["accuracy"], "test_top5_accuracy": test["top5_accuracy"],
        "images_per_second": speed, **(input_report or {}), "wall_time": record.wall_time()}


def run_summary(config: ExperimentConfig, runtime: RuntimeConfig, data, loaded_counts, state, program,
                record: hooks.RunRecord, ckpt_path: str, devices) -> Dict[str, Any]:
    """summary.json's content (README, "Output files")."""
    history = record.history
    if history:
        final = history[-1]
    else:
        test = program.evaluate(state)
        final = {"test_accuracy": test["accuracy"], "test_top5_accuracy": test["top5_accuracy"]}
    speeds = [r["images_per_second"] for r in history[1:] or history]
    trainable, total = train_modes.count(train_modes.variables_of(state), config.train_mode, config.k)
    return {"model": config.model, "width": config.width, "train_mode": config.train_mode,
            "dataset": runtime.data_dir or config.dataset, "num_classes": data.num_classes,
            "examples_per_class": data.class_counts(), "examples_per_class_loaded": loaded_counts,
            "total_params": total, "trainable_params": trainable, "trainable_fraction": trainable / total,
            "final_test_accuracy": final["test_accuracy"],
            "final_test_top5_accuracy": final.get("test_top5_accuracy"),  # (None: a run resumed from before top-5)
            "best_test_accuracy": max([r["test_accuracy"] for r in history] or [final["test_accuracy"]]),
            "epochs": config.epochs, "steps": int(state.step),
            "images_per_second": float(np.mean(speeds)) if speeds else None,
            "wall_time": record.wall_time(), "checkpoints": ckpt_path, "loop": program.loop, **devices,
            **program.input_summary(history), "provenance": provenance.provenance()}


def load_data(config: ExperimentConfig, runtime: RuntimeConfig, data, guard):
    """(the run's data, per-class counts as loaded); DataError for data it cannot train on.
    Streamed datasets (ImageNet) are opened, not loaded: their images are read as training goes."""
    if data is None:
        if config.dataset in config_lib.STREAMED_DATASETS:
            from bn_jax import imagenet
            data = imagenet.load(runtime.data_dir, crop=config.image_size or imagenet.CROP)
        else:
            data = input_pipeline.load(config.dataset, runtime.data_dir)
    preemption.stop_before_start(guard, runtime.data_dir or config.dataset)
    loaded = data.class_counts()
    data = data.subset(config.max_train_examples, config.max_test_examples)
    if data.num_train < config.batch_size:
        raise input_pipeline.DataError(f"batch_size {config.batch_size} exceeds the {data.num_train} training examples")
    steps_per_epoch = data.num_train // config.batch_size  # the remainder of each epoch's order is dropped
    if config.epochs * steps_per_epoch > MAX_STEPS:
        raise input_pipeline.DataError(
            f"{config.epochs} epochs of {steps_per_epoch} steps exceed the step counter's {MAX_STEPS:,} steps")
    return data, loaded


def train_and_evaluate(config: ExperimentConfig, workdir: str, data: Optional[input_pipeline.Dataset] = None,
                       log=print, runtime: Optional[RuntimeConfig] = None,
                       checkpointing: Optional[checkpoints.CheckpointOptions] = None,
                       guard: Optional[preemption.PreemptionGuard] = None,
                       extra_hooks: Sequence[hooks.Hook] = ()) -> Dict[str, Any]:
    """Train ``config``, evaluate every epoch, and write config/metrics/summary/checkpoints into
    workdir. ``runtime``: how to execute it (devices, loop, data location; default RuntimeConfig()).

    ``guard``: a PreemptionGuard the caller entered early, so that a signal during start-up
    (data loading, restoring) stops the run at once with Preempted, and whose ``deadline`` may ask
    for a checkpoint and stop at a time; by default one is entered around the training loop.
    ``extra_hooks`` run before the trainer's own after every call (tests inject faults so).

    Resumes from the newest good checkpoint in ``workdir/checkpoints`` (exactly: same final
    bits as an uninterrupted run); see docs/checkpoints.md.
    """
    config.validate()
    runtime = (runtime or RuntimeConfig()).validate()
    options = (checkpointing or checkpoints.CheckpointOptions()).validate()
    data, loaded = load_data(config, runtime, data, guard)
    mesh = parallel.make_mesh(runtime.num_devices)
    parallel.check_batch_size(config.batch_size, mesh)
    devices, writer = device_summary(mesh, config.batch_size), parallel.is_writer()
    log = log if writer else (lambda *args: None)
    if options.extend and not any(os.path.isdir(os.path.join(workdir, "checkpoints", n))
                                  for n in step_entries(workdir)):
        raise checkpoints.CheckpointError(f"--extend_to_epochs: {workdir} holds no checkpoint to continue from")
    os.makedirs(workdir, exist_ok=True)  # only now: bad data leaves nothing behind
    with workdir_lib.exclusive(workdir):  # one run per workdir, until its summary is written
        if writer or not options.restart:  # every process refuses alike; one deletes for --restart
            prepare_workdir(workdir, config, options.restart, log)
        parallel.barrier("prepare_workdir")
        program = program_lib.build_program(config, runtime, data, mesh)
        state = create_train_state(config, data.num_classes, data.image_shape, program.steps_per_epoch)
        state = parallel.replicate(state, mesh)
        variables = train_modes.variables_of(state)
        log(f"data: {data.describe()}")
        log(f"{config.model} ×{config.width}, mode {config.train_mode}: "
            f"{train_modes.describe(variables, config.train_mode, config.k)}; {devices['device_count']} "
            f"{devices['platform']} device(s), {devices['per_device_batch_size']} images per device")
        expected = {"config": config.to_dict(), "data_fingerprint": checkpoints.data_fingerprint(data),
                    "frozen_hash": checkpoints.frozen_hash(variables, config.train_mode)}
        with checkpoints.Checkpointer(workdir, options, log) as ckpt, contextlib.closing(program), \
                (contextlib.nullcontext(guard) if guard else preemption.PreemptionGuard()) as guard:
            state, totals, record = resume(ckpt, program, state, expected, log)
            state = program.put(state)  # restored leaves are on the default device only
            if writer:
                metrics_log.write_metrics(os.path.join(workdir, "metrics.jsonl"), record.history)
                config_lib.save(os.path.join(workdir, "config.json"), config, runtime, provenance.provenance())
            preemption.stop_before_start(guard, ckpt.path)  # a signal while loading or restoring
            saver = hooks.Saver(ckpt, program, expected, record)
            hook_list = [*extra_hooks, *hooks.standard_hooks(program, saver, options, guard, config.epochs, workdir, log)]
            state = train_loop(state, totals, program, hook_list, config.epochs, record)
            if config.epochs == 0:
                saver.save(state, program.zero_totals())
        summary = run_summary(config, runtime, data, loaded, state, program, record, ckpt.path, devices)
        if writer:
            workdir_lib.write_atomic(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    return summary
