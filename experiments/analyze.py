"""Report on finished runs: ``python -m experiments.analyze RUN_OR_SWEEP_DIR... [--out DIR]``.

Writes DIR/report.md and PNG plots: learning curves (train/test accuracy and loss against epoch,
each setting's seeds as a band); a runs table with every setting in which the runs differ, and
mean ± std over each setting's seeds; test accuracy against depth, width and trainable parameters
per train mode, where the runs vary them (seeds as error bars; the paper's published numbers
beside ours, from bn_jax.paper_results); per-layer γ and β histograms with a colour bar; the
fraction of features disabled (|γ| < --threshold) per layer and overall;
and test accuracy as the smallest-|γ| features are zeroed (needs the run's data: the test subset
is re-created exactly as in training; --no_ablation skips it).
"""

import argparse
import datetime
import math
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bn_jax import analysis, checkpoints, models, paper_results, train, train_modes  # noqa: E402
from bn_jax import workdir as workdir_lib  # noqa: E402

FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def depth_of(run) -> Optional[int]:
    """The depth of a CIFAR ResNet run (None for other models)."""
    family, depth = models.parse_model_name(run.config.model)
    return depth if family == "resnet" else None


def run_order(run):
    """Architecture, width, then the order of train_modes.MODES (full, bn, ... as the presets list them)."""
    modes = list(train_modes.MODES)
    return (*models.parse_model_name(run.config.model), run.config.width, modes.index(run.config.train_mode), run.config.k, run.config.seed)


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)


def _series(runs, x_of, group_of) -> Dict[str, List]:
    """{group: [(x, mean %, std %, seeds)]}: the runs at one x of a group are one setting's seeds."""
    groups: Dict[str, Dict] = {}
    for run in runs:
        x = x_of(run)
        if x is not None:
            groups.setdefault(group_of(run), {}).setdefault(x, []).append(100 * run.summary["final_test_accuracy"])
    return {g: sorted((x, *analysis.mean_std(v), len(v)) for x, v in points.items()) for g, points in groups.items()}


def plot_accuracy(runs, x_of, group_of, xlabel: str, path: str, logx=False, paper=None) -> Optional[str]:
    """Final test accuracy against ``x_of``; where a point has several seeds, their mean with ±1 std."""
    series = _series(runs, x_of, group_of)
    if len({x for points in series.values() for x, *_ in points}) < 2:
        return None  # (the runs do not vary it: nothing to draw against)
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, points in sorted(series.items()):
        xs, means, stds, _ = zip(*points)
        ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=3, label=group)
    for label, points in (paper or {}).items():
        if points:
            ax.plot(*zip(*sorted(points)), "x--", color="gray" if "full" in label else "black", label=label)
    ax.set(xlabel=xlabel, ylabel="test accuracy (%; mean ± std over seeds)", xscale="log" if logx else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def setting_label(run, fields: Sequence[str]) -> str:
    """A run's name without seeds and hash, plus the differing settings its name does not show."""
    readable = re.sub(r"_s\d+$", "", run.name.rsplit("-", 1)[0])
    shown = ("model", "width", "train_mode", "k", "bn_placement", "bn_init")
    extra = [f"{k}={getattr(run.config, k)}" for k in fields if k not in shown]
    return " ".join([readable, *extra])


def plot_learning_curves(runs, path: str) -> str:
    """Train and test accuracy and loss against epoch, one line per setting, its seeds as a ±1 std band."""
    groups, fields = analysis.seed_groups(runs), analysis.differing_fields(runs)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, key in zip(axes.flat, ("train_accuracy", "test_accuracy", "train_loss", "test_loss")):
        scale = 100 if key.endswith("accuracy") else 1
        for group in groups:
            epochs, mean, std = analysis.curve_band(group, key)
            line, = ax.plot(epochs, scale * mean, label=f"{setting_label(group[0], fields)} ({len(group)} seeds)")
            ax.fill_between(epochs, scale * (mean - std), scale * (mean + std), color=line.get_color(), alpha=0.25)
        ax.set(xlabel="epoch", ylabel=key.replace("_", " ") + (" (%)" if scale == 100 else ""))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=6)
    return _save(fig, path)


