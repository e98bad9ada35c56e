"""benchmarks.benchmark (the performance report) and the roofline estimate beside it."""

import json
import os

import pytest

from bn_jax import roofline
from benchmarks import benchmark, input_benchmark

from conftest import TORCH_REQUIRED

if TORCH_REQUIRED:
    import torch  # noqa: F401  (CI installs it: the PyTorch rows must be exercised there)

# ResNet-8's convolutions written out by hand: (output side, kernel side, in channels, out channels).
RESNET8_CONVS = [(32, 3, 3, 16), (32, 3, 16, 16), (32, 3, 16, 16),
                 (16, 3, 16, 32), (16, 3, 32, 32), (16, 1, 16, 32),
                 (8, 3, 32, 64), (8, 3, 64, 64), (8, 1, 32, 64)]
FORWARD_FLOPS = sum(2 * side**2 * k**2 * cin * cout for side, k, cin, cout in RESNET8_CONVS)


def step_flops_per_image(mode, loop="step"):
    case = benchmark.Case("bn_jax", "resnet8", 8, mode, "float32", loop, None)
    return benchmark.jax_runner(case, width=1, steps=1).cost()["flops"] / 8


def test_cost_analysis_counts_three_conv_passes_for_full_and_two_for_bn_only():
    full, bn = step_flops_per_image("full"), step_flops_per_image("bn")
    assert 2.6 < full / FORWARD_FLOPS < 3.3  # forward, input gradient, weight gradient
    assert 1.7 < bn / FORWARD_FLOPS < 2.2  # no weight gradients
    assert bn / full < 0.72


def test_fused_program_cost_is_one_steps_cost():
    # The fused loop's cost is read off its own executable (no second compile): XLA counts the
    # loop body once, so it must match a single step's cost, whatever the trip count.
    assert step_flops_per_image("bn", "fused") == pytest.approx(step_flops_per_image("bn", "step"), rel=0.01)


def test_roofline_limit_is_the_tighter_of_compute_and_memory():
    peaks = roofline.Peaks(matmul_flops=100.0, copy_bytes=10.0)
    assert peaks.limit(flops=5.0, nbytes=1.0) == 10.0  # memory-bound: 10 B/s ÷ 1 B
    assert peaks.limit(flops=50.0, nbytes=0.01) == 2.0  # compute-bound: 100 FLOP/s ÷ 50 FLOP


def test_measured_peaks_are_plausible_for_a_cpu():
    peaks = roofline.measure_peaks(matmul_size=256, copy_mib=8, repeats=2)
    assert 1e8 < peaks.matmul_flops < 1e14 and 1e8 < peaks.copy_bytes < 1e13


