"""The training loop's periodic work, as hooks it calls between compiled calls.

In the spirit of Flax's ``periodic_actions``: the loop (``bn_jax.train.train_loop``) runs steps,
checks the loss at every synced tick (``Tick.finite_totals``), evaluates and appends each epoch's
line to the run's history; the progress bar, checkpoints, preemption and the metrics log are
hooks, and a test installs its fault injection the same way. After each call the loop calls
``after_steps`` with a ``Tick``; after each epoch's evaluation, ``after_epoch``. A hook may also
ask for a call to end at a given step (``next_stop``): a due checkpoint does. Hooks read only
the tick, so their order does not matter.
"""

import dataclasses
import os
import time
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np
from tqdm import tqdm

from bn_jax import checkpoints, metrics_log, parallel, preemption

# The one host-sync rhythm: the step loop reads the metric sums back every SYNC_STEPS steps and
# at each epoch's end (a read waits for the device); the fused loop at every call boundary.
SYNC_STEPS = 20


@dataclasses.dataclass
class Tick:
    """Where the loop stands after a call (or an epoch's evaluation)."""

    epoch: int                 # 0-based epoch the call belonged to
    first_step: int            # global step the call started at
    step: int                  # global steps done
    epoch_end: bool            # the call ended the epoch
    state: Any
    totals: Any                # the epoch's metric sums so far, on the device
    synced: bool = False       # the loop read the sums back here (its one host-sync rhythm)
    record: Optional[Dict[str, Any]] = None       # after_epoch: the epoch's metrics line (already in the history)
    # the sums read back: at synced ticks, or once a save asked (after_epoch: the finished epoch's,
    # while ``totals`` are the next epoch's zeros)
    host_totals: Optional[Dict[str, Any]] = None

    def finite_totals(self) -> Dict[str, Any]:
        """The epoch's sums read back (a sync, unless this tick has them), after the one check that
        the loss stayed finite: FloatingPointError naming the first step with a NaN/Inf loss. The
        loop calls it at every synced tick, and a save at any other tick calls it first."""
        if self.host_totals is None:
            self.host_totals = jax.device_get(self.totals)
        t = self.host_totals
        bad = np.flatnonzero((np.ravel(t["nonfinite_step"]) >= 0) | ~np.isfinite(np.ravel(t["loss"])))
        if bad.size:  # (a pack's sums hold one entry per member)
            member = f" of pack member {bad[0]}" if np.ndim(t["loss"]) else ""
            raise FloatingPointError(f"non-finite training loss{member} at step "
                                     f"{int(np.ravel(t['nonfinite_step'])[bad[0]])} (epoch {self.epoch + 1}); "
                                     "stopped without saving this state")
        return t


class Hook:
    def start_epoch(self, epoch: int, position: int) -> None:
        """An epoch starts (or resumes at step ``position`` of it)."""

    def next_stop(self, step: int) -> Optional[int]:
        """A global step after ``step`` at which a call must end so that this hook sees it."""
        return None

    def after_steps(self, tick: Tick) -> None:
        """After each call."""

    def after_epoch(self, tick: Tick) -> None:
        """After the epoch's evaluation (``tick.record`` holds its metrics; ``tick.totals`` are zero)."""

    def close(self) -> None:
        """The session ends, finished or stopped: let go of what the hook holds (files, a trace)."""


@dataclasses.dataclass
class RunRecord:
    """What a run has done: its epochs' metrics, and the wall time of its earlier sessions;
    ``schedule``, the run's learning rate by step, for each epoch's line."""

    history: list = dataclasses.field(default_factory=list)
    past_wall_time: float = 0.0
    session_start: float = dataclasses.field(default_factory=time.time)
    schedule: Any = None

    def wall_time(self) -> float:
        return self.past_wall_time + time.time() - self.session_start