def paper_depth_points():
    bn = [(int(m[6:]), r.bn_only) for m, r in paper_results.CIFAR10_RESNET.items()]
    full = [(int(m[6:]), r.full) for m, r in paper_results.CIFAR10_RESNET.items()]
    return {"paper: bn": bn, "paper: full": full}


def plot_by_mode(runs, path: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r.config.train_mode}\n{r.config.model}" for r in runs]
    ax.bar(range(len(runs)), [100 * r.summary["final_test_accuracy"] for r in runs])
    ax.set_xticks(range(len(runs)), labels, fontsize=7)
    ax.set(ylabel="final test accuracy (%)")
    return _save(fig, path)


def plot_gamma_beta(layers, title: str, path: str) -> str:
    """Per-layer histograms as heat maps (rows = BN layers in network order)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, max(3, 0.12 * len(layers) + 1.5)))
    for ax, index, name in ((axes[0], 1, "γ"), (axes[1], 2, "β")):
        values = [layer[index] for layer in layers]
        lo, hi = min(v.min() for v in values), max(v.max() for v in values)
        edges = np.linspace(lo, hi if hi > lo else lo + 1, 41)
        counts = np.stack([np.histogram(v, edges)[0] / v.size for v in values])
        image = ax.imshow(counts, aspect="auto", cmap="viridis", extent=(edges[0], edges[-1], len(layers) - 0.5, -0.5))
        fig.colorbar(image, ax=ax, label="share of the layer's features")
        ax.set(xlabel=name, ylabel="BN layer (network order)", title=f"{name} per layer")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_disabled(per_layer: Dict[str, float], threshold: float, title: str, path: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(len(per_layer)), [100 * f for f in per_layer.values()])
    ax.set(xlabel="BN layer (network order)", ylabel=f"% features |γ| < {threshold:g}", title=title)
    return _save(fig, path)


def plot_ablation(curves: Dict[str, List], path: str) -> Optional[str]:
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in sorted(curves.items()):
        ax.plot([100 * f for f, _ in curve], [100 * a for _, a in curve], "o-", label=name)
    ax.set(xlabel="% of features zeroed (smallest |γ| first, all layers)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def results_table(runs) -> List[str]:
    """One row per run, with a column for every setting in which the runs differ (seeds aside)."""
    fields = analysis.differing_fields(runs)
    rows = ["| run | mode | " + "".join(f"{k} | " for k in fields) +
            "trainable | of total | final acc | best acc | epochs | paper BN-only | paper full |",
            "|---|---|" + "---|" * len(fields) + "---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        s, ref = r.summary, paper_results.paper_result(r.config.model, r.config.width)
        paper = (f"{ref.bn_only:.1f}%", f"{ref.full:.1f}%") if ref else ("–", "–")
        settings = "".join(f"{getattr(r.config, k)} | " for k in fields)
        rows.append(f"| {r.name} | {r.config.train_mode} | {settings}{s['trainable_params']:,} | {s['total_params']:,} | "
                    f"{100 * s['final_test_accuracy']:.2f}% | {100 * s['best_test_accuracy']:.2f}% | "
                    f"{s['epochs']} | {paper[0]} | {paper[1]} |")
    return rows


def seeds_table(runs) -> List[str]:
    """Mean ± std of each setting's seeds (nothing when no setting has more than one)."""
    groups, fields = analysis.seed_groups(runs), analysis.differing_fields(runs)
    if all(len(g) == 1 for g in groups):
        return []
    rows = ["### Over seeds", "", "Mean ± sample standard deviation over each setting's seeds.", "",
            "| setting | seeds | final acc | best acc |", "|---|---|---:|---:|"]
    for group in groups:
        final = analysis.mean_std([100 * r.summary["final_test_accuracy"] for r in group])
        best = analysis.mean_std([100 * r.summary["best_test_accuracy"] for r in group])
        seeds = ", ".join(str(r.config.seed) for r in group)
        rows.append(f"| {setting_label(group[0], fields)} | {seeds} | {final[0]:.2f} ± {final[1]:.2f}% | "
                    f"{best[0]:.2f} ± {best[1]:.2f}% |")
    return rows + [""]


