"""Train a CIFAR ResNet, optionally BatchNorm-only: ``python -m experiments.cifar --bn_only``.

Writes into --workdir: config.json, metrics.jsonl (one line per epoch), summary.json and the
final train state as an Orbax checkpoint under checkpoints/<step>/.
"""

import argparse
import dataclasses
import os
import sys

from bn_jax import config as config_lib
from bn_jax import models, train_modes

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
                   help="width multiplier k: ResNet segments have 16k, 32k, 64k channels; VGG channels ×k")
    m.add_argument("--bn_init", default=DEFAULTS.bn_init, choices=list(models.BN_INITS),
                   help="BatchNorm γ init: uniform = U[0,1) as the paper's code, ones = 1")
    m.add_argument("--bn_placement", default=DEFAULTS.bn_placement, choices=config_lib.BN_PLACEMENTS,
                   help="BatchNorm before the ReLU (the paper's, He et al. 2016) or after it")
    t = p.add_argument_group("what trains")
    t.add_argument("--train_mode", default=DEFAULTS.train_mode, choices=list(train_modes.MODES),
                   help="which parameters train; all others stay at their initial value. random_k: k "
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
    p.add_argument("--workdir", default=None,
                   help="output folder (default: runs/<model>_w<width>_<mode>_s<seed>)")
    return p


def parse_config(argv=None):
    parser = build_parser()
    config, workdir = config_from_argv(argv, parser)
    workdir = workdir or os.path.join("runs", run_name(config))
    try:
        os.makedirs(workdir, exist_ok=True)
        if not os.access(workdir, os.W_OK):
            raise PermissionError(f"not writable: {workdir}")
    except OSError as e:
        parser.error(f"cannot write to workdir {workdir}: {e}")
    return config, workdir


def config_from_argv(argv, parser=None):
    """(validated Config, --workdir or None) from command-line flags; touches no files."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    if values.pop("bn_only"):
        if args.train_mode not in (DEFAULTS.train_mode, "bn"):
            parser.error(f"--bn_only conflicts with --train_mode {args.train_mode}")
        values["train_mode"] = "bn"
    workdir = values.pop("workdir")
    config = config_lib.Config(**{f.name: values[f.name] for f in dataclasses.fields(config_lib.Config)})
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    return config, workdir


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
