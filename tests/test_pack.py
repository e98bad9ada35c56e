"""Packs: K runs in one compiled step (bn_jax.pack), each member an ordinary run on disk
(bn_jax.pack_run), and which runs may share one (bn_jax.pack_config)."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from bn_jax import datasets, pack, pack_config, pack_run, train
from bn_jax import program as program_lib
from bn_jax.config import ExperimentConfig, RuntimeConfig, run_name

from conftest import write_image_folder
from test_checkpoints import FAULT_RUNNER, REPO, assert_same_run, cli_env, finalized_steps

DATA = datasets.random_dataset(n_train=64, n_test=16, size=16, seed=0)
STEPS = 4
# How far may a member be from the same run trained alone? In a pack every convolution runs
# grouped (one group per member) or over the members' joined batch, and vmap maps the BN
# reductions: the same sums, accumulated in another order. That is the 8-vs-1-device question
# (tests/test_parallel.py): float32 addition is not associative, a ReLU input within rounding of 0
# can flip, and a flip moves a leaf by a small part of its update. So the same bound holds: each
# leaf within 2% of the distance training moved it, plus 4 ulps of its size. Measured here (4 steps
# of ResNet-8, jax 0.10.2, CPU), members with their own weights stayed within 1.4e-5 of that
# distance, and members sharing frozen weights were bit-identical. A member fed another member's
# data order moves its leaves by their whole update (test_swapped_orders_break_the_tolerance).
MOVED_FRACTION = 0.02


def reassociated(other, one, initial) -> bool:
    one, initial = np.asarray(one), np.asarray(initial)
    tolerance = MOVED_FRACTION * np.abs(one - initial).max() + 4 * np.spacing(np.abs(one).max())
    return bool(np.abs(np.asarray(other) - one).max() <= tolerance)


def configs(mode="bn", seeds=(0, 1), **kw):
    return [ExperimentConfig(model="resnet8", batch_size=16, epochs=1, train_mode=mode, seed=s, **kw) for s in seeds]


def solo_steps(config, n=STEPS):
    """(initial params, params after ``n`` steps) of ``config`` trained alone."""
    program = program_lib.build_program(config, RuntimeConfig(loop="step"), DATA, None)
    state = train.create_train_state(config, DATA.num_classes, DATA.image_shape, program.steps_per_epoch)
    initial, totals = jax.device_get(state.params), program.zero_totals()
    for i in range(n):
        state, totals = program.run(state, totals, 0, i, i + 1)
    return initial, jax.device_get(state.params)


def pack_steps(members, n=STEPS, loop="step", swap_orders=False, how="vmap"):
    p = pack.Pack(members, DATA.num_classes, DATA.image_shape, DATA.num_train // members[0].batch_size, how)
    program = pack.PackProgram(p, RuntimeConfig(loop=loop), DATA, None)
    if swap_orders:
        program.order_keys = program.order_keys[::-1]
    state, totals = program.put(p.initial_state()), program.zero_totals()
    if loop == "fused":
        return p, jax.device_get(program.run(state, totals, 0, 0, n)[0].params)
    for i in range(n):
        state, totals = program.run(state, totals, 0, i, i + 1)
    return p, jax.device_get(state.params)


def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def beyond_tolerance(member_params, solo_initial, solo_final):
    return [i for i, (got, want, initial) in enumerate(zip(leaves(member_params), leaves(solo_final),
                                                           leaves(solo_initial)))
            if not reassociated(got, want, initial)]


# ---- which runs may share a pack ----------------------------------------------------------------

def test_seeds_take_lists_and_ranges():
    assert pack_config.parse_seeds("0-3,8") == [0, 1, 2, 3, 8]
    assert pack_config.parse_seeds("5") == [5]


@pytest.mark.parametrize("text, says", [("0,0", "seed 0 twice"), ("0-2,1", "seed 1 twice"), ("3-1", "backwards"),
                                        ("a", "neither a seed"), ("1,,2", "neither a seed"), ("", "neither")])
def test_malformed_seeds_are_refused_in_one_line(text, says):
    with pytest.raises(ValueError, match=says):
        pack_config.parse_seeds(text)


def test_members_are_every_seed_for_every_varied_value():
    options = pack_config.PackOptions(seeds="0-1", vary=["lr=0.1,0.05"], share_init=True).validate()
    members = pack_config.members(ExperimentConfig(model="resnet8"), options)
    assert [(m.seed, m.lr, m.init_seed) for m in members] == [(0, 0.1, 0), (1, 0.1, 0), (0, 0.05, 0), (1, 0.05, 0)]


@pytest.mark.parametrize("field, value", [("batch_size", 64), ("train_mode", "full"), ("model", "resnet14"),
                                          ("epochs", 3), ("schedule", "cosine"), ("precision", "bfloat16")])
def test_a_pack_whose_members_differ_in_shape_or_mode_is_refused_naming_the_field(field, value):
    first, second = configs()
    setattr(second, field, value)
    with pytest.raises(ValueError, match=f"differ in {field} "):
        pack_config.check_pack([first, second])


def test_packs_refuse_a_run_twice_and_mixed_momentum():
    with pytest.raises(ValueError, match="twice"):
        pack_config.check_pack(configs(seeds=(0, 0)))
    first, second = configs()
    second.momentum = 0.0
    with pytest.raises(ValueError, match="momentum 0 and > 0"):
        pack_config.check_pack([first, second])
    with pytest.raises(ValueError, match="may differ only in lr"):
        pack_config.parse_vary("batch_size=64,128")


# ---- a member is the solo run -------------------------------------------------------------------

@pytest.mark.parametrize("mode, share_init, how, extra", [
    ("bn", False, "vmap", {}), ("bn", True, "vmap", {}), ("full", False, "vmap", {}), ("full", True, "vmap", {}),
    ("bn", False, "sequential", {}), ("random_k", False, "vmap", {}), ("no_affine", False, "vmap", {}),
    ("bn", False, "vmap", {"momentum": 0.0}), ("bn", False, "sequential", {"precision": "bfloat16"})])
def test_each_member_matches_its_solo_run_and_keeps_its_frozen_leaves(mode, share_init, how, extra):
    members = configs(mode, init_seed=0 if share_init else None, **extra)
    p, params = pack_steps(members, how=how)
    assert p.shared == (share_init and mode == "bn")  # (full and no_affine train every leaf: nothing to share)
    for m, config in enumerate(members):
        initial, final = solo_steps(config)
        assert p.fresh[m].plan.frozen_hash == train.create_train_state(config, 10, DATA.image_shape, 4).plan.frozen_hash
        assert beyond_tolerance(pack.member_of(params, m), initial, final) == []
        labels = leaves(p.fresh[m].plan.labels)
        for label, got, start in zip(labels, leaves(pack.member_of(params, m)), leaves(initial)):
            if label == "freeze":
                assert np.array_equal(got, start)


@pytest.mark.parametrize("share_init", [False, True])
def test_mapped_bfloat16_members_stay_within_bfloat16_rounding_of_their_solo_run(share_init):
    # In bfloat16 the mapped convolutions round differently from the solo run's, and bfloat16
    # rounding is 2^16 times coarser than float32's, so the float32 bound cannot hold. How far does
    # bfloat16 rounding move a run? As far as the same run differs from its float32 twin: measured
    # here (4 steps), 27% of the distance training moved a leaf; the mapped pack's members, 33-39%.
    # Two bfloat16 computations each that far from float32 may be twice that far apart, so each
    # leaf may differ from its solo run by 2x its solo run's distance from float32.
    members = configs(init_seed=0 if share_init else None, precision="bfloat16")
    _, params = pack_steps(members, how="vmap")
    for m, config in enumerate(members):
        initial, final = solo_steps(config)
        _, final32 = solo_steps(dataclasses.replace(config, precision="float32"))
        for got, want, want32, start in zip(leaves(pack.member_of(params, m)), leaves(final), leaves(final32),
                                            leaves(initial)):
            rounding = np.abs(np.asarray(want) - want32).max()
            assert np.abs(np.asarray(got) - want).max() <= 2 * rounding + 4 * np.spacing(np.abs(want).max())


def test_members_may_differ_in_optimizer_settings_and_bn_init():
    members = configs(seeds=(0, 1))
    members[1].lr, members[1].weight_decay, members[1].momentum = 0.3, 5e-4, 0.5
    members[1].warmup_epochs, members[1].bn_init = 1.0, "ones"
    _, params = pack_steps(members)
    for m, config in enumerate(members):
        initial, final = solo_steps(config)
        assert beyond_tolerance(pack.member_of(params, m), initial, final) == []


def test_swapped_orders_break_the_tolerance():
    members = configs()
    _, params = pack_steps(members, swap_orders=True)
    initial, final = solo_steps(members[0])
    assert len(beyond_tolerance(pack.member_of(params, 0), initial, final)) >= 5


def test_the_fused_loop_trains_a_pack_as_the_step_loop_does():
    members = configs()
    _, stepped = pack_steps(members)
    _, fused = pack_steps(members, loop="fused")
    initial, _ = solo_steps(members[0], 0)
    for m in range(2):
        assert beyond_tolerance(pack.member_of(fused, m), initial, pack.member_of(stepped, m)) == []


@pytest.mark.parametrize("how", ["vmap", "sequential"])
def test_the_fused_program_scores_all_members_on_the_whole_test_set_in_one_call(how):
    """One scan over the test batches for every member: the metrics of one call per batch, bit for
    bit, and each member's own (as its state alone scores)."""
    members = configs()
    p = pack.Pack(members, DATA.num_classes, DATA.image_shape, 2, how)
    program = pack.PackProgram(p, RuntimeConfig(loop="fused", eval_batch_size=8), DATA, None)
    state, _ = program.run(program.put(p.initial_state()), program.zero_totals(), 0, 0, 2)
    one_call = program.evaluate(state)
    program.loop = "step"  # the same state scored one test batch per call
    assert program.evaluate(state) == one_call
    assert one_call[0] != one_call[1]
    for m in range(2):
        alone = program.base.evaluate(pack.member_of(state, m))
        assert alone["accuracy"] == one_call[m]["accuracy"]
        assert alone["loss"] == pytest.approx(one_call[m]["loss"], rel=1e-5)


