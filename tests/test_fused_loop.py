"""The fused loop (many steps per compiled call, data and shuffling on the device) against the
one-call-per-step loop."""

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
    if kw.get("loop", "fused") == "fused":  # one compilation for the whole run, whatever the calls
        assert compiled[0]._cache_size() == 1
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
    args = (program.train_data, program.order(0), *jax.device_put((np.int32(0), np.int32(5), np.int32(0))),
            program.augment_key, program.mean, program.std)
    totals = program.zero_totals()
    program.steps_fn(state, totals, *args)  # compile outside the guard
    state = program.put(train.create_train_state(cfg, 10, (32, 32, 3), steps_per_epoch=5))
    with jax.transfer_guard("disallow"):
        state, totals = program.steps_fn(state, totals, *args)
        jax.block_until_ready(state)
    assert int(state.step) == 5 and int(totals["count"]) == 80


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
