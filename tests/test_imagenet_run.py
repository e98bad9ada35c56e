"""``python -m experiments.imagenet`` end to end on a generated ImageNet-style JPEG folder (small
crops, so a CPU runs it in seconds): training, top-1/top-5, exact resume of the streamed input
after a SIGKILL, bad input, undecodable files, and the host shards of a multi-host run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import need
from PIL import Image

need("grain")

from bn_jax import imagenet, streaming  # noqa: E402
from bn_jax import cli  # noqa: E402
from experiments import imagenet as imagenet_cli  # noqa: E402

pytestmark = pytest.mark.slow  # every test here runs the CLI in a subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_RUNNER = os.path.join(REPO, "tests", "fault_runner.py")
CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")
TIMING = ("images_per_second", "wall_time", "input_images_per_second", "input_wait_fraction")


def write_imagenet_folder(root, train=6, val=2, seed=0):
    """JPEGs of assorted sizes (some smaller than the crop), plus a grayscale and a CMYK one."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in CLASSES:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(20, 80)), int(rng.integers(20, 80))
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    os.path.join(root, split, c, f"{c}_{i}.JPEG"))
    gray, cmyk = (os.path.join(root, "train", c, f"{c}_0.JPEG") for c in CLASSES[:2])
    Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)).save(gray)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).convert("CMYK").save(cmyk)
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_run")
    return {"root": root, "data": write_imagenet_folder(str(root / "imagenet")), "cache": str(root / "xla_cache")}


def run(env, workdir, *extra, data=None, hooks=None, expect=0, session=False):
    flags = ["--bn_only", "--model", "resnet18", "--data_dir", data or env["data"], "--image_size", "32",
             "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "0.5", "--eval_batch_size", "4",
             "--workers", "0", "--checkpoint_every", "2", "--checkpoint_unit", "steps",
             "--workdir", str(workdir), *extra]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BN_JAX_TEST_")}
    environ.update({"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": env["cache"],
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **(hooks or {})})
    proc = subprocess.run([sys.executable, FAULT_RUNNER, "imagenet", *flags], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=400, start_new_session=session)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def read(workdir, name):
    with open(os.path.join(workdir, name)) as f:
        return json.load(f) if name.endswith(".json") else [json.loads(line) for line in f]


def results(workdir):
    """What a run computed: its metrics lines without timings, and the final state's hash."""
    lines = [{k: v for k, v in r.items() if k not in TIMING} for r in read(workdir, "metrics.jsonl")]
    final = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    with open(os.path.join(workdir, "checkpoints", str(final), "meta", "metadata")) as f:
        return lines, json.load(f)["state_sha256"]


@pytest.fixture(scope="module")
def uninterrupted(env):
    workdir = env["root"] / "uninterrupted"
    proc = run(env, workdir)
    return workdir, proc