def convolutions(members, how="vmap"):
    p = pack.Pack(members, DATA.num_classes, DATA.image_shape, 4, how)
    program = pack.PackProgram(p, RuntimeConfig(loop="step"), DATA, None)
    text = program.compile(program.put(p.initial_state()), program.zero_totals()).as_text()
    return [line for line in text.splitlines() if " convolution(" in line]


def test_per_member_weights_run_grouped_and_shared_weights_run_over_the_joined_batch():
    grouped, joined = convolutions(configs()), convolutions(configs(init_seed=0))
    assert grouped and all("feature_group_count=2" in line for line in grouped if "window={size=3x3" in line)
    assert not any("feature_group_count" in line for line in joined)
    assert any("f32[32,16,16," in line for line in joined)  # two members' 16 images as one batch of 32
    # one after another: each member's own convolutions, on its own batch of 16
    sequential = convolutions(configs(), "sequential")
    assert len(sequential) == 2 * len(convolutions(configs(seeds=(0,))))
    assert not any("feature_group_count" in line or "f32[32,16,16," in line for line in sequential)


def test_auto_runs_the_members_one_after_another_on_a_cpu_only():
    assert pack.resolve_members("auto", platform="cpu") == "sequential"
    assert pack.resolve_members("auto", platform="gpu") == "vmap"
    assert pack.resolve_members("vmap", platform="cpu") == "vmap"


