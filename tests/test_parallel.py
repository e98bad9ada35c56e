"""Data parallelism over simulated CPU devices and over two local processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from bn_jax import checkpoints, train
from bn_jax import config as config_lib

from conftest import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 8
# How far may 8 devices differ from 1? Over 8 devices every BN statistic and gradient is summed in
# another order, and float32 addition is not associative: each sum moves by a few ulps (~1e-7
# relative). Through a smooth network that would stay at rounding level. ReLU is not smooth: a
# pre-activation within rounding distance of 0 can land on the other side, and then that element's
# whole share of a gradient switches on or off. A share is one of batch × height × width terms of
# the sum, so the leaf moves by a small part of its update. Measured here (3 steps of ResNet-8 with
# jax 0.12.0.1), such a flip changed a BN bias by 0.5% of the distance training moved it. The
# 1-device run of the same steps stayed within 3e-9 of a float64 run. So each leaf may differ by
# MOVED_FRACTION of the distance it moved from its initial value, plus 4 ulps of its size for leaves
# that barely moved. Per-device ("ghost") BN statistics are what pmap without a BN axis_name gives.
# They move leaves by up to 120% of that distance, and test_ghost_batch_norm_breaks_the_tolerance
# shows the tolerance catches them.
MOVED_FRACTION = 0.02
# The loss follows from the parameters: the flip above moved it by 2e-7 relative. Ghost BN moves
# the very first loss by 8e-4, before any update.
LOSS_RTOL = 1e-4


def env(devices=N):
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parallel") / "results.npz")
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "parallel_worker.py"), out, str(N)],
                   env=env(), check=True, timeout=900)
    return dict(np.load(out))


def trained_leaves(results, mode):
    return [k[len(f"{mode}/1/"):] for k in results if k.startswith(f"{mode}/1/[")]


def reassociated(other, one, initial) -> bool:
    """Whether ``other`` is within float32 reassociation of ``one`` (see MOVED_FRACTION)."""
    one, initial = np.asarray(one), np.asarray(initial)
    tolerance = MOVED_FRACTION * np.abs(one - initial).max() + 4 * np.spacing(np.abs(one).max())
    return bool(np.abs(np.asarray(other) - one).max() <= tolerance)


def beyond_tolerance(results, mode, run):
    """Leaves of ``run`` farther from the 1-device result than float32 reassociation explains."""
    return [leaf for leaf in trained_leaves(results, mode) if not reassociated(
        results[f"{mode}/{run}/{leaf}"], results[f"{mode}/1/{leaf}"], results[f"{mode}/initial/{leaf}"])]


@pytest.mark.parametrize("mode", ["full", "bn"])
@pytest.mark.slow
def test_eight_devices_match_one(results, mode):
    assert results[f"{mode}/{N}/num_shards"] == N  # really replicated over 8 devices
    np.testing.assert_allclose(results[f"{mode}/{N}/loss"], results[f"{mode}/1/loss"], rtol=LOSS_RTOL)
    assert len(trained_leaves(results, mode)) > 20
    assert beyond_tolerance(results, mode, str(N)) == []


@pytest.mark.parametrize("mode", ["full", "bn"])
def test_ghost_batch_norm_breaks_the_tolerance(results, mode):
    # The same steps on one device with BN statistics over each eighth of the batch: the tolerance
    # above must not let per-device statistics pass for synchronised ones.
    assert len(beyond_tolerance(results, mode, "ghost")) >= 5
    assert abs(results[f"{mode}/ghost/loss"][0] / results[f"{mode}/1/loss"][0] - 1) > LOSS_RTOL


@pytest.mark.parametrize("mode", ["full", "bn"])
def test_replicas_stay_identical_and_frozen_leaves_untouched(results, mode):
    assert results[f"{mode}/{N}/replicated"]
    assert results[f"{mode}/{N}/frozen_unchanged"]


def test_sharded_bn_step_drops_weight_gradient_convolutions(results):
    full, bn = int(results[f"full/{N}/convolutions"]), int(results[f"bn/{N}/convolutions"])
    convs = 9  # resnet8: stem, 3 blocks × 2, 2 projection shortcuts
    assert full == 3 * convs - 1 and bn == 2 * convs - 1


@pytest.mark.slow
def test_batch_not_dividing_over_devices_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.cifar", "--batch_size", "12",
                             "--workdir", str(tmp_path / "run")], cwd=ROOT, env=env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert "batch_size 12 does not divide over 8 devices" in result.stderr
    assert "Traceback" not in result.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cli(data, workdir, *extra):
    return [sys.executable, "-m", "experiments.cifar", "--bn_only", "--model", "resnet8", "--epochs", "2",
            "--batch_size", "8", "--data_dir", data, "--workdir", workdir, *extra]


def srun_env(task: int, port: int):
    """What srun sets for task ``task`` of a 2-task step on this one node (the variables JAX's SLURM
    detection reads); JAX_COORDINATOR_PORT replaces the port it would derive from the job id."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
            "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
            "SLURM_TASKS_PER_NODE": "2", "JAX_COORDINATOR_PORT": str(port)}