class ProgressBar(Hook):
    def __init__(self, program, epochs: int, enabled: bool):
        self.program, self.epochs, self.enabled = program, epochs, enabled

    def start_epoch(self, epoch, position):
        self.bar = tqdm(total=self.program.steps_per_epoch, initial=position, desc=f"epoch {epoch + 1}/{self.epochs}",
                        leave=False, dynamic_ncols=True, disable=not self.enabled)
        self.start, self.first = time.time(), position

    def after_steps(self, tick):
        self.bar.update(tick.step - tick.first_step)
        if tick.synced:
            t, done = tick.host_totals, tick.step - tick.epoch * self.program.steps_per_epoch - self.first
            speeds = {"img_s": f"{done * self.program.batch_size / (time.time() - self.start):.0f}"}
            report = self.program.input.report()
            if report:  # streamed input: what it can deliver, and how long training waited for it
                speeds.update(load_img_s=f"{report['input_images_per_second']:.0f}",
                              wait=f"{report['input_wait_fraction']:.0%}")
            self.bar.set_postfix(loss=f"{np.mean(t['loss'] / t['count']):.3f}",  # (a pack: the members' mean)
                                 acc=f"{np.mean(t['correct'] / t['count']):.3f}", **speeds)
        if tick.epoch_end:
            self.bar.close()