# ---- every member an ordinary run on disk ---------------------------------------------------------

def metrics_of(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_second", "wall_time")}
                for line in f]


def test_members_are_written_as_their_solo_runs_and_a_finished_member_is_not_trained_again(tmp_path):
    members, logged = configs(seeds=(0, 1)), []
    summaries = pack_run.train_pack(members, str(tmp_path), data=DATA, log=logged.append)
    solo = tmp_path / "solo"
    want = train.train_and_evaluate(members[1], str(solo), data=DATA, log=lambda *a: None)
    folder = str(tmp_path / run_name(members[1]))
    got = summaries[folder]
    assert got.keys() == want.keys()
    assert got["final_test_accuracy"] == pytest.approx(want["final_test_accuracy"], abs=1 / 16)
    assert json.load(open(os.path.join(folder, "config.json")))["experiment"] == members[1].to_dict()
    np.testing.assert_allclose([m["train_loss"] for m in metrics_of(folder)],
                               [m["train_loss"] for m in metrics_of(solo)], rtol=1e-4)
    assert json.load(open(os.path.join(folder, "pack.json")))["sessions"][0]["members"] == [
        run_name(c) for c in members]
    again = pack_run.train_pack(configs(seeds=(0, 1, 2)), str(tmp_path), data=DATA, log=logged.append)
    assert list(again) == [str(tmp_path / run_name(configs(seeds=(2,))[0]))]
    assert sum("[done]" in line for line in logged) == 2