def launch_two(data, workdir, extra_env=(None, None), *extra, slurm=False):
    """Two processes of one job: joined by the explicit flags, or (``slurm``) under simulated srun
    variables, as ``--distributed auto`` finds them."""
    port = free_port()
    runner = [sys.executable, os.path.join(ROOT, "tests", "fault_runner.py")]  # the CLI, plus extra_env's fault

    def flags(i):
        return [] if slurm else ["--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                                 "--process_id", str(i)]
    procs = [subprocess.Popen(runner + cli(data, workdir, *flags(i), *extra)[3:], cwd=ROOT,
                              env={**env(1), **(srun_env(i, port) if slurm else {}), **(extra_env[i] or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    return [p.returncode for p in procs], outputs


@pytest.mark.slow
def test_two_processes_under_srun_variables_match_one(tmp_path):
    """jax.distributed over localhost (CPU, gloo collectives), one device per process, joined as
    --distributed auto finds an srun step: from the SLURM variables alone, no cluster flags."""
    data = write_image_folder(str(tmp_path / "data"), per_class=(12, 4))
    single = str(tmp_path / "single")
    subprocess.run(cli(data, single), cwd=ROOT, env=env(1), check=True, timeout=600, capture_output=True)
    multi = str(tmp_path / "multi")
    codes, outputs = launch_two(data, multi, slurm=True)
    assert codes == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]

    summary = json.load(open(os.path.join(multi, "summary.json")))
    assert summary["process_count"] == 2 and summary["device_count"] == 2
    assert summary["cluster"] == "slurm" and summary["host_count"] == 1 and summary["local_device_count"] == 1
    # Each process keeps its own log; process 1, silent on the terminal, logged its start-up.
    for i in range(2):
        log = open(os.path.join(multi, "logs", f"process_{i}.log")).read()
        assert f"process {i} of 2" in log.splitlines()[0]
        assert "2 cpu device(s), 4 images per device" in log
    assert "final test accuracy" in open(os.path.join(multi, "logs", "process_0.log")).read()
    assert "2 cpu device(s)" not in outputs[1][0] + outputs[1][1]
    assert summary["per_device_batch_size"] == 4
    a = [json.loads(line) for line in open(os.path.join(single, "metrics.jsonl"))]
    b = [json.loads(line) for line in open(os.path.join(multi, "metrics.jsonl"))]
    assert len(a) == len(b) == 2  # written once, by process 0
    for x, y in zip(a, b):
        for key in ("train_loss", "test_loss", "train_accuracy", "test_accuracy"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key

    config, _ = config_lib.load(os.path.join(single, "config.json"))
    fresh = train.create_train_state(config, 3, (8, 8, 3), steps_per_epoch=4)
    s, m = checkpoints.restore(single, fresh), checkpoints.restore(multi, fresh)
    for (path, x), y, x0 in zip(jax.tree_util.tree_leaves_with_path((s.params, s.batch_stats)),
                                jax.tree_util.tree_leaves((m.params, m.batch_stats)),
                                jax.tree_util.tree_leaves((fresh.params, fresh.batch_stats))):
        assert reassociated(y, x, x0), jax.tree_util.keystr(path)


@pytest.mark.parametrize("loop", ["step", "fused"])
@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes(tmp_path, loop):
    """Preemption in a multi-host job: the processes agree (all-gather) on when to stop."""
    data = write_image_folder(str(tmp_path / "data"), per_class=(12, 4))
    single = str(tmp_path / "single")
    subprocess.run(cli(data, single), cwd=ROOT, env=env(1), check=True, timeout=600, capture_output=True)
    multi = str(tmp_path / "multi")
    codes, outputs = launch_two(data, multi, (None, {"BN_JAX_TEST_SIGTERM_AT_STEP": "2"}), "--loop", loop)
    assert codes == [75, 75], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert sorted(int(s) for s in os.listdir(os.path.join(multi, "checkpoints")) if s.isdigit()) == [4]
    codes, outputs = launch_two(data, multi, (None, None), "--loop", loop)  # the same command resumes
    assert codes == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    a = [json.loads(line) for line in open(os.path.join(single, "metrics.jsonl"))]
    b = [json.loads(line) for line in open(os.path.join(multi, "metrics.jsonl"))]
    assert [r["epoch"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert x["test_loss"] == pytest.approx(y["test_loss"], rel=1e-5)
