"""The trainer's command line, one for every recipe: parse, join the cluster, train, exit code.

A recipe (``experiments.cifar``, ``experiments.imagenet``) is a ``Recipe``: its command, its
description and its defaults as an ``ExperimentConfig``. Every flag is generated from a field
of a configuration part (``bn_jax.config``: experiment, runtime, checkpoints, cluster), so this
module adds only the two flags that are no field: ``--bn_only`` and ``--workdir``.

Writes into --workdir: config.json, metrics.jsonl (one line per epoch), summary.json and Orbax
checkpoints under checkpoints/<step>/ (``bn_jax.workdir.RunDir``). Re-running the same command
resumes from the newest checkpoint; see docs/checkpoints.md.

Exit codes: 0 done, 2 bad flags/data or unusable checkpoint, 3 non-finite loss,
75 preempted (SIGTERM, SIGINT, SIGUSR1, SIGUSR2; a checkpoint was saved: re-run to resume), 130 a second SIGINT.

Nothing here imports JAX until a run starts, so ``--help`` answers at once.
"""

import argparse
import dataclasses
import os
import sys
from typing import NamedTuple

from bn_jax import config as config_lib
from bn_jax import dataset_registry, orbax_failures, pack_config, preemption, process_log
from bn_jax import workdir as workdir_lib

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, preemption.EXIT_PREEMPTED
EXIT_INTERRUPTED = 130  # the shell's code for an interrupted command (128 + SIGINT)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A command that trains: its name, what it is for, and the experiment it runs by default."""

    prog: str
    description: str
    defaults: config_lib.ExperimentConfig = dataclasses.field(default_factory=config_lib.ExperimentConfig)
    streamed: bool = False  # trains only streamed datasets (ImageNet), whose --model resnet50 is imagenet_resnet50


class Command(NamedTuple):
    experiment: config_lib.ExperimentConfig
    runtime: config_lib.RuntimeConfig
    workdir: str  # a pack's: the folder that holds its members' run folders
    checkpoint_options: config_lib.CheckpointOptions
    cluster: config_lib.ClusterOptions
    pack: pack_config.PackOptions = pack_config.PackOptions()
    members: tuple = ()  # a pack's experiments (``pack_config.members``); empty for one run


def build_parser(recipe: Recipe) -> argparse.ArgumentParser:
    """The recipe's flags, each with its help, its choices and the recipe's default."""
    p = argparse.ArgumentParser(prog=recipe.prog, description=recipe.description,
                                formatter_class=config_lib.HelpFormatter)
    groups = config_lib.add_flags(p, config_lib.ExperimentConfig)
    for part in (config_lib.RuntimeConfig, config_lib.ClusterOptions, config_lib.CheckpointOptions,
                 pack_config.PackOptions):
        config_lib.add_flags(p, part, groups)
    defaults = recipe.defaults.to_dict()
    if recipe.streamed:  # (the name its users know: torchvision's)
        defaults["model"] = defaults["model"].removeprefix("imagenet_")
    p.set_defaults(**defaults)
    groups["what trains"].add_argument("--bn_only", action="store_true", help="shorthand for --train_mode bn")
    p.set_defaults(train_mode=None)  # (to tell an explicit --train_mode from the default: see --bn_only)
    mode = next(a for a in p._actions if a.dest == "train_mode")
    mode.help += f" (default: {recipe.defaults.train_mode})"
    groups["checkpoints and resume"].add_argument(
        "--workdir", default=None,
        help="output folder (default: runs/<model>_w<width>_<mode>_s<seed>-<hash of the experiment>); with "
             "--seeds or --vary, the folder that holds each member's run folder (default: runs)")
    return p


def parse_args(recipe: Recipe, argv=None, parser=None) -> Command:
    """What the command line asks for, validated; bad flags exit with code 2. Creates no files
    and starts nothing (no JAX, no cluster)."""
    parser = parser or build_parser(recipe)
    args = parser.parse_args(argv)
    experiment, runtime, workdir = configs_from_args(recipe, args, parser)
    try:
        options = config_lib.CheckpointOptions.from_dict(vars(args)).validate()
        cluster = config_lib.ClusterOptions.from_dict(vars(args)).validate()
        pack = pack_config.PackOptions.from_dict(vars(args)).validate()
        members = tuple(pack_config.members(experiment, pack)) if pack.packed else ()
        if members and options.extend:
            raise ValueError(pack_config.NO_EXTEND)
    except ValueError as e:
        parser.error(str(e))
    if members:
        workdir = workdir or "runs"
    workdir = workdir or os.path.join("runs", config_lib.run_name(experiment))
    problem = workdir_lib.unwritable(workdir)
    if problem:
        parser.error(f"cannot write to workdir {workdir}: {problem}")
    return Command(experiment, runtime, workdir, options, cluster, pack, members)


def configs_from_argv(recipe: Recipe, argv, parser=None):
    """(validated ExperimentConfig, RuntimeConfig, --workdir or None) from flags; touches no files."""
    parser = parser or build_parser(recipe)
    return configs_from_args(recipe, parser.parse_args(argv), parser)


