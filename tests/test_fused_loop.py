"""The fused loop (many steps per compiled call, data and shuffling on the device) against the
one-call-per-step loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_jax import augmentation, steps, train
from bn_jax import program as program_lib
from bn_jax.config import ExperimentConfig, RuntimeConfig

from conftest import random_dataset

DATA = random_dataset(n_train=80, n_test=16)  # 5 steps of 16 per epoch
JIT_EPOCH_STEPS = program_lib.jit_epoch_steps


def config(**kw):
    base = dict(model="resnet8", train_mode="bn", epochs=2, batch_size=16, lr=0.02, schedule="cosine",
                seed=3)  # a small lr: float reassociation stays small
    return ExperimentConfig(**{**base, **kw})


def runtime(**kw):
    return RuntimeConfig(**{"loop": "fused", "eval_batch_size": 16, **kw})


def run(monkeypatch, tmp_path, name, mode="bn", **kw):
    """Train; return (final state, summary, the (start, stop) of every compiled step call)."""
    calls, states, compiled = [], [], []

    def counting(cfg, rt, mesh=None):
        fn = JIT_EPOCH_STEPS(cfg, rt, mesh)
        compiled.append(fn)

        def wrapped(*args):
            calls.append(tuple(int(a) for a in args[4:6]))
            out = fn(*args)
            states[:] = [out[0]]
            return out
        return wrapped

    monkeypatch.setattr(program_lib, "jit_epoch_steps", counting)
    summary = train.train_and_evaluate(config(train_mode=mode), str(tmp_path / name), data=DATA,
                                       log=lambda *a: None, runtime=runtime(**kw))
    if kw.get("loop", "fused") == "fused":  # one compilation per distinct call length, at most 2, then one for all
        lengths = len({b - a for a, b in calls})
        assert compiled[0].lengths_compiled() == (lengths if lengths <= 2 else 3)
    return jax.device_get(states[0]), summary, calls


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mode", ["bn", "full"])
def test_fused_loop_matches_step_loop(monkeypatch, tmp_path, mode):
    fused, fused_summary, fused_calls = run(monkeypatch, tmp_path, "fused", mode=mode, loop="fused",
                                            steps_per_call=2)
    step, step_summary, step_calls = run(monkeypatch, tmp_path, "step", mode=mode, loop="step")
    assert int(fused.step) == int(step.step) == 10
    # 5 steps per epoch in calls of at most 2 steps: [0,2) [2,4) [4,5) per epoch; one call per step otherwise.
    assert fused_calls == [(0, 2), (2, 4), (4, 5)] * 2
    assert len(step_calls) == 10
    assert_trees_close(fused.params, step.params)
    assert_trees_close(fused.batch_stats, step.batch_stats)
    assert fused_summary["final_test_accuracy"] == pytest.approx(step_summary["final_test_accuracy"], abs=1 / 16)


def test_steps_per_call_does_not_change_a_single_bit(monkeypatch, tmp_path):
    """What makes a resume exact: a run split into other calls computes the same steps."""
    a, _, calls_a = run(monkeypatch, tmp_path, "a", steps_per_call=1)
    b, _, calls_b = run(monkeypatch, tmp_path, "b", steps_per_call=100)
    assert (len(calls_a), len(calls_b)) == (10, 2)
    for x, y in zip(jax.tree_util.tree_leaves((a.params, a.batch_stats, a.opt_state)),
                    jax.tree_util.tree_leaves((b.params, b.batch_stats, b.opt_state))):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_a_fused_call_moves_no_data_between_host_and_device():
    """Once the dataset, order and scalars are on the device, S steps run without a transfer."""
    cfg = config()
    program = program_lib.build_program(cfg, runtime(), DATA, mesh=None)  # what the trainer runs
    state = program.put(train.create_train_state(cfg, 10, (32, 32, 3), steps_per_epoch=5))
    # the loop of 5 steps as the trainer's call of steps 0…4 runs it, its start and first step on the device
    loop = functools.partial(program.steps_fn.jitted, length=5)
    args = (program.train_data, program.order(0), *jax.device_put((np.int32(0), np.int32(0))),
            program.augment_key, program.mean, program.std)
    totals = program.zero_totals()
    loop(state, totals, *args)  # compile outside the guard
    state = program.put(train.create_train_state(cfg, 10, (32, 32, 3), steps_per_epoch=5))
    with jax.transfer_guard("disallow"):
        state, totals = loop(state, totals, *args)
        jax.block_until_ready(state)
    assert int(state.step) == 5 and int(totals["count"]) == 80


def traced_bounds_loop(state, totals, data, order, start, stop, epoch_step, key, mean, std, **kw):
    """The fused loop as it was before it had a static length: a fori_loop over traced bounds."""
    def body(i, carry):
        return steps.train_step_at(*carry, data, order, i, epoch_step + i, key, mean, std, **kw)
    return jax.lax.fori_loop(start, stop, body, (state, totals))


@pytest.mark.parametrize("mode", ["bn", "full"])
def test_static_length_loop_is_bit_identical_to_the_traced_loop(mode):
    """Steps 1…3 of epoch 1 three ways: the static-length loop equals the earlier traced-bounds
    loop bit for bit, leaf by leaf, state and sums. Against three single steps it is as close as
    the traced loop ever was: XLA:CPU compiles a convolution inside a loop body to other code than
    alone (jax-ml/jax#12868), so the last bits differ; ``test_fused_loop_matches_step_loop``."""
    cfg = config(train_mode=mode)
    program = program_lib.build_program(cfg, runtime(), DATA, mesh=None)
    kw = dict(batch_size=16, augment=True)
    args = (program.train_data, program.order(1))
    tail = (5, program.augment_key, program.mean, program.std)
    fresh = lambda: program.put(train.create_train_state(cfg, 10, (32, 32, 3), steps_per_epoch=5))
    static = program.run(fresh(), program.zero_totals(), 1, 1, 4)
    traced = jax.jit(functools.partial(traced_bounds_loop, **kw))(fresh(), program.zero_totals(), *args, 1, 4, *tail)
    one = jax.jit(functools.partial(steps.train_step_at, **kw))
    single = (fresh(), program.zero_totals())
    for i in range(1, 4):
        single = one(*single, *args, i, 5 + i, *tail[1:])
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(static), jax.tree_util.tree_leaves(traced)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)
    if mode == "bn":  # (full training amplifies the differing last bits beyond this tolerance in 3 steps)
        assert_trees_close(static, single)


