"""Train a CIFAR ResNet, optionally BatchNorm-only: ``python -m experiments.cifar --bn_only``.

Writes into --workdir: config.json, metrics.jsonl (one line per epoch), summary.json and the
final train state as an Orbax checkpoint under checkpoints/<step>/.
"""

import argparse
import dataclasses
import os
import sys

from bn_jax import config as config_lib
from bn_jax import models, parallel, train_modes

DEFAULTS = config_lib.Config()


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
                   help="width multiplier k: segments have 16k, 32k, 64k channels")
    m.add_argument("--bn_init", default=DEFAULTS.bn_init, choices=list(models.BN_INITS),
                   help="BatchNorm γ init: uniform = U[0,1) as the paper's code, ones = 1")
    t = p.add_argument_group("what trains")
    t.add_argument("--train_mode", default=DEFAULTS.train_mode, choices=list(train_modes.MODES),
                   help="which parameters train; all others stay at their initial value")
    t.add_argument("--bn_only", action="store_true", help="shorthand for --train_mode bn")
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
    c = p.add_argument_group("devices and clusters")
    c.add_argument("--num_devices", type=int, default=None,
                   help="data-parallel over the first N local devices (default: all); the global "
                        "--batch_size is split over them and must divide by N")
    c.add_argument("--coordinator_address", default=None,
                   help="multi-host: host:port of process 0 (not needed under SLURM or on a TPU pod, "
                        "where jax.distributed finds it)")
    c.add_argument("--num_processes", type=int, default=None, help="multi-host: number of processes")
    c.add_argument("--process_id", type=int, default=None, help="multi-host: this process's index")
    p.add_argument("--workdir", default=None,
                   help="output folder (default: runs/<model>_w<width>_<mode>_s<seed>)")
    return p


def parse_config(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    if values.pop("bn_only"):
        if args.train_mode not in (DEFAULTS.train_mode, "bn"):
            parser.error(f"--bn_only conflicts with --train_mode {args.train_mode}")
        values["train_mode"] = "bn"
    workdir = values.pop("workdir")
    cluster = {k: values.pop(k) for k in ("coordinator_address", "num_processes", "process_id")}
    config = config_lib.Config(**{f.name: values[f.name] for f in dataclasses.fields(config_lib.Config)})
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    workdir = workdir or os.path.join("runs", run_name(config))
    problem = unwritable(workdir)
    if problem:
        parser.error(f"cannot write to workdir {workdir}: {problem}")
    parallel.maybe_initialize_distributed(**cluster)
    try:
        parallel.check_batch_size(config.batch_size, parallel.make_mesh(config.num_devices))
    except ValueError as e:
        parser.error(str(e))
    return config, workdir


def unwritable(path: str):
    """Why ``path`` could not be created and written, or None; creates nothing itself."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{path} is a file"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def run_name(config) -> str:
    return f"{config.model}_w{config.width}_{config.train_mode}_s{config.seed}"


def main(argv=None) -> int:
    config, workdir = parse_config(argv)
    from bn_jax import input_pipeline, train  # after parsing: --help stays fast
    try:
        summary = train.train_and_evaluate(config, workdir)
    except input_pipeline.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"final test accuracy {summary['final_test_accuracy']:.4f} "
          f"(best {summary['best_test_accuracy']:.4f}); results in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