@pytest.mark.slow
def test_report_times_every_configuration_and_writes_json_markdown_and_png(tmp_path, capsys):
    out = tmp_path / "bench"
    torch_variants = "eager" if benchmark.torch_cases(benchmark.build_parser().parse_args([])) else "none"
    benchmark.main(["--models", "resnet8", "--batch_sizes", "8", "--precisions", "float32",
                    "--loops", "step,fused", "--torch", torch_variants, "--steps", "2", "--rounds", "2",
                    "--warmup", "2", "--out", str(out)])
    report = json.loads((out / "benchmark.json").read_text())
    jax_rows = [r for r in report["rows"] if r["framework"] == "bn_jax"]
    assert {(r["mode"], r["loop"]) for r in jax_rows} == {("full", "step"), ("full", "fused"),
                                                          ("bn", "step"), ("bn", "fused")}
    for r in report["rows"]:
        assert len(r["ms_per_step_rounds"]) == 2 and r["images_per_second"] > 0
        assert r["images_per_second"] == pytest.approx(8 / (r["ms_per_step"] / 1000))
    for r in jax_rows:
        assert r["limit_images_per_second"] == min(r["compute_limit_images_per_second"],
                                                   r["memory_limit_images_per_second"])
        assert r["fraction_of_limit"] == pytest.approx(r["images_per_second"] / r["limit_images_per_second"])
    ratios = {c["what"]: c["ratio"] for c in report["comparisons"]}
    assert "bn/full step time, bn_jax resnet8 b8 float32 step" in ratios
    if torch_variants != "none":
        assert {r["mode"] for r in report["rows"] if r["framework"] == "torch"} == {"bn", "full"}
        assert any(w.startswith("bn_jax bn float32") and "over torch eager bn" in w for w in ratios)
    assert report["command"].startswith("python -m benchmarks.benchmark --models resnet8")
    timed_s = sum(sum(r["ms_per_step_rounds"]) * 2 / 1e3 for r in report["rows"])  # 2 steps per round
    assert report["wall_s"] >= timed_s  # the command's duration, which documented commands state
    assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "benchmark.md").read_text()
    assert table.count("| bn_jax | resnet8 | 8 |") == 4
    assert "% of roofline" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps and --rounds must be >= 1"),
    (["--torch", "eagre"], "--torch: unknown eagre"),
])
def test_bad_flags_exit_2_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_per_image_costs_do_not_depend_on_the_device_count(tmp_path):
    """XLA costs one device's share of a sharded step; per image it must come out the same."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "benchmarks.benchmark", "--simulate_cpu_devices", "2",
                    "--num_devices", "1,2", "--models", "resnet8", "--batch_sizes", "8", "--modes", "bn",
                    "--precisions", "float32", "--loops", "step", "--torch", "none", "--steps", "1",
                    "--rounds", "1", "--warmup", "0", "--out", str(tmp_path)],
                   cwd=root, check=True, capture_output=True, timeout=600)
    one, two = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    assert (one["devices"], two["devices"]) == (1, 2)
    assert two["flops_per_image"] == pytest.approx(one["flops_per_image"], rel=0.05)
    peak_flops = one["compute_limit_images_per_second"] * one["flops_per_image"]
    assert two["compute_limit_images_per_second"] == pytest.approx(2 * peak_flops / two["flops_per_image"])


def test_convolution_counts_read_cpu_and_cudnn_hlo():
    # One line of each form, as XLA:CPU and XLA:GPU print them.
    hlo = "\n".join([
        "  %convolution.3 = f32[8,32,32,16]{3,2,1,0} convolution(f32[8,32,32,3]{3,2,1,0} %p0, f32[3,3,3,16]{3,2,1,0} %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f",
        '  %custom-call.1 = (f32[8,16,32,32]{3,2,1,0}, u8[0]{0}) custom-call(f32[8,3,32,32]{3,2,1,0} %a, f32[16,3,3,3]{3,2,1,0} %b), window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convForward", backend_config={}',
        '  %custom-call.2 = (f32[16,3,3,3]{3,2,1,0}, u8[0]{0}) custom-call(%x, %y), custom_call_target="__cudnn$convBackwardFilter"',
        '  %custom-call.3 = f32[8]{0} custom-call(%z), custom_call_target="SomethingElse"',
        '  %add.1 = f32[8]{0} add(%a, %b), metadata={op_name="jit(step)/conv_general_dilated"}',
    ])
    assert roofline.convolution_counts(hlo) == {"convolution": 1, "__cudnn$convForward": 1,
                                                "__cudnn$convBackwardFilter": 1}


@pytest.mark.parametrize("flags, message", [
    (["--batch_sizes", "abc"], "--batch_sizes takes comma-separated positive integers"),
    (["--batch_sizes", "0"], "--batch_sizes takes comma-separated positive integers"),
    (["--num_devices", "two"], "--num_devices takes comma-separated positive integers"),
    (["--models", "resnet21"], "6n+2"),
    (["--modes", "most"], "most"),
    (["--precisions", "fp8"], "unknown precision 'fp8'"),
    (["--loops", "scan"], "--loops: unknown loop 'scan'"),
    (["--models", ",,,"], "--models names nothing"),
    (["--modes", ","], "--modes names nothing"),
    (["--num_devices", "5"], "--num_devices 5 exceeds the 1 visible device(s)"),  # (before: exit 0, an empty table)
])
def test_bad_flags_exit_2_before_any_timing(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit:
        benchmark.main([*flags, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_exits_2_before_any_timing(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exit:
        benchmark.main(["--models", "resnet8", "--out", str(blocker / "bench")])
    assert exit.value.code == 2 and "cannot write to --out" in capsys.readouterr().err


# ---- the input-pipeline report (--input_pipeline) --------------------------------------------

def test_h100_estimate_is_peak_times_utilisation_over_flops_and_cores_divide_by_the_per_core_rate():
    rows = {e["precision"]: e for e in input_benchmark.h100_estimates(1e10, images_per_core_second=100.0, mfu=0.5)}
    assert rows["bfloat16"]["estimated_images_per_second"] == pytest.approx(989e12 * 0.5 / 1e10)
    assert rows["tf32"]["estimated_cores"] == pytest.approx(495e12 * 0.5 / 1e10 / 100.0)
    assert input_benchmark.h100_estimates(None, 100.0, 0.5) == []  # no FLOP count (cuDNN): no estimate


@pytest.mark.slow
def test_input_pipeline_report_on_generated_imagenet_sized_jpegs(tmp_path, monkeypatch, capsys):
    import tempfile
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "bench"
    benchmark.main(["--input_pipeline", "generate", "--generate_images", "8", "--input_batch_size", "2",
                    "--input_model", "resnet18", "--input_image_size", "64", "--input_workers", "0,1",
                    "--precisions", "float32", "--steps", "2", "--rounds", "2",
                    "--warmup", "1", "--h100_mfu", "0.3", "--out", str(out)])
    assert not list(scratch.glob("bn_jax_input_*"))  # the generated folder is removed
    section = json.loads((out / "benchmark.json").read_text())["input_pipeline"]
    src = section["source"]
    assert src["files"] == 8 and 300 <= src["mean_width"] <= 500 and 250 <= src["mean_height"] <= 450
    assert 60 < src["mean_kb"] < 180  # ImageNet-like JPEGs (about 110 KB), not incompressible noise
    rows = {r["workers"]: r for r in section["pipeline"]}
    assert set(rows) == {0, 1}
    for r in rows.values():
        # each round: 10× the batches grain holds in flight: the read-ahead of each reading process
        # (1 in a worker; 2 per thread, at most 8 threads, without workers) and 2 finished per worker
        in_flight = 3 * r["workers"] if r["workers"] else 2 * min(8, os.cpu_count())
        assert r["images_per_round"] == 2 * 10 * in_flight
        assert len(r["seconds_rounds"]) == 2 and r["images_per_second"] > 0
        assert sum(r["cpu_seconds_rounds"]) > 0 and r["cores_busy"] > 0
        assert r["images_per_core_second"] == pytest.approx(2 * r["images_per_round"] / sum(r["cpu_seconds_rounds"]))
    (step,) = section["step"]
    assert (step["model"], step["batch_size"], step["train_mode"]) == ("imagenet_resnet18", 2, "bn")
    assert step["images_per_second"] == pytest.approx(2 / (step["ms_per_step"] / 1000))
    assert step["flops_per_image"] > 1e8  # XLA:CPU counts the convolutions
    verdict = section["keeps_up"]
    assert verdict["workers"] == 1 and verdict["shared_cores"]
    assert verdict["ratio"] == pytest.approx(rows[1]["images_per_second"] / step["images_per_second"])
    assert verdict["keeps_up"] == (verdict["ratio"] >= 1)
    assert verdict["cores_needed"] == pytest.approx(step["images_per_second"] / rows[1]["images_per_core_second"])
    estimates = {e["precision"]: e for e in section["h100_estimate"]}
    for precision, peak in (("bfloat16", 989e12), ("tf32", 495e12)):
        e = estimates[precision]
        assert e["assumed_mfu"] == 0.3
        assert e["estimated_images_per_second"] == pytest.approx(peak * 0.3 / step["flops_per_image"])
        per_core = rows[1]["images_per_core_second"]  # (the most workers: all the cores it was given)
        assert e["estimated_cores"] == pytest.approx(e["estimated_images_per_second"] / per_core)
    text = (out / "benchmark.md").read_text()
    assert "H100 ESTIMATE (not measured)" in text and "ASSUMED 30% utilisation" in text and "Keeps up" in text
    assert "share the same" in capsys.readouterr().out  # (a CPU: the step and the workers compete)


@pytest.mark.parametrize("flags, message", [
    (["--input_pipeline", "MISSING"], "no such folder"),
    (["--input_pipeline", "generate", "--input_workers", "two"], "--input_workers takes comma-separated counts"),
    (["--input_pipeline", "generate", "--h100_mfu", "1.5"], "--h100_mfu must be in (0, 1]"),
    (["--input_pipeline", "generate", "--input_model", "resnet21"], "resnet21"),
    (["--input_pipeline", "generate", "--generate_images", "4"], "fewer than one batch"),
    (["--input_pipeline", "generate", "--input_workers", "0,2", "--input_batches", "5"],
     "fewer than the 6 batches grain holds in flight with 2 workers"),
])
def test_bad_input_pipeline_flags_or_folder_exit_2_before_any_timing(tmp_path, capsys, flags, message):
    flags = [str(tmp_path / "missing") if f == "MISSING" else f for f in flags]
    with pytest.raises(SystemExit) as exit:
        benchmark.main([*flags, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_folder_without_val_is_named(tmp_path, capsys):
    input_benchmark.generate_imagenet_folder(str(tmp_path / "imagenet"), 2)
    import shutil
    shutil.rmtree(tmp_path / "imagenet" / "val")
    with pytest.raises(SystemExit) as exit:
        benchmark.main(["--input_pipeline", str(tmp_path / "imagenet"), "--out", str(tmp_path / "out")])
    assert exit.value.code == 2 and "missing folder val/" in capsys.readouterr().err


def test_every_finished_round_is_handed_on_as_it_ends():
    """What lets the benchmark rewrite its report after each round: a kill keeps the rounds done."""
    from benchmarks import report as report_lib
    seen, calls = [], []
    runners = {"a": lambda n: calls.append(("a", n)), "b": lambda n: calls.append(("b", n))}
    times = report_lib.time_rounds(runners, 3, 2, on_round=lambda t, done: seen.append(
        (done, {k: len(v) for k, v in t.items()}, len(calls))))
    assert seen == [(1, {"a": 1, "b": 1}, 2), (2, {"a": 2, "b": 2}, 4)]
    assert calls == [("a", 3), ("b", 3)] * 2 and all(len(v) == 2 for v in times.values())
