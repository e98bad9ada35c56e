"""Data parallelism on current JAX: one ``jax.jit`` program over a 1-D device mesh.

This is what ``pmap`` did, written the way JAX now recommends: parameters, optimizer state and
BatchNorm statistics are *replicated* (``P()``), every batch is *sharded* along the ``data``
axis (``P("data")``), and XLA's SPMD partitioner inserts the all-reduces. Because the program
is the single-device program, BatchNorm's batch statistics are those of the global batch
(synchronised BN) and results match one device up to float reassociation, for any device count.
The same code runs on 1…N local devices and 1…M hosts: each host supplies its own slice of
every global batch (``make_array_from_process_local_data``).
"""

from typing import Optional

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "data"


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
