"""A run's configuration, each field declared once with its flag's help and its checks.

* ``ExperimentConfig``: what sets a run's results (model, what trains, data, recipe, seed,
  compute precision). Runs are named by it, resumed only into the same one (``same_experiment``),
  and a sweep or an analysis tells runs apart by it.
* ``RuntimeConfig``: how a run executes (devices, loop, evaluation batch, where the data are).
  Changing it changes no result beyond float summation order, so a run resumes under another.
* ``CheckpointOptions`` (how a run saves and resumes) and ``ClusterOptions`` (how a process
  joins a multi-host job): the command line's other option groups, declared the same way.

Defaults are the paper's CIFAR-10 ResNet recipe (open_lth ``cifar_resnet``): batch 128, SGD with
momentum 0.9, lr 0.1 dropped ×0.1 at 50% and 75% of training (epochs 80 and 120 of 160), coupled
L2 weight decay 1e-4 on the trainable leaves. The command-line flags are generated from these
fields (``add_flags``), and so is the flag table in docs/cli.md (checked by a test).

This module imports no JAX, so that ``--help`` answers at once; what needs JAX (the model
registry, the train modes) is checked in ``validate``.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Dict, List, Optional

from bn_jax.names import (BN_INITS, BN_PLACEMENTS, CHECKPOINT_FORMATS, CHECKPOINT_UNITS, IMAGENET_DEPTHS,  # noqa: F401
                          LOOPS, MODEL_NAMES, NORMALIZATIONS, PRECISIONS, SCHEDULES, TRAIN_MODES)

from bn_jax import dataset_registry

MAX_DEFAULT_WORKERS = 32  # each worker holds a few 150 MB ImageNet batches: more by default risks memory
MAX_SEED = 2**31 - 1  # jax.random.key and NumPy take any such int; larger ones overflow somewhere
# Experiment keys added after runs were saved, with the behaviour those runs had.
LEGACY_DEFAULTS = {"normalize": "dataset", "image_size": None, "init_seed": None}
# Of those, the keys left out of a run's name hash at their legacy value, so that runs named before
# the key existed keep their names (normalize was there when names got their hash).
UNHASHED_AT_LEGACY = ("image_size", "init_seed")


# ---- validation rules: (name, value) -> a one-line complaint, or None -----------------------

def at_least(low):
    def rule(name, value):
        if value is None:
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name} must be a finite number, got {value}"
        return None if value >= low else f"{name} must be >= {low}, got {value}"
    return rule


def at_most(high):
    def rule(name, value):
        return None if value is None or value <= high else f"{name} must be <= {high}, got {value}"
    return rule


def below(high):
    def rule(name, value):
        return None if value is None or value < high else f"{name} must be < {high}, got {value}"
    return rule


def one_of(choices):
    def rule(name, value):
        return None if value in choices else f"unknown {name} {value!r}; known: {', '.join(choices)}"
    return rule


def param(default, help: str, *rules, choices=None, group: str = "optimisation", flag: Optional[str] = None,
          switch: Any = None, metavar: Optional[str] = None, append: bool = False):
    """A field with its flag's help text, its validation rules and its choices beside it.
    ``switch``: the flag takes no value and sets the field to this one (``--small_checkpoints``);
    ``append``: the flag may be repeated, and the field holds the list of its values."""
    rules = rules + ((one_of(choices),) if choices else ())
    return dataclasses.field(default=default, metadata={"help": help, "rules": rules, "choices": choices,
                                                         "group": group, "flag": flag, "switch": switch,
                                                         "metavar": metavar, "append": append})


def check_fields(config) -> None:
    """Raise ValueError with one readable line for the first field its rules refuse."""
    for field in dataclasses.fields(config):
        for rule in field.metadata.get("rules", ()):
            problem = rule(field.name, getattr(config, field.name))
            if problem:
                raise ValueError(problem)


class _Part:
    """What both parts share: a dict of the fields, and back."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: Dict[str, Any]):
        """From a saved dict; keys of the other part (a flat config of older runs) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclasses.dataclass
class ExperimentConfig(_Part):
    model: str = param("resnet110", f"architecture: {MODEL_NAMES}", group="model")
    width: int = param(1, "width multiplier k: ResNet segments have 16k, 32k, 64k channels; VGG channels ×k",
                       at_least(1), group="model")
    bn_init: str = param("uniform", "BatchNorm γ init: uniform = U[0,1) as the paper's code, ones = 1",
                         choices=BN_INITS, group="model")
    bn_placement: str = param("before", "BatchNorm before the ReLU (the paper's, He et al. 2016) or after it",
                              choices=BN_PLACEMENTS, group="model")
    train_mode: str = param("full", "which parameters train; all others stay at their initial value. random_k: k "
                            "random weights per conv output channel + output layer; no_affine: BN without γ/β, "
                            "all else trains", choices=TRAIN_MODES, group="what trains")
    k: int = param(2, "random_k: trainable weights per output channel of each conv (2 ≈ as many as BN)",
                   at_least(1), group="what trains")
    epochs: int = param(160, "passes over the training set (0 evaluates the initial network)",
                        at_least(0), at_most(1_000_000))
    batch_size: int = param(128, "training batch size (each epoch's last partial batch is dropped)", at_least(1))
    lr: float = param(0.1, "peak SGD learning rate", at_least(0.0))
    schedule: str = param("step", "step: ×0.1 at 50%% and 75%% of training (the paper's epochs 80/120 of 160); "
                          "imagenet: ×0.1 at 1/3, 2/3 and 8/9 of training (the paper's ImageNet epochs 30/60/80 of "
                          "90); cosine: cosine decay to 0; constant", choices=SCHEDULES)
    warmup_epochs: float = param(0.0, "linear learning-rate warm-up from 0, in epochs", at_least(0.0),
                                 at_most(1_000_000))
    momentum: float = param(0.9, "SGD momentum, in [0, 1)", at_least(0.0), below(1.0))
    weight_decay: float = param(1e-4, "coupled L2 penalty, applied to the trainable parameters only", at_least(0.0))
    augment: bool = param(True, "disable the random crop (4-pixel padding) and horizontal flip", flag="--no_augment")
    # (a documented deviation: the paper's code uses ImageNet's statistics; runs saved before this
    # option existed used "dataset", see LEGACY_DEFAULTS)
    normalize: str = param("dataset", "per-channel input normalisation: the training set's own mean/std, or "
                           "ImageNet's as the paper's code (open_lth) does", choices=NORMALIZATIONS)
    seed: int = param(0, "seeds the initialisation, data order and augmentation", at_least(0), at_most(MAX_SEED))
    init_seed: Optional[int] = param(None, "seeds the initialisation instead of --seed, which then seeds only the "
                                     "data order, augmentation and random_k's choice (runs that share it start "
                                     "from the same weights: see --share_init)", at_least(0), at_most(MAX_SEED))
    dataset: str = param("cifar10", "TFDS name (cifar10, cifar100), or the name of the --data_dir data; "
                         "TFDS downloads and caches it and needs TensorFlow. imagenet2012: streamed from an "
                         "ImageNet folder (--data_dir) or a prepared TFDS imagenet2012 (no TensorFlow needed)",
                         group="data")
    image_size: Optional[int] = param(None, "streamed data (ImageNet): side of the square training and "
                                      "evaluation crops (default 224; evaluation resizes the shorter side to 256/224 "
                                      "of it first); smaller sizes make quick CPU looks. CIFAR stays 32×32",
                                      at_least(32), group="data")
    max_train_examples: Optional[int] = param(None, "train on a fixed random subset of this size (for quick looks)",
                                              at_least(1), group="data")
    max_test_examples: Optional[int] = param(None, "evaluate on a fixed random subset of this size",
                                             at_least(1), group="data")
    precision: str = param("float32", "compute dtype of convolutions and the dense layer; bfloat16 keeps "
                           "parameters, BatchNorm statistics and optimizer state in float32 (see "
                           "docs/performance.md)", choices=PRECISIONS, group="speed")

    def validate(self) -> "ExperimentConfig":
        """Raise ValueError with one readable line for anything that cannot run."""
        check_fields(self)
        data = dataset_registry.lookup(self.dataset)
        from bn_jax import models  # (the one model-name parser; create_model below refuses an unknown name)
        family = models.family_of(self.model)
        if family is not None and family not in data.model_families and family == "imagenet_resnet":
            raise ValueError(f"{self.model} is an ImageNet model: train it with python -m experiments.imagenet "
                             "(--dataset imagenet2012); CIFAR takes resnet<6n+2>, vgg11/13/16/19")
        if family is not None and family not in data.model_families:
            raise ValueError(f"{self.dataset} takes the ImageNet ResNets (resnet18, 34, 50, 101, 152, 200), "
                             f"not {self.model}")
        if not data.streamed and self.image_size is not None:
            raise ValueError(f"image_size applies to streamed datasets ({', '.join(dataset_registry.STREAMED)}); "
                             f"{self.dataset} is 32×32")
        if self.normalize not in data.normalizations:
            raise ValueError(f"normalize 'dataset' needs the training set in memory; {self.dataset} is streamed: "
                             "use --normalize imagenet")
        self.create_model()
        return self

    @property
    def weights_seed(self) -> int:
        """The seed of the initial weights: --init_seed, or --seed where none is given."""
        return self.seed if self.init_seed is None else self.init_seed

    def create_model(self, num_classes: int = 10):
        """The model this config describes (architecture, BN placement, and what the mode implies)."""
        from bn_jax import models, train_modes
        return models.create_model(self.model, width=self.width, num_classes=num_classes,
                                   bn_init=self.bn_init, bn_before_relu=self.bn_placement == "before",
                                   precision=self.precision, **train_modes.model_options(self.train_mode))

    def short_hash(self) -> str:
        """8 hex digits of SHA-256 over the experiment (open_lth names runs by such a hash)."""
        fields = {k: v for k, v in self.to_dict().items()
                  if not (k in UNHASHED_AT_LEGACY and v == LEGACY_DEFAULTS[k])}
        text = json.dumps(fields, sort_keys=True, allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclasses.dataclass
class RuntimeConfig(_Part):
    data_dir: Optional[str] = param(None, "offline data instead of TFDS: a folder or .tar.gz with "
                                    "train/<class>/*.jpg|png and test/<class>/*; classes are taken in sorted order "
                                    "(the data themselves are fingerprinted, so moving them does not change a run)",
                                    group="data")
    eval_batch_size: int = param(1000, "test-set batch size (does not change results)", at_least(1), group="speed")
    loop: str = param("auto", "fused: --steps_per_call steps per compiled call (lax.fori_loop); step: one jitted "
                      "call per step (same results up to float rounding); auto: fused, except on CPU where XLA "
                      "runs convolutions in loops slowly. Data, shuffling and augmentation stay on the device "
                      "in both", choices=LOOPS, group="speed")
    steps_per_call: int = param(100, "fused loop: steps per call; the progress bar, signals and step "
                                "checkpoints are handled between calls", at_least(1), group="speed")
    compilation_cache: str = param("auto", "folder of JAX's persistent compilation cache, so a later run "
                                   "(a resume, a sweep's next seed) reuses this one's compiled initialisation "
                                   "and steps; none turns it off; auto: $JAX_COMPILATION_CACHE_DIR, else "
                                   "~/.cache/bn_jax/jax", group="speed")
    num_devices: Optional[int] = param(None, "data-parallel over the first N local devices (default: all); the "
                                       "global --batch_size is split over them and must divide by N",
                                       at_least(1), group="devices and clusters")
    workers: Optional[int] = param(None, "streamed data (ImageNet): processes per host that decode and augment "
                                   "images (default: the CPUs this process may use less one, at most 32; 0: threads of "
                                   "the training process). Unused by CIFAR, which stays on the device", at_least(0),
                                   group="speed")

    tensorboard: Optional[str] = param(None, "write TensorBoard scalars while training into DIR/<run folder name> "
                                       "(each epoch's metrics, and the running train loss and accuracy at the "
                                       "progress bar's rhythm); needs the tensorboard package, not TensorFlow",
                                       group="output", metavar="DIR")
    profile_steps: Optional[str] = param(None, "A:B: a jax.profiler trace of global steps A to B-1 into "
                                         "<workdir>/profile, for TensorBoard's profile plugin or ui.perfetto.dev "
                                         "(perfetto_trace.json.gz)", group="output", metavar="A:B")

    def resolved_workers(self) -> int:
        """--workers, or the CPUs this process may use (a SLURM or container limit, not the whole
        node) less one for the training process, at most MAX_DEFAULT_WORKERS."""
        if self.workers is not None:
            return self.workers
        return max(0, min(usable_cpus() - 1, MAX_DEFAULT_WORKERS))

    @property
    def profile_range(self) -> Optional[tuple]:
        """``--profile_steps A:B`` as (A, B)."""
        if self.profile_steps is None:
            return None
        a, _, b = self.profile_steps.partition(":")
        return int(a), int(b)

    def validate(self) -> "RuntimeConfig":
        check_fields(self)
        if self.data_dir is not None and not os.path.exists(self.data_dir):
            raise ValueError(f"data_dir does not exist: {self.data_dir}")
        if self.workers is not None and self.workers > usable_cpus():
            raise ValueError(f"--workers {self.workers} exceeds the {usable_cpus()} CPUs this process may use; each "
                             "worker is a process of its own (use at most that many, or leave the default)")
        if self.profile_steps is not None:
            a, colon, b = self.profile_steps.partition(":")
            if not (colon and a.isdigit() and b.isdigit() and int(a) < int(b)):
                raise ValueError(f"--profile_steps must be A:B with 0 <= A < B (global steps), got {self.profile_steps!r}")
        return self


def usable_cpus() -> int:
    """The CPUs this process may use (a SLURM or container limit, not the whole node)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_name(config: ExperimentConfig) -> str:
    """A run's folder name: a readable prefix (the hyperparameters that tell a sweep's runs apart,
    defaults left out) plus a short hash of the whole experiment, so two different experiments
    never share a name (open_lth names runs by such a hash)."""
    default = ExperimentConfig()
    parts = [config.model, f"w{config.width}", config.train_mode]
    if config.train_mode == "random_k":
        parts.append(f"k{config.k}")
    if config.bn_placement != default.bn_placement:
        parts.append(f"bn{config.bn_placement}")
    if config.bn_init != default.bn_init:
        parts.append(f"init{config.bn_init}")
    if config.init_seed is not None:
        parts.append(f"i{config.init_seed}")
    return "_".join(parts + [f"s{config.seed}"]) + "-" + config.short_hash()