def reference_lines() -> List[str]:
    lines = ["| model | paper BN-only | paper full | source | checked against paper text |", "|---|---:|---:|---|---|"]
    for model, r in paper_results.CIFAR10_RESNET.items():
        lines.append(f"| {model} | {r.bn_only}% | {r.full}% | {r.source} | {'yes' if r.confirmed else 'no'} |")
    return lines


def accuracy_section(runs, out: str) -> List[str]:
    """The tables, and the plots of what the runs vary (a plot against depth only if depth varies)."""
    plots = [
        plot_learning_curves(runs, os.path.join(out, "learning_curves.png")),
        plot_accuracy(runs, depth_of, lambda r: f"{r.config.train_mode} w{r.config.width}", "ResNet depth",
                      os.path.join(out, "accuracy_vs_depth.png"), paper=paper_depth_points()),
        plot_accuracy(runs, lambda r: r.config.width if depth_of(r) else None,
                      lambda r: f"{r.config.model} {r.config.train_mode}", "width multiplier",
                      os.path.join(out, "accuracy_vs_width.png"), logx=True),
        plot_accuracy(runs, lambda r: r.summary["trainable_params"], lambda r: r.config.train_mode,
                      "trainable parameters", os.path.join(out, "accuracy_vs_trainable.png"), logx=True),
        plot_by_mode(runs, os.path.join(out, "accuracy_by_run.png")),
    ]
    return ["## Accuracy", "", *results_table(runs), "", *seeds_table(runs), "Published numbers used above:", "",
            *reference_lines(), "", *[f"![{p}]({p})" for p in plots if p], ""]


def bn_section(run, state, threshold: float, out: str):
    """Markdown lines and the overall disabled fraction for one run (None without γ)."""
    layers = analysis.bn_layers(train_modes.variables_of(state))
    if not layers:
        return [], None
    per_layer, overall = analysis.disabled_fractions(train_modes.variables_of(state), threshold)
    hist = plot_gamma_beta(layers, f"{run.name}: γ and β per BN layer", os.path.join(out, f"gamma_beta_{run.name}.png"))
    bars = plot_disabled(per_layer, threshold, f"{run.name}: disabled features per layer",
                         os.path.join(out, f"disabled_{run.name}.png"))
    lines = [f"### {run.name}", "", f"Disabled (|γ| < {threshold:g}): {100 * overall:.1f}% of "
             f"{sum(g.size for _, g, _ in layers):,} features.", "", f"![{hist}]({hist})", f"![{bars}]({bars})", ""]
    return lines, overall


