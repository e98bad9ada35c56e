"""CPU throughput of the trainer before and after the redesign (programs, hooks, two configs),
measured side by side in one process.

    python docs/performance/redesign/compare.py --before 6013c24 [--rounds 5 --steps 10]

The ``--before`` revision's ``bn_jax`` and ``experiments`` are exported with ``git archive`` and
imported under other names (``bn_jax_before``, ``experiments_before``), so both versions run in
this process, round by round on the same data, and the machine's noise falls on both alike.
Two measurements per version:

* bench: the benchmark's CPU row (``experiments.benchmark.jax_runner``): ``steps`` train steps of
  the compiled program, nothing else;
* epoch: one epoch of ``steps`` steps through the trainer's own loop (progress bar, finite
  check, preemption check, then the evaluation and the metrics line; no checkpoint).

Prints seconds per step (median over rounds) and the after/before ratios. This script belongs to
the measurement recorded in docs/performance.md; it reaches into both versions' internals.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)


def export_before(rev: str, into: str) -> None:
    """``rev``'s bn_jax and experiments as bn_jax_before and experiments_before under ``into``."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "bn_jax", "experiments"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    for old, new in (("bn_jax", "bn_jax_before"), ("experiments", "experiments_before")):
        os.rename(os.path.join(into, old), os.path.join(into, new))
    for folder in ("bn_jax_before", "experiments_before"):
        for name in os.listdir(os.path.join(into, folder)):
            path = os.path.join(into, folder, name)
            if name.endswith(".py"):
                with open(path) as f:
                    text = f.read()
                text = re.sub(r"\bbn_jax\b(?!_)", "bn_jax_before", text)
                text = re.sub(r"\bexperiments\b(?=[.\s])", "experiments_before", text)
                with open(path, "w") as f:
                    f.write(text)
    sys.path.insert(0, into)


def fresh_copy(state):
    """A copy with new buffers (the step donates its input) and the same static fields, so that
    every round runs the step compiled in the first one."""
    import jax
    import numpy as np
    return jax.tree_util.tree_map(lambda x: np.array(x), state)


def epoch_runner_before(data, steps: int, batch: int, workdir: str):
    from bn_jax_before import checkpoints, parallel, train
    from bn_jax_before.config import Config
    config = Config(model="resnet20", train_mode="bn", epochs=1, batch_size=batch, loop="step")
    mesh = parallel.make_mesh(None)
    ckpt = checkpoints.Checkpointer(workdir, checkpoints.CheckpointOptions(), log=lambda *a: None)
    guard = checkpoints.PreemptionGuard()
    loop = train._Loop(config, data, workdir, mesh, ckpt, guard, {}, lambda *a: None)
    loop.writer = False  # no metrics file, as below

    initial = train.create_train_state(config, 10, (32, 32, 3), steps)  # one treedef: compiled once

    def run():
        state = parallel.replicate(fresh_copy(initial), mesh)
        totals = parallel.replicate(train.zero_totals(), mesh)
        t = time.perf_counter()
        state, totals, speed = loop.train_epoch(state, totals, 0)
        loop.end_epoch(state, totals, 0, speed)
        return time.perf_counter() - t
    return run


def epoch_runner_after(data, steps: int, batch: int, workdir: str):
    from bn_jax import checkpoints, hooks, parallel, preemption, program, train
    from bn_jax.config import ExperimentConfig, RuntimeConfig
    config = ExperimentConfig(model="resnet20", train_mode="bn", epochs=1, batch_size=batch)
    mesh = parallel.make_mesh(None)
    prog = program.build_program(config, RuntimeConfig(loop="step"), data, mesh)
    ckpt = checkpoints.Checkpointer(workdir, checkpoints.CheckpointOptions(), log=lambda *a: None)
    record = hooks.RunRecord()
    saver = hooks.Saver(ckpt, prog, {}, record)
    hook_list = [hooks.ProgressBar(prog, 1, False), hooks.FiniteCheck(ckpt),
                 hooks.MetricsLog(record, os.path.join(workdir, "metrics.jsonl"), False, lambda *a: None),
                 hooks.Preemption(preemption.PreemptionGuard(), saver, lambda *a: None)]

    initial = train.create_train_state(config, 10, (32, 32, 3), steps)  # one treedef: compiled once

    def run():
        state = prog.put(fresh_copy(initial))
        t = time.perf_counter()
        train.train_loop(state, prog.zero_totals(), prog, hook_list, 1, record)
        return time.perf_counter() - t
    return run


def bench_runner(benchmark, steps: int, batch: int):
    case = benchmark.Case("bn_jax", "resnet20", batch, "bn", "float32", "step", 1)
    runner = benchmark.jax_runner(case, 1, steps)

    def run():
        t = time.perf_counter()
        runner.run(steps)
        return time.perf_counter() - t
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision to compare this checkout against")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each runs every variant once")
    p.add_argument("--steps", type=int, default=10, help="train steps per timed run")
    p.add_argument("--batch_size", type=int, default=128)
    args = p.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bn_jax_compare_")
    export_before(args.before, scratch)
    from bn_jax import input_pipeline
    from experiments import benchmark
    import experiments_before.benchmark as benchmark_before
    data = input_pipeline.random_dataset(args.steps * args.batch_size, 256)
    runners = {"bench before": bench_runner(benchmark_before, args.steps, args.batch_size),
               "bench after": bench_runner(benchmark, args.steps, args.batch_size),
               "epoch before": epoch_runner_before(data, args.steps, args.batch_size, os.path.join(scratch, "b")),
               "epoch after": epoch_runner_after(data, args.steps, args.batch_size, os.path.join(scratch, "a"))}
    for run in runners.values():  # compile everything before timing
        run()
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            times[name].append(run() / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:13s} {median[name] * 1e3:8.1f} ms/step   rounds: {', '.join(f'{x * 1e3:.1f}' for x in t)}")
    for what in ("bench", "epoch"):
        print(f"{what}: after/before = {median[what + ' after'] / median[what + ' before']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
