"""Read finished runs and measure what the paper measures on them: accuracy against depth, width
and trainable parameters; γ/β distributions per layer; the fraction of features BatchNorm
disables (|γ| below a threshold); and test accuracy as the smallest-|γ| features are zeroed.

Pure functions of parameter trees live here; plotting and the report are in experiments.analyze.
"""

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from bn_jax import checkpoints, dataset_registry, metrics_log, parallel, train, train_modes
from bn_jax import program as program_lib
from bn_jax import config as config_lib
from bn_jax import workdir as workdir_lib
from bn_jax.config import ExperimentConfig, RuntimeConfig


@dataclasses.dataclass
class Run:
    workdir: str
    config: ExperimentConfig
    runtime: RuntimeConfig
    summary: Dict[str, Any]
    metrics: List[Dict[str, Any]]

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.workdir))


def is_finished(workdir: str) -> bool:
    return workdir_lib.RunDir(workdir).is_finished()


SUMMARY_KEYS = ("final_test_accuracy", "trainable_params", "total_params")


def load_run(workdir: str) -> Run:
    """A finished run's files; ValueError naming the file when one is missing or unreadable."""
    run = workdir_lib.RunDir(workdir)

    def read(name, parse):
        path = run.file(name)
        try:
            with open(path) as f:
                return parse(f)
        except FileNotFoundError:
            raise ValueError(f"no {name}") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{name} is unreadable ({e})") from None

    saved = read(run.CONFIG, json.load)
    try:
        config, runtime = config_lib.parts(saved)
        config.validate()
    except (TypeError, ValueError) as e:  # unknown, missing or bad fields
        raise ValueError(f"config.json does not describe a run ({e})") from None
    summary = read(run.SUMMARY, json.load)
    missing = [k for k in SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise ValueError(f"summary.json lacks {', '.join(missing)}")
    metrics = read(run.METRICS, metrics_log.parse_metrics)
    return Run(workdir, config, runtime, summary, metrics)


def find_runs(paths: Sequence[str], warn=print) -> List[Run]:
    """Finished runs in each path: the path itself, or its immediate subfolders (a sweep root).
    A run whose files are missing or broken is skipped with a warning naming it."""
    dirs = []
    for path in paths:
        if is_finished(path):
            dirs.append(path)
        elif os.path.isdir(path):
            dirs += [os.path.join(path, d) for d in sorted(os.listdir(path)) if is_finished(os.path.join(path, d))]
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # their plots and report rows would overwrite each other
        raise ValueError(f"runs named {', '.join(repeated)} appear in several folders; analyze them separately")
    runs = []
    for d in dirs:
        try:
            runs.append(load_run(d))
        except ValueError as e:
            warn(f"warning: skipping {d}: {e}")
    return runs


def restore_state(run: Run, num_classes: Optional[int] = None):
    """The final train state, restored into a fresh state of the run's config (checkpoints.restore)."""
    if num_classes is None:
        num_classes = run.summary.get("num_classes") or dataset_registry.lookup(run.config.dataset).num_classes or 10
    template = train.create_train_state(run.config, num_classes, (32, 32, 3), steps_per_epoch=1)
    return checkpoints.restore(run.workdir, template)


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def bn_layers(variables) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """[(layer, γ, β)] in network order (Block_2 before Block_10)."""
    found: Dict[str, Dict[str, np.ndarray]] = {}
    for path, role, x in train_modes.role_leaves(variables):
        if role in ("bn_scale", "bn_bias"):
            found.setdefault(train_modes.path_name(path[:-1], "/"), {})[role] = np.asarray(x)
    return [(layer, v["bn_scale"], v["bn_bias"]) for layer, v in sorted(found.items(), key=lambda i: _natural(i[0]))]


def disabled_fractions(variables, threshold: float):
    """({layer: fraction of its features with |γ| < threshold}, overall fraction over all features)."""
    layers = bn_layers(variables)
    per_layer = {layer: float(np.mean(np.abs(g) < threshold)) for layer, g, _ in layers}
    gammas = np.concatenate([g for _, g, _ in layers]) if layers else np.zeros(0)
    overall = float(np.mean(np.abs(gammas) < threshold)) if gammas.size else float("nan")
    return per_layer, overall


def zero_smallest_gammas(variables, fraction: float):
    """Params with γ set to 0 for the ``fraction`` of features of smallest |γ|, ranked across all
    layers (the feature then outputs its constant β). Ties are broken by network order."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables["params"])
    is_gamma = [role == "bn_scale" for _, role, _ in train_modes.role_leaves(variables)]
    gammas = [np.asarray(x) for (p, x), g in zip(leaves, is_gamma) if g]
    flat = np.concatenate([g.ravel() for g in gammas])
    n = int(round(fraction * flat.size))
    keep = np.ones(flat.size, bool)
    keep[np.argsort(np.abs(flat), kind="stable")[:n]] = False
    pieces = iter(np.split(keep, np.cumsum([g.size for g in gammas])[:-1]))
    new = [np.where(next(pieces).reshape(x.shape), x, 0).astype(x.dtype) if g else x
           for (_, x), g in zip(leaves, is_gamma)]
    return jax.tree_util.tree_unflatten(treedef, new)


def load_data(run: Run, data=None):
    """The run's data as it trained on them (its subset, its crops): loaded as the trainer loads
    them (``train.load_data``), or taken from ``data``, the same source loaded earlier."""
    return train.load_data(run.config, run.runtime, data, None)[0]


def scorer(run: Run, data):
    """``score(state)`` → test loss, top-1 and top-5 accuracy on ``data`` (``load_data``), through
    the program the run trained with (device-resident or streamed), normalised as it was; one
    device, the input decoded in this process."""
    runtime = dataclasses.replace(run.runtime, num_devices=1, workers=0)
    program = program_lib.build_program(run.config, runtime, data, parallel.make_mesh(1))
    return program.evaluate


def evaluate(run: Run, state, data=None) -> Dict[str, float]:
    """Test loss, top-1 and top-5 accuracy of ``state`` on the run's own test set (loaded unless given)."""
    return scorer(run, load_data(run, data))(state)


def ablation_curve(run: Run, state, data, fractions: Sequence[float]):
    """[(fraction zeroed, test accuracy)] on ``data`` (``load_data``: the run's data as trained)."""
    score = scorer(run, data)
    variables = train_modes.variables_of(state)
    return [(float(f), score(state.replace(params=zero_smallest_gammas(variables, f)))["accuracy"])
            for f in fractions]


# ---- runs over seeds -------------------------------------------------------------------------

# What tells a pack's or a sweep's repetitions of one setting apart. (Not --init_seed: runs that
# share their initial weights are another setting than runs that each draw their own.)
SEED_FIELDS = ("seed",)


def without_seeds(run: Run) -> str:
    """The run's experiment with its seeds left out: equal for every seed of one setting."""
    return json.dumps({k: v for k, v in run.config.to_dict().items() if k not in SEED_FIELDS}, sort_keys=True)


def seed_groups(runs: Sequence[Run]) -> List[List[Run]]:
    """The runs grouped by their experiment without seeds, in the order the runs come."""
    groups: Dict[str, List[Run]] = {}
    for run in runs:
        groups.setdefault(without_seeds(run), []).append(run)
    return list(groups.values())


def differing_fields(runs: Sequence[Run]) -> List[str]:
    """The experiment fields, seeds aside, whose value is not the same in every run (in field order)."""
    dicts = [r.config.to_dict() for r in runs]
    return [k for k in (dicts[0] if dicts else {}) if k not in SEED_FIELDS and len({json.dumps(d[k]) for d in dicts}) > 1]


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def curve_band(runs: Sequence[Run], key: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean, std) of a metrics.jsonl key over ``runs``, up to the shortest history."""
    length = min(len(r.metrics) for r in runs)
    values = np.array([[m[key] for m in r.metrics[:length]] for r in runs], float)
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(length)
    return np.arange(1, length + 1), values.mean(axis=0), std
