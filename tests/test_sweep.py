"""Sweep naming, skipping and command printing (no training: the runner is replaced)."""

import json
import os

import pytest

from bn_jax import cli, workdir
from bn_jax.config import ExperimentConfig, RuntimeConfig
from experiments import sweep


def prefix(name):
    """A run name without its experiment hash (checked to be 8 hex digits)."""
    readable, digest = name.rsplit("-", 1)
    assert len(digest) == 8 and int(digest, 16) >= 0
    return readable


def test_modes_preset_names_every_mode_once(tmp_path):
    runs = sweep.plan("modes", str(tmp_path), ["--epochs", "2"])
    names = [prefix(name) for name, _, _ in runs]
    assert names == ["resnet20_w1_full_s0", "resnet20_w1_bn_s0", "resnet20_w1_bn_output_s0",
                     "resnet20_w1_output_s0", "resnet20_w1_gamma_only_s0", "resnet20_w1_beta_only_s0",
                     "resnet20_w1_random_k_k2_s0", "resnet20_w1_no_affine_s0"]
    assert all(state == "todo" for _, state, _ in runs)
    assert runs[1][2][-4:] == ["--epochs", "2", "--workdir", str(tmp_path / runs[1][0])]


def test_names_carry_non_default_hyperparameters(tmp_path):
    names = [prefix(n) for n, _, _ in sweep.plan("width", str(tmp_path), ["--bn_placement", "after", "--seed", "3"])]
    assert "resnet14_w32_bn_bnafter_s3" in names and len(names) == 12
    k5 = [prefix(n) for n, _, _ in sweep.plan("modes", str(tmp_path), ["--k", "5"])]
    assert "resnet20_w1_random_k_k5_s0" in k5


def finish(root, name, config, runtime=RuntimeConfig()):
    os.makedirs(os.path.join(root, name))
    workdir.RunDir(os.path.join(root, name)).write_config(config, runtime, {})
    with open(os.path.join(root, name, "summary.json"), "w") as f:
        json.dump({}, f)


def test_finished_runs_are_skipped_and_changed_configs_refused(tmp_path, capsys):
    root = str(tmp_path)
    named = {prefix(name): name for name, _, _ in sweep.plan("vgg", root, ["--epochs", "3"])}
    # a finished run that differs only in how it executed (eval batch, loop) is the same run
    finish(root, named["vgg11_w1_full_s0"], ExperimentConfig(model="vgg11", train_mode="full", epochs=3),
           RuntimeConfig(eval_batch_size=7, loop="step"))
    # a folder of this name that holds another experiment (another lr) is refused
    finish(root, named["vgg11_w1_bn_s0"], ExperimentConfig(model="vgg11", train_mode="bn", epochs=3, lr=0.05))
    # the same run trained further with --extend_to_epochs 5 is that run, done (before: a conflict)
    finish(root, named["vgg13_w1_bn_s0"], ExperimentConfig(model="vgg13", train_mode="bn", epochs=5))
    os.makedirs(os.path.join(root, named["vgg13_w1_full_s0"]))  # started, never finished: runs again
    runs = sweep.plan("vgg", root, ["--epochs", "3"])
    states = {prefix(name): state for name, state, _ in runs}
    assert states["vgg11_w1_full_s0"] == "done"
    assert states["vgg11_w1_bn_s0"] == "conflict"
    assert states["vgg13_w1_bn_s0"] == "extended"
    assert states["vgg13_w1_full_s0"] == "todo"
    ran, logged = [], []
    failed = sweep.execute(runs, runner=lambda cmd: ran.append(cmd[cmd.index("--workdir") + 1]) or 0,
                           log=logged.append)
    assert failed == 1  # the conflict
    assert len(ran) == 5 and os.path.join(root, named["vgg11_w1_full_s0"]) not in ran
    assert any(line.startswith("[extended]") and "--extend_to_epochs" in line for line in logged)
    # the same grid with other flags is other experiments: other folders, nothing done yet
    assert all(state == "todo" for _, state, _ in sweep.plan("vgg", root, ["--epochs", "4"]))

    # --print_only says what the sweep would: the conflict, with exit 1 (before: nothing, exit 0)
    assert sweep.main(["--preset", "vgg", "--root", root, "--print_only", "--epochs", "3"]) == 1
    out = capsys.readouterr()
    printed = out.out.strip().splitlines()
    assert len(printed) == 5 and all(line.startswith("python -m experiments.cifar --model vgg") for line in printed)
    assert f"[conflict] {named['vgg11_w1_bn_s0']}: config.json differs" in out.err