def test_members_whose_checkpoints_come_from_elsewhere_and_lack_a_common_step_are_refused(tmp_path):
    members = configs(seeds=(0, 1))
    alone = tmp_path / run_name(members[0])
    train.train_and_evaluate(members[0], str(alone), data=DATA, log=lambda *a: None)
    (alone / "summary.json").unlink()  # (an unfinished run with checkpoints, trained alone)
    with pytest.raises(pack_run.checkpoints.CheckpointError, match="last trained in another pack or alone"):
        pack_run.train_pack(members, str(tmp_path), data=DATA, log=lambda *a: None)


def test_a_member_folder_holding_another_experiment_is_refused_before_anything_is_written(tmp_path):
    members = configs()
    other = tmp_path / run_name(members[1])
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"experiment": {**members[1].to_dict(), "lr": 0.5}}))
    with pytest.raises(pack_run.workdir_lib.WorkdirUnusable, match="different lr"):
        pack_run.train_pack(members, str(tmp_path), data=DATA, log=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == [run_name(members[1])]
    assert os.listdir(other) == ["config.json"]


def test_a_pack_too_large_for_the_memory_limit_is_refused_naming_the_largest_that_fits(tmp_path):
    members = configs(seeds=(0, 1, 2, 3))
    p = pack.Pack(members, DATA.num_classes, DATA.image_shape, 4)
    program = pack.PackProgram(p, RuntimeConfig(loop="step"), DATA, None)
    state, totals = program.put(p.initial_state()), program.zero_totals()
    need_4 = pack.footprint(program.compile(state, totals))
    need_1 = pack.footprint(program.compile(state, totals, members=1))
    assert need_1 < need_4
    limit_gb = (need_1 + (need_4 - need_1) / 3 * 1.5) / 2**30  # room for 2.5 members
    with pytest.raises(MemoryError, match="a pack of 4 needs .* the largest pack that fits is 2$"):
        pack_run.train_pack(members, str(tmp_path / "root"), data=DATA, log=lambda *a: None,
                            device_memory_gb=limit_gb)
    assert not (tmp_path / "root").exists()


# ---- the command line: exact resume after SIGKILL, refusals -------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    data = write_image_folder(str(root / "data"), per_class=(8, 2), size=8)
    return {"root": root, "data": data, "cache": str(root / "xla_cache")}


def pack_cli(env, root, *extra, hooks=None, expect=0):
    argv = ["--model", "resnet8", "--bn_only", "--data_dir", env["data"], "--epochs", "3", "--batch_size", "8",
            "--checkpoint_every", "2", "--checkpoint_unit", "steps", "--seeds", "0-2", "--workdir", str(root), *extra]
    proc = subprocess.run([sys.executable, FAULT_RUNNER, *argv], cwd=REPO, env=cli_env(env, hooks),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--pack_members", "vmap", "--small_checkpoints")], ids=["auto", "vmap-small"])
def test_a_pack_killed_at_any_moment_resumes_bitwise_exact(env, flags):
    baseline = env["root"] / f"baseline{len(flags)}"
    pack_cli(env, baseline, *flags)
    folders = sorted(os.listdir(baseline))
    assert len(folders) == 3 and all(finalized_steps(baseline / f) == [6, 8, 9] for f in folders)
    root = env["root"] / f"killed{len(flags)}"
    # SIGKILL after step 3, while the members' asynchronous step-2 saves may be half written
    pack_cli(env, root, *flags, hooks={"BN_JAX_TEST_KILL_AT_STEP": "3"}, expect=-signal.SIGKILL)
    # SIGKILL right after the first member's step-6 checkpoint was handed to the writer: the
    # members now hold different newest steps (which ones depends on the background writes)
    pack_cli(env, root, *flags, hooks={"BN_JAX_TEST_KILL_DURING_SAVE": "6"}, expect=-signal.SIGKILL)
    newest = {max(finalized_steps(root / f), default=None) for f in folders}
    out = pack_cli(env, root, *flags, hooks={"BN_JAX_TEST_SIGTERM_AT_STEP": "7"}, expect=75)
    resumed = re.search(r"resumed the pack from its members' checkpoints of step (\d+)", out.stdout)
    assert resumed or "the pack starts all of them over, and saves the same bits again" in out.stdout
    assert resumed is None or int(resumed.group(1)) <= min(s for s in newest if s is not None)
    out = pack_cli(env, root, *flags)
    assert "resumed the pack from its members' checkpoints of step 7" in out.stdout
    assert sorted(os.listdir(root)) == folders
    for folder in folders:
        assert_same_run(root / folder, baseline / folder)
    sessions = json.load(open(root / folders[0] / "pack.json"))["sessions"]
    assert len(sessions) == 4 and sessions[-1]["from_step"] == 7 and sessions[0]["members"] == folders


@pytest.mark.slow
@pytest.mark.parametrize("flags, says", [(["--seeds", "0,1,1"], "names seed 1 twice"),
                                         (["--vary", "batch_size=8,16"], "may differ only in"),
                                         (["--device_memory_gb", "0.0001"], "the largest pack that fits is 0"),
                                         (["--extend_to_epochs", "3"], "continues one run")])
def test_bad_packs_exit_2_with_one_line_and_write_nothing(env, flags, says):
    root = env["root"] / "refused"
    proc = pack_cli(env, root, *flags, expect=2)
    assert says in proc.stderr.strip().splitlines()[-1]
    assert not root.exists()


def test_pack_vs_solo_pairs_runs_by_folder_name_and_reports_the_largest_difference(tmp_path, capsys):
    from benchmarks import pack_vs_solo

    def write(root, name, accuracy, losses):
        folder = tmp_path / root / name
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"final_test_accuracy": accuracy,
                                                         "best_test_accuracy": accuracy}))
        (folder / "metrics.jsonl").write_text("".join(
            json.dumps({"train_loss": x, "test_loss": x, "test_accuracy": accuracy}) + "\n" for x in losses))

    write("pack", "a", 0.5, [2.0, 1.5])
    write("solo", "a", 0.5, [2.0, 1.25])
    write("pack", "only_in_pack", 0.1, [1.0])
    assert pack_vs_solo.main(["--pack_root", str(tmp_path / "pack"), "--solo_root", str(tmp_path / "solo"),
                              "--out", str(tmp_path / "out")]) == 0
    (row,) = json.load(open(tmp_path / "out" / "pack_vs_solo.json"))["rows"]
    assert row["run"] == "a" and row["max_abs_diff_train_loss"] == 0.25 and row["max_abs_diff_test_accuracy"] == 0
    write("solo", "b", 0.5, [1.0])
    write("pack", "b", 0.5, [1.0, 1.0])
    with pytest.raises(SystemExit):
        pack_vs_solo.main(["--pack_root", str(tmp_path / "pack"), "--solo_root", str(tmp_path / "solo"),
                           "--out", str(tmp_path / "out2")])
    assert "b: 2 epochs in the pack, 1 alone" in capsys.readouterr().err


