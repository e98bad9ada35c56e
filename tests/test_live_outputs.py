"""What a run writes while it trains beside its metrics: live TensorBoard scalars (--tensorboard)
and a jax.profiler trace of chosen steps (--profile_steps)."""

import gzip
import json
import os

import pytest

from bn_jax import train
from bn_jax.config import ExperimentConfig, RuntimeConfig

from conftest import random_dataset

pytestmark = pytest.mark.slow  # (two epochs trained end to end)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2 epochs of 21 steps (the loss is read back at step 20, mid-epoch), traced over steps 3 to 5."""
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("live")
    workdir, logdir = root / "r8", root / "tb"
    config = ExperimentConfig(model="resnet8", epochs=2, batch_size=8, schedule="constant")
    runtime = RuntimeConfig(loop="step", tensorboard=str(logdir), profile_steps="3:5")
    train.train_and_evaluate(config, str(workdir), data=random_dataset(n_train=168, n_test=16, size=8),
                             log=lambda *a: None, runtime=runtime)
    return workdir, logdir


def scalars(logdir):
    from tensorboard.backend.event_processing import event_accumulator
    events = event_accumulator.EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_each_epoch_and_the_running_loss(run):
    workdir, logdir = run
    got = scalars(logdir / "r8")  # DIR/<run folder name>
    lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    for key in ("test_accuracy", "test_loss", "train_loss", "lr"):
        assert got[f"epoch/{key}"] == [(r["step"], pytest.approx(r[key])) for r in lines]
    # mid-epoch, where the loop read the sums back (every 20 steps): the epoch's running mean so far
    assert [s for s, _ in got["train/loss"]] == [20, 41] and [s for s, _ in got["train/accuracy"]] == [20, 41]
    assert all(0 <= v <= 1 for _, v in got["train/accuracy"])


def test_profile_traces_the_steps_asked_for(run):
    workdir, _ = run
    traces = [os.path.join(d, f) for d, _, files in os.walk(workdir / "profile") for f in files]
    assert any(t.endswith(".xplane.pb") for t in traces)  # TensorBoard's profile plugin
    perfetto, = [t for t in traces if t.endswith("perfetto_trace.json.gz")]  # ui.perfetto.dev
    events = json.load(gzip.open(perfetto))
    events = events["traceEvents"] if isinstance(events, dict) else events
    steps = [e for e in events if e.get("name") == "PjitFunction(train_step_at)" and e.get("ph") == "X"]
    # Steps 3 and 4 (the profiler records each call's dispatch once or twice, by its threads; measured
    # twice here, 6 for 3:6): a trace from any earlier step, or of the whole run's 42, holds more.
    assert steps and len(steps) % 2 == 0 and len(steps) <= 4