def configs_from_args(recipe: Recipe, args, parser):
    values = dict(vars(args))
    if values["bn_only"]:
        if args.train_mode not in (None, "bn"):
            parser.error(f"--bn_only conflicts with --train_mode {args.train_mode}")
        values["train_mode"] = "bn"
    values["train_mode"] = values["train_mode"] or recipe.defaults.train_mode
    streamed = dataset_registry.lookup(values["dataset"]).streamed
    if recipe.streamed and not streamed:
        parser.error(f"this command trains streamed datasets ({', '.join(dataset_registry.STREAMED)}); train "
                     f"{values['dataset']} with python -m experiments.cifar")
    if streamed:
        values["model"] = config_lib.imagenet_model_name(values["model"])
        if values.get("image_size") == dataset_registry.DEFAULT_IMAGE_SIZE:  # (the default, named: the same run)
            values["image_size"] = None
    if values.get("extend_to_epochs") is not None:
        if args.restart:
            parser.error("--extend_to_epochs continues a run; --restart discards it")
        if values["epochs"] not in (parser.get_default("epochs"), values["extend_to_epochs"]):
            parser.error("--epochs and --extend_to_epochs disagree; give only --extend_to_epochs")
        values["epochs"] = values["extend_to_epochs"]
    try:
        experiment = config_lib.ExperimentConfig.from_dict(values).validate()
        runtime = config_lib.RuntimeConfig.from_dict(values).validate()
    except ValueError as e:
        parser.error(str(e))
    return experiment, runtime, values["workdir"]


def start_cluster(cluster: config_lib.ClusterOptions, runtime, batch_size: int, parser) -> None:
    """jax.distributed (multi-process), the allocated-devices check and the batch/device check;
    bad values exit 2."""
    from bn_jax import cluster as cluster_lib
    from bn_jax import parallel
    try:
        cluster_lib.join(cluster)
        cluster_lib.check_allocation(runtime.num_devices)
        parallel.check_batch_size(batch_size, parallel.make_mesh(runtime.num_devices))
    except ValueError as e:
        parser.error(str(e))


def main(recipe: Recipe, argv=None, extra_hooks=()) -> int:
    """The run's exit code; everything it prints also goes to its run folder's log
    (``bn_jax.process_log``), the traceback of an unexpected error included."""
    process_log.start()
    try:
        return _main(recipe, argv, extra_hooks)
    except BaseException as e:
        if not isinstance(e, SystemExit):  # (a refused flag's one line is already in the log)
            process_log.record_exception()
        raise
    finally:
        process_log.stop()


def _main(recipe: Recipe, argv, extra_hooks) -> int:
    orbax_failures.quiet_background_noise()
    # Signals are turned into a checkpoint and exit 75 from the start, data loading included.
    with preemption.PreemptionGuard() as guard:
        parser = build_parser(recipe)
        command = parse_args(recipe, argv, parser)
        try:
            start_cluster(command.cluster, command.runtime, command.experiment.batch_size, parser)
        except KeyboardInterrupt:  # a second Ctrl-C while waiting for a coordinator
            print("interrupted: stopped at once on a second SIGINT", file=sys.stderr)
            return EXIT_INTERRUPTED
        guard.reinstall()  # after jax.distributed.initialize, which takes SIGTERM for itself
        return train(command, guard, extra_hooks, parser)


def train(command: Command, guard, extra_hooks, parser) -> int:
    """Run the training; its outcome as an exit code with one line on stderr."""
    from bn_jax import checkpoints, datasets, parallel
    workdir = command.workdir
    try:
        summaries = run_training(command, guard, extra_hooks)
    except (datasets.DataError, checkpoints.CheckpointError, workdir_lib.WorkdirUnusable, MemoryError) as e:
        parser.print_usage(sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except OSError as e:
        if orbax_failures.disk_full_bytes(e) is None:
            raise
        print(f"error: no space left on the device holding {e.filename or workdir} ({e.strerror}); "
              "free space and re-run the same command to resume from the newest checkpoint", file=sys.stderr)
        return EXIT_BAD_INPUT
    except preemption.Preempted as e:
        print(f"preempted: {e} (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, without the checkpoint
        where = (f"in {workdir_lib.RunDir(workdir).checkpoints}" if not command.members else
                 f"of each member (in {workdir}/<run name>/checkpoints)")
        print(f"interrupted: stopped at once on a second SIGINT; resume from the newest checkpoint "
              f"{where} by re-running the command", file=sys.stderr)
        return EXIT_INTERRUPTED
    if parallel.is_writer():
        for summary, folder in summaries:
            print(f"final test accuracy {summary['final_test_accuracy']:.4f} "
                  f"(best {summary['best_test_accuracy']:.4f}), top-5 {summary['final_test_top5_accuracy'] or 0:.4f}; "
                  f"results in {folder}")
    return 0


def run_training(command: Command, guard, extra_hooks):
    """[(summary, run folder)] of the run, or of each member a pack trained."""
    from bn_jax import compile_cache
    compile_cache.use(command.runtime.compilation_cache)
    if not command.members:
        from bn_jax import train as train_lib
        return [(train_lib.train_and_evaluate(command.experiment, command.workdir, runtime=command.runtime,
                                              checkpoint_options=command.checkpoint_options, guard=guard,
                                              extra_hooks=extra_hooks), command.workdir)]
    from bn_jax import pack_run
    summaries = pack_run.train_pack(command.members, command.workdir, runtime=command.runtime,
                                    checkpoint_options=command.checkpoint_options, guard=guard,
                                    device_memory_gb=command.pack.device_memory_gb,
                                    pack_members=command.pack.pack_members, extra_hooks=extra_hooks)
    return [(summary, folder) for folder, summary in summaries.items()]


def run_main(recipe: Recipe, argv=None, extra_hooks=()) -> int:
    """``main``'s exit code; after a failed background save, exit at once (see below)."""
    code = main(recipe, argv, extra_hooks)
    if orbax_failures.FAILED_IN_BACKGROUND:  # skip the shutdown, where Orbax's failed threads print tracebacks
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
