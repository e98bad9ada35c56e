"""Training and evaluation: the train state, and the flat loop that drives a run's program.

Read top to bottom: ``create_train_state`` builds the state; ``bn_jax.program`` compiles the
steps and holds the data; ``train_loop`` runs the epochs, evaluates, and hands every call's end
to the hooks (``bn_jax.hooks``: progress bar, metrics log, checkpoints, preemption; the loop itself checks the loss,
``Tick.finite_totals``);
``train_and_evaluate`` sets a run up, resumes it and writes its outputs.
"""

import contextlib
import json
import os
import time
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from bn_jax import checkpoints, cluster, dataset_registry, datasets, hooks, metrics_log, models, parallel, preemption, provenance
from bn_jax import program as program_lib
from bn_jax import process_log, rng, steps, train_modes
from bn_jax import workdir as workdir_lib
from bn_jax.config import ExperimentConfig, RuntimeConfig
from bn_jax.steps import cross_entropy, eval_step, train_step  # noqa: F401  (the Flax examples' names)

MAX_STEPS = 2**31 - 1  # the train state's step counter is int32


class TrainState(train_state.TrainState):
    batch_stats: Any
    # what trains, decided once at creation (train_modes.TrainPlan); static: it holds no arrays
    plan: Any = struct.field(pytree_node=False, default=None)


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
    """The run's initial state (a pure function of the seed) with its train plan: what trains is
    decided here, once, and everything after asks ``state.plan``."""
    model = config.create_model(num_classes)
    variables = models.init_variables(model, rng.key(config.weights_seed, "init"), image_shape)
    plan = train_modes.plan(variables, config.train_mode, config.k, config.seed)
    tx = train_modes.make_optimizer(variables, config.train_mode, make_schedule(config, steps_per_epoch),
                                    config.momentum, config.weight_decay, k=config.k, seed=config.seed)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"], plan=plan)


def device_summary(mesh, batch_size: int) -> Dict[str, Any]:
    """The devices a run trains on, for summary.json (every process must call it: it counts hosts)."""
    devices = mesh.devices.flatten()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": len(devices), "process_count": jax.process_count(), "host_count": cluster.host_count(),
            "local_device_count": jax.local_device_count(), "cluster": cluster.JOINED,
            "per_device_batch_size": batch_size // len(devices)}


def resume(ckpt: checkpoints.Checkpointer, program, fresh_state, expected: checkpoints.RunMeta, log):
    """(state, partial-epoch totals, RunRecord) from the newest good checkpoint, or a fresh start."""
    restored = ckpt.restore_latest(fresh_state, steps.zero_totals(), expected)
    if restored is None:
        return fresh_state, program.zero_totals(), hooks.RunRecord()
    state, totals, meta = restored
    step, spe = int(state.step), program.steps_per_epoch
    program.input.restore(ckpt, step, meta, log)
    log(f"resumed from checkpoint step {step} (epoch {step // spe + 1}, step {step % spe} of {spe}) in {ckpt.path}")
    return state, program.put(totals), hooks.RunRecord(meta["history"], meta["wall_time"])


def call_end(program, hook_list, epoch: int, i: int) -> int:
    """Where a call starting at step ``i`` of ``epoch`` ends: the epoch's end, the program's
    longest call, or the next step a hook must see."""
    spe, base = program.steps_per_epoch, epoch * program.steps_per_epoch
    ends = [spe, i + program.max_steps_per_call]
    ends += [s - base for s in (h.next_stop(base + i) for h in hook_list) if s is not None]
    return min(e for e in ends if e > i)


def step_of(state) -> int:
    """The steps ``state`` has trained (a pack's members have all trained as many)."""
    return int(np.ravel(jax.device_get(state.step))[0])


def train_epoch(state, totals, program, hook_list: Sequence[hooks.Hook], epoch: int):
    """Train the rest of ``epoch`` from where ``state`` stands; (state, last tick, images/s)."""
    spe = program.steps_per_epoch
    first = i = step_of(state) - epoch * spe
    totals = totals if first else program.zero_totals()
    for hook in hook_list:
        hook.start_epoch(epoch, first)
    start = time.time()
    while i < spe:
        end = call_end(program, hook_list, epoch, i)
        state, totals = program.run(state, totals, epoch, i, end)
        synced = program.loop == "fused" or end % hooks.SYNC_STEPS == 0 or end == spe
        tick = hooks.Tick(epoch, epoch * spe + i, epoch * spe + end, end == spe, state, totals, synced)
        if synced:
            tick.finite_totals()  # (read back and checked for NaN/Inf before any hook sees the tick)
        for hook in hook_list:
            hook.after_steps(tick)
        i = end
    return state, tick, (spe - first) * program.batch_size / (time.time() - start)