def write_report(runs, out: str, threshold: float = paper_results.DISABLED_THRESHOLD,
                 fractions=FRACTIONS, load_data: Optional[Callable] = None, num_classes: Optional[int] = None) -> str:
    """Write out/report.md and its PNGs; ``load_data(config)`` gives the run's data subset for the ablation."""
    os.makedirs(out, exist_ok=True)
    runs = sorted(runs, key=run_order)
    lines = [f"# BatchNorm-only analysis: {len(runs)} runs", "",
             f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
             "`python -m experiments.analyze`.", "", *accuracy_section(runs, out),
             "## γ and β per layer; disabled features", "",
             "The paper reports that BN-only training of deep ResNets disables around a third of the "
             f"features ({paper_results.PAPER_DISABLED_FRACTION[1]}). Threshold here: |γ| < {threshold:g} "
             "(see bn_jax/paper_results.py for its provenance).", ""]
    disabled, curves = [], {}
    for run in tqdm(runs, desc="γ/β" + (" and ablation" if load_data else ""), unit="run", disable=None):
        try:
            state = analysis.restore_state(run, num_classes)
        except (checkpoints.CheckpointError, ValueError) as e:  # one broken run spoils no report
            print(f"warning: {run.name}: no γ/β analysis ({e})", file=sys.stderr)
            lines += [f"### {run.name}", "", f"No γ/β analysis: {e}.", ""]
            continue
        section, overall = bn_section(run, state, threshold, out)
        lines += section
        if overall is not None:
            disabled.append(f"| {run.name} | {run.config.train_mode} | {100 * overall:.1f}% |")
            if load_data is not None:
                curves[run.name] = analysis.ablation_curve(run, state, load_data(run), fractions)
    lines += ["| run | mode | disabled |", "|---|---|---:|", *disabled, ""]
    lines += ablation_lines(curves, out)
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def ablation_lines(curves, out: str) -> List[str]:
    if not curves:
        return ["## Zeroing the smallest-|γ| features", "", "Skipped (no data given).", ""]
    plot = plot_ablation(curves, os.path.join(out, "ablation_zero_gamma.png"))
    fractions = next(iter(curves.values()))
    header = "| run | " + " | ".join(f"{100 * f:.0f}%" for f, _ in fractions) + " |"
    rows = [header, "|---|" + "---:|" * len(fractions)]
    rows += [f"| {name} | " + " | ".join(f"{100 * a:.1f}" for _, a in curve) + " |" for name, curve in curves.items()]
    return ["## Zeroing the smallest-|γ| features", "",
            "γ := 0 for the given share of features with the smallest |γ| (ranked over all layers); "
            "test accuracy (%) on the run's own test subset:", "", *rows, "", f"![{plot}]({plot})", ""]


def data_loader():
    """load_data for write_report: the run's data as it trained on them, each distinct source
    loaded once (an ImageNet folder is opened, not decoded: its images stream)."""
    cache = {}

    def load(run):
        key = (run.config.dataset, run.runtime.data_dir, run.config.image_size)
        if key not in cache:
            cache[key] = train.open_data(run.config, run.runtime)
        return analysis.load_data(run, cache[key])
    return load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run folders, or sweep roots holding run folders")
    p.add_argument("--out", default=None, help="report folder (default: FIRST_PATH/report for a sweep root, "
                                                 "FIRST_PATH_report beside a single run: never inside a run)")
    p.add_argument("--threshold", type=float, default=paper_results.DISABLED_THRESHOLD,
                   help="a feature is disabled when |γ| is below this")
    p.add_argument("--no_ablation", action="store_true", help="skip zeroing γ (needs no data)")
    p.add_argument("--num_classes", type=int, default=None, help="for --data_dir runs that are not 10-class")
    p.add_argument("--tensorboard", default=None, metavar="LOGDIR",
                   help="also write each run's per-epoch metrics as TensorBoard scalars to LOGDIR/<run> "
                        "(needs the optional tensorboard package)")
    args = p.parse_args(argv)
    if not (math.isfinite(args.threshold) and args.threshold >= 0):
        p.error(f"--threshold must be a finite number >= 0, got {args.threshold}")
    if args.num_classes is not None and args.num_classes < 1:
        p.error(f"--num_classes must be >= 1, got {args.num_classes}")
    first = workdir_lib.RunDir(os.path.normpath(args.paths[0]))  # a sweep root gets FIRST/report; a run,
    out = args.out or (first.path + "_" + first.REPORT if first.is_finished() else first.report)  # one beside it
    problem = workdir_lib.unwritable(out)
    if problem:
        p.error(f"cannot write the report to {out}: {problem}")
    try:
        runs = analysis.find_runs(args.paths, warn=lambda m: print(m, file=sys.stderr))
    except ValueError as e:
        p.error(str(e))
    if not runs:
        p.error(f"no readable finished runs (summary.json) in {', '.join(args.paths)}")
    if args.tensorboard:
        from bn_jax import tensorboard_export
        for run in runs:
            tensorboard_export.write_scalars(os.path.join(args.tensorboard, run.name), run.metrics)
    path = write_report(runs, out, args.threshold, load_data=None if args.no_ablation else data_loader(),
                        num_classes=args.num_classes)
    print(f"{len(runs)} runs → {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
