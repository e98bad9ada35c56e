"""Joining a cluster job (bn_jax.cluster), the allocated-devices check, the per-process log and the
signals a scheduler sends before a time limit."""

import os
import signal

import jax
import pytest

from bn_jax import cluster, preemption, process_log
from bn_jax.config import ClusterOptions

# What srun sets for task 1 of a 2-task step on nodes node[001-002] (the variables JAX's SLURM
# detection reads, plus the step's task count).
SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2"}
OTHER_LAUNCHERS = ("OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def no_cluster(monkeypatch):
    for name in [*SRUN, *OTHER_LAUNCHERS, "JAX_COORDINATOR_PORT"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def initialize_calls(no_cluster):
    """jax.distributed.initialize replaced by a recorder (a real one would wait for peers)."""
    calls = []
    no_cluster.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    no_cluster.setattr(cluster, "wait_for_coordinator", lambda address, timeout: calls.append({"waited": address}))
    return calls


def test_jax_detection_finds_an_srun_step_and_nothing_outside_one(no_cluster):
    assert cluster.detect() is None
    for name, value in SRUN.items():
        no_cluster.setenv(name, value)
    assert cluster.detect() == cluster.Detected("slurm", 2, 1)
    no_cluster.setenv("SLURM_STEP_NUM_TASKS", "1")  # a batch script running python without srun
    assert cluster.detect().num_processes == 1


def test_auto_joins_an_srun_step_at_jax_s_coordinator_after_waiting_for_it(initialize_calls, no_cluster):
    for name, value in SRUN.items():
        no_cluster.setenv(name, value)
    no_cluster.setenv("JAX_COORDINATOR_PORT", "12399")
    assert cluster.join(ClusterOptions(coordinator_timeout_s=7).validate()) == "slurm"
    assert cluster.JOINED == "slurm"
    waited, call = initialize_calls
    assert waited == {"waited": "node001:12399"}  # the step's first node, as JAX's SLURM rule names it
    assert call["coordinator_address"] == "node001:12399"
    assert (call["num_processes"], call["process_id"]) == (2, 1)
    assert call["local_device_ids"] is None and call["initialization_timeout"] == 7  # JAX's default: one GPU per task


def test_auto_outside_a_job_and_off_inside_one_stay_single_process(initialize_calls, no_cluster):
    assert cluster.join(ClusterOptions().validate()) == "single process"
    for name, value in SRUN.items():
        no_cluster.setenv(name, value)
    no_cluster.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert cluster.join(ClusterOptions().validate()) == "single process"
    no_cluster.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert cluster.join(ClusterOptions(distributed="off").validate()) == "single process"
    assert initialize_calls == []


def test_on_without_a_job_is_refused_in_one_line(initialize_calls):
    with pytest.raises(ValueError, match="--distributed on: no multi-process job found"):
        cluster.join(ClusterOptions(distributed="on").validate())
    assert initialize_calls == []


def test_explicit_flags_pass_all_gpus_of_the_node_for_one_task_per_node(initialize_calls, no_cluster):
    no_cluster.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    options = ClusterOptions(coordinator_address="host0:1234", num_processes=2, process_id=0,
                             local_device_ids="all").validate()
    assert cluster.join(options) == "explicit flags"
    assert initialize_calls[-1]["local_device_ids"] == [0, 1, 2, 3]  # indices among the visible GPUs


def test_local_device_ids():
    assert cluster.local_device_ids(None, {}) is None
    assert cluster.local_device_ids("1,3", {}) == [1, 3]
    assert cluster.local_device_ids("all", {"SLURM_GPUS_ON_NODE": "8"}) == list(range(8))
    with pytest.raises(ValueError, match="cannot tell how many GPUs"):
        cluster.local_device_ids("all", {})


@pytest.mark.parametrize("flags, message", [
    (dict(distributed="off", coordinator_address="h:1", num_processes=2, process_id=0), "conflicts"),
    (dict(local_device_ids="0,0"), "distinct device indices"),
    (dict(local_device_ids="gpu0"), "distinct device indices"),
    (dict(distributed="sometimes"), "unknown distributed"),
])
def test_bad_cluster_options_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        ClusterOptions(**flags).validate()


# (scheduler variables, accelerators this process drives) -> whether the check stops the run
ALLOCATIONS = {
    "one task per node, JAX's one GPU per task": ({"SLURM_JOB_ID": "1", "SLURM_GPUS_ON_NODE": "8",
                                                   "SLURM_TASKS_PER_NODE": "1(x2)"}, 1, True),
    "one task per GPU": ({"SLURM_JOB_ID": "1", "SLURM_GPUS_ON_NODE": "8", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, 1,
                         False),
    "one task per node driving all": ({"SLURM_JOB_ID": "1", "SLURM_GPUS_ON_NODE": "8",
                                       "SLURM_TASKS_PER_NODE": "1"}, 8, False),
    "gpus per task": ({"SLURM_JOB_ID": "1", "SLURM_GPUS_PER_TASK": "a100:2", "SLURM_GPUS_ON_NODE": "8",
                       "SLURM_TASKS_PER_NODE": "4"}, 1, True),
    "visible devices outside SLURM": ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 2, True),
    "no scheduler": ({}, 1, False),
}


@pytest.mark.parametrize("case", list(ALLOCATIONS))
def test_a_process_driving_fewer_gpus_than_allocated_is_stopped(case):
    env, in_use, stops = ALLOCATIONS[case]
    problem = cluster.allocation_problem("gpu", in_use, env)
    assert (problem is not None) == stops
    if stops:
        expected = cluster.allocated("gpu", env)[0]
        assert f"drives {in_use} GPU(s) but was allocated {expected}" in problem
        assert "--ntasks-per-node" in problem and "--local_device_ids all" in problem
    assert cluster.allocation_problem("cpu", in_use, env) is None  # CPU devices are not scheduled


def test_tpu_chips_per_process():
    env = {"TPU_CHIPS_PER_PROCESS_BOUNDS": "2,2,1"}
    assert cluster.allocated("tpu", env)[0] == 4
    assert "allocated 4" in cluster.allocation_problem("tpu", 1, env)
    assert cluster.allocation_problem("tpu", 4, env) is None


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM])
def test_scheduler_signals_ask_for_a_checkpoint(signum):
    """SLURM's --signal=B:USR1 and submitit's USR2 stop the run as SIGTERM does."""
    with preemption.PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signum)
        assert guard.requested and guard.reason == f"{signal.Signals(signum).name} received"
    assert signal.getsignal(signum) is not guard._handle  # given back


def test_process_log_keeps_what_was_printed_before_the_folder_and_a_bar_s_last_state(tmp_path, capsys):
    process_log.start()
    try:
        print("start-up line")
        import sys
        sys.stderr.write("bar 1/3\rbar 2/3\rbar 3/3\n")
        process_log.attach([str(tmp_path / "a"), str(tmp_path / "b")], 1, 2)
        process_log.note("only in the file")
        print("after attach")
    finally:
        process_log.stop()
    terminal = capsys.readouterr()
    assert "start-up line" in terminal.out and "only in the file" not in terminal.out + terminal.err
    for folder in ("a", "b"):
        lines = (tmp_path / folder / "logs" / "process_1.log").read_text().splitlines()
        assert lines[0].startswith("=== ") and "process 1 of 2" in lines[0]
        assert lines[1:] == ["start-up line", "bar 3/3", "only in the file", "after attach"]
    print("after stop")
    assert "after stop" not in (tmp_path / "a" / "logs" / "process_1.log").read_text()
