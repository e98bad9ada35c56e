"""Train a CIFAR ResNet, optionally BatchNorm-only: ``python -m experiments.cifar --bn_only``.

Writes into --workdir: config.json, metrics.jsonl (one line per epoch), summary.json and Orbax
checkpoints under checkpoints/<step>/. Re-running the same command resumes from the newest
checkpoint; see docs/checkpoints.md for resume, exit codes and the checkpoint layout.

Exit codes: 0 done, 2 bad flags/data or unusable checkpoint, 3 non-finite loss,
75 preempted (SIGTERM/SIGINT; a checkpoint was saved: re-run to resume), 130 a second SIGINT.

The flags of both configuration parts are generated from their fields (``bn_jax.config``); this
module imports no JAX until it trains, so ``--help`` answers at once.
"""

import argparse
import os
import sys
from typing import NamedTuple

from bn_jax import config as config_lib
from bn_jax import orbax_failures, preemption
from bn_jax import workdir as workdir_lib

EXPERIMENT = config_lib.ExperimentConfig()
CKPT_DEFAULTS = config_lib.CheckpointOptions()
EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, preemption.EXIT_PREEMPTED
EXIT_INTERRUPTED = 130  # the shell's code for an interrupted command (128 + SIGINT)


DESCRIPTION = ("Train a CIFAR ResNet with all weights (--train_mode full) or only BatchNorm's γ and β "
               "(--bn_only), everything else frozen at its random initialisation. Defaults reproduce the "
               "paper's recipe (Frankle et al., ICLR 2021).")


def build_parser(prog: str = "python -m experiments.cifar", description: str = DESCRIPTION,
                 defaults=None) -> argparse.ArgumentParser:
    """The trainer's flags; ``defaults`` replaces field defaults (experiments.imagenet's recipe)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=config_lib.HelpFormatter)
    groups = config_lib.add_flags(p, config_lib.ExperimentConfig)
    config_lib.add_flags(p, config_lib.RuntimeConfig, groups)
    p.set_defaults(**(defaults or {}))
    groups["what trains"].add_argument("--bn_only", action="store_true", help="shorthand for --train_mode bn")
    p.set_defaults(train_mode=None)  # (to tell an explicit --train_mode from the default: see --bn_only)
    mode = next(a for a in p._actions if a.dest == "train_mode")
    mode.help += f" (default: {EXPERIMENT.train_mode})"
    c = groups["devices and clusters"]
    c.add_argument("--coordinator_address", default=None,
                   help="multi-host: host:port of process 0 (not needed under SLURM or on a TPU pod, "
                        "where jax.distributed finds it)")
    c.add_argument("--num_processes", type=int, default=None, help="multi-host: number of processes")
    c.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index")
    c.add_argument("--coordinator_timeout_s", type=float, default=300.0,
                   help="multi-host: give up (exit 2) when the coordinator does not answer within this "
                        "many seconds")
    add_checkpoint_flags(p.add_argument_group("checkpoints and resume"))
    p.add_argument("--workdir", default=None,
                   help="output folder (default: runs/<model>_w<width>_<mode>_s<seed>-<hash of the experiment>)")
    return p


def add_checkpoint_flags(c) -> None:
    c.add_argument("--checkpoint_every", type=int, default=CKPT_DEFAULTS.every,
                   help="save a checkpoint every this many --checkpoint_unit (and always at the end)")
    c.add_argument("--checkpoint_unit", default=CKPT_DEFAULTS.unit, choices=config_lib.CHECKPOINT_UNITS,
                   help="unit of --checkpoint_every")
    c.add_argument("--keep", type=int, default=CKPT_DEFAULTS.keep,
                   help="keep the newest N checkpoints (>= 2 lets a corrupt newest one fall back)")
    c.add_argument("--small_checkpoints", action="store_true",
                   help="store only the trainable leaves, batch_stats and optimizer state; frozen leaves "
                        "are re-created from the seed and checked against a saved hash on restore")
    c.add_argument("--no_async_checkpoints", dest="async_checkpoints", action="store_false",
                   help="write checkpoints synchronously instead of in a background thread")
    c.add_argument("--extend_to_epochs", type=int, default=None, metavar="N",
                   help="train the run in --workdir on to N epochs (more than it was started with), "
                        "resuming from its newest checkpoint; the step schedule's lr drops move to 50%% "
                        "and 75%% of N")
    c.add_argument("--restart", action="store_true",
                   help="delete an existing run in --workdir (checkpoints, metrics) and start over; "
                        "without it, an existing run is resumed")


class Command(NamedTuple):
    experiment: "config_lib.ExperimentConfig"
    runtime: "config_lib.RuntimeConfig"
    workdir: str
    checkpointing: "config_lib.CheckpointOptions"
    args: argparse.Namespace  # (the cluster flags, for start_cluster)


def parse_args(argv=None, parser=None) -> Command:
    """What the command line asks for, validated; bad flags exit with code 2. Creates no files
    and starts nothing (no JAX, no cluster)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        options = config_lib.CheckpointOptions(
            every=args.checkpoint_every, unit=args.checkpoint_unit, keep=args.keep,
            format="small" if args.small_checkpoints else "full", restart=args.restart,
            extend=args.extend_to_epochs is not None, async_save=args.async_checkpoints).validate()
    except ValueError as e:
        parser.error(str(e))
    experiment, runtime, workdir = configs_from_args(args, parser)
    workdir = workdir or os.path.join("runs", run_name(experiment))
    problem = workdir_lib.unwritable(workdir)
    if problem:
        parser.error(f"cannot write to workdir {workdir}: {problem}")
    return Command(experiment, runtime, workdir, options, args)


