"""Run a grid of ``experiments.cifar`` runs into one folder: ``python -m experiments.sweep --preset modes``.

Each run lives in ROOT/<run name> (``bn_jax.config.run_name``: the hyperparameters that tell
the grid's runs apart, and a short hash of the whole experiment, so a sweep with other flags
gets other folders). A run with summary.json and the same experiment in config.json is finished
and skipped, so a sweep can be restarted; a folder of that name holding another experiment is a
conflict and is refused (use another --root). Runs without summary.json are (re)started, and resume from their newest
checkpoint if an earlier sweep was interrupted (docs/checkpoints.md). ``--print_only`` prints
one command per unfinished run (or pack: ``--seeds 0-4 --pack 8`` trains each point's seeds as
packs, one compiled step for up to 8 runs), for a cluster scheduler. Flags after the known ones
are passed to every run (e.g. ``--epochs 3 --data_dir ...``).

Presets follow the paper's experiments (Frankle et al., ICLR 2021):
  depth: ResNet-14 … ResNet-866, full vs BN-only (Figure 2)
  width: ResNet-14 at width 1 … 32, full vs BN-only (Figure 2)
  modes: ResNet-20 in every train mode of bn_jax.train_modes (BN-only vs its baselines and ablations)
  vgg:   VGG-11/13/16/19, full vs BN-only (Figure 3's VGG panel)
"""

import argparse
import os
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from bn_jax import cli
from bn_jax import config as config_lib
from bn_jax import names, pack_config
from bn_jax import workdir as workdir_lib
from experiments import cifar

PAPER_DEPTHS = (14, 32, 56, 110, 218, 434, 866)
PAPER_WIDTHS = (1, 2, 4, 8, 16, 32)


def _grid(points: List[Dict]) -> List[Dict]:
    return [{key: str(value) for key, value in p.items()} for p in points]


PRESETS = {
    "depth": _grid([{"model": f"resnet{d}", "train_mode": m} for d in PAPER_DEPTHS for m in ("full", "bn")]),
    "width": _grid([{"model": "resnet14", "width": w, "train_mode": m}
                    for w in PAPER_WIDTHS for m in ("full", "bn")]),
    "modes": _grid([{"model": "resnet20", "train_mode": m} for m in names.TRAIN_MODES]),
    "vgg": _grid([{"model": f"vgg{d}", "train_mode": m} for d in (11, 13, 16, 19) for m in ("full", "bn")]),
}


def run_argv(point: Dict[str, str], extra: Sequence[str]) -> List[str]:
    argv = [arg for key, value in point.items() for arg in (f"--{key}", value)]
    return argv + list(extra)


def check_extra(preset: str, extra: Sequence[str], seeds: bool = False) -> None:
    """Refuse passed-through flags that would override what the grid varies (names would collide)."""
    varied = {f"--{key}" for point in PRESETS[preset] for key in point} | {"--workdir", "--bn_only", "--seeds", "--vary"}
    varied |= {"--seed"} if seeds else set()
    clash = sorted({arg.split("=")[0] for arg in extra} & varied)
    if clash:
        raise ValueError(f"preset {preset} sets {', '.join(clash)} itself")


def status(workdir: str, config) -> str:
    """done (finished with this config), extended (finished, and trained further with
    --extend_to_epochs: the same run), conflict (finished with another config), or todo."""
    run = workdir_lib.RunDir(workdir)
    if not run.is_finished():
        return "todo"
    # keys that only change how a run executes (eval batch, devices, loop) do not make it another run
    if run.holds(config):
        return "done"
    return "extended" if run.extended_to(config) else "conflict"


def plan(preset: str, root: str, extra: Sequence[str], seeds: Optional[Sequence[int]] = None, pack: int = 1):
    """[(name, status, command)] for every grid point (each of ``seeds``, if given), in grid order.
    ``pack`` > 1: a point's unfinished seeds train as packs of up to ``pack`` (one command each,
    named by its members joined with " + "); finished and conflicting runs keep a line each."""
    check_extra(preset, extra, seeds is not None)
    runs, names = [], []
    for point in PRESETS[preset]:
        argv, todo = run_argv(point, extra), []
        for seed in seeds if seeds is not None else [None]:
            seed_argv = argv + ([] if seed is None else ["--seed", str(seed)])
            config, _, _ = cli.configs_from_argv(cifar.RECIPE, seed_argv)
            name = config_lib.run_name(config)
            workdir, names = os.path.join(root, name), names + [name]
            state = status(workdir, config)
            if state == "todo" and pack > 1 and seed is not None:
                todo.append((seed, name))
            else:
                runs.append((name, state, ["python", "-m", "experiments.cifar", *seed_argv, "--workdir", workdir]))
        for i in range(0, len(todo), pack):
            chunk = todo[i:i + pack]
            runs.append((" + ".join(n for _, n in chunk), "todo", ["python", "-m", "experiments.cifar", *argv, "--seeds",
                                                                  ",".join(str(s) for s, _ in chunk), "--workdir", root]))
    if len(set(names)) != len(names):
        raise ValueError(f"preset {preset} gives duplicate run names: {names}")
    return runs


