"""Train a CIFAR ResNet, optionally BatchNorm-only: ``python -m experiments.cifar --bn_only``.

Writes into --workdir: config.json, metrics.jsonl (one line per epoch), summary.json and Orbax
checkpoints under checkpoints/<step>/. Re-running the same command resumes from the newest
checkpoint; see docs/checkpoints.md for resume, exit codes and the checkpoint layout.

Exit codes: 0 done, 2 bad flags/data or unusable checkpoint, 3 non-finite loss,
75 preempted (SIGTERM/SIGINT; a checkpoint was saved: re-run to resume), 130 a second SIGINT.
"""

import argparse
import dataclasses
import os
import sys

from bn_jax import checkpoints, orbax_failures, preemption
from bn_jax import config as config_lib
from bn_jax import input_pipeline, models, parallel, train_modes
from bn_jax import workdir as workdir_lib

DEFAULTS = config_lib.Config()
CKPT_DEFAULTS = checkpoints.CheckpointOptions()
EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED = 2, 3, preemption.EXIT_PREEMPTED
EXIT_INTERRUPTED = 130  # the shell's code for an interrupted command (128 + SIGINT)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.cifar",
        description="Train a CIFAR ResNet with all weights (--train_mode full) or only BatchNorm's "
                    "γ and β (--bn_only), everything else frozen at its random initialisation. "
                    "Defaults reproduce the paper's recipe (Frankle et al., ICLR 2021).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=DEFAULTS.model, help=f"architecture: {models.model_names()}")
    m.add_argument("--width", type=int, default=DEFAULTS.width,
                   help="width multiplier k: ResNet segments have 16k, 32k, 64k channels; VGG channels ×k")
    m.add_argument("--bn_init", default=DEFAULTS.bn_init, choices=list(models.BN_INITS),
                   help="BatchNorm γ init: uniform = U[0,1) as the paper's code, ones = 1")
    m.add_argument("--bn_placement", default=DEFAULTS.bn_placement, choices=config_lib.BN_PLACEMENTS,
                   help="BatchNorm before the ReLU (the paper's, He et al. 2016) or after it")
    t = p.add_argument_group("what trains")
    t.add_argument("--train_mode", default=None, choices=list(train_modes.MODES),
                   help=f"(default: {DEFAULTS.train_mode}) which parameters train; all others stay at their "
                        "initial value. random_k: k "
                        "random weights per conv output channel + output layer; no_affine: BN without "
                        "γ/β, all else trains")
    t.add_argument("--bn_only", action="store_true", help="shorthand for --train_mode bn")
    t.add_argument("--k", type=int, default=DEFAULTS.k,
                   help="random_k: trainable weights per output channel of each conv (2 ≈ as many as BN)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="passes over the training set")
    o.add_argument("--batch_size", type=int, default=DEFAULTS.batch_size,
                   help="training batch size (each epoch's last partial batch is dropped)")
    o.add_argument("--eval_batch_size", type=int, default=DEFAULTS.eval_batch_size,
                   help="test-set batch size (does not change results)")
    o.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak SGD learning rate")
    o.add_argument("--schedule", default=DEFAULTS.schedule, choices=config_lib.SCHEDULES,
                   help="step: ×0.1 at 50%% and 75%% of training (the paper's epochs 80/120 of 160); "
                        "cosine: cosine decay to 0; constant")
    o.add_argument("--warmup_epochs", type=float, default=DEFAULTS.warmup_epochs,
                   help="linear learning-rate warm-up from 0, in epochs")
    o.add_argument("--momentum", type=float, default=DEFAULTS.momentum, help="SGD momentum")
    o.add_argument("--weight_decay", type=float, default=DEFAULTS.weight_decay,
                   help="coupled L2 penalty, applied to the trainable parameters only")
    o.add_argument("--no_augment", dest="augment", action="store_false",
                   help="disable the random crop (4-pixel padding) and horizontal flip")
    o.add_argument("--normalize", default=DEFAULTS.normalize, choices=input_pipeline.NORMALIZATIONS,
                   help="per-channel input normalisation: the training set's own mean/std, or ImageNet's "
                        "as the paper's code (open_lth) does")
    o.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="seeds the initialisation, data order and augmentation")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=DEFAULTS.dataset,
                   help="TFDS name (cifar10, cifar100); downloaded and cached by TFDS, needs TensorFlow")
    d.add_argument("--data_dir", default=None,
                   help="offline data instead of TFDS: a folder or .tar.gz with train/<class>/*.jpg|png "
                        "and test/<class>/*; classes are taken in sorted order")
    d.add_argument("--max_train_examples", type=int, default=None,
                   help="train on a fixed random subset of this size (for quick looks)")
    d.add_argument("--max_test_examples", type=int, default=None,
                   help="evaluate on a fixed random subset of this size")
    s = p.add_argument_group("speed")
    s.add_argument("--precision", default=DEFAULTS.precision, choices=list(models.PRECISIONS),
                   help="compute dtype of convolutions and the dense layer; bfloat16 keeps parameters, "
                        "BatchNorm statistics and optimizer state in float32 (see docs/performance.md)")
    s.add_argument("--loop", default=DEFAULTS.loop, choices=config_lib.LOOPS,
                   help="fused: --steps_per_call steps per compiled call (lax.fori_loop); step: one "
                        "jitted call per step (same results up to float rounding); auto: fused, except "
                        "on CPU where XLA runs convolutions in loops slowly. Data, shuffling and "
                        "augmentation stay on the device in both")
    s.add_argument("--steps_per_call", type=int, default=DEFAULTS.steps_per_call,
                   help="fused loop: steps per call; the progress bar, signals and step checkpoints "
                        "are handled between calls")
    c = p.add_argument_group("devices and clusters")
    c.add_argument("--num_devices", type=int, default=None,
                   help="data-parallel over the first N local devices (default: all); the global "
                        "--batch_size is split over them and must divide by N")
    c.add_argument("--coordinator_address", default=None,
                   help="multi-host: host:port of process 0 (not needed under SLURM or on a TPU pod, "
                        "where jax.distributed finds it)")
    c.add_argument("--num_processes", type=int, default=None, help="multi-host: number of processes")
    c.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index")
    c.add_argument("--coordinator_timeout_s", type=float, default=300.0,
                   help="multi-host: give up (exit 2) when the coordinator does not answer within this "
                        "many seconds")
    c = p.add_argument_group("checkpoints and resume")
    c.add_argument("--checkpoint_every", type=int, default=CKPT_DEFAULTS.every,
                   help="save a checkpoint every this many --checkpoint_unit (and always at the end)")
    c.add_argument("--checkpoint_unit", default=CKPT_DEFAULTS.unit, choices=checkpoints.UNITS,
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
    p.add_argument("--workdir", default=None,
                   help="output folder (default: runs/<model>_w<width>_<mode>_s<seed>)")
    return p


def parse_args(argv=None):
    """(config, workdir, checkpoint options) from the command line; bad flags exit with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = checkpoints.CheckpointOptions(
            every=args.checkpoint_every, unit=args.checkpoint_unit, keep=args.keep,
            format="small" if args.small_checkpoints else "full", restart=args.restart,
            extend=args.extend_to_epochs is not None,
            async_save=args.async_checkpoints).validate()
    except ValueError as e:
        parser.error(str(e))
    config, workdir = config_from_args(args, parser)
    workdir = workdir or os.path.join("runs", run_name(config))
    problem = workdir_lib.unwritable(workdir)
    if problem:
        parser.error(f"cannot write to workdir {workdir}: {problem}")
    try:
        parallel.maybe_initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                              args.coordinator_timeout_s)
        parallel.check_batch_size(config.batch_size, parallel.make_mesh(config.num_devices))
    except ValueError as e:
        parser.error(str(e))
    return config, workdir, options


def config_from_argv(argv, parser=None):
    """(validated Config, --workdir or None) from command-line flags; touches no files."""
    parser = parser or build_parser()
    return config_from_args(parser.parse_args(argv), parser)


def config_from_args(args, parser):
    values = dict(vars(args))
    if values["bn_only"]:
        if args.train_mode not in (None, "bn"):
            parser.error(f"--bn_only conflicts with --train_mode {args.train_mode}")
        values["train_mode"] = "bn"
    values["train_mode"] = values["train_mode"] or DEFAULTS.train_mode
    if values.get("extend_to_epochs") is not None:
        if args.restart:
            parser.error("--extend_to_epochs continues a run; --restart discards it")
        if values["epochs"] not in (DEFAULTS.epochs, values["extend_to_epochs"]):
            parser.error("--epochs and --extend_to_epochs disagree; give only --extend_to_epochs")
        values["epochs"] = values["extend_to_epochs"]
    config = config_lib.Config(**{f.name: values[f.name] for f in dataclasses.fields(config_lib.Config)})
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    return config, values["workdir"]


def run_name(config) -> str:
    """Folder name from the hyperparameters that tell runs of one sweep apart (defaults left out)."""
    parts = [config.model, f"w{config.width}", config.train_mode]
    if config.train_mode == "random_k":
        parts.append(f"k{config.k}")
    if config.bn_placement != DEFAULTS.bn_placement:
        parts.append(f"bn{config.bn_placement}")
    if config.bn_init != DEFAULTS.bn_init:
        parts.append(f"init{config.bn_init}")
    return "_".join(parts + [f"s{config.seed}"])


def main(argv=None, extra_hooks=()) -> int:
    orbax_failures.quiet_background_noise()
    # Signals are turned into a checkpoint and exit 75 from the start, data loading included.
    with preemption.PreemptionGuard() as guard:
        try:
            config, workdir, options = parse_args(argv)
        except KeyboardInterrupt:  # a second Ctrl-C while waiting for a coordinator
            print("interrupted: stopped at once on a second SIGINT", file=sys.stderr)
            return EXIT_INTERRUPTED
        guard.reinstall()  # after jax.distributed.initialize, which takes SIGTERM for itself
        from bn_jax import train
        try:
            summary = train.train_and_evaluate(config, workdir, checkpointing=options, guard=guard,
                                               extra_hooks=extra_hooks)
        except (input_pipeline.DataError, checkpoints.CheckpointError, workdir_lib.WorkdirUnusable) as e:
            build_parser().print_usage(sys.stderr)
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
              f"(best {summary['best_test_accuracy']:.4f}); results in {workdir}")
    return 0


def run_main(argv=None, extra_hooks=()) -> int:
    """``main``'s exit code; after a failed background save, exit at once (see below)."""
    code = main(argv, extra_hooks)
    if orbax_failures.FAILED_IN_BACKGROUND:  # skip the shutdown, where Orbax's failed threads print tracebacks
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(run_main())