def configs_from_argv(argv, parser=None):
    """(validated ExperimentConfig, RuntimeConfig, --workdir or None) from flags; touches no files."""
    parser = parser or build_parser()
    return configs_from_args(parser.parse_args(argv), parser)


def configs_from_args(args, parser):
    values = dict(vars(args))
    if values["bn_only"]:
        if args.train_mode not in (None, "bn"):
            parser.error(f"--bn_only conflicts with --train_mode {args.train_mode}")
        values["train_mode"] = "bn"
    values["train_mode"] = values["train_mode"] or EXPERIMENT.train_mode
    streamed = config_lib.STREAMED_DATASETS
    if parser.get_default("dataset") in streamed and values["dataset"] not in streamed:
        parser.error(f"this command trains streamed datasets ({', '.join(streamed)}); train "
                     f"{values['dataset']} with python -m experiments.cifar")
    if values["dataset"] in streamed:
        values["model"] = config_lib.imagenet_model_name(values["model"])
        if values.get("image_size") == config_lib.DEFAULT_IMAGE_SIZE:  # (the default, named: the same run)
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


def run_name(config: config_lib.ExperimentConfig) -> str:
    """A readable prefix (the hyperparameters that tell a sweep's runs apart, defaults left out)
    plus a short hash of the whole experiment, so two different experiments never share a name."""
    parts = [config.model, f"w{config.width}", config.train_mode]
    if config.train_mode == "random_k":
        parts.append(f"k{config.k}")
    if config.bn_placement != EXPERIMENT.bn_placement:
        parts.append(f"bn{config.bn_placement}")
    if config.bn_init != EXPERIMENT.bn_init:
        parts.append(f"init{config.bn_init}")
    return "_".join(parts + [f"s{config.seed}"]) + "-" + config.short_hash()


def start_cluster(args, runtime, batch_size: int, parser) -> None:
    """jax.distributed (multi-host) and the batch/device check; bad values exit 2."""
    from bn_jax import parallel
    try:
        parallel.maybe_initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                              args.coordinator_timeout_s)
        parallel.check_batch_size(batch_size, parallel.make_mesh(runtime.num_devices))
    except ValueError as e:
        parser.error(str(e))


def main(argv=None, extra_hooks=(), parser=None) -> int:
    orbax_failures.quiet_background_noise()
    # Signals are turned into a checkpoint and exit 75 from the start, data loading included.
    with preemption.PreemptionGuard() as guard:
        parser = parser or build_parser()
        experiment, runtime, workdir, options, args = parse_args(argv, parser)
        try:
            start_cluster(args, runtime, experiment.batch_size, parser)
        except KeyboardInterrupt:  # a second Ctrl-C while waiting for a coordinator
            print("interrupted: stopped at once on a second SIGINT", file=sys.stderr)
            return EXIT_INTERRUPTED
        guard.reinstall()  # after jax.distributed.initialize, which takes SIGTERM for itself
        return train(experiment, runtime, workdir, options, guard, extra_hooks, parser)


def train(experiment, runtime, workdir: str, options, guard, extra_hooks, parser) -> int:
    """Run the training; its outcome as an exit code with one line on stderr."""
    from bn_jax import checkpoints, input_pipeline, parallel
    from bn_jax import train as train_lib
    try:
        summary = train_lib.train_and_evaluate(experiment, workdir, runtime=runtime, checkpointing=options,
                                               guard=guard, extra_hooks=extra_hooks)
    except (input_pipeline.DataError, checkpoints.CheckpointError, workdir_lib.WorkdirUnusable) as e:
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
        print(f"interrupted: stopped at once on a second SIGINT; resume from the newest checkpoint "
              f"in {os.path.join(workdir, 'checkpoints')} by re-running the command", file=sys.stderr)
        return EXIT_INTERRUPTED
    if parallel.is_writer():
        print(f"final test accuracy {summary['final_test_accuracy']:.4f} "
              f"(best {summary['best_test_accuracy']:.4f}), top-5 {summary['final_test_top5_accuracy'] or 0:.4f}; "
              f"results in {workdir}")
    return 0


def run_main(argv=None, extra_hooks=(), parser=None) -> int:
    """``main``'s exit code; after a failed background save, exit at once (see below)."""
    code = main(argv, extra_hooks, parser)
    if orbax_failures.FAILED_IN_BACKGROUND:  # skip the shutdown, where Orbax's failed threads print tracebacks
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(run_main())
