"""The analysis on a tiny finished run, and its γ computations on hand-made trees."""

import os

import jax
import numpy as np
import pytest

from bn_jax import analysis, train
from bn_jax.config import ExperimentConfig, RuntimeConfig
from experiments import analyze

from conftest import random_dataset

DATA = random_dataset(n_train=64, n_test=16)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("runs") / "resnet8_w1_bn_s0")
    config = ExperimentConfig(model="resnet8", train_mode="bn", epochs=1, batch_size=32, schedule="constant")
    summary = train.train_and_evaluate(config, workdir, data=DATA, log=lambda *_: None)
    return workdir, summary


def hand_tree():
    stats = {"mean": np.zeros(4), "var": np.ones(4)}
    return {"params": {"BatchNorm_0": {"scale": np.array([0.0, 0.005, -0.02, 0.5]), "bias": np.zeros(4)},
                       "Block_0": {"norm": {"scale": np.array([-0.001, 1.0, 0.3]), "bias": np.ones(3)},
                                   "Conv_0": {"kernel": np.full((3, 3, 2, 3), 0.001)}},
                       "head": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}},
            "batch_stats": {"BatchNorm_0": stats, "Block_0": {"norm": stats}}}


def test_disabled_fractions_on_a_hand_made_tree():
    per_layer, overall = analysis.disabled_fractions(hand_tree(), threshold=0.01)
    assert per_layer == {"BatchNorm_0": 0.5, "Block_0/norm": pytest.approx(1 / 3)}
    assert overall == pytest.approx(3 / 7)
    assert analysis.disabled_fractions(hand_tree(), threshold=0.03)[1] == pytest.approx(4 / 7)


def test_zero_smallest_gammas_ranks_across_layers():
    tree = analysis.zero_smallest_gammas(hand_tree(), 3 / 7)
    np.testing.assert_array_equal(tree["BatchNorm_0"]["scale"], [0.0, 0.0, -0.02, 0.5])
    np.testing.assert_array_equal(tree["Block_0"]["norm"]["scale"], [0.0, 1.0, 0.3])
    np.testing.assert_array_equal(tree["Block_0"]["norm"]["bias"], np.ones(3))  # β untouched
    np.testing.assert_array_equal(tree["Block_0"]["Conv_0"]["kernel"], np.full((3, 3, 2, 3), 0.001))
    assert (analysis.zero_smallest_gammas(hand_tree(), 1.0)["BatchNorm_0"]["scale"] == 0).all()


def test_restored_run_reproduces_its_final_accuracy(finished_run):
    workdir, summary = finished_run
    run = analysis.load_run(workdir)
    assert run.summary == summary and len(run.metrics) == 1
    state = analysis.restore_state(run)
    assert int(state.step) == summary["steps"] == 2
    (f0, acc0), (f1, acc1) = analysis.ablation_curve(run, state, DATA, [0.0, 1.0])
    assert acc0 == summary["final_test_accuracy"]
    # Every γ zeroed: each BN outputs its β whatever the input, so the network predicts one class
    # for every image and its accuracy is that class's share of the test labels.
    shares = [float(np.mean(DATA.test_labels == c)) for c in range(10)]
    assert any(abs(acc1 - share) < 1e-6 for share in shares)


def test_report_and_plots(finished_run, tmp_path):
    workdir, _ = finished_run
    runs = analysis.find_runs([str(tmp_path / "nothing"), workdir.rsplit("/", 1)[0]])
    assert [r.name for r in runs] == ["resnet8_w1_bn_s0"]
    out = tmp_path / "report"
    path = analyze.write_report(runs, str(out), fractions=(0.0, 0.5), load_data=lambda config: DATA)
    text = open(path).read()
    for needle in ("resnet8_w1_bn_s0", "Disabled (|γ| < 0.01)", "| 0% | 50% |", "ablation_zero_gamma.png"):
        assert needle in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"learning_curves.png", "gamma_beta_resnet8_w1_bn_s0.png", "disabled_resnet8_w1_bn_s0.png",
            "ablation_zero_gamma.png"} <= set(pngs)
    # one run varies neither depth, width nor trainable parameters: nothing to draw against them
    assert not {"accuracy_vs_depth.png", "accuracy_vs_width.png", "accuracy_vs_trainable.png"} & set(pngs)
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
        assert f"({name})" in text


def test_tensorboard_scalars_round_trip(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator

    from bn_jax import tensorboard_export
    records = [{"epoch": 1, "test_accuracy": 0.25, "train_loss": 2.0},
               {"epoch": 2, "test_accuracy": 0.5, "train_loss": 1.5}]
    assert tensorboard_export.write_scalars(str(tmp_path), records) == 4
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("test_accuracy")] == [(1, 0.25), (2, 0.5)]
    assert sorted(acc.Tags()["scalars"]) == ["test_accuracy", "train_loss"]