def test_lengths_beyond_two_share_one_traced_loop_and_change_no_bit():
    """Chunks of 1, 2, 3 and 4 steps (as step checkpoints cut them): 1 and 2 get static loops, 3 and
    4 the one traced-bounds loop; the state equals that of single-length calls bit for bit."""
    cfg = config()
    program = program_lib.build_program(cfg, runtime(), DATA, mesh=None)
    fresh = lambda: program.put(train.create_train_state(cfg, 10, (32, 32, 3), steps_per_epoch=5))
    state, totals = fresh(), program.zero_totals()
    for start, stop in ((0, 1), (1, 3), (3, 5), (0, 3), (3, 4), (4, 5)):  # epochs 0 and 1 (two calls at 0)
        state, totals = program.run(state, totals, 0 if (start, stop) in ((0, 1), (1, 3), (3, 5)) and
                                    int(state.step) < 5 else 1, start, stop)
    assert program.steps_fn.static == [1, 2] and program.steps_fn.jitted._cache_size() == 3
    other = program_lib.build_program(cfg, runtime(), DATA, mesh=None)
    single, single_totals = fresh(), other.zero_totals()
    for step in range(10):
        single, single_totals = other.run(single, single_totals, step // 5, step % 5, step % 5 + 1)
    for x, y in zip(jax.tree_util.tree_leaves((state.params, state.batch_stats, state.opt_state)),
                    jax.tree_util.tree_leaves((single.params, single.batch_stats, single.opt_state))):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_the_fused_loop_has_a_trip_count_xla_knows():
    """XLA records the static loop's trip count on the compiled while loop (what lets a GPU run it
    without asking the host after each step); the traced-bounds loop has no count of 3."""
    cfg = config()
    program = program_lib.build_program(cfg, runtime(), DATA, mesh=None)
    state = program.put(train.create_train_state(cfg, 10, (32, 32, 3), steps_per_epoch=5))
    args = (program.train_data, program.order(0))
    tail = (0, program.augment_key, program.mean, program.std)
    static = program.steps_fn.lower(state, program.zero_totals(), *args, 0, 3, *tail).compile().as_text()
    traced = jax.jit(functools.partial(traced_bounds_loop, batch_size=16, augment=True)).lower(
        state, program.zero_totals(), *args, 0, 3, *tail).compile().as_text()
    assert '"known_trip_count":{"n":"3"}' in static
    assert '"known_trip_count":{"n":"3"}' not in traced  # (other, inner loops have counts of their own)


def test_each_epoch_sees_every_example_once_in_a_new_order():
    key = jax.random.key(0)
    a, b = (np.asarray(augmentation.epoch_order(key, e, 80)) for e in (0, 1))
    assert sorted(a) == sorted(b) == list(range(80))
    assert not np.array_equal(a, b)


def test_auto_loop_is_fused_except_on_cpu():
    assert [program_lib.resolve_loop("auto", p) for p in ("gpu", "tpu", "cpu")] == ["fused", "fused", "step"]
    assert program_lib.resolve_loop("fused", "cpu") == "fused" and program_lib.resolve_loop("step", "gpu") == "step"


def test_bad_loop_and_steps_per_call_are_refused():
    with pytest.raises(ValueError, match="unknown loop 'scan'"):
        runtime(loop="scan").validate()
    with pytest.raises(ValueError, match="steps_per_call must be >= 1"):
        runtime(steps_per_call=0).validate()


def test_step_loop_gathers_the_same_batches_as_the_order_says(monkeypatch):
    """train_step_at's batch i is order[i*B:(i+1)*B] (checked through the labels it counts)."""
    cfg = config()
    state = train.create_train_state(cfg, 10, (32, 32, 3), steps_per_epoch=5)
    labels = jnp.arange(80, dtype=jnp.int32) % 10
    data = (jnp.asarray(DATA.train_images), labels)
    order = jnp.asarray(np.random.default_rng(0).permutation(80), jnp.int32)
    seen = []
    original = steps.train_step

    def spy(state, images, batch_labels, *args):
        seen.append(batch_labels)
        return original(state, images, batch_labels, *args)

    monkeypatch.setattr(steps, "train_step", spy)
    steps.train_step_at(state, steps.zero_totals(), data, order, 2, 2, jax.random.key(0),
                        jnp.zeros(3), jnp.ones(3), batch_size=16, augment=False)
    np.testing.assert_array_equal(seen[0], np.asarray(order[32:48]) % 10)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_evaluation_in_one_call_gives_the_metrics_of_one_call_per_batch(precision):
    """The fused program scores the test set in one scan over padded batches; its metrics equal
    those of one call per batch bit for bit in float32 (20 test images in batches of 8: the last
    is padded). In bfloat16 XLA:CPU compiles the convolutions inside the loop to other code, whose
    bfloat16 roundings move the loss in its 4th or 5th digit and may flip a near-tied prediction
    (one of the 20, with jax 0.12). (The GPU check reports float32 on its device.)"""
    data = random_dataset(n_train=32, n_test=20)
    cfg = config(precision=precision)
    program = program_lib.build_program(cfg, runtime(eval_batch_size=8), data, mesh=None)
    assert program.loop == "fused" and program.test_stack[0].shape[:2] == (3, 8)
    state = program.put(train.create_train_state(cfg, 10, (32, 32, 3), steps_per_epoch=2))
    state, _ = program.run(state, program.zero_totals(), 0, 0, 2)  # running statistics of 2 steps
    one_call = program.evaluate(state)
    per_batch = program_lib.evaluate(state, program.test_batches, program.mean, program.std)
    if precision == "float32":
        assert one_call == per_batch
    else:  # bfloat16 roundings may differ, and flip a near-tied prediction (seen with jax 0.12)
        for k in ("accuracy", "top5_accuracy"):
            assert abs(one_call[k] - per_batch[k]) <= 1 / 20 + 1e-6, k
        # (with jax 0.12 both losses of this tiny bfloat16 net came out NaN alike; unexplained so far)
        assert np.isnan(one_call["loss"]) == np.isnan(per_batch["loss"])
        if not np.isnan(per_batch["loss"]):
            assert one_call["loss"] == pytest.approx(per_batch["loss"], rel=1e-3)
    assert len(program.test_batches) == 3 and program_lib.jit_scan_eval._cache_size() >= 1
    # the padding counts for nothing: the same metrics from the 20 images alone, unpadded batches
    unpadded = [tuple(jax.device_put(a[i:i + 4]) for a in (data.test_images, data.test_labels, np.ones(20, np.float32)))
                for i in range(0, 20, 4)]
    alone = program_lib.evaluate(state, unpadded, program.mean, program.std)
    if precision == "float32":
        assert alone["accuracy"] == one_call["accuracy"]
        assert alone["loss"] == pytest.approx(one_call["loss"], rel=1e-5)
