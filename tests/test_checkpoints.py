"""Preemption-safe runs: exact resume after SIGKILL/SIGTERM/SIGINT, refusals, fallbacks, NaN guard.

The CLI runs in subprocesses on a tiny 8×8 image folder (24 training images, batch 8: 3 steps
per epoch, 3 epochs) with a persistent XLA compilation cache shared by the module, so each run
takes seconds. Faults are hooks installed by tests/fault_runner.py (the CLI plus the fault named
by a BN_JAX_TEST_* variable), which fire at an exact step, so every test is deterministic.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bn_jax import checkpoints, preemption, steps, train
from bn_jax import config as config_lib
from bn_jax.config import ExperimentConfig, RuntimeConfig
from bn_jax import cli as cli_lib
from experiments import cifar

from conftest import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_RUNNER = os.path.join(REPO, "tests", "fault_runner.py")  # the CLI plus the fault a test asks for
TIMING = ("images_per_second", "wall_time")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    data = write_image_folder(str(root / "data"), per_class=(8, 2), size=8)
    return {"root": root, "data": data, "cache": str(root / "xla_cache")}


def flags(env, workdir, *extra):
    return ["--model", "resnet8", "--data_dir", env["data"], "--epochs", "3", "--batch_size", "8",
            "--checkpoint_every", "2", "--checkpoint_unit", "steps", "--workdir", str(workdir), *extra]


def cli_env(env, hooks=None):
    environ = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": env["cache"],
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **(hooks or {})}
    for name in ("BN_JAX_TEST_KILL_AT_STEP", "BN_JAX_TEST_KILL_DURING_SAVE", "BN_JAX_TEST_SIGTERM_AT_STEP",
                 "BN_JAX_TEST_SIGNAL"):
        if name not in (hooks or {}):
            environ.pop(name, None)
    return environ


def cli(env, workdir, *extra, hooks=None, expect=0):
    proc = subprocess.run([sys.executable, FAULT_RUNNER, *flags(env, workdir, *extra)],
                          cwd=REPO, env=cli_env(env, hooks), capture_output=True, text=True, timeout=240)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def finalized_steps(workdir):
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(path) if n.isdigit()) if os.path.isdir(path) else []


def saved_arrays(workdir, step=None):
    """{leaf path: array} of a checkpoint's state item, read back without a target structure."""
    with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               item_names=("state", "meta")) as manager:
        step = manager.latest_step() if step is None else step
        tree = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def assert_same_run(workdir, reference):
    got, want = saved_arrays(workdir), saved_arrays(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), f"{name} differs from the uninterrupted run"
    assert metrics(workdir) == metrics(reference)


@pytest.fixture(scope="module")
def baseline(env):
    """An uninterrupted run: checkpoints at steps 2, 4, 6, 8 and the final 9 (the newest 3 kept)."""
    workdir = env["root"] / "baseline"
    cli(env, workdir)
    assert finalized_steps(workdir) == [6, 8, 9]
    assert [m["epoch"] for m in metrics(workdir)] == [1, 2, 3]
    return workdir


@pytest.mark.slow
def test_kill_and_resume_at_several_points_is_bitwise_exact(env, baseline):
    workdir = env["root"] / "chain"
    # SIGKILL mid-epoch 1 at step 3, one step after the step-2 save (partial epoch sums).
    cli(env, workdir, hooks={"BN_JAX_TEST_KILL_AT_STEP": "3"}, expect=-signal.SIGKILL)
    survived = finalized_steps(workdir)  # the async step-2 save may or may not have finished
    assert survived in ([], [2])
    # Resume; SIGKILL right after the step-6 save is handed to the async writer. Epoch 2's line
    # was already appended, so the resume must neither lose nor duplicate it.
    out = cli(env, workdir, hooks={"BN_JAX_TEST_KILL_DURING_SAVE": "6"}, expect=-signal.SIGKILL)
    assert ("resumed from checkpoint step 2 (epoch 1, step 2 of 3)" in out.stdout) == bool(survived)
    assert 6 not in finalized_steps(workdir), "the kill should have landed before the async save finished"
    assert [m["epoch"] for m in metrics(workdir)] == [1, 2]
    # Resume; SIGUSR1 (SLURM's --signal=B:USR1) after step 7: a checkpoint at step 7 and exit code 75,
    # as for SIGTERM (which the fused-loop and multi-process tests send).
    out = cli(env, workdir, hooks={"BN_JAX_TEST_SIGTERM_AT_STEP": "7", "BN_JAX_TEST_SIGNAL": "SIGUSR1"},
              expect=preemption.EXIT_PREEMPTED)
    assert "SIGUSR1 received" in out.stderr and "step 7" in out.stderr
    assert max(finalized_steps(workdir)) == 7
    out = cli(env, workdir)
    assert "resumed from checkpoint step 7 (epoch 3, step 1 of 3)" in out.stdout
    assert_same_run(workdir, baseline)


