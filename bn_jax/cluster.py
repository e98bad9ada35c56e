"""Joining a multi-process job, and checking that it drives every accelerator it was given.

``--distributed auto`` asks ``jax.distributed``'s own cluster detection (SLURM, Open MPI,
Kubernetes, GKE TPU, Cloud TPU VM) whether this process is one of several, so that bn_jax starts a
multi-process job exactly where ``jax.distributed.initialize()`` would find one. After joining,
``allocation_problem`` compares the devices this process drives with what the scheduler gave it:
JAX's SLURM and Open MPI default is one GPU per process (``local_device_ids = [local rank]``), so a
one-task-per-node job on 8-GPU nodes would otherwise train on 1 GPU of 8, silently
(jax-ml/jax#16788).
"""

import os
import socket
import sys
import time
from typing import Mapping, NamedTuple, Optional, Sequence

import jax

JOINED = "single process"  # how this process runs, once ``join`` has run (summary.json's "cluster")


class Detected(NamedTuple):
    """A cluster environment JAX's detection found: its name (JAX's), and this step's processes."""
    name: str
    num_processes: int
    process_id: int


def detect() -> Optional[Detected]:
    """The environment ``jax.distributed.initialize()`` would detect, or None.

    JAX exposes its detection only privately (``jax._src.clusters``; the same classes in jax 0.10
    and 0.12): we ask it rather than copy its rules, so a launcher JAX learns is one bn_jax knows.
    Under SLURM the count is the srun step's (``SLURM_STEP_NUM_TASKS``): a batch script that runs
    python without srun is one process even in an allocation of many tasks.
    """
    from jax._src import clusters  # noqa: F401  (imports register every cluster type)
    for kind in clusters.ClusterEnv._cluster_types:
        if getattr(kind, "opt_in_only_method", False) or not kind.is_env_present():
            continue
        count, index = kind.get_process_count(), kind.get_process_id()
        if kind.name == "slurm" and "SLURM_STEP_NUM_TASKS" in os.environ:  # (JAX's own rules read os.environ)
            count = int(os.environ["SLURM_STEP_NUM_TASKS"])
        return Detected(kind.name, count, index)
    return None


def join(options) -> str:
    global JOINED
    JOINED = _join(options)
    return JOINED


def _join(options) -> str:
    """Join the job ``options`` (a validated ``config.ClusterOptions``) asks for; how this process
    runs: "single process", "explicit flags" or the name of the detected cluster. ValueError (one
    line) when ``--distributed on`` finds no job or the coordinator never answers."""
    if options.distributed == "off":
        return "single process"
    if options.coordinator_address is not None:
        initialize(options.coordinator_address, options.num_processes, options.process_id, options)
        return "explicit flags"
    found = detect()
    if found is None or (found.num_processes < 2 and options.distributed == "auto"):
        if options.distributed == "on":
            raise ValueError("--distributed on: no multi-process job found (jax.distributed detects SLURM srun steps, "
                             "Open MPI, Kubernetes and Cloud TPU VMs); pass --coordinator_address, --num_processes "
                             "and --process_id, or --distributed auto")
        return "single process"
    # JAX fills in what is left None from the same detection; under SLURM we name the coordinator
    # ourselves, so that a process other than 0 can wait for it with our timeout and one-line error.
    address = slurm_coordinator() if found.name == "slurm" else None
    initialize(address, found.num_processes, found.process_id, options)
    return found.name


def initialize(address: Optional[str], num_processes: Optional[int], process_id: Optional[int], options) -> None:
    """``jax.distributed.initialize``; a process other than 0 first waits for the coordinator
    (JAX aborts the process with a C++ stack when it never answers)."""
    if address is not None and process_id != 0:
        wait_for_coordinator(address, options.coordinator_timeout_s)
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids(options.local_device_ids),
                               initialization_timeout=max(1, int(options.coordinator_timeout_s)))


