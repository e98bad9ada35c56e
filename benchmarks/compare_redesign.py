"""CPU throughput of the trainer at another revision and at this checkout, measured side by side
in one process: ``python -m benchmarks.compare_redesign --before REV [--rounds 5 --steps 10]``.

The ``--before`` revision's packages (``bn_jax``, and ``experiments`` or ``benchmarks``, whichever
it has) are exported with ``git archive`` and imported under other names (``bn_jax_before``, …),
so both versions run in this process, round by round on the same data, and the machine's noise
falls on both alike. Two measurements per version:

* bench: the benchmark's CPU row (``benchmark.jax_runner``): ``steps`` train steps of the compiled
  program, nothing else;
* epoch: one epoch of ``steps`` steps through the trainer's own loop (progress bar, loss check,
  preemption check, then the evaluation and the metrics line; no checkpoint).

Prints seconds per step (median over rounds) and the after/before ratios. The script reaches into
both versions' internals (their hooks), so it knows the layouts of the revisions it was used on.
"""

import argparse
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import report  # noqa: E402  (early, so that the report's wall_s counts the whole command)
PACKAGES = ("bn_jax", "experiments", "benchmarks")


def export_before(rev: str, into: str):
    """``rev``'s packages as ``<name>_before`` under ``into``; the renamed package names."""
    tree = subprocess.run(["git", "-C", ROOT, "ls-tree", "--name-only", rev], check=True, capture_output=True,
                          text=True).stdout.split()
    packages = [p for p in PACKAGES if p in tree]
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, *packages], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    for package in packages:
        os.rename(os.path.join(into, package), os.path.join(into, package + "_before"))
    for package in packages:
        folder = os.path.join(into, package + "_before")
        for name in (n for n in os.listdir(folder) if n.endswith(".py")):
            with open(os.path.join(folder, name)) as f:
                text = f.read()
            for other in packages:
                text = re.sub(rf"\b{other}\b(?=[.\s])", other + "_before", text)
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
    sys.path.insert(0, into)
    return [p + "_before" for p in packages]


def fresh_copy(state):
    """A copy with new buffers (the step donates its input) and the same static fields, so that
    every round runs the step compiled in the first one."""
    import jax
    import numpy as np
    return jax.tree_util.tree_map(lambda x: np.array(x), state)


def epoch_runner(prefix: str, data, steps: int, batch: int, workdir: str):
    """One epoch through ``prefix``'s (``bn_jax`` or ``bn_jax_before``) own loop and hooks."""
    lib = {name: importlib.import_module(f"{prefix}.{name}")
           for name in ("checkpoints", "hooks", "parallel", "preemption", "program", "train", "config")}
    hooks, train = lib["hooks"], lib["train"]
    config = lib["config"].ExperimentConfig(model="resnet20", train_mode="bn", epochs=1, batch_size=batch)
    prog = lib["program"].build_program(config, lib["config"].RuntimeConfig(loop="step"), data,
                                        lib["parallel"].make_mesh(None))
    ckpt = lib["checkpoints"].Checkpointer(workdir, lib["checkpoints"].CheckpointOptions(), log=lambda *a: None)
    record = hooks.RunRecord()
    metrics, quiet = os.path.join(workdir, "metrics.jsonl"), (lambda *a: None)
    if hasattr(hooks, "FiniteCheck"):  # (before the loop checked the loss and kept the history itself)
        saver = hooks.Saver(ckpt, prog, {}, record)
        own = [hooks.FiniteCheck(ckpt), hooks.MetricsLog(record, metrics, False, quiet)]
    else:  # (no checkpoint is due in one epoch: the hook only stands by for the preemption check)
        saver = hooks.Checkpoint(ckpt, prog, None, record, lib["checkpoints"].CheckpointOptions(), steps + 1)
        own = [hooks.MetricsLog(metrics, False, quiet)]
    hook_list = [hooks.ProgressBar(prog, 1, False), *own,
                 hooks.Preemption(lib["preemption"].PreemptionGuard(), saver, quiet)]
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
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_redesign", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision to compare this checkout against")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each runs every variant once")
    p.add_argument("--steps", type=int, default=10, help="train steps per timed run")
    p.add_argument("--batch_size", type=int, default=128, help="images per step")
    p.add_argument("--out", default=None, help="also write the medians, rounds and ratios to OUT/compare.json")
    args = p.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="bn_jax_compare_")
    before = export_before(args.before, scratch)
    from bn_jax import datasets
    from benchmarks import benchmark
    benchmark_before = importlib.import_module(
        ("benchmarks_before" if "benchmarks_before" in before else "experiments_before") + ".benchmark")
    data = datasets.random_dataset(args.steps * args.batch_size, 256)
    runners = {"bench before": bench_runner(benchmark_before, args.steps, args.batch_size),
               "bench after": bench_runner(benchmark, args.steps, args.batch_size),
               "epoch before": epoch_runner("bn_jax_before", data, args.steps, args.batch_size,
                                            os.path.join(scratch, "b")),
               "epoch after": epoch_runner("bn_jax", data, args.steps, args.batch_size, os.path.join(scratch, "a"))}
    for run in runners.values():  # compile everything before timing
        run()
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            times[name].append(run() / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:13s} {median[name] * 1e3:8.1f} ms/step   rounds: {', '.join(f'{x * 1e3:.1f}' for x in t)}")
    ratios = {what: median[what + " after"] / median[what + " before"] for what in ("bench", "epoch")}
    for what, ratio in ratios.items():
        print(f"{what}: after/before = {ratio:.3f}")
    if args.out:
        header = report.report_header(argv, prog="python -m benchmarks.compare_redesign")
        rows = {name: {"ms_per_step": 1e3 * median[name], "ms_per_step_rounds": [1e3 * x for x in t]}
                for name, t in times.items()}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compare.json"), "w") as f:
            json.dump({**header, "before": args.before, "steps": args.steps, "rounds": args.rounds,
                       "batch_size": args.batch_size, "rows": rows, "after_over_before": ratios}, f, indent=2)
        print(f"wrote {os.path.join(args.out, 'compare.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