PACK_ON_DEVICES = """
import sys, numpy as np, jax
from bn_jax import datasets, pack, parallel
from bn_jax.config import ExperimentConfig, RuntimeConfig
data = datasets.random_dataset(n_train=64, n_test=16, size=16, seed=0)
members = [ExperimentConfig(model="resnet8", batch_size=16, epochs=1, train_mode="bn", seed=s) for s in (0, 1)]
out = {}
for n in (1, 2):
    p = pack.Pack(members, 10, data.image_shape, 4, "vmap")
    program = pack.PackProgram(p, RuntimeConfig(loop="step"), data, parallel.make_mesh(n))
    state, totals = program.put(p.initial_state()), program.zero_totals()
    out["initial"] = jax.tree_util.tree_leaves(jax.device_get(state.params))
    for i in range(3):
        state, totals = program.run(state, totals, 0, i, i + 1)
    out[n] = jax.tree_util.tree_leaves(jax.device_get(state.params))
np.savez(sys.argv[1], **{f"{k}/{i}": x for k, leaves in out.items() for i, x in enumerate(leaves)})
"""


@pytest.mark.slow
def test_a_pack_trains_data_parallel_over_two_devices_as_on_one(tmp_path):
    out = tmp_path / "leaves.npz"
    subprocess.run([sys.executable, "-c", PACK_ON_DEVICES, str(out)], cwd=REPO, check=True, timeout=600,
                   env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"})
    leaves = dict(np.load(out))
    count = sum(k.startswith("1/") for k in leaves)
    assert count > 10
    # (the 8-vs-1-device bound: each member's batch is split over the devices, its sums reassociated)
    assert [i for i in range(count) if not reassociated(leaves[f"2/{i}"], leaves[f"1/{i}"], leaves[f"initial/{i}"])] == []