@pytest.mark.slow
def test_a_second_run_in_a_busy_workdir_is_refused_naming_the_first(env, baseline, tmp_path):
    workdir = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, "-m", "experiments.cifar", *flags(env, workdir)], cwd=REPO,
                             env=cli_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock, deadline = workdir / ".lock", time.time() + 180
    while f'"pid": {first.pid}' not in (lock.read_text() if lock.exists() else ""):
        assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # it keeps the lock for as long as the second one needs
    try:
        second = cli(env, workdir, expect=2)
    finally:
        first.send_signal(signal.SIGCONT)
    assert f"error: workdir {workdir} in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert "Traceback" not in second.stderr
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert_same_run(workdir, baseline)  # the refused run changed nothing


@pytest.mark.slow
def test_a_killed_runs_lock_does_not_block_its_resume(env, baseline, tmp_path):
    workdir = tmp_path / "killed"
    cli(env, workdir, hooks={"BN_JAX_TEST_KILL_AT_STEP": "5"}, expect=-signal.SIGKILL)
    assert '"pid"' in (workdir / ".lock").read_text()  # left behind, but no process holds it
    out = cli(env, workdir)
    assert "resumed from checkpoint" in out.stdout
    assert_same_run(workdir, baseline)


def start_blocked_in_data_loading(env, tmp_path):
    """A run whose data loading waits on a named pipe: it is provably inside start-up (past
    argument parsing, before training) until the test writes the image into the pipe."""
    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    image = data / "train" / "cat" / "0000.png"
    png = image.read_bytes()
    image.unlink()
    os.mkfifo(image)
    workdir = tmp_path / "run"
    argv = flags(env, workdir)
    argv[argv.index("--data_dir") + 1] = str(data)
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cifar", *argv], cwd=REPO, env=cli_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while True:  # opening the pipe's write end succeeds once the run opened it to read
        try:
            fd = os.open(image, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.stderr and proc.stderr.read()
            time.sleep(0.05)

    def release():
        os.set_blocking(fd, True)
        os.write(fd, png)
        os.close(fd)
        image.unlink()
        image.write_bytes(png)  # a plain file again, for the resume
    return proc, release, argv


@pytest.mark.slow
def test_sigterm_during_start_up_exits_75_at_once(env, baseline, tmp_path):
    # Before: killed by the signal (-15), though the README promises 75.
    proc, release, argv = start_blocked_in_data_loading(env, tmp_path)
    proc.send_signal(signal.SIGTERM)
    release()
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == preemption.EXIT_PREEMPTED, err
    assert "SIGTERM received during start-up: stopped before the first step" in err and "Traceback" not in err
    workdir = argv[argv.index("--workdir") + 1]
    assert not os.path.exists(workdir)  # it stopped right after loading the data
    again = subprocess.run([sys.executable, "-m", "experiments.cifar", *argv], cwd=REPO, env=cli_env(env),
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0
    assert metrics(workdir) == metrics(baseline)


def test_a_second_sigint_stops_at_once_with_one_line(env, tmp_path):
    proc, release, _ = start_blocked_in_data_loading(env, tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    release()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == cli_lib.EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "interrupted: stopped at once on a second SIGINT" in err


@pytest.mark.slow
def test_a_finished_run_is_extended_to_more_epochs_from_its_last_checkpoint(env, baseline, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    refused = cli(env, workdir, "--epochs", "5", expect=2)  # the same flags as before, plus --epochs 5
    assert "pass --extend_to_epochs N" in refused.stderr
    argv = flags(env, workdir)
    del argv[argv.index("--epochs"):argv.index("--epochs") + 2]
    out = subprocess.run([sys.executable, "-m", "experiments.cifar", *argv, "--extend_to_epochs", "5"], cwd=REPO,
                         env=cli_env(env), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert "resumed from checkpoint step 9 (epoch 4, step 0 of 3)" in out.stdout
    assert metrics(workdir)[:3] == metrics(baseline)  # the first three epochs are kept as they were
    assert [m["epoch"] for m in metrics(workdir)] == [1, 2, 3, 4, 5]
    summary = json.load(open(workdir / "summary.json"))
    assert summary["epochs"] == 5 and summary["steps"] == 15
    assert json.load(open(workdir / "config.json"))["experiment"]["epochs"] == 5
    assert cifar.main([*argv, "--extend_to_epochs", "4"]) == 2
    assert "cannot extend to 4 epochs: the run in checkpoint step 15 already has 5" in capsys.readouterr().err
    # Killed while extending to 7 (at step 20, after checkpoints of the extension itself): the same
    # command resumes. Before: exit 2, "already has 7", because those checkpoints hold the 7 epochs.
    killed = subprocess.run([sys.executable, FAULT_RUNNER, *argv, "--extend_to_epochs", "7"], cwd=REPO,
                            env=cli_env(env, {"BN_JAX_TEST_KILL_AT_STEP": "20"}), capture_output=True, text=True,
                            timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    newest = max(finalized_steps(workdir))
    assert newest > 15  # (saved by the extension to 7; the saves after it may still have been in flight)
    again = subprocess.run([sys.executable, "-m", "experiments.cifar", *argv, "--extend_to_epochs", "7"], cwd=REPO,
                           env=cli_env(env), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert f"resumed from checkpoint step {newest}" in again.stdout
    assert [m["epoch"] for m in metrics(workdir)] == [1, 2, 3, 4, 5, 6, 7]
    assert cifar.main([*argv[:-1], str(tmp_path / "empty"), "--extend_to_epochs", "4"]) == 2
    assert "holds no checkpoint to continue from" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


@contextlib.contextmanager
def tmpfs(tmp_path, size):
    """A file system of ``size`` (mount options) that the test can fill or make read-only."""
    folder = tmp_path / "fs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"needs its own small file system: mounting a tmpfs failed ({mounted.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)])


@pytest.mark.slow
def test_a_full_disk_gives_one_line_and_resumes_exactly_once_space_is_freed(env, baseline, tmp_path):
    # Before: exit 1 and 132 lines of tracebacks, no error line.
    with tmpfs(tmp_path, "1200k") as small:
        workdir = small / "run"
        out = cli(env, workdir, expect=2)
        errors = [line for line in out.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and f"no space left on the device holding {workdir}" in errors[0], out.stderr
        assert "bytes" in errors[0] and "is intact" in errors[0]
        assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        cli(env, workdir)
        assert_same_run(workdir, baseline)


def test_a_read_only_checkpoints_folder_is_refused_at_once(env, baseline, tmp_path):
    # Before: the first checkpoint blocked for 311 s, then exit 1.
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    with tmpfs(tmp_path, "64m") as fs:
        shutil.copytree(workdir / "checkpoints", fs, dirs_exist_ok=True)
        subprocess.run(["mount", "--bind", str(fs), str(workdir / "checkpoints")], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(workdir / "checkpoints")], check=True)
            start = time.time()
            out = cli(env, workdir, expect=2)
            assert f"error: cannot write to {workdir / 'checkpoints'} (Read-only file system)" in out.stderr
            assert "Traceback" not in out.stderr and time.time() - start < 120
        finally:
            subprocess.run(["umount", str(workdir / "checkpoints")])


@pytest.mark.parametrize("damage", ["read-only", "folder"])
def test_an_unwritable_metrics_file_is_refused_at_once(env, baseline, tmp_path, damage):
    # Before: a PermissionError traceback when the first epoch's line was written.
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    metrics_file = workdir / "metrics.jsonl"
    if damage == "folder":
        metrics_file.unlink()
        metrics_file.mkdir()
        out = cli(env, workdir, expect=2)
        assert f"error: {metrics_file} is a folder; a run writes a file there" in out.stderr
    else:
        mounted = subprocess.run(["mount", "--bind", str(metrics_file), str(metrics_file)], capture_output=True)
        if mounted.returncode:  # (as root the permission bits grant everything: a read-only mount does not)
            pytest.skip(f"needs a read-only bind mount ({mounted.stderr.decode().strip()})")
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(metrics_file)], check=True)
            out = cli(env, workdir, expect=2)
            assert f"error: cannot write to {metrics_file} (read-only)" in out.stderr
        finally:
            subprocess.run(["umount", str(metrics_file)])
        assert metrics(workdir) == metrics(baseline)  # nothing lost
    assert "Traceback" not in out.stderr and out.stderr.startswith("usage: ")


@pytest.mark.slow
def test_fused_loop_stops_at_the_signalled_step_and_resumes_bitwise(env, tmp_path):
    """The fused loop ends a compiled call at every step that must reach the host."""
    fused = ("--loop", "fused", "--steps_per_call", "100")
    reference = tmp_path / "fused_reference"
    cli(env, reference, *fused)
    workdir = tmp_path / "fused"
    out = cli(env, workdir, *fused, hooks={"BN_JAX_TEST_SIGTERM_AT_STEP": "5"}, expect=preemption.EXIT_PREEMPTED)
    assert "step 5" in out.stderr and max(finalized_steps(workdir)) == 5
    out = cli(env, workdir, *fused, "--steps_per_call", "1")  # steps per call may change on resume
    assert "resumed from checkpoint step 5 (epoch 2, step 2 of 3)" in out.stdout
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_external_sigint_saves_a_checkpoint_and_exits_75(env):
    workdir = env["root"] / "sigint"
    environ = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": env["cache"],
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    # Enough epochs that the run is still training when the signal lands; same recipe otherwise.
    argv = flags(env, workdir) + ["--epochs", "200", "--schedule", "constant"]
    proc = subprocess.Popen([sys.executable, "-u", "-m", "experiments.cifar", *argv], cwd=REPO, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 2:"):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == preemption.EXIT_PREEMPTED, err
    assert "SIGINT received" in err
    step = max(finalized_steps(workdir))
    assert f"at step {step} " in err
    epochs_done = [m["epoch"] for m in metrics(workdir)]
    assert epochs_done == list(range(1, step // 3 + 1))
    assert all(np.all(np.isfinite(a)) for a in saved_arrays(workdir, step).values()
               if np.issubdtype(a.dtype, np.floating))


def test_incompatible_config_is_refused_naming_keys(env, baseline, capsys):
    code = cifar.main(flags(env, baseline, "--width", "2", "--batch_size", "4", "--train_mode", "bn"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("usage: python -m experiments.cifar")
    [err] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "batch_size" in err and "width" in err and "train_mode" in err and "model" not in err.split("(")[0]
    assert finalized_steps(baseline) == [6, 8, 9]  # untouched


def test_runs_saved_before_a_config_key_existed_still_match_its_legacy_default():
    saved = ExperimentConfig().to_dict()
    del saved["normalize"]  # as runs saved before --normalize existed
    assert config_lib.different_keys(saved, ExperimentConfig()) == []
    assert config_lib.different_keys(saved, ExperimentConfig(normalize="imagenet")) == ["normalize"]


def test_eval_batch_size_may_change_on_resume(env, baseline, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    assert cifar.main(flags(env, workdir, "--eval_batch_size", "3")) == 0
    assert "resumed from checkpoint step 9" in capsys.readouterr().out
    assert metrics(workdir) == metrics(baseline)


def corrupt(step_dir):
    """Overwrite every array file of a checkpoint's state item with same-length garbage."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


@pytest.mark.slow
def test_corrupt_latest_falls_back_then_errors_when_none_left(env, baseline, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    corrupt(os.path.join(workdir, "checkpoints", "9"))
    # A half-written save (what SIGKILL during a save leaves) must be ignored too.
    shutil.copytree(os.path.join(workdir, "checkpoints", "8"),
                    os.path.join(workdir, "checkpoints", "10.orbax-checkpoint-tmp"))
    out = cli(env, workdir)
    assert "warning: checkpoint step 9" in out.stdout and "resumed from checkpoint step 8" in out.stdout
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr  # one warning line
    assert len(os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == 1
    assert_same_run(workdir, baseline)  # step 9 re-trained from 8 to the same bits

    for step in finalized_steps(workdir):
        corrupt(os.path.join(workdir, "checkpoints", str(step)))
    out = cli(env, workdir, expect=2)
    assert "no restorable checkpoint left" in out.stderr and "--restart" in out.stderr
    # Before: the next run silently started over and rewrote metrics.jsonl.
    kept = metrics(workdir)
    out = cli(env, workdir, expect=2)
    assert "was found corrupt" in out.stderr and "--restart" in out.stderr
    assert metrics(workdir) == kept
    quarantined = len(os.listdir(os.path.join(workdir, "corrupt_checkpoints")))
    out = cli(env, workdir, "--restart")
    assert (f"--restart: deleting {quarantined} quarantined checkpoint(s) in "
            f"{os.path.join(workdir, 'corrupt_checkpoints')}") in out.stdout  # never deleted unsaid
    assert_same_run(workdir, baseline)


def test_a_checkpoint_that_no_longer_fits_the_train_state_is_refused_not_quarantined(tmp_path):
    # Before: any restore error moved the checkpoint aside, so an optax release that shapes its
    # state otherwise would have quarantined every good checkpoint.
    import optax
    from conftest import random_dataset
    data = random_dataset(n_train=16, n_test=8)
    config = ExperimentConfig(model="resnet8", train_mode="bn", epochs=1, batch_size=8)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir, data=data, log=lambda *a: None, runtime=RuntimeConfig(loop="step"))
    state = train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=2)
    state = state.replace(tx=optax.adam(1e-3), opt_state=optax.adam(1e-3).init(state.params))
    expected = checkpoints.RunMeta(config.to_dict(), data.fingerprint(), state.plan.frozen_hash)
    with checkpoints.Checkpointer(workdir, checkpoints.CheckpointOptions(), log=lambda *a: None) as ckpt:
        with pytest.raises(checkpoints.CheckpointError, match="readable but does not fit this code's train state"):
            ckpt.restore_latest(state, steps.zero_totals(), expected)
    assert finalized_steps(workdir) == [2]
    assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_a_checkpoint_denied_by_permissions_is_refused_not_quarantined(tmp_path, monkeypatch):
    # Before: a checkpoint this user could not read was moved aside as corrupt, and then --restart deleted it.
    from conftest import random_dataset
    data = random_dataset(n_train=16, n_test=8)
    config = ExperimentConfig(model="resnet8", train_mode="bn", epochs=1, batch_size=8)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir, data=data, log=lambda *a: None, runtime=RuntimeConfig(loop="step"))
    state = train.create_train_state(config, 10, (32, 32, 3), steps_per_epoch=2)
    expected = checkpoints.RunMeta(config.to_dict(), data.fingerprint(), state.plan.frozen_hash)

    def denied(*args):  # what tensorstore raises for a file without read permission (root reads any file)
        try:
            raise PermissionError(13, "Permission denied", os.path.join(workdir, "checkpoints", "2", "state"))
        except PermissionError as e:
            raise ValueError("PERMISSION_DENIED: error opening the array") from e
    monkeypatch.setattr(checkpoints, "_read_state", denied)
    with checkpoints.Checkpointer(workdir, checkpoints.CheckpointOptions(), log=lambda *a: None) as ckpt:
        with pytest.raises(checkpoints.CheckpointError, match="checkpoint step 2 cannot be read: permission denied"):
            ckpt.restore_latest(state, steps.zero_totals(), expected)
    assert finalized_steps(workdir) == [2]
    assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_permission_errors_are_told_from_bad_bytes():
    def chained(outer, inner):
        try:
            raise inner
        except BaseException as e:
            try:
                raise outer from e
            except BaseException as wrapped:
                return wrapped
    assert checkpoints.permission_denied(chained(ValueError("read failed"), PermissionError(13, "no")))
    assert checkpoints.permission_denied(ValueError("PERMISSION_DENIED: open"))
    assert not checkpoints.permission_denied(chained(ValueError("read failed"), EOFError("truncated")))
    assert not checkpoints.permission_denied(ValueError("DATA_LOSS: checksum mismatch"))


@pytest.mark.slow
def test_a_checkpoint_folder_replaced_by_a_file_is_named(env, baseline, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(baseline, workdir)
    newest = workdir / "checkpoints" / "9"
    shutil.rmtree(newest)
    newest.write_text("not a checkpoint")
    out = cli(env, workdir)
    assert f"warning: {newest} is a file, not a checkpoint folder; ignoring it" in out.stdout
    assert "resumed from checkpoint step 8" in out.stdout
    for step in finalized_steps(workdir):  # every checkpoint folder a file: nothing to resume
        shutil.rmtree(workdir / "checkpoints" / str(step))
        (workdir / "checkpoints" / str(step)).write_text("x")
    out = cli(env, workdir, expect=2)
    assert "is a file, not a checkpoint folder (and 2 more), and no checkpoint folder is left" in out.stderr


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_keeps_good_checkpoints(env, tmp_path):
    workdir = tmp_path / "nan"
    extra = ("--lr", "1e12", "--checkpoint_every", "1", "--keep", "100")
    out = cli(env, workdir, *extra, expect=3)
    assert "non-finite" in out.stderr
    steps = finalized_steps(workdir)
    assert steps, "at least the first steps should have been finite and saved"
    bad = int(re.search(r"at step (\d+)", out.stderr).group(1))
    assert max(steps) <= bad
    for step in steps:
        assert all(np.all(np.isfinite(a)) for a in saved_arrays(workdir, step).values()
                   if np.issubdtype(a.dtype, np.floating))
    before = {s: saved_arrays(workdir, s) for s in steps}
    out = cli(env, workdir, *extra, expect=3)  # resumes from the last good one and stops again
    assert finalized_steps(workdir) == steps
    for s in steps:
        assert all(np.array_equal(before[s][k], v) for k, v in saved_arrays(workdir, s).items())


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


@pytest.mark.slow
def test_small_checkpoints_resume_exactly_and_refuse_other_frozen_weights(env, tmp_path, monkeypatch):
    bn = ("--train_mode", "bn", "--keep", "1")
    full, small = tmp_path / "full", tmp_path / "small"
    cli(env, full, *bn)
    cli(env, small, *bn, "--small_checkpoints", hooks={"BN_JAX_TEST_KILL_AT_STEP": "5"}, expect=-signal.SIGKILL)
    cli(env, small, *bn, "--small_checkpoints")
    # Restored into a fresh state, the small checkpoint is the full one, bit for bit.
    config = cli_lib.parse_args(cifar.RECIPE, flags(env, small, *bn)).experiment
    fresh = train.create_train_state(config, 3, (8, 8, 3), steps_per_epoch=3)
    a = checkpoints.restore(str(small), fresh)
    b = checkpoints.restore(str(full), fresh)
    for x, y in zip(jax.tree_util.tree_leaves((a.params, a.batch_stats, a.opt_state, a.step)),
                    jax.tree_util.tree_leaves((b.params, b.batch_stats, b.opt_state, b.step))):
        assert np.array_equal(x, y)
    assert metrics(small) == metrics(full)
    assert dir_bytes(small / "checkpoints") < dir_bytes(full / "checkpoints") / 2

    # Frozen weights that differ from the saved hash (a changed init recipe) are refused.
    original = train.models.init_variables

    def perturbed(*args, **kwargs):
        v = original(*args, **kwargs)
        return {**v, "params": jax.tree_util.tree_map(lambda x: x + 1e-3, v["params"])}

    monkeypatch.setattr(train.models, "init_variables", perturbed)
    command = cli_lib.parse_args(cifar.RECIPE, flags(env, small, *bn, "--small_checkpoints"))
    with pytest.raises(checkpoints.CheckpointError, match="frozen"):
        train.train_and_evaluate(command.experiment, command.workdir, runtime=command.runtime,
                                 checkpoint_options=command.checkpoint_options, log=lambda *_: None)


def test_workdir_with_results_but_no_checkpoint_is_not_clobbered(env, tmp_path, capsys):
    workdir = tmp_path / "old"
    workdir.mkdir()
    (workdir / "summary.json").write_text("{}")
    assert cifar.main(flags(env, workdir)) == 2
    assert "--restart" in capsys.readouterr().err
    assert (workdir / "summary.json").read_text() == "{}"
    # --restart is the explicit way to overwrite it.
    assert cifar.main(flags(env, workdir, "--restart", "--epochs", "0")) == 0
    assert "--restart: removed earlier outputs" in capsys.readouterr().out
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 0
    assert finalized_steps(workdir) == [0]
