"""Train a pack (``bn_jax.pack``) so that every member is an ordinary run on disk.

Each member has the folder, config.json, metrics.jsonl, summary.json and checkpoints that the
same run trained alone would have (``workdir.RunDir``), so the sweep, the analysis and a later
solo resume treat it like any run. The members' checkpoints are written from the packed state,
member by member; a pack resumes from the newest step that all its members saved, so a kill
during a save (some members saved, some not) resumes exactly. ``pack.json`` in each member's
folder records the packs it trained in. A finished member is left alone.
"""

import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence

import jax

from bn_jax import checkpoints, datasets, hooks, metrics_log, pack_config, parallel, preemption, provenance
from bn_jax import process_log, steps, train
from bn_jax import config as config_lib
from bn_jax import workdir as workdir_lib
from bn_jax.config import ExperimentConfig, RuntimeConfig, run_name
from bn_jax.pack import Pack, PackProgram, device_memory_limit, footprint, largest_fitting, member_of, stack


def member_runs(configs: Sequence[ExperimentConfig], root: str) -> List[workdir_lib.RunDir]:
    return [workdir_lib.RunDir(os.path.join(root, run_name(c))) for c in configs]


def unfinished(configs, root: str, options: checkpoints.CheckpointOptions, log) -> List[ExperimentConfig]:
    """The members still to train. Without --restart, WorkdirUnusable before anything is written
    for a member whose folder holds another experiment."""
    todo = []
    for config, run in zip(configs, member_runs(configs, root)):
        saved = run.saved_config()
        diff = [] if saved is None or options.restart else config_lib.different_keys(saved, config)
        if diff:
            raise workdir_lib.WorkdirUnusable(f"{run.path} holds a run with different {', '.join(diff)}; pass "
                                              "--restart to overwrite it or choose another --workdir")
        if run.is_finished() and not options.restart:
            log(f"[done] {os.path.basename(run.path)}: finished, not trained again")
            continue
        todo.append(config)
    return todo


def check_memory(program: PackProgram, state, totals, limit: Optional[float], log) -> None:
    """Refuse (MemoryError, one line) a pack whose compiled step needs more than ``limit`` bytes,
    naming the largest size that fits; memory grows linearly with the members, so a pack of one
    gives the slope. Runs before any file is written."""
    if limit is None:
        return
    k = program.pack.size
    stop = min(program.max_steps_per_call, program.steps_per_epoch)  # the call the run makes most (compiled once)
    need = footprint(program.compile(state, totals, stop=stop))
    log(f"pack memory: the compiled step needs {need / 2**30:.2f} GiB of {limit / 2**30:.2f} GiB")
    if need <= limit:
        return
    need_1 = need if k == 1 else footprint(program.compile(state, totals, stop=stop, members=1))
    fits = min(k - 1, largest_fitting(need, need_1, k, limit))
    raise MemoryError(f"a pack of {k} needs {need / 2**30:.2f} GiB of device memory, more than the "
                      f"{limit / 2**30:.2f} GiB there are; the largest pack that fits is {fits}")


class MemberCheckpoint(hooks.Checkpoint):
    """One member's checkpoints, written from the packed state (its slice, as its solo run's)."""

    def __init__(self, pack: Pack, m: int, *args):
        super().__init__(*args)
        self.pack, self.m = pack, m

    def save(self, tick):
        if tick.step != self.saved_step:
            super().save(member_tick(self.pack, tick, self.m))


class MemberMetricsLog(hooks.MetricsLog):
    def __init__(self, m: int, *args):
        super().__init__(*args)
        self.m = m

    def after_epoch(self, tick):
        super().after_epoch(dataclasses.replace(tick, record=tick.record[self.m]))


