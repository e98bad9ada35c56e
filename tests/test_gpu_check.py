"""benchmarks.gpu_check, the one-command accelerator check, at --smoke sizes on the CPU: the same
code paths a GPU run takes, so the command is known to work before a GPU ever sees it. Its
subprocesses run with TensorFlow and TFDS made unimportable, as on the GPU image."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import TORCH_REQUIRED
from benchmarks import gpu_check, report as report_lib, torch_reference, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {"gpu_check.json", "gpu_check.md", "gpu_check.log", "throughput.png", "run.tar.gz"}


def block_tensorflow(tmp_path) -> str:
    """A folder whose tensorflow and tensorflow_datasets packages raise ImportError on import."""
    folder = tmp_path / "no_tensorflow"
    for name in ("tensorflow", "tensorflow_datasets"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked by the test')\n")
    return str(folder)


def run_module(tmp_path, module, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([block_tensorflow(tmp_path), ROOT]),
               PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def report(out):
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_smoke_check_runs_every_stage_and_writes_its_report(tmp_path):
    out = tmp_path / "out"
    torch = "eager,expert,expert_graph" if torch_reference.available() or TORCH_REQUIRED else "none"
    proc = run_module(tmp_path, "benchmarks.gpu_check", "--smoke", "--stages", "all", "--torch", torch, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == FILES  # at most 8 files may come back from a GPU job
    data = report(out)
    assert not data["tensorflow_imported"]
    assert data["stages"]["environment"]["device_count"] >= 1
    checks = data["stages"]["correctness"]["checks"]
    assert len(checks) == 5 and all(c["passed"] for c in checks), checks
    assert checks[3]["max_relative_difference"] < 1e-5  # a pack's member against its solo run, on a CPU
    assert checks[2]["bitwise_equal"] and checks[2]["test_batches"] == 3  # evaluation in one call, on a CPU
    assert data["stages"]["correctness"]["fused_cost_over_step_cost"] == pytest.approx(1.0, rel=0.01)
    rows = data["stages"]["throughput"]["rows"]
    jax_rows = {(r["mode"], r["precision"]) for r in rows if r["framework"] == "bn_jax"}
    assert jax_rows == {("bn", "float32"), ("full", "float32"), ("bn", "bfloat16")}
    assert {r["loop"] for r in rows if r["framework"] == "bn_jax"} == {"fused"}
    assert [r["stage"] for r in rows if r["framework"] == "bn_jax"] == ["single"] * 3 + ["packs"] * 4 + ["batch_sweep"]
    assert [r.get("pack") for r in rows if r["stage"] == "packs"] == [1, 2, 2, 2]
    # the blog's loop (bn, full) and the expert's (float32, bfloat16); no CUDA graph without CUDA
    assert [(r["loop"], r["precision"]) for r in rows if r["framework"] == "torch"] == (
        [("eager", "float32")] * 2 + [("expert", "float32"), ("expert", "bfloat16")] if torch != "none" else [])
    setup = data["stages"]["setup"]
    assert [(r["lowering"], r["cache"]) for r in setup["rows"]] == [  # cold first: they compare the lowerings
        ("default", "cold"), ("kernel", "cold"), ("default", "warm"), ("kernel", "warm")]
    assert all(r["setup_s"] > r["init_s"] > 0 for r in setup["rows"])
    assert setup["kernel_lowering_leaves"]["equal"] and not setup["kernel_lowering_used"]  # (a no-op on CPU)
    flags = data["stages"]["xla_flags"]["rows"]
    assert [r["name"] for r in flags] == list(xla_flags.FLAG_SETS)
    assert all(r["compiled"] and r["ms_per_step"] > 0 and r["command_buffers"] == 0 for r in flags)  # none on CPU
    assert all(r["bit_equal_to_default"] for r in flags[1:])  # GPU-only flags change nothing on a CPU
    for r in rows:
        assert r["images_per_second"] > 0 and r["compile_s"] >= 0
        if r["framework"] == "bn_jax":
            assert r["compile_s"] > 0 and r["limit_images_per_second"] > 0
    run = data["stages"]["run"]
    assert run["status"] == "finished" and run["epochs_done"] == 3 and run["archive"] == "run.tar.gz"
    assert run["final_test_accuracy"] == run["test_accuracy"] and run["paper_test_accuracy"] is None  # (ResNet-8)
    assert 0 <= run["gamma_disabled_fraction"] <= run["gamma_most_disabled_fraction"] <= 1
    assert run["projected_3_epochs_s"] == pytest.approx(3 * run["epoch_s"])
    md = (out / "gpu_check.md").read_text()
    for section in ("## Environment", "## Correctness", "## Throughput", "## Set-up", "## XLA options",
                    "## The 160-epoch run", "## Targets"):
        assert section in md


@pytest.mark.slow
def test_run_stops_at_its_deadline_and_resumes_from_the_archive_exactly(tmp_path):
    stopped, resumed, straight = tmp_path / "stopped", tmp_path / "resumed", tmp_path / "straight"
    base = ["--smoke", "--stages", "run", "--torch", "none"]
    proc = run_module(tmp_path, "benchmarks.gpu_check", *base, "--run_s", "0", "--out", str(stopped))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = report(stopped)["stages"]["run"]
    assert first["status"].startswith("stopped: time limit reached: saved a checkpoint at step 4")
    assert 1 <= first["epochs_done"] < 3
    with tarfile.open(stopped / "run.tar.gz") as tar:
        assert any("/checkpoints/" in m.name for m in tar.getmembers())

    proc = run_module(tmp_path, "benchmarks.gpu_check", *base, "--resume_run", str(stopped / "run.tar.gz"),
                      "--out", str(resumed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from checkpoint" in proc.stdout
    proc = run_module(tmp_path, "benchmarks.gpu_check", *base, "--out", str(straight))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = report(resumed)["stages"]["run"], report(straight)["stages"]["run"]
    assert a["status"] == b["status"] == "finished" and a["epochs_done"] == b["epochs_done"] == 3
    # the same final numbers as the run that was never stopped (CPU: bit for bit)
    assert (a["train_loss"], a["test_accuracy"]) == (b["train_loss"], b["test_accuracy"])


@pytest.mark.slow
def test_cifar_trains_without_tensorflow(tmp_path):
    from conftest import write_image_folder
    data = write_image_folder(str(tmp_path / "data"), size=32)
    proc = run_module(tmp_path, "experiments.cifar", "--bn_only", "--model", "resnet8", "--epochs", "1",
                      "--batch_size", "4", "--data_dir", data, "--workdir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4  # 3 classes × 6 images, batch 4


@pytest.mark.parametrize("args, message", [
    (["--stages", "bogus"], "--stages: unknown bogus"),
    (["--budget_s", "0"], "--budget_s must be a positive"),
    (["--budget_s", "nan"], "--budget_s must be a positive"),
    (["--run_s", "-1"], "--run_s must be >= 0"),
    (["--torch", "jit"], "--torch: unknown jit"),
    (["--stages", "all"], "no data at data/cifar10-jpg.tar.gz"),
    (["--stages", "run"], "no data at data/cifar10-jpg.tar.gz"),
    (["--smoke", "--resume_run", "missing.tar.gz"], "--resume_run: no such file"),
    (["--smoke", "--resume_run", "notes.txt"], "--resume_run: notes.txt is not a tar archive"),
])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not an archive")  # (before: the whole budget went by, then a traceback)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_archive_of_one_run_unpacks_as_the_workdir_whatever_its_folder_name(tmp_path):
    # An archive packed under an older run name (before names carried the experiment's hash)
    # still resumes: whether it holds this run is checked by the trainer, from its checkpoints.
    (tmp_path / "old_name").mkdir()
    (tmp_path / "old_name" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "second").mkdir()
    archive, two = tmp_path / "run.tar.gz", tmp_path / "two.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "old_name", arcname="old_name")
    with tarfile.open(two, "w:gz") as tar:
        tar.add(tmp_path / "old_name", arcname="old_name")
        tar.add(tmp_path / "second", arcname="second")
    workdir = tmp_path / "runs" / "resnet8_w1_bn_s0-0123abcd"
    with pytest.raises(ValueError, match="holds old_name, second, not one run folder"):
        gpu_check.unpack_run(str(two), str(workdir))
    gpu_check.unpack_run(str(archive), str(workdir))
    assert (workdir / "metrics.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [workdir.name]  # no staging left
    with pytest.raises(ValueError, match="exists already"):
        gpu_check.unpack_run(str(archive), str(workdir))


def history(wall_times, speeds):
    return [{"epoch": i + 1, "step": 10 * (i + 1), "test_accuracy": 0.1 * (i + 1), "train_loss": 1.0,
             "wall_time": w, "images_per_second": s} for i, (w, s) in enumerate(zip(wall_times, speeds))]


def test_run_projection_leaves_out_the_sessions_first_epoch():
    # epoch 1 includes compilation (12 s, 500 img/s); epochs 2-4 take 3, 4 and 3 s
    s = gpu_check.summarize_run(history([12.0, 15.0, 19.0, 22.0], [500.0, 900.0, 800.0, 1000.0]), 160, 1)
    assert s["steady_epochs"] == [2, 3, 4]
    assert s["epoch_s"] == 3.0 and s["projected_160_epochs_s"] == 480.0
    assert s["images_per_second"] == 900.0  # the median of the steady epochs
    assert s["epochs_done"] == 4 and s["best_test_accuracy"] == pytest.approx(0.4)
    # resumed at epoch 3: this session's first epoch (3) includes its compilation
    s = gpu_check.summarize_run(history([12.0, 15.0, 40.0, 43.0], [500.0, 900.0, 300.0, 1000.0]), 160, 3)
    assert s["steady_epochs"] == [4] and s["epoch_s"] == 3.0 and s["images_per_second"] == 1000.0


def test_the_targets_are_read_from_the_performance_doc(tmp_path):
    goals = gpu_check.read_targets()  # docs/performance.md, "Targets": the one place they are written
    assert set(goals) == set(gpu_check.TARGET_KEYS)
    assert goals["bn_over_full_time"][0] == "≤" and 0 < goals["bn_over_full_time"][1] < 1
    doc = tmp_path / "performance.md"
    doc.write_text("## Targets\n\n| a | b | `bn_over_torch_eager` ≥ 3.0 |\n\n## Next\n| a | b | `bn_over_full_time` ≤ 1 |\n")
    with pytest.raises(ValueError, match="lacks bn_over_torch_compile, bn_over_full_time, run_160_epochs_s"):
        gpu_check.read_targets(str(doc))


def test_targets_compare_the_measured_ratios():
    rows = [{"framework": "bn_jax", "mode": "bn", "loop": "fused", "precision": "float32", "images_per_second": 1200.0},
            {"framework": "bn_jax", "mode": "full", "loop": "fused", "precision": "float32", "images_per_second": 800.0},
            {"framework": "torch", "mode": "bn", "loop": "eager", "precision": "float32", "images_per_second": 300.0}]
    data = {"stages": {"throughput": {"rows": rows}, "run": {"projected_160_epochs_s": 400.0}}}
    got = {t["target"]: (t["measured"], t["met"]) for t in gpu_check.targets(data)}
    assert list(got.values()) == [(4.0, True), (None, None), (800.0 / 1200.0, True), (400.0, False),
                                  (None, None), (None, None), (None, None)] + [(None, None)] * 6
    rows.append({"framework": "bn_jax", "mode": "bn", "loop": "fused", "precision": "float32", "pack": 8,
                 "init": "seed", "images_per_second": 6000.0})
    got = [(t["measured"], t["met"]) for t in gpu_check.targets(data)]
    assert got[0] == (4.0, True)  # (the solo row, not the pack's)
    assert got[4] == (5.0, True) and got[5][0] == 6000.0 and got[5][1] is False


def test_targets_against_the_expert_loop_take_its_fastest_variant_of_the_same_precision():
    def row(framework, loop, precision, ips, **kw):
        return {"framework": framework, "mode": "bn", "loop": loop, "precision": precision, "images_per_second": ips,
                "ms_per_step": 128_000 / ips, **kw}
    rows = [row("bn_jax", "fused", "float32", 16000.0), row("bn_jax", "fused", "bfloat16", 24000.0),
            row("torch", "expert", "float32", 10000.0), row("torch", "expert_graph", "float32", 20000.0),
            row("torch", "expert", "bfloat16", 12000.0),
            row("bn_jax", "fused", "float32", 99000.0, stage="batch_sweep")]  # (not the paper's batch: left out)
    data = {"stages": {"throughput": {"rows": rows}, "setup": {"best_bit_identical_setup_s": 12.0}}}
    got = {t["target"].split(" ≥")[0].split(" ≤")[0]: (t["measured"], t["met"]) for t in gpu_check.targets(data)}
    assert got["one BN-only run, float32, ms/step"] == (8.0, False)
    assert got["one BN-only run, bfloat16, ms/step"][1] is True
    assert got["bn_jax BN-only images/s over the expert's PyTorch loop (float32, its fastest variant)"] == (0.8, False)
    assert got["… in bfloat16, over the expert's loop in bfloat16"] == (2.0, True)
    assert got["set-up seconds of one case (warm cache, a bit-identical lowering)"] == (12.0, True)


@pytest.mark.slow
def test_an_xla_flag_that_kills_its_process_loses_only_its_own_row():
    case = report_lib.Case("bn_jax", "resnet8", 8, "bn", "float32", "fused", 1)
    rows = xla_flags.measure(case, 1, 1, 120, {"default": "", "bogus": "--xla_no_such_flag=1", "again": ""})
    assert [r["compiled"] for r in rows] == [True, False, True]
    assert "Unknown flag" in rows[1]["error"]
    assert rows[2]["bit_equal_to_default"] is True  # the same steps from the same seed, in another process
    skipped = xla_flags.measure(case, 1, 1, 120, {"default": ""}, left=lambda: 10.0)
    assert skipped[0]["compiled"] is None and "skipped" in skipped[0]["error"]


def campaign_metrics(out, run):
    """{run folder: [(epoch, train loss, test accuracy)]} from a campaign archive."""
    with tarfile.open(out / "campaign.tar.gz") as tar:
        names = {m.name.split("/")[0] for m in tar.getmembers()}
        lines = tar.extractfile(f"{run}/metrics.jsonl").read().decode().splitlines()
    return names, [(r["epoch"], r["train_loss"], r["test_accuracy"]) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_a_campaign_stopped_at_its_deadline_goes_on_in_the_next_call_as_if_never_stopped(tmp_path):
    plan = tmp_path / "campaign.json"
    plan.write_text(json.dumps({"runs": [{"model": "resnet8", "train_mode": "bn"},
                                         {"model": "resnet8", "train_mode": "full"}]}))
    base = ["--smoke", "--stages", "campaign", "--campaign", str(plan), "--torch", "none"]
    first, second, straight = tmp_path / "first", tmp_path / "second", tmp_path / "straight"
    proc = run_module(tmp_path, "benchmarks.gpu_check", *base, "--run_s", "0", "--out", str(first))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = report(first)["stages"]["campaign"]["runs"]
    assert runs[0]["status"].startswith("stopped") and runs[0]["epochs_done"] < 3
    assert runs[1]["status"].startswith("not started")
    proc = run_module(tmp_path, "benchmarks.gpu_check", *base, "--resume_campaign", str(first / "campaign.tar.gz"),
                      "--out", str(second))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["status"] for r in report(second)["stages"]["campaign"]["runs"]] == ["finished"] * 2
    proc = run_module(tmp_path, "benchmarks.gpu_check", *base, "--out", str(straight))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in report(straight)["stages"]["campaign"]["runs"]:
        names, resumed = campaign_metrics(second, r["run"])
        assert len(names) == 2 and [e for e, _, _ in resumed] == [1, 2, 3]
        assert resumed == campaign_metrics(straight, r["run"])[1]  # bit for bit: the same losses
    assert (second / "campaign.tar.gz").stat().st_size < 16 * 2**20


def test_a_campaign_with_a_run_twice_or_an_unknown_field_is_refused(tmp_path, capsys):
    from benchmarks import campaign
    runs = campaign.load(campaign.DEFAULT)
    assert [r["config"].model for r in runs[:3]] == ["resnet110", "resnet14", "resnet14"]
    assert os.path.isfile(runs[0]["archive"])  # the ResNet-110 run to finish: the archive holds this very experiment
    from bn_jax import config as config_lib
    with tarfile.open(runs[0]["archive"]) as tar:
        saved = json.load(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("/config.json"))))
    assert config_lib.same_experiment(saved, runs[0]["config"])
    for bad, says in (([{"model": "resnet8"}, {"model": "resnet8"}], "listed twice"),
                      ([{"model": "resnet8", "lr_typo": 1}], "unknown fields lr_typo"),
                      ([{"model": "resnet9"}], "run 1")):
        plan = tmp_path / "c.json"
        plan.write_text(json.dumps({"runs": bad}))
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.main(["--smoke", "--stages", "campaign", "--campaign", str(plan), "--out", str(tmp_path / "o")])
        assert exit_info.value.code == 2 and says in capsys.readouterr().err
        assert not (tmp_path / "o").exists()


def test_an_archive_to_resume_inside_the_output_folder_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "campaign.tar.gz").write_bytes(b"earlier")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--smoke", "--stages", "environment", "--resume_campaign", str(out / "campaign.tar.gz"),
                        "--out", str(out)])
    assert exit_info.value.code == 2 and "which the check empties first" in capsys.readouterr().err
    assert (out / "campaign.tar.gz").read_bytes() == b"earlier"
