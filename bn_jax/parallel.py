"""Data parallelism on current JAX: one ``jax.jit`` program over a 1-D device mesh.

This is what ``pmap`` did, written the way JAX now recommends: parameters, optimizer state and
BatchNorm statistics are *replicated* (``P()``), every batch is *sharded* along the ``data``
axis (``P("data")``), and XLA's SPMD partitioner inserts the all-reduces. Because the program
is the single-device program, BatchNorm's batch statistics are those of the global batch
(synchronised BN) and results match one device up to float reassociation, for any device count.
The same code runs on 1…N local devices and 1…M hosts: each host supplies its own slice of
every global batch (``make_array_from_process_local_data``).
"""

import os
import socket
import sys
import time
from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "data"


def maybe_initialize_distributed(options) -> None:
    """Join a multi-host job when ``options`` (a validated ``config.ClusterOptions``: the three
    flags go together) or a cluster launcher (SLURM, TPU pod) say there is one."""
    if options.coordinator_address is not None:
        if options.process_id != 0:  # JAX aborts the process when the coordinator never answers: ask first
            wait_for_coordinator(options.coordinator_address, options.coordinator_timeout_s)
        jax.distributed.initialize(coordinator_address=options.coordinator_address,
                                   num_processes=options.num_processes, process_id=options.process_id,
                                   initialization_timeout=max(1, int(options.coordinator_timeout_s)))
    elif _under_launcher():
        jax.distributed.initialize()


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


def _under_launcher() -> bool:
    """An srun step of several tasks, or a TPU pod / multislice worker (their env vars)."""
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # set by srun, not by sbatch alone
        return True
    return any(v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all of them by default)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be between 1 and {len(devices)} (visible devices), got {num_devices}")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError("--num_devices cannot limit a multi-host job; every host's devices take part")
        devices = devices[:num_devices]
    return jax.sharding.Mesh(np.array(devices), (AXIS,))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def check_batch_size(batch_size: int, mesh, name: str = "batch_size") -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"{name} {batch_size} does not divide over {n} devices; "
                         f"use a multiple of {n} or set --num_devices")


def replicate(tree, mesh):
    """Place a pytree (state, dataset) on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def shard_global(array: np.ndarray, mesh):
    """A host array holding the *global* batch (same on every host) → a batch-sharded jax.Array."""
    sharding = sharded(mesh)
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    per_process = len(array) // jax.process_count()
    start = jax.process_index() * per_process
    return jax.make_array_from_process_local_data(sharding, array[start:start + per_process], array.shape)


def any_process(flag: bool) -> bool:
    """True if ``flag`` is true on any process (an all-gather: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def barrier(name: str) -> None:
    """Wait for every process (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def is_writer() -> bool:
    """Only process 0 writes metrics, summaries and plots (Orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0


def sum_over_processes(values) -> np.ndarray:
    """Elementwise sum of ``values`` over all processes (an all-gather: every process must call it)."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(values)).sum(0)