def test_the_analysis_reads_an_imagenet_run_gamma_ablation_included(uninterrupted, tmp_path):
    from bn_jax import analysis
    from experiments import analyze
    workdir, _ = uninterrupted
    out = tmp_path / "report"
    assert analyze.main([str(workdir), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "No γ/β analysis" not in report and "Skipped (no data given)" not in report
    # the streamed evaluation of the restored state, nothing zeroed, scores what the run recorded
    run = analysis.load_run(str(workdir))
    curve = analysis.ablation_curve(run, analysis.restore_state(run), analysis.load_data(run), [0.0, 1.0])
    assert curve[0] == (0.0, read(workdir, "summary.json")["final_test_accuracy"])
    assert f"| {run.name} | {100 * curve[0][1]:.1f} | " in report


def test_a_run_trains_bn_only_and_reports_top1_top5_and_input_speed(uninterrupted):
    workdir, proc = uninterrupted
    config = read(workdir, "config.json")["experiment"]
    assert (config["model"], config["dataset"], config["train_mode"]) == ("imagenet_resnet18", "imagenet2012", "bn")
    assert (config["schedule"], config["lr"], config["normalize"]) == ("imagenet", 0.4, "imagenet")
    lines = read(workdir, "metrics.jsonl")
    assert [r["step"] for r in lines] == [3, 6]  # 24 images, batch 8
    for r in lines:
        assert 0 <= r["test_accuracy"] <= r["test_top5_accuracy"] <= 1
        assert r["input_images_per_second"] > 0 and 0 <= r["input_wait_fraction"] <= 1
    summary = read(workdir, "summary.json")
    assert summary["final_test_top5_accuracy"] == lines[-1]["test_top5_accuracy"]
    assert summary["undecodable_images"] == {"train_replaced": 0, "test_left_out": 0}
    assert summary["trainable_params"] < 0.01 * summary["total_params"]
    assert "top-5" in proc.stdout and "input can load" in proc.stdout


def test_sigkill_mid_epoch_then_resume_with_grain_workers_is_exact(env, uninterrupted):
    """Killed after step 5 (the newest finished checkpoint is mid-epoch: step 2 or 4, as far as the
    asynchronous save of step 4 got), resumed with 2 grain worker processes both times: the resumed
    run restores grain's iterator state and ends with the same metrics and bit-identical state as
    the uninterrupted in-process run."""
    workdir = env["root"] / "killed"
    marker = f"{os.getpid()}-killed"  # (the workers inherit it: how they are found afterwards)
    run(env, workdir, "--workers", "2", hooks={"BN_JAX_TEST_KILL_AT_STEP": "5", "BN_JAX_TEST_MARK": marker},
        expect=-9)
    assert not processes_marked(marker, wait_s=10), "grain workers outlived the killed trainer"
    saved = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    assert saved in (2, 4) and os.path.isdir(os.path.join(workdir, "checkpoints", str(saved), "data"))
    proc = run(env, workdir, "--workers", "2")
    assert f"resumed from checkpoint step {saved}" in proc.stdout and "restarting the stream" not in proc.stdout
    assert results(workdir) == results(uninterrupted[0])


def processes_marked(marker: str, wait_s: float):
    """Pids of live processes whose environment holds BN_JAX_TEST_MARK=marker, after waiting up to
    ``wait_s`` for them to go (a worker looks for its trainer once a second)."""
    import time
    deadline = time.time() + wait_s
    while True:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"BN_JAX_TEST_MARK={marker}".encode() in f.read().split(b"\0"):
                        with open(f"/proc/{pid}/stat") as g:
                            if g.read().split(")")[-1].split()[0] != "Z":
                                alive.append(int(pid))
            except OSError:
                continue
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.5)


def test_sigterm_to_the_process_group_checkpoints_and_resumes_exactly(env, uninterrupted):
    """As SLURM, ``timeout`` and Ctrl-C send it: to the trainer and its grain workers at once. Before:
    rc 1 and a grain traceback, or Ctrl-C's worker tracebacks. The workers ignore it; the trainer
    checkpoints and exits 75 in one line, and the same command resumes to the same bits."""
    workdir = env["root"] / "group_sigterm"
    proc = run(env, workdir, "--workers", "2", hooks={"BN_JAX_TEST_GROUP_SIGTERM_AT_STEP": "3"},
               expect=cli.EXIT_PREEMPTED, session=True)
    assert "Traceback" not in proc.stderr and "saved a checkpoint at step 3" in proc.stderr
    proc = run(env, workdir, "--workers", "2")
    assert "resumed from checkpoint step 3" in proc.stdout
    assert results(workdir) == results(uninterrupted[0])


def test_resume_under_another_worker_count_restarts_the_stream_at_the_step(env, uninterrupted):
    workdir = env["root"] / "killed_then_fewer_workers"
    run(env, workdir, "--workers", "2", hooks={"BN_JAX_TEST_KILL_AT_STEP": "5"}, expect=-9)
    proc = run(env, workdir, "--workers", "0")
    assert "workers on 1 host(s), now 0 on 1; restarting the stream at step" in proc.stdout
    assert results(workdir) == results(uninterrupted[0])


def test_a_damaged_grain_state_restarts_the_stream_at_the_step(env, uninterrupted):
    workdir = env["root"] / "killed_then_state_lost"
    run(env, workdir, "--workers", "2", hooks={"BN_JAX_TEST_KILL_AT_STEP": "5"}, expect=-9)
    saved = max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    os.remove(os.path.join(workdir, "checkpoints", str(saved), "data", "process_0-of-1.json"))
    proc = run(env, workdir, "--workers", "2")
    assert "did not restore" in proc.stdout and f"restarting the stream at step {saved}" in proc.stdout
    assert results(workdir) == results(uninterrupted[0])


def damage(root, how):
    import shutil
    if how == "missing split":
        shutil.rmtree(os.path.join(root, "val"))
    elif how == "no classes":
        for c in CLASSES:
            shutil.rmtree(os.path.join(root, "train", c))
    else:
        os.rename(os.path.join(root, "val", CLASSES[0]), os.path.join(root, "val", "n09999999"))


@pytest.mark.parametrize("how, message", [("missing split", "missing folder val/"),
                                          ("no classes", "train: no class folders"),
                                          ("different classes", "train/ and val/ hold different classes")])
def test_bad_folders_exit_2_with_one_line_and_write_nothing(env, tmp_path, how, message):
    data = write_imagenet_folder(str(tmp_path / "imagenet"), train=1, val=1)
    damage(data, how)
    proc = run(env, tmp_path / "run", data=data, expect=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")


def test_undecodable_images_are_replaced_in_training_left_out_of_evaluation_and_counted(env, tmp_path):
    data = write_imagenet_folder(str(tmp_path / "imagenet"))
    bad_train = os.path.join(data, "train", CLASSES[2], f"{CLASSES[2]}_1.JPEG")
    bad_val = os.path.join(data, "val", CLASSES[3], f"{CLASSES[3]}_0.JPEG")
    for path in (bad_train, bad_val):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    proc = run(env, tmp_path / "run", data=data)
    summary = read(tmp_path / "run", "summary.json")
    # 24 training images in 3 full batches: every epoch meets the bad one; the last evaluation once
    assert summary["undecodable_images"] == {"train_replaced": 2, "test_left_out": 1}
    assert bad_train in proc.stderr and bad_val in proc.stderr
    assert summary["examples_per_class_loaded"]["test"][CLASSES[3]] == 2  # listed, then left out


def test_a_file_that_cannot_be_read_stops_the_run_with_exit_2_naming_it(env, tmp_path):
    """Not a bad image but a fault (here a dangling link; in life a vanished mount): stepping over
    it would quietly change the data, so the run stops and names it."""
    data = write_imagenet_folder(str(tmp_path / "imagenet"))
    gone = os.path.join(data, "train", CLASSES[1], f"{CLASSES[1]}_9.JPEG")
    os.symlink(os.path.join(data, "nowhere.JPEG"), gone)
    proc = run(env, tmp_path / "run", "--workers", "1", data=data, expect=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and gone in errors[0] and "cannot read" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_imagenet_help_shows_the_papers_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser(imagenet_cli.RECIPE).parse_args(["--help"])
    assert e.value.code == 0
    entries, name = {}, None  # each flag's help entry: its first line starts "  --flag"
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            name = line.split()[0]
        if name:
            entries[name] = entries.get(name, "") + " " + line.strip()
    for flag, default in (("--batch_size", "1024"), ("--lr", "0.4"), ("--epochs", "90"),
                          ("--warmup_epochs", "5.0"), ("--schedule", "imagenet"), ("--model", "resnet50"),
                          ("--weight_decay", "0.0001"), ("--normalize", "imagenet")):
        assert f"(default: {default})" in entries[flag]


# ---- hosts: each reads only its slice of every global batch ----------------------------------

@pytest.fixture(scope="module")
def stream_data(env):
    return imagenet.load(env["data"], crop=32)


def test_two_hosts_read_disjoint_halves_of_every_global_batch(stream_data):
    one = streaming.train_dataset(stream_data, seed=0, batch_size=8, epochs=2, augment=True)
    hosts = [streaming.train_dataset(stream_data, 0, 8, 2, True, process_index=h, process_count=2) for h in (0, 1)]
    assert len(one) == len(hosts[0]) == len(hosts[1]) == 6
    for step in range(len(one)):
        whole, halves = one[step], [h[step] for h in hosts]
        assert not set(halves[0]["index"]) & set(halves[1]["index"])
        for key in ("index", "label", "image"):  # the same examples, augmented alike, in order
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
        streaming.check_indices(halves[1]["index"], step, 8, 1, 2)


def test_two_hosts_evaluate_disjoint_shards_covering_the_test_set(stream_data):
    shards = [streaming.eval_dataset(stream_data, 4, process_index=h, process_count=2) for h in (0, 1)]
    labels = [np.concatenate([s[i]["label"][s[i]["valid"] > 0] for i in range(len(s))]) for s in shards]
    assert sum(len(x) for x in labels) == stream_data.num_test
    interleaved = np.concatenate([np.concatenate([shards[h][i]["label"] for h in (0, 1)])
                                  for i in range(len(shards[0]))])
    assert interleaved.tolist() == [int(stream_data.test[i]["label"]) for i in range(stream_data.num_test)]


def test_a_batch_from_the_wrong_step_is_refused(stream_data):
    ds = streaming.train_dataset(stream_data, 0, 8, 2, True)
    with pytest.raises(RuntimeError, match="out of step: step 2 needs stream examples 16"):
        streaming.check_indices(ds[1]["index"], 2, 8, 0, 1)


def test_two_processes_each_feed_their_slice_and_match_one(env, uninterrupted):
    """jax.distributed over localhost (one CPU device per process): each host streams only its
    half of every global batch (make_array_from_process_local_data), saves its own grain state,
    and the run matches the one-process run up to float reassociation."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = env["root"] / "two_processes"
    procs = [subprocess.Popen(
        [sys.executable, FAULT_RUNNER, "imagenet", "--bn_only", "--model", "resnet18", "--data_dir", env["data"],
         "--image_size", "32", "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "0.5",
         "--eval_batch_size", "4", "--workers", "0", "--checkpoint_every", "2", "--checkpoint_unit", "steps",
         "--workdir", str(workdir), "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
         "--process_id", str(i)],
        cwd=REPO, env={**{k: v for k, v in os.environ.items() if not k.startswith("BN_JAX_TEST_")},
                       "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    summary = read(workdir, "summary.json")
    assert (summary["process_count"], summary["device_count"], summary["per_device_batch_size"]) == (2, 2, 4)
    saved = os.listdir(os.path.join(workdir, "checkpoints", "6", "data"))
    assert sorted(n for n in saved if n.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]
    one, two = read(uninterrupted[0], "metrics.jsonl"), read(workdir, "metrics.jsonl")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "test_top5_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_a_subset_counts_its_own_classes_and_changes_the_fingerprint(stream_data):
    sub = stream_data.subset(10, 3)
    counts = sub.class_counts()
    assert sum(counts["train"].values()) == 10 and sum(counts["test"].values()) == 3
    assert stream_data.class_counts()["train"] == {c: 6 for c in CLASSES}
    assert sub.fingerprint() != stream_data.fingerprint() == imagenet.load(stream_data.name, crop=32).fingerprint()