def run_child(argv: List[str]) -> int:
    """Run one training process; on Ctrl-C let it save its checkpoint and exit (code 75).

    (``subprocess.call`` would SIGKILL the child a quarter second after the interrupt.)
    """
    proc = subprocess.Popen(argv)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the child, in our process group, got the same SIGINT
        return proc.wait()


NOTES = {"conflict": ": config.json differs; use another --root",
         "extended": ": finished, then trained further with --extend_to_epochs (the same run)"}


def execute(runs, runner=run_child, log=print, busy=lambda run: workdir_lib.in_use(run.path)) -> int:
    """Run the unfinished runs one after another; the number of failed runs. A run another process
    trains (``busy``: it holds the run's lock) is skipped, and is no failure.

    A preempted run (exit 75) stops the sweep: re-running it resumes that run and goes on.
    """
    failed = 0
    for name, state, command in runs:
        if state != "todo":
            log(f"[{state}] {name}" + NOTES.get(state, ""))
            failed += state == "conflict"
            continue
        run = workdir_lib.RunDir(command[command.index("--workdir") + 1]) if "--workdir" in command else None
        if run is not None and busy(run):  # another sweep on this root trains it now
            log(f"[busy] {name}: another process is training it; skipped (not a failure)")
            continue
        log(f"[run] {name}")
        code = runner([sys.executable, *command[1:]])
        if code not in (0, cli.EXIT_PREEMPTED) and run is not None and (busy(run) or run.is_finished()):
            log(f"[busy] {name}: another process took it first; not a failure")  # (it held the run's lock)
            continue
        if code == cli.EXIT_PREEMPTED:
            log(f"[preempted] {name}: checkpoint saved; re-run the sweep to resume")
            return failed + 1
        if code:
            log(f"[failed] {name}: exit status {code}")
            failed += 1
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0],
                                epilog="Other flags go to every run, e.g. --epochs 3 --data_dir DIR.")
    p.add_argument("--preset", required=True, choices=list(PRESETS),
                   help="the grid: depth (ResNet-14…866), width (ResNet-14 ×1…×32), modes (every train mode), "
                        "vgg (VGG-11…19); each full vs BN-only unless modes")
    p.add_argument("--root", required=True, help="folder that holds one subfolder per run")
    p.add_argument("--print_only", action="store_true", help="print the unfinished runs' commands and exit")
    p.add_argument("--seeds", metavar="LIST", help="every grid point once per seed: a list and ranges such as "
                   "0-4 or 0,1,5 (default: one run per point, with --seed if passed on)")
    p.add_argument("--pack", type=int, default=1, metavar="N",
                   help="train each point's unfinished seeds as packs of up to N runs, one compiled step for "
                        "all (experiments.cifar --seeds; docs/packs.md); 1: one process per run")
    args, extra = p.parse_known_args(argv)
    problem = workdir_lib.unwritable(args.root)
    if problem:
        p.error(f"cannot use --root {args.root}: {problem}")
    try:
        seeds = None if args.seeds is None else pack_config.parse_seeds(args.seeds)
        if args.pack < 1:
            raise ValueError(f"--pack must be >= 1, got {args.pack}")
        if args.pack > 1 and seeds is None:
            raise ValueError("--pack groups each grid point's seeds: give --seeds")
        runs = plan(args.preset, args.root, extra, seeds, args.pack)
    except ValueError as e:
        p.error(str(e))
    if args.print_only:
        try:
            for _, state, command in runs:
                if state == "todo":
                    print(shlex.join(command))
            sys.stdout.flush()
        except BrokenPipeError:  # a reader such as `head` took what it wanted: not the sweep's failure
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        conflicts = [name for name, state, _ in runs if state == "conflict"]
        for name in conflicts:  # (as the sweep itself would report them: said, and exit 1)
            print(f"[conflict] {name}{NOTES['conflict']}", file=sys.stderr)
        return 1 if conflicts else 0
    os.makedirs(args.root, exist_ok=True)
    failed = execute(runs)
    print(f"{len(runs)} runs in {args.root}: {failed} failed or conflicting")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