def imagenet_model_name(name: str) -> str:
    """``resnet50`` → ``imagenet_resnet50`` (the registry's name); other names unchanged."""
    if name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in IMAGENET_DEPTHS:
        return "imagenet_" + name
    return name


def different_keys(saved: Dict[str, Any], current) -> List[str]:
    """The experiment keys in which a saved config (either layout) differs from ``current`` (an
    ExperimentConfig or its dict); a key saved before it existed counts as its ``LEGACY_DEFAULTS``
    value. Runtime keys never count."""
    saved = saved.get("experiment", saved)
    current = current if isinstance(current, dict) else current.to_dict()
    return [k for k, v in current.items() if saved.get(k, LEGACY_DEFAULTS.get(k)) != v]


def same_experiment(saved: Dict[str, Any], current: ExperimentConfig) -> bool:
    """Whether a saved config describes the experiment ``current`` does: the one rule the trainer,
    the sweep and the analysis use to call two runs the same."""
    return not different_keys(saved, current)


def parts(saved: Any):
    """(ExperimentConfig, RuntimeConfig) of a config.json's content, this layout or the older flat one."""
    if not isinstance(saved, dict):
        raise ValueError("config.json does not hold a JSON object")
    return (ExperimentConfig.from_dict(saved.get("experiment", saved)),
            RuntimeConfig.from_dict(saved.get("runtime", saved)))