def test_a_root_that_is_a_file_exits_2_with_one_line(tmp_path, capsys):
    root = tmp_path / "file"
    root.write_text("x")
    with pytest.raises(SystemExit) as exit:
        sweep.main(["--preset", "modes", "--root", str(root)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"cannot use --root {root}" in err and "Traceback" not in err


def test_flags_the_grid_varies_cannot_be_passed_through(tmp_path):
    with pytest.raises(ValueError, match="--train_mode"):
        sweep.plan("modes", str(tmp_path), ["--train_mode", "bn"])
    with pytest.raises(SystemExit) as exit:
        sweep.main(["--preset", "depth", "--root", str(tmp_path), "--model=resnet8"])
    assert exit.value.code == 2


def test_a_preempted_run_stops_the_sweep(tmp_path):
    runs = sweep.plan("modes", str(tmp_path), ["--epochs", "1"])
    ran = []
    failed = sweep.execute(runs, runner=lambda cmd: ran.append(cmd) or cli.EXIT_PREEMPTED, log=lambda *a: None)
    assert failed == 1 and len(ran) == 1  # the later runs wait for the re-run that resumes this one


def test_seeds_multiply_the_grid_and_packs_group_each_points_unfinished_seeds(tmp_path):
    root = str(tmp_path)
    solo = sweep.plan("vgg", root, ["--epochs", "3"], seeds=[0, 1, 2])
    assert len(solo) == 24 and prefix(solo[1][0]) == "vgg11_w1_full_s1"
    first = {prefix(name): name for name, _, _ in solo}
    finish(root, first["vgg11_w1_full_s1"], ExperimentConfig(model="vgg11", train_mode="full", epochs=3, seed=1))
    runs = sweep.plan("vgg", root, ["--epochs", "3"], seeds=[0, 1, 2, 3, 4], pack=2)
    vgg11_full = [(name, state, command) for name, state, command in runs if "vgg11_w1_full" in name]
    # seed 1 is done; seeds 0, 2, 3, 4 train as two packs of two, each one command into the root
    assert [state for _, state, _ in vgg11_full] == ["done", "todo", "todo"]
    packs = [command for _, state, command in vgg11_full if state == "todo"]
    assert [c[c.index("--seeds") + 1] for c in packs] == ["0,2", "3,4"]
    assert all(c[c.index("--workdir") + 1] == root and "--seed" not in c for c in packs)
    # the pack's command names the very runs the solo commands would write
    argv = packs[0][3:]
    command = cli.parse_args(cifar_recipe(), argv)
    assert [os.path.join(root, n) for n in map(config_name, command.members)] == [
        os.path.join(root, first["vgg11_w1_full_s0"]), os.path.join(root, first["vgg11_w1_full_s2"])]


def cifar_recipe():
    from experiments import cifar
    return cifar.RECIPE


def config_name(config):
    from bn_jax.config import run_name
    return run_name(config)


def test_a_seed_flag_cannot_be_passed_through_beside_seeds(tmp_path):
    with pytest.raises(ValueError, match="--seed"):
        sweep.plan("vgg", str(tmp_path), ["--seed", "3"], seeds=[0, 1])


def test_pack_without_seeds_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--preset", "vgg", "--root", str(tmp_path), "--pack", "2", "--print_only"])
    assert e.value.code == 2 and "give --seeds" in capsys.readouterr().err


def test_a_run_another_sweep_is_training_is_busy_not_failed(tmp_path):
    """Two sweeps on one root: each run trains once, and neither calls the other's runs failures."""
    import subprocess
    import sys
    runs = sweep.plan("modes", str(tmp_path), ["--epochs", "1"])[:2]
    held = runs[0][2][runs[0][2].index("--workdir") + 1]
    os.makedirs(held)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom bn_jax import workdir\n"
                               f"with workdir.exclusive({held!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        ran, logged = [], []
        failed = sweep.execute(runs, runner=lambda cmd: ran.append(cmd) or 0, log=logged.append)
        assert failed == 0 and len(ran) == 1  # the free run trained, the held one skipped
        assert logged[0].startswith(f"[busy] {runs[0][0]}: another process is training it")
        # taken between the check and the start: the child fails on the lock (exit 2), which is no failure
        fails_on_lock, answers = [], iter([False, True])  # (free when checked, held once the child started)
        assert sweep.execute(runs[:1], runner=lambda cmd: fails_on_lock.append(cmd) or 2, log=logged.append,
                             busy=lambda run: next(answers)) == 0
        assert len(fails_on_lock) == 1 and "another process took it first" in logged[-1]
    finally:
        holder.kill()
        holder.wait()
    assert not workdir.in_use(held)