def test_random_k_run_restores_with_its_mask(tmp_path):
    # The entry mask lives in the optimizer state: it must survive the checkpoint round trip.
    config = ExperimentConfig(model="resnet8", train_mode="random_k", k=3, epochs=1, batch_size=32, schedule="constant")
    summary = train.train_and_evaluate(config, str(tmp_path / "rk"), data=DATA, log=lambda *_: None)
    assert summary["trainable_params"] == 3 * (16 + 16 * 2 + 32 * 3 + 64 * 3) + 64 * 10 + 10
    run = analysis.load_run(str(tmp_path / "rk"))
    state = analysis.restore_state(run)
    masks = [m for m in jax.tree_util.tree_leaves(state.opt_state) if getattr(m, "dtype", None) == bool]
    assert masks and all(int(np.asarray(m).reshape(-1, m.shape[-1]).sum(0).max()) == 3 for m in masks if m.ndim == 4)
    assert analysis.ablation_curve(run, state, DATA, [0.0])[0][1] == summary["final_test_accuracy"]


@pytest.mark.parametrize("flags, message", [
    (["--num_classes", "0"], "--num_classes must be >= 1"),  # before: ZeroDivisionError
    (["--threshold", "nan"], "--threshold must be a finite number >= 0, got nan"),  # before: accepted
    (["--threshold", "-1"], "--threshold must be a finite number >= 0"),
])
def test_bad_analysis_flags_exit_2_and_write_nothing(finished_run, tmp_path, capsys, flags, message):
    from experiments import analyze
    workdir, _ = finished_run
    with pytest.raises(SystemExit) as exit_info:
        analyze.main([workdir, "--out", str(tmp_path / "report"), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_runs_with_one_name_in_two_folders_are_refused(finished_run, tmp_path):
    import shutil
    workdir, _ = finished_run
    copy = tmp_path / "other_root" / os.path.basename(workdir)
    shutil.copytree(workdir, copy)
    with pytest.raises(ValueError, match="several folders"):
        analysis.find_runs([os.path.dirname(workdir), str(copy.parent)])


def test_broken_runs_are_skipped_with_a_warning_and_never_written_into(finished_run, tmp_path, capsys):
    import shutil
    workdir, _ = finished_run
    root = tmp_path / "sweep"
    good = root / "good"
    shutil.copytree(workdir, good)
    for name, damage in [("no_config", lambda d: (d / "config.json").unlink()),
                         ("empty_summary", lambda d: (d / "summary.json").write_text("{}")),
                         ("no_checkpoints", lambda d: shutil.rmtree(d / "checkpoints"))]:
        shutil.copytree(workdir, root / name)
        damage(root / name)
    before = {p: p.stat().st_mtime for p in root.rglob("*")}
    out = tmp_path / "report"
    assert analyze.main([str(root), "--out", str(out), "--no_ablation"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping {root / 'no_config'}: no config.json" in err
    assert f"warning: skipping {root / 'empty_summary'}: summary.json lacks final_test_accuracy" in err
    assert "warning: no_checkpoints: no γ/β analysis" in err and "Traceback" not in err
    report = (out / "report.md").read_text()
    assert "### good" in report and "No γ/β analysis" in report
    assert {p: p.stat().st_mtime for p in root.rglob("*")} == before  # nothing created or touched
    assert not (root / "no_checkpoints" / "checkpoints").exists()


def test_report_folder_that_is_a_file_exits_2_before_any_work(finished_run, tmp_path, capsys):
    workdir, _ = finished_run
    blocker = tmp_path / "report"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exit:
        analyze.main([workdir, "--out", str(blocker)])
    assert exit.value.code == 2 and "cannot write the report" in capsys.readouterr().err


def test_the_default_report_of_a_single_run_goes_beside_it(finished_run, tmp_path):
    import shutil
    workdir, _ = finished_run
    run = tmp_path / "one_run"
    shutil.copytree(workdir, run)
    analyze.main([str(run), "--no_ablation"])
    assert (tmp_path / "one_run_report" / "report.md").exists() and not (run / "report").exists()


def test_ablation_normalises_as_the_run_did(tmp_path):
    config = ExperimentConfig(model="resnet8", epochs=1, batch_size=32, schedule="constant", normalize="imagenet")
    summary = train.train_and_evaluate(config, str(tmp_path / "in"), data=DATA, log=lambda *_: None)
    run = analysis.load_run(str(tmp_path / "in"))
    assert run.config.normalize == "imagenet"
    state = analysis.restore_state(run)
    assert analysis.ablation_curve(run, state, DATA, [0.0])[0][1] == summary["final_test_accuracy"]


def api_example() -> str:
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")).read()
    block = text.split("<!-- api example: tests/test_analysis.py runs this block on a run it trains -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_api_example_reads_a_run_back(tmp_path, capsys):
    from conftest import write_image_folder
    data = write_image_folder(str(tmp_path / "data"), per_class=(12, 4))
    workdir = str(tmp_path / "run")
    config = ExperimentConfig(model="resnet8", train_mode="bn", epochs=1, batch_size=8, schedule="constant")
    summary = train.train_and_evaluate(config, workdir, runtime=RuntimeConfig(data_dir=data), log=lambda *_: None)
    capsys.readouterr()
    exec(compile(api_example(), "docs/api.md", "exec"), {"RUN": workdir})  # noqa: S102 (our own docs)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"resnet8 bn {summary['final_test_accuracy']}"
    assert lines[2].startswith("9 BatchNorm layers; ")  # ResNet-8: stem, 2 in each of 3 blocks, 2 shortcuts
    # evaluated again on the run's own test set, it scores what the run recorded
    assert lines[-1] == (f"test accuracy {summary['final_test_accuracy']:.4f}, "
                         f"top-5 {summary['final_test_top5_accuracy']:.4f}")


def hand_run(seed, accuracy, curve, **settings):
    """A finished run as the analysis reads it, without training: its config, summary and metrics."""
    config = ExperimentConfig(model=settings.pop("model", "resnet14"), train_mode="bn", seed=seed, **settings)
    from bn_jax.config import run_name
    summary = {"final_test_accuracy": accuracy, "best_test_accuracy": accuracy + 0.01, "trainable_params": 100,
               "total_params": 1000, "epochs": len(curve)}
    metrics = [{"epoch": i + 1, "train_accuracy": a, "test_accuracy": a, "train_loss": 1 - a, "test_loss": 1 - a}
               for i, a in enumerate(curve)]
    return analysis.Run(f"/runs/{run_name(config)}", config, RuntimeConfig(), summary, metrics)


def test_seeds_are_summarised_as_mean_and_std_and_differing_settings_get_columns(tmp_path):
    runs = [hand_run(0, 0.30, [0.1, 0.3]), hand_run(1, 0.40, [0.2, 0.4]), hand_run(2, 0.50, [0.3, 0.5]),
            hand_run(0, 0.12, [0.1, 0.12], max_train_examples=500)]
    groups = analysis.seed_groups(runs)
    assert [len(g) for g in groups] == [3, 1]
    assert analysis.differing_fields(runs) == ["max_train_examples"]
    table = analyze.seeds_table(runs)
    assert "| resnet14_w1_bn max_train_examples=None | 0, 1, 2 | 40.00 ± 10.00% | 41.00 ± 10.00% |" in table
    assert "| resnet14_w1_bn max_train_examples=500 | 0 | 12.00 ± 0.00% |" in "\n".join(table)
    rows = analyze.results_table(runs)
    assert rows[0].startswith("| run | mode | max_train_examples | ") and "| 500 | " in rows[-1]
    epochs, mean, std = analysis.curve_band(groups[0], "test_accuracy")
    np.testing.assert_allclose(mean, [0.2, 0.4])
    np.testing.assert_allclose(std, [0.1, 0.1])
    assert analyze.plot_learning_curves(runs, str(tmp_path / "curves.png")) == "curves.png"


def test_depth_is_plotted_with_error_bars_over_seeds_only_when_it_varies(tmp_path, monkeypatch):
    same_depth = [hand_run(0, 0.3, [0.3]), hand_run(1, 0.5, [0.5])]
    assert analyze.plot_accuracy(same_depth, analyze.depth_of, lambda r: "bn", "depth", str(tmp_path / "a.png")) is None
    bars = []
    monkeypatch.setattr(analyze.plt.Axes, "errorbar", lambda self, x, y, yerr, **kw: bars.append((x, y, yerr)))
    runs = same_depth + [hand_run(0, 0.6, [0.6], model="resnet20")]
    assert analyze.plot_accuracy(runs, analyze.depth_of, lambda r: "bn", "depth", str(tmp_path / "b.png"))
    (xs, means, stds), = bars
    assert xs == (14, 20) and means == pytest.approx((40.0, 60.0))
    assert stds[0] == pytest.approx(np.std([30, 50], ddof=1)) and stds[1] == 0
