import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from bn_jax import checkpoints, cli, train, train_modes
from bn_jax.config import ExperimentConfig
from experiments import cifar

from conftest import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.cifar", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_end_to_end_bn_only_run_writes_documented_files(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), per_class=(12, 4))
    workdir = str(tmp_path / "run")
    result = run_cli("--bn_only", "--model", "resnet8", "--epochs", "2", "--batch_size", "8",
                     "--data_dir", data, "--workdir", workdir, "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "trainable" in result.stdout

    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    config = saved["experiment"]
    assert config["train_mode"] == "bn" and config["model"] == "resnet8" and config["seed"] == 3
    assert saved["runtime"]["data_dir"] == data and saved["provenance"]["versions"]["jax"] == jax.__version__

    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert [r["step"] for r in lines] == [4, 8]  # 36 images // batch 8 = 4 steps per epoch
    for r in lines:
        assert set(r) >= {"epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                          "test_top5_accuracy", "images_per_second", "wall_time"}
        assert r["test_top5_accuracy"] == 1.0  # 3 classes: the label is always among the top 5
        assert 0 <= r["test_accuracy"] <= 1 and r["images_per_second"] > 0
    # The learning rate of each epoch's last step: 0.1 until half of the 8 steps, then ×0.1 at steps 4 and 6.
    assert [r["lr"] for r in lines] == pytest.approx([0.1, 0.001])

    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["train_mode"] == "bn" and summary["steps"] == 8
    assert summary["final_test_accuracy"] == lines[-1]["test_accuracy"]
    assert summary["final_test_top5_accuracy"] == 1.0
    assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in lines)
    assert summary["device_count"] >= 1 and summary["device_kind"]
    per_class = {"train": {"cat": 12, "dog": 12, "frog": 12}, "test": {"cat": 4, "dog": 4, "frog": 4}}
    assert summary["examples_per_class"] == summary["examples_per_class_loaded"] == per_class
    assert "data: 3 classes; train 36 (12 per class); test 12 (4 per class)" in result.stdout
    assert (summary["process_count"], summary["host_count"], summary["cluster"]) == (1, 1, "single process")
    assert summary["local_device_count"] == jax.local_device_count()
    # The run's log holds what the terminal showed: the start-up lines, each epoch's line (the bar,
    # which clears itself, leaves no line behind), the result.
    log = open(os.path.join(workdir, "logs", "process_0.log")).read()
    assert log.startswith("=== ") and "process 0 of 1" in log.splitlines()[0]
    for line in ("data: 3 classes; train 36 (12 per class); test 12 (4 per class)", "epoch 2: train loss",
                 "final test accuracy"):
        assert line in log
    assert "\r" not in log

    versions = summary["provenance"]["versions"]
    assert versions["jax"] == jax.__version__ and versions["flax"] and versions["orbax-checkpoint"]
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the tests run from a git checkout (CI: a fresh clone)
        assert summary["provenance"]["git"]["commit"] == head.stdout.strip()

    # The checkpoint restores into a fresh state: frozen leaves equal the init, BN leaves moved.
    fresh = train.create_train_state(ExperimentConfig(**config), 3, (8, 8, 3), steps_per_epoch=4)
    restored = checkpoints.restore(workdir, fresh)
    assert int(restored.step) == 8
    mask = jax.tree_util.tree_leaves(train_modes.trainable_mask(train_modes.variables_of(fresh), "bn"))
    for a, b, trainable in zip(jax.tree_util.tree_leaves(fresh.params),
                               jax.tree_util.tree_leaves(restored.params), mask):
        assert np.array_equal(a, b) != trainable
    assert summary["trainable_params"] == train_modes.count(train_modes.variables_of(fresh), "bn")[0]


BAD_FLAGS = {
    "unknown model": (["--model", "resnext9"], "unknown model"),
    "depth not 6n+2": (["--model", "resnet21"], "6n+2"),
    "imagenet model": (["--model", "imagenet_resnet18"], "ImageNet model: train it with python -m experiments.imagenet"),
    "batch size 0": (["--batch_size", "0"], "batch_size must be >= 1"),
    "negative epochs": (["--epochs", "-1"], "epochs must be >= 0"),
    "unknown mode": (["--train_mode", "most"], "invalid choice"),
    "conflicting mode": (["--bn_only", "--train_mode", "output"], "conflicts"),
    "bn_only with explicit full": (["--bn_only", "--train_mode", "full"], "conflicts"),
    "partial cluster flags": (["--num_processes", "2", "--process_id", "0"], "go together"),
    "distributed off with a coordinator": (["--distributed", "off", "--coordinator_address", "h:1", "--num_processes",
                                            "2", "--process_id", "0"], "--distributed off conflicts"),
    "distributed on outside a job": (["--distributed", "on"], "--distributed on: no multi-process job found"),
    "repeated device ids": (["--local_device_ids", "0,1,1"], "distinct device indices"),
    "momentum of one or more": (["--momentum", "1.5"], "momentum must be < 1.0, got 1.5"),
    "warm-up beyond a million epochs": (["--warmup_epochs", "1e308"], "warmup_epochs must be <= 1000000"),
    "missing data": (["--data_dir", "/no/such/folder"], "does not exist"),
    "negative lr": (["--lr", "-1"], "lr must be >= 0"),
    "nan lr": (["--lr", "nan"], "lr must be a finite number, got nan"),
    "inf lr": (["--lr", "inf"], "lr must be a finite number, got inf"),
    "lr overflowing to inf": (["--lr", "1e400"], "lr must be a finite number, got inf"),
    "nan momentum": (["--momentum", "nan"], "momentum must be a finite number"),
    "inf momentum": (["--momentum", "inf"], "momentum must be a finite number"),
    "inf weight decay": (["--weight_decay", "inf"], "weight_decay must be a finite number"),
    "nan warm-up": (["--warmup_epochs", "nan"], "warmup_epochs must be a finite number"),
    "huge seed": (["--seed", str(2**70)], "seed must be <= 2147483647"),
    "negative seed": (["--seed", "-1"], "seed must be >= 0"),
    "a billion epochs": (["--epochs", "1000000000"], "epochs must be <= 1000000"),
    "zero width": (["--width", "0"], "width must be >= 1"),
    "epochs not an integer": (["--epochs", "1e9"], "invalid int value: '1e9'"),
    "zero k": (["--k", "0"], "k must be >= 1"),
    "empty subset": (["--max_train_examples", "0"], "max_train_examples must be >= 1"),
    "empty test subset": (["--max_test_examples", "-5"], "max_test_examples must be >= 1"),
    "unknown schedule": (["--schedule", "linear"], "invalid choice"),
    "unknown precision": (["--precision", "float16"], "invalid choice"),
    "unknown normalisation": (["--normalize", "cifar"], "invalid choice"),
    "zero eval batch": (["--eval_batch_size", "0"], "eval_batch_size must be >= 1"),
    "unknown loop": (["--loop", "scan"], "invalid choice"),
    "zero steps per call": (["--steps_per_call", "0"], "steps_per_call must be >= 1"),
    "zero devices": (["--num_devices", "0"], "num_devices must be >= 1"),
    "zero checkpoint period": (["--checkpoint_every", "0"], "checkpoint_every must be >= 1"),
    "keep none": (["--keep", "0"], "keep must be >= 1"),
    "extend and restart": (["--extend_to_epochs", "9", "--restart"], "--restart discards it"),
    "extend disagreeing with epochs": (["--extend_to_epochs", "9", "--epochs", "5"], "disagree"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_exit_2_with_one_line(case, capsys):
    argv, message = BAD_FLAGS[case]
    with pytest.raises(SystemExit) as exit:
        cifar.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [line.startswith("usage:") for line in err.splitlines()].count(True) == 1
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_unreachable_coordinator_gives_up_naming_address_and_flag(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as exit:
        cifar.main(["--coordinator_address", f"localhost:{port}", "--num_processes", "2", "--process_id", "1",
                    "--coordinator_timeout_s", "1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    assert f"no coordinator answered at localhost:{port} within 1 s" in err and "--coordinator_timeout_s" in err


@pytest.mark.parametrize("workdir, message", [
    ("x" * 256, "bytes; this file system allows 255"),
    ("/".join(["d" * 200] * 20), "with the files a run writes inside it"),
])
def test_overlong_workdir_names_exit_2_and_create_nothing(tmp_path, monkeypatch, capsys, workdir, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        cifar.main(["--workdir", workdir])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_unwritable_workdir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exit:
        cifar.main(["--workdir", str(blocker / "run")])
    assert exit.value.code == 2 and "cannot write to workdir" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_data_exits_2_naming_the_file_and_writes_nothing(tmp_path):
    data = write_image_folder(str(tmp_path / "data"))
    bad = os.path.join(data, "train", "cat", "0002.png")
    open(bad, "wb").write(b"\x89PNG broken")
    workdir = tmp_path / "run"
    result = run_cli("--model", "resnet8", "--epochs", "1", "--data_dir", data, "--workdir", str(workdir))
    assert result.returncode == 2
    assert "0002.png: cannot decode" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("usage: python -m experiments.cifar")
    assert not workdir.exists()


@pytest.mark.slow
def test_help_explains_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for action in cli.build_parser(cifar.RECIPE)._actions:
        assert action.help, f"{action.option_strings} has no help"
        assert action.option_strings[0] in result.stdout