def train_loop(state, totals, program, hook_list: Sequence[hooks.Hook], epochs: int, record: hooks.RunRecord):
    """Train from ``state`` (and a partial epoch's ``totals``) to the end of ``epochs``; after each
    epoch, evaluate, append the epoch's line to ``record`` and hand it to the hooks."""
    for epoch in range(step_of(state) // program.steps_per_epoch, epochs):
        state, tick, speed = train_epoch(state, totals, program, hook_list, epoch)
        input_report = program.input.report()  # (before the evaluation, which reads input too)
        test = program.evaluate(state)
        line = epoch_record(epoch, tick.step, tick.finite_totals(), test, speed, record, input_report)
        record.history.append(line)
        done = hooks.Tick(epoch, tick.step, tick.step, True, state, program.zero_totals(), True, line, tick.host_totals)
        for hook in hook_list:
            hook.after_epoch(done)
    return state


def epoch_record(epoch: int, step: int, totals, test: Dict[str, float], speed: float,
                 record: hooks.RunRecord, input_report: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """An epoch's line of metrics.jsonl (docs/cli.md, "Output files"), with the learning rate of the
    epoch's last step; a streamed run adds what its input could load (images/s) and the share of the
    epoch training waited for it."""
    return {"epoch": epoch + 1, "step": step, "train_loss": float(totals["loss"] / totals["count"]),
        "train_accuracy": float(totals["correct"] / totals["count"]),
        "test_loss": test["loss"], "test_accuracy": test["accuracy"], "test_top5_accuracy": test["top5_accuracy"],
        "images_per_second": speed, **(input_report or {}), "wall_time": record.wall_time(),
        **({"lr": float(record.schedule(step - 1))} if record.schedule is not None and step else {})}


def run_summary(config: ExperimentConfig, runtime: RuntimeConfig, data, loaded_counts, state, program,
                record: hooks.RunRecord, ckpt_path: str, devices) -> Dict[str, Any]:
    """summary.json's content (docs/cli.md, "Output files")."""
    history = record.history
    if history:
        final = history[-1]
    else:
        test = program.evaluate(state)
        final = {"test_accuracy": test["accuracy"], "test_top5_accuracy": test["top5_accuracy"]}
    speeds = [r["images_per_second"] for r in history[1:] or history]
    trainable, total = state.plan.trainable, state.plan.total
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
            **program.input.summary(history), "provenance": provenance.provenance()}


def open_data(config: ExperimentConfig, runtime: RuntimeConfig):
    """The whole dataset a run names (``dataset_registry``): loaded into memory (CIFAR, image
    folders), or opened for streaming (ImageNet: its images are read as training goes)."""
    return dataset_registry.lookup(config.dataset).open(runtime.data_dir, config.image_size)


def load_data(config: ExperimentConfig, runtime: RuntimeConfig, data, guard):
    """(the run's data: its subset of ``data`` or of ``open_data``, per-class counts before the
    subset); DataError for data it cannot train on."""
    if data is None:
        data = open_data(config, runtime)
    preemption.stop_before_start(guard, runtime.data_dir or config.dataset)
    loaded = data.class_counts()
    data = data.subset(config.max_train_examples, config.max_test_examples)
    problem = models.input_problem(config.model, data.image_shape)
    if problem:  # (before: NaN logits for a VGG on small images, silently)
        raise datasets.DataError(problem)
    if data.num_train < config.batch_size:
        raise datasets.DataError(f"batch_size {config.batch_size} exceeds the {data.num_train} training examples")
    steps_per_epoch = data.num_train // config.batch_size  # the remainder of each epoch's order is dropped
    for what, epochs in (("epochs", config.epochs), ("warm-up epochs", config.warmup_epochs)):
        if epochs * steps_per_epoch > MAX_STEPS:
            raise datasets.DataError(f"{epochs:g} {what} of {steps_per_epoch} steps exceed the step counter's "
                                     f"{MAX_STEPS:,} steps")
    return data, loaded


def set_up(config: ExperimentConfig, runtime: RuntimeConfig, data, mesh, devices, log):
    """(program, fresh train state on the mesh, what a checkpoint must match), with the run's
    data, model and devices logged."""
    program = program_lib.build_program(config, runtime, data, mesh)
    state = create_train_state(config, data.num_classes, data.image_shape, program.steps_per_epoch)
    state = parallel.replicate(state, mesh)
    log(f"data: {data.describe()}")
    log(f"{config.model} ×{config.width}, mode {config.train_mode}: {state.plan.describe()}; "
        f"{devices['device_count']} {devices['platform']} device(s), {devices['per_device_batch_size']} "
        "images per device")
    expected = checkpoints.RunMeta(config.to_dict(), data.fingerprint(), state.plan.frozen_hash, program.position)
    return program, state, expected


def run_session(config, runtime, run: workdir_lib.RunDir, program, state, expected, ckpt, guard, options,
                extra_hooks, log):
    """Resume (or start), write config.json and the metrics so far, and train to the end:
    (final state, RunRecord). A NaN/Inf loss stops it, naming the last good checkpoint."""
    state, totals, record = resume(ckpt, program, state, expected, log)
    record.schedule = make_schedule(config, program.steps_per_epoch)
    state = program.put(state)  # restored leaves are on the default device only
    if parallel.is_writer():
        metrics_log.write_metrics(run.metrics, record.history)
        run.write_config(config, runtime, provenance.provenance())
    preemption.stop_before_start(guard, ckpt.path)  # a signal while loading or restoring
    checkpoint = hooks.Checkpoint(ckpt, program, expected, record, options, config.epochs * program.steps_per_epoch)
    hook_list = [*extra_hooks, *hooks.standard_hooks(program, checkpoint, guard, config.epochs, run, log),
                 *hooks.optional_hooks(runtime, run.path, [os.path.basename(os.path.abspath(run.path))])]
    try:
        state = train_loop(state, totals, program, hook_list, config.epochs, record)
        if config.epochs == 0:
            checkpoint.save(hooks.Tick(0, 0, 0, True, state, program.zero_totals(), True))
    except FloatingPointError as e:
        raise FloatingPointError(f"{e} (last good checkpoint: step {ckpt.latest_saved()})") from None
    finally:
        for hook in hook_list:
            hook.close()
    return state, record


def train_and_evaluate(config: ExperimentConfig, workdir: str, data: Optional[datasets.Dataset] = None,
                       log=print, runtime: Optional[RuntimeConfig] = None,
                       checkpoint_options: Optional[checkpoints.CheckpointOptions] = None,
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
    options = (checkpoint_options or checkpoints.CheckpointOptions()).validate()
    data, loaded = load_data(config, runtime, data, guard)
    mesh = parallel.make_mesh(runtime.num_devices)
    parallel.check_batch_size(config.batch_size, mesh)
    devices, writer = device_summary(mesh, config.batch_size), parallel.is_writer()
    log = log if writer else process_log.note  # (only process 0 prints; every process keeps its log)
    run = workdir_lib.RunDir(workdir)
    if options.extend and not run.has_checkpoint():
        raise checkpoints.CheckpointError(f"--extend_to_epochs: {workdir} holds no checkpoint to continue from")
    os.makedirs(workdir, exist_ok=True)  # only now: bad data leaves nothing behind
    with run.exclusive():  # one run per workdir, until its summary is written
        if writer or not options.restart:  # every process refuses alike; one deletes for --restart
            run.prepare(config, options.restart, log)
        parallel.barrier("prepare_run")
        process_log.attach([workdir], jax.process_index(), jax.process_count())
        program, state, expected = set_up(config, runtime, data, mesh, devices, log)
        with checkpoints.Checkpointer(workdir, options, log) as ckpt, contextlib.closing(program), \
                (contextlib.nullcontext(guard) if guard else preemption.PreemptionGuard()) as guard:
            state, record = run_session(config, runtime, run, program, state, expected, ckpt, guard, options,
                                        extra_hooks, log)
        summary = run_summary(config, runtime, data, loaded, state, program, record, ckpt.path, devices)
        if writer:
            workdir_lib.write_atomic(run.summary, json.dumps(summary, indent=2))
    return summary