def load(path: str):
    """(ExperimentConfig, RuntimeConfig) from a config.json file."""
    with open(path) as f:
        return parts(json.load(f))


# ---- how a run saves, and how it joins a cluster (the other option groups of the CLI) -------------

@dataclasses.dataclass
class CheckpointOptions(_Part):
    checkpoint_every: int = param(1, "save a checkpoint every this many --checkpoint_unit (and always at the end)",
                                  at_least(1), group="checkpoints and resume")
    checkpoint_unit: str = param("epochs", "unit of --checkpoint_every", choices=CHECKPOINT_UNITS,
                                 group="checkpoints and resume")
    keep: int = param(3, "keep the newest N checkpoints (>= 2 lets a corrupt newest one fall back)", at_least(1),
                      group="checkpoints and resume")
    format: str = param("full", "store only the trainable leaves, batch_stats and optimizer state; frozen leaves "
                        "are re-created from the seed and checked against a saved hash on restore",
                        choices=CHECKPOINT_FORMATS, group="checkpoints and resume", flag="--small_checkpoints",
                        switch="small")
    async_save: bool = param(True, "write checkpoints synchronously instead of in a background thread",
                             group="checkpoints and resume", flag="--no_async_checkpoints")
    extend_to_epochs: Optional[int] = param(None, "train the run in --workdir on to N epochs (more than it was "
                                            "started with), resuming from its newest checkpoint; the step schedule's "
                                            "lr drops move to 50%% and 75%% of N", at_least(1),
                                            group="checkpoints and resume", metavar="N")
    restart: bool = param(False, "delete an existing run in --workdir (checkpoints, metrics) and start over; "
                          "without it, an existing run is resumed", group="checkpoints and resume")

    @property
    def extend(self) -> bool:
        """Resume a run saved with fewer epochs, training on to the config's epochs."""
        return self.extend_to_epochs is not None

    def validate(self) -> "CheckpointOptions":
        check_fields(self)
        return self

    def due(self, step: int, epoch_done: Optional[int] = None) -> bool:
        """Whether to save after ``step`` (``epoch_done`` set when an epoch just ended)."""
        if self.checkpoint_unit == "steps":
            return step % self.checkpoint_every == 0
        return epoch_done is not None and epoch_done % self.checkpoint_every == 0

    def next_due_step(self, step: int) -> Optional[int]:
        """The first step after ``step`` that ``due`` names by step count (None for epoch units)."""
        every = self.checkpoint_every
        return (step // every + 1) * every if self.checkpoint_unit == "steps" else None


@dataclasses.dataclass
class ClusterOptions(_Part):
    """How this process joins a multi-process job (``bn_jax.cluster.join``)."""

    distributed: str = param("auto", "multi-process: auto joins a job wherever jax.distributed detects one (a SLURM "
                             "srun step of several tasks, Open MPI, Kubernetes, Cloud TPU VMs); on requires one; off "
                             "never joins", choices=("auto", "on", "off"), group="devices and clusters")
    local_device_ids: Optional[str] = param(None, "multi-process: the GPUs this process drives: all (one process "
                                            "per node driving each of its GPUs) or a list like 0,1,2,3; default "
                                            "JAX's, one GPU per process under SLURM and Open MPI",
                                            group="devices and clusters", metavar="all|IDS")

    coordinator_address: Optional[str] = param(None, "multi-host: host:port of process 0 (not needed under SLURM "
                                               "or on a TPU pod, where jax.distributed finds it)",
                                               group="devices and clusters")
    num_processes: Optional[int] = param(None, "multi-host: number of processes", at_least(1),
                                         group="devices and clusters")
    process_id: Optional[int] = param(None, "multi-host: this process's index", at_least(0),
                                      group="devices and clusters")
    coordinator_timeout_s: float = param(300.0, "multi-host: give up (exit 2) when the coordinator does not answer "
                                         "within this many seconds", at_least(0.0), group="devices and clusters")

    def validate(self) -> "ClusterOptions":
        check_fields(self)
        given = [v is not None for v in (self.coordinator_address, self.num_processes, self.process_id)]
        if any(given) and not all(given):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together")
        if any(given) and self.distributed == "off":
            raise ValueError("--distributed off conflicts with --coordinator_address (which joins a job)")
        ids = self.local_device_ids
        if ids is not None and ids != "all":
            parts = ids.split(",")
            if not all(p.strip().isdigit() for p in parts) or len(set(parts)) != len(parts):
                raise ValueError(f"--local_device_ids must be all or distinct device indices like 0,1,2,3, got {ids!r}")
        return self


# ---- command-line flags, generated from the fields ---------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or a switch's off state."""

    def _get_help_string(self, action):
        if (action.default is None or isinstance(action.default, bool) or action.nargs == 0
                or action.default is argparse.SUPPRESS):  # (nargs 0: a switch, --small_checkpoints)
            return action.help
        return super()._get_help_string(action)


def _parser_of(annotation):
    """int, float or str: the type a flag's text is parsed as (Optional[X] takes X)."""
    for t in (int, float, str):
        if annotation is t or t in getattr(annotation, "__args__", ()):
            return t
    raise TypeError(f"no flag type for {annotation}")


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or f"--{field.name}"


def add_flags(parser: argparse.ArgumentParser, cls, groups: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A flag per field of ``cls``, in the field's group, with its help and choices; returns the
    groups by name. The rules run in ``validate``, so every bad value gets the same one line."""
    groups = {} if groups is None else groups
    for field in dataclasses.fields(cls):
        meta = field.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        name, common = flag_name(field), dict(dest=field.name, default=field.default, help=meta["help"])
        if meta.get("append"):
            group.add_argument(name, action="append", metavar=meta.get("metavar"), **common)
        elif meta.get("switch") is not None:
            group.add_argument(name, action="store_const", const=meta["switch"], **common)
        elif field.type is bool:
            group.add_argument(name, action="store_false" if field.default else "store_true", **common)
        else:
            group.add_argument(name, type=_parser_of(field.type), choices=meta["choices"],
                               metavar=meta.get("metavar"), **common)
    return groups