def slurm_coordinator() -> str:
    """The coordinator JAX's SLURM detection picks: the step's first node, at ``JAX_COORDINATOR_PORT``
    or the port it derives from the job id."""
    from jax._src.clusters import slurm_cluster
    return slurm_cluster.SlurmCluster.get_coordinator_address(
        timeout_secs=None, override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"))


def local_device_ids(value: Optional[str], env: Mapping[str, str] = os.environ) -> Optional[Sequence[int]]:
    """``--local_device_ids``: None (JAX's default), ``all`` (every GPU of the node: one process per
    node) or the listed indices."""
    if value is None:
        return None
    if value != "all":
        return [int(i) for i in value.split(",")]
    count = gpus_on_node(env)
    if count is None:
        raise ValueError("--local_device_ids all: cannot tell how many GPUs this node has (neither CUDA_VISIBLE_DEVICES "
                         "nor SLURM_GPUS_ON_NODE is set); list them, e.g. --local_device_ids 0,1,2,3")
    return list(range(count))


def gpus_on_node(env: Mapping[str, str]) -> Optional[int]:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    return None


def leading_count(value: str) -> Optional[int]:
    """The first number of a SLURM count: "4" → 4, "8(x2),4" → 8, "a100:2" → 2."""
    head = value.split(",")[0].split("(")[0].rsplit(":", 1)[-1]
    return int(head) if head.isdigit() else None


def allocated(platform: str, env: Mapping[str, str] = os.environ):
    """(accelerators the scheduler gave this process, where that number comes from), or (None, "")."""
    if platform == "gpu":
        if env.get("SLURM_GPUS_PER_TASK") and leading_count(env["SLURM_GPUS_PER_TASK"]):
            return leading_count(env["SLURM_GPUS_PER_TASK"]), f"SLURM_GPUS_PER_TASK={env['SLURM_GPUS_PER_TASK']}"
        tasks = leading_count(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
        if env.get("SLURM_GPUS_ON_NODE", "").isdigit() and tasks:
            return (int(env["SLURM_GPUS_ON_NODE"]) // tasks,
                    f"SLURM_GPUS_ON_NODE={env['SLURM_GPUS_ON_NODE']} over {tasks} task(s) on this node")
        if env.get("CUDA_VISIBLE_DEVICES") and "SLURM_JOB_ID" not in env:
            return gpus_on_node(env), f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}"
    if platform == "tpu" and env.get("TPU_CHIPS_PER_PROCESS_BOUNDS"):
        bounds = [int(b) for b in env["TPU_CHIPS_PER_PROCESS_BOUNDS"].split(",") if b.strip().isdigit()]
        count = 1
        for b in bounds:
            count *= b
        return count, f"TPU_CHIPS_PER_PROCESS_BOUNDS={env['TPU_CHIPS_PER_PROCESS_BOUNDS']}"
    return None, ""


def allocation_problem(platform: str, in_use: int, env: Mapping[str, str] = os.environ) -> Optional[str]:
    """One line when this process drives fewer accelerators than it was allocated, naming the fix."""
    expected, source = allocated(platform, env)
    if expected is None or in_use >= expected:
        return None
    fix = ("launch one task per GPU (#SBATCH --ntasks-per-node=G --gpus-per-node=G), or pass --local_device_ids all "
           "to drive them all from one process" if platform == "gpu" else "check the TPU topology variables")
    return (f"this process drives {in_use} {platform.upper()}(s) but was allocated {expected} ({source}); {fix}")


def check_allocation(num_devices: Optional[int]) -> None:
    """ValueError (one line) if this process leaves allocated accelerators idle; ``--num_devices``
    limits the run on purpose, and is not second-guessed."""
    if num_devices is not None:
        return
    problem = allocation_problem(jax.devices()[0].platform, jax.local_device_count())
    if problem:
        raise ValueError(problem)


def host_count() -> int:
    """How many machines the job spans (processes may share one: one per GPU)."""
    if jax.process_count() == 1:
        return 1
    import zlib

    import numpy as np
    from jax.experimental import multihost_utils
    name = np.array(zlib.crc32(socket.gethostname().encode()), np.int64)
    return len(set(np.asarray(multihost_utils.process_allgather(name)).ravel().tolist()))


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Return once ``host:port`` accepts connections; ValueError naming it after ``timeout_s``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address must be host:port, got {address!r}")
    print(f"waiting up to {timeout_s:g} s for the coordinator at {address}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ValueError(f"no coordinator answered at {address} within {timeout_s:g} s ({e.strerror or e}); "
                                 "start process 0 there first, or raise --coordinator_timeout_s") from None
            time.sleep(0.5)