class Checkpoint(Hook):
    """The run's checkpoints: saved when ``options`` say one is due, at the run's last step, and
    when another hook asks (``save``: preemption). Each holds the train state plus what an exact
    resume needs in its meta (``expected``, the run's RunMeta, and where the run stands)."""

    def __init__(self, ckpt: checkpoints.Checkpointer, program, expected: checkpoints.RunMeta, record: RunRecord,
                 options: checkpoints.CheckpointOptions, last_step: int):
        self.ckpt, self.program, self.expected, self.record = ckpt, program, expected, record
        self.options, self.last_step, self.saved_step = options, last_step, None

    def save(self, tick: Tick) -> None:
        step, spe = tick.step, self.program.steps_per_epoch
        if step == self.saved_step:
            return
        tick.finite_totals()
        input_meta, items = self.program.input.checkpoint()
        self.ckpt.save(tick.state, tick.totals, {**self.expected.saved(), "epoch": step // spe, "position": step % spe,
                                                 "steps_per_epoch": spe, "history": list(self.record.history),
                                                 "wall_time": self.record.wall_time(),
                                                 "rng": self.program.position(step // spe), **input_meta}, items)
        self.saved_step = step

    @property
    def path(self) -> str:
        return self.ckpt.path

    def wait(self) -> None:
        """Until the saves handed to the background writer are on disk."""
        self.ckpt.wait()

    def next_stop(self, step):
        return self.options.next_due_step(step)

    def after_steps(self, tick):
        if not tick.epoch_end and self.options.due(tick.step):  # (an epoch's end: after its evaluation)
            self.save(tick)

    def after_epoch(self, tick):
        if tick.step == self.last_step or self.options.due(tick.step, tick.epoch + 1):
            self.save(tick)


class Preemption(Hook):
    """On a signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) or the deadline: checkpoint here, then raise Preempted (exit 75).

    All processes must stop at the same step (the save and the next step are collective), so a
    multi-host job combines the local flags with an all-gather, at synced ticks only.
    """

    def __init__(self, guard: preemption.PreemptionGuard, checkpoint, log: Callable):
        # (checkpoint: a Checkpoint, or anything with its save, wait and path: a pack's)
        self.guard, self.checkpoint, self.log = guard, checkpoint, log

    def after_steps(self, tick):
        if not tick.epoch_end:  # (an epoch's end: after its evaluation)
            self._stop_if_asked(tick)

    def after_epoch(self, tick):
        self._stop_if_asked(tick)

    def _stop_if_asked(self, tick):
        if jax.process_count() == 1:
            stop = self.guard.requested
        else:
            stop = tick.synced and parallel.any_process(self.guard.requested)
        if not stop:
            return
        reason = self.guard.reason if self.guard.requested else "another process was signalled"
        self.log(f"{reason}: saving a checkpoint at step {tick.step} and exiting")
        self.checkpoint.save(tick)
        self.checkpoint.wait()
        raise preemption.Preempted(reason, tick.step, self.checkpoint.path)


class MetricsLog(Hook):
    """Each epoch's line (already in the run's history): into metrics.jsonl (process 0) and the log."""

    def __init__(self, path: str, writer: bool, log: Callable):
        self.path, self.writer, self.log = path, writer, log

    def after_epoch(self, tick):
        r = tick.record
        if self.writer:
            metrics_log.append_metrics(self.path, r)
        loading = "" if "input_images_per_second" not in r else (
            f" (input can load {r['input_images_per_second']:.0f} img/s; training waited for it "
            f"{r['input_wait_fraction']:.0%} of the time)")
        self.log(f"epoch {r['epoch']}: train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f} | "
                 f"test loss {r['test_loss']:.4f} acc {r['test_accuracy']:.4f} top-5 {r['test_top5_accuracy']:.4f} | "
                 f"{r['images_per_second']:.0f} img/s trained{loading}")


class TensorBoard(Hook):
    """``--tensorboard DIR``: each epoch's metrics (at its last global step, ``epoch/...``) and, at
    the progress bar's rhythm, the epoch's running train loss and accuracy (``train/...``), written
    as the run trains (process 0)."""

    def __init__(self, logdir: str, member: Optional[int] = None):
        from bn_jax import tensorboard_export  # (the optional tensorboard package, only when asked for)
        self.writer, self.member = tensorboard_export.ScalarWriter(logdir), member  # member: of a pack

    def after_steps(self, tick):
        if tick.synced and not tick.epoch_end:
            t = {k: np.ravel(v)[self.member or 0] for k, v in tick.host_totals.items()}
            self.writer.write(tick.step, {"train/loss": float(t["loss"] / t["count"]),
                                          "train/accuracy": float(t["correct"] / t["count"])})

    def after_epoch(self, tick):
        record = tick.record if self.member is None else tick.record[self.member]
        self.writer.write(tick.step, {f"epoch/{k}": v for k, v in record.items() if k not in ("step", "epoch")})

    def close(self):
        self.writer.close()


class Profile(Hook):
    """``--profile_steps A:B``: a ``jax.profiler`` trace of global steps A to B-1 into ``folder``
    (the calls end at A and B, so the trace holds exactly those steps, and its last is waited for)."""

    def __init__(self, folder: str, steps: tuple):
        self.folder, (self.start, self.stop) = folder, steps
        self.tracing = False

    def next_stop(self, step):
        return next((s for s in (self.start, self.stop) if step < s), None)

    def after_steps(self, tick):
        if not self.tracing and self.start <= tick.step < self.stop:
            jax.block_until_ready(tick.state)  # (the steps before A stay out of the trace)
            jax.profiler.start_trace(self.folder, create_perfetto_trace=True)
            self.tracing = True
        elif self.tracing and tick.step >= self.stop:
            self.close(tick.state)

    def close(self, state=None) -> None:
        if self.tracing:  # (a run that ends, or stops, before B: the trace ends there)
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.tracing = False


def optional_hooks(runtime, workdir: str, run_names, pack: bool = False) -> list:
    """What ``runtime`` asks for beside the trainer's own hooks: live TensorBoard scalars (process 0,
    one folder per run) and a profile. ``run_names``: the run folder's name, or (``pack``) its members'."""
    out = []
    if runtime.tensorboard and parallel.is_writer():
        out += [TensorBoard(os.path.join(runtime.tensorboard, name), m if pack else None)
                for m, name in enumerate(run_names)]
    if runtime.profile_range is not None:
        out.append(Profile(os.path.join(workdir, "profile"), runtime.profile_range))
    return out


def standard_hooks(program, checkpoint: Checkpoint, guard, epochs: int, run_dir, log: Callable):
    """The trainer's hooks. Each reads only the tick and its own state, never what another hook
    wrote, so their order does not matter (a save that two ask for at one step is made once)."""
    writer = parallel.is_writer()
    return [ProgressBar(program, epochs, writer), MetricsLog(run_dir.metrics, writer, log), checkpoint,
            Preemption(guard, checkpoint, log)]