class PackCheckpoints(hooks.Hook):
    """Every member's checkpoints as one hook: the Preemption hook saves them all at once."""

    def __init__(self, members: Sequence[MemberCheckpoint], root: str):
        self.members, self.root = list(members), root

    path = property(lambda self: f"the members' checkpoints/ folders under {self.root}")

    def save(self, tick):
        for member in self.members:
            member.save(tick)

    def wait(self):
        for member in self.members:
            member.wait()

    def next_stop(self, step):
        return self.members[0].next_stop(step)  # (the same options for all)

    def after_steps(self, tick):
        for member in self.members:
            member.after_steps(tick)

    def after_epoch(self, tick):
        for member in self.members:
            member.after_epoch(tick)


def member_tick(pack: Pack, tick: hooks.Tick, m: int) -> hooks.Tick:
    """Member ``m``'s view of a pack's tick."""
    host = None if tick.host_totals is None else member_of(tick.host_totals, m)
    return dataclasses.replace(tick, state=pack.member_state(tick.state, m),
                               totals=member_of(tick.totals, m), host_totals=host,
                               record=None if tick.record is None else tick.record[m])


def last_pack(run: workdir_lib.RunDir) -> Optional[List[str]]:
    """The members of the pack the run last trained in (pack.json), or None."""
    try:
        with open(run.file(run.PACK)) as f:
            return json.load(f)["sessions"][-1]["members"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def start_over_or_refuse(runs, newest, log) -> None:
    """No step that every member saved: start all over when the checkpoints there are this very
    pack's (a kill during its first saves; it writes the same bits again), else refuse naming them."""
    names = [os.path.basename(r.path) for r in runs]
    saved = [(n, s, r) for n, s, r in zip(names, newest, runs) if s is not None]
    if not saved:
        return
    if all(last_pack(r) == names for _, _, r in saved):
        log("warning: not every member has a checkpoint at one step (killed while saving); the pack starts "
            "all of them over, and saves the same bits again")
        return
    raise checkpoints.CheckpointError(
        "cannot resume these runs as one pack: " + ", ".join(f"{n} (newest step {s})" for n, s, _ in saved) +
        " hold checkpoints that " + ", ".join(n for n, s in zip(names, newest) if s is None) + " lack at one step, "
        "and they last trained in another pack or alone; resume them that way, or pass --restart")


def resume_pack(ckpts, program: PackProgram, expected, runs, log):
    """(packed state, totals, a RunRecord per member) at the newest step every member saved, or
    a fresh start. A member ahead of the others (killed while the pack saved) goes back to their
    step; its later checkpoints stay, and the pack does not save those steps again."""
    pack = program.pack
    newest = [c.latest_saved() for c in ckpts]
    bound = None if None in newest else min(newest)
    while bound is not None:
        restored = [c.restore_latest(pack.fresh[m], steps.zero_totals(), expected[m], at_most=bound)
                    for m, c in enumerate(ckpts)]
        if any(r is None for r in restored):
            break
        at = {train.step_of(r[0]) for r in restored}
        if len(at) == 1:
            step, spe = at.pop(), program.steps_per_epoch
            log(f"resumed the pack from its members' checkpoints of step {step} (epoch {step // spe + 1}, "
                f"step {step % spe} of {spe})")
            state = program.put(stack([r[0] for r in restored]))
            records = [hooks.RunRecord(r[2]["history"], r[2]["wall_time"]) for r in restored]
            return state, program.put(stack([r[1] for r in restored])), records
        bound = min(at)
    start_over_or_refuse(runs, newest, log)
    return program.put(pack.initial_state()), program.zero_totals(), [hooks.RunRecord() for _ in ckpts]


def pack_loop(state, totals, program: PackProgram, hook_list, epochs: int, records: List[hooks.RunRecord]):
    """``train.train_loop`` for a pack: after each epoch, one evaluation of all members, and one
    metrics line per member (its own images/s: the pack's divided by its size)."""
    for epoch in range(train.step_of(state) // program.steps_per_epoch, epochs):
        state, tick, speed = train.train_epoch(state, totals, program, hook_list, epoch)
        tests, host = program.evaluate(state), tick.finite_totals()
        lines = []
        for m, record in enumerate(records):
            line = train.epoch_record(epoch, tick.step, member_of(host, m), tests[m],
                                      speed / program.pack.size, record)
            record.history.append(line)
            lines.append(line)
        done = hooks.Tick(epoch, tick.step, tick.step, True, state, program.zero_totals(), True, lines, host)
        for hook in hook_list:
            hook.after_epoch(done)
    return state


def write_pack_record(run: workdir_lib.RunDir, names: List[str], pack: Pack, step: int) -> None:
    """Append this session to the member's pack.json: whom it trained with, from which step."""
    path = run.file(run.PACK)
    try:
        with open(path) as f:
            sessions = json.load(f)["sessions"]
    except (OSError, ValueError, KeyError, TypeError):
        sessions = []
    sessions.append({"members": names, "from_step": step, "frozen_weights": "shared" if pack.shared else "per member",
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    workdir_lib.write_atomic(path, json.dumps({"sessions": sessions}, indent=2))


def member_logs(runs, log):
    return [lambda text, name=os.path.basename(r.path): log(f"[{name}] {text}") for r in runs]


def session(program: PackProgram, runtime, runs, state_totals_records, ckpts, expected, guard, options,
            extra_hooks, log, root: str):
    """Write each member's config.json, metrics so far and pack.json, then train the pack to the end."""
    pack, (state, totals, records) = program.pack, state_totals_records
    for config, record in zip(pack.configs, records):
        record.schedule = train.make_schedule(config, program.steps_per_epoch)
    names = [os.path.basename(r.path) for r in runs]
    if parallel.is_writer():
        for config, run, record in zip(pack.configs, runs, records):
            metrics_log.write_metrics(run.metrics, record.history)
            run.write_config(config, runtime, provenance.provenance())
            write_pack_record(run, names, pack, train.step_of(state))
    preemption.stop_before_start(guard, root)
    last = pack.configs[0].epochs * program.steps_per_epoch
    members = [MemberCheckpoint(pack, m, ckpts[m], program.member(m), expected[m], records[m], options, last)
               for m in range(pack.size)]
    checkpoint, writer = PackCheckpoints(members, root), parallel.is_writer()
    logs = member_logs(runs, log)
    hook_list = [*extra_hooks, hooks.ProgressBar(program, pack.configs[0].epochs, writer), checkpoint,
                 *(MemberMetricsLog(m, run.metrics, writer, logs[m]) for m, run in enumerate(runs)),
                 hooks.Preemption(guard, checkpoint, log),
                 *hooks.optional_hooks(runtime, runs[0].path, names, pack=True)]  # (a trace: in the first member's folder)
    try:
        state = pack_loop(state, totals, program, hook_list, pack.configs[0].epochs, records)
        if pack.configs[0].epochs == 0:
            checkpoint.save(hooks.Tick(0, 0, 0, True, state, program.zero_totals(), True))
    except FloatingPointError as e:
        text = re.sub(r"of pack member (\d+)", lambda m: f"of {names[int(m.group(1))]}", str(e))
        raise FloatingPointError(f"{text} (the members' last good checkpoints: step "
                                 f"{min(c.latest_saved() or 0 for c in ckpts)})") from None
    finally:
        for hook in hook_list:
            hook.close()
    return state, records


def set_up(configs, runtime: RuntimeConfig, data, mesh, limit, members: str, log):
    """The pack's program, checked to fit the device before any file is written."""
    pack = Pack(configs, data.num_classes, data.image_shape, data.num_train // configs[0].batch_size, members,
                (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform)
    program = PackProgram(pack, runtime, data, mesh)
    state, totals = program.put(pack.initial_state()), program.zero_totals()
    check_memory(program, state, totals, limit, log)
    log(f"data: {data.describe()}")
    log(f"{configs[0].model} ×{configs[0].width}, mode {configs[0].train_mode}, {pack.describe()}: "
        f"{pack.fresh[0].plan.describe()} each")
    return program


def train_pack(configs: Sequence[ExperimentConfig], root: str, data: Optional[datasets.Dataset] = None, log=print,
               runtime: Optional[RuntimeConfig] = None, checkpoint_options=None, guard=None,
               device_memory_gb: Optional[float] = None, pack_members: str = "auto",
               extra_hooks=()) -> Dict[str, Dict[str, Any]]:
    """Train ``configs`` as one pack, each member in ``root/<run name>``: {run folder: summary} of
    the members trained here (finished members are skipped). See ``train.train_and_evaluate``;
    ``device_memory_gb``: refuse a pack whose step needs more (default: the device's limit);
    ``pack_members``: vmap, sequential or auto (``pack.resolve_members``)."""
    pack_config.check_pack(configs)
    runtime = (runtime or RuntimeConfig()).validate()
    options = (checkpoint_options or checkpoints.CheckpointOptions()).validate()
    if options.extend:  # (members are found by run name, whose hash holds the epochs they were started with)
        raise checkpoints.CheckpointError(pack_config.NO_EXTEND)
    configs = unfinished([c.validate() for c in configs], root, options, log)
    if not configs:
        return {}
    data, loaded = train.load_data(configs[0], runtime, data, guard)
    mesh = parallel.make_mesh(runtime.num_devices)
    parallel.check_batch_size(configs[0].batch_size, mesh)
    program = set_up(configs, runtime, data, mesh, device_memory_limit(mesh, device_memory_gb), pack_members, log)
    runs, devices = member_runs(configs, root), train.device_summary(mesh, configs[0].batch_size)
    log = log if parallel.is_writer() else process_log.note  # (only process 0 prints; every process keeps its log)
    with contextlib.ExitStack() as held:
        hold_members(held, configs, runs, options, log)
        process_log.attach([r.path for r in runs], jax.process_index(), jax.process_count())
        ckpts = [held.enter_context(checkpoints.Checkpointer(r.path, options, log)) for r in runs]
        expected = [checkpoints.RunMeta(c.to_dict(), data.fingerprint(), program.pack.fresh[m].plan.frozen_hash,
                                        program.member(m).position) for m, c in enumerate(configs)]
        with contextlib.ExitStack() as session_:
            guard = session_.enter_context(contextlib.nullcontext(guard) if guard else preemption.PreemptionGuard())
            resumed = resume_pack(ckpts, program, expected, runs, log)
            state, records = session(program, runtime, runs, resumed, ckpts, expected, guard, options,
                                     extra_hooks, log, root)
        return write_summaries(configs, runtime, data, loaded, program, state, records, runs, devices)


def hold_members(held: contextlib.ExitStack, configs, runs, options, log) -> None:
    """Lock every member's folder (until the pack's summaries are written), and only then prepare
    them (--restart deletes), so that a member another run holds stops the pack before any member
    is changed. Process 0 deletes for --restart; the others wait for it."""
    for run in runs:
        os.makedirs(run.path, exist_ok=True)
        held.enter_context(run.exclusive())
    for config, run in zip(configs, runs):
        if parallel.is_writer() or not options.restart:
            run.prepare(config, options.restart, log)
    parallel.barrier("prepare_pack")


def write_summaries(configs, runtime, data, loaded, program, state, records, runs, devices):
    summaries = {}
    for m, (config, run) in enumerate(zip(configs, runs)):
        summary = train.run_summary(config, runtime, data, loaded, program.pack.member_state(state, m),
                                    program.member(m), records[m], run.checkpoints, devices)
        if parallel.is_writer():
            workdir_lib.write_atomic(run.summary, json.dumps(summary, indent=2))
        summaries[run.path] = summary
    return summaries
