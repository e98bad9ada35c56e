"""What a run executes: the compiled steps, the data they read, and the keys they use.

``build_program(config, runtime, data, mesh)`` is the one place that puts a run's data on its
devices and compiles its steps; the trainer, the benchmark and the tests all go through it, so
they measure and check the very code that trains.

A program offers the training loop the ``Program`` protocol, whatever feeds it:
``run(state, totals, epoch, start, stop)`` trains steps ``start``…``stop - 1`` of an epoch,
``evaluate(state)`` scores the test set, ``position(epoch)`` describes what an exact resume must
find unchanged, and ``input`` (a ``ProgramInput``) saves and restores the input's own state
beside the train state and says how fast the input is.
``DeviceResidentProgram`` keeps the whole training set on the device as uint8 and draws each
epoch's order there (CIFAR; its input has no state of its own); ``StreamingProgram`` trains on
batches that grain workers decode and augment on the hosts (ImageNet, ``streaming.StreamInput``).

Everything random is a function of ``config.seed`` and the step number (init key, epoch order,
augmentation key), so a run is reproducible and can be replayed from any step.
"""

import functools
from typing import Any, Dict, List, Optional, Protocol, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bn_jax import augmentation, dataset_registry, datasets, hashing, parallel, rng, steps, streaming
from bn_jax.config import ExperimentConfig, RuntimeConfig

# fused: ``steps_per_call`` steps as one compiled fori_loop, so the host only wakes between
# calls; step: one jitted call per step. auto: fused except on CPU, where XLA compiles
# convolutions inside a loop body to much slower code (jax-ml/jax#12868; docs/performance.md).


def resolve_loop(loop: str, platform: str) -> str:
    if loop != "auto":
        return loop
    return "step" if platform == "cpu" else "fused"


def loop_for(runtime: RuntimeConfig, mesh=None) -> str:
    """The loop ``runtime.loop`` means on the mesh's devices (or the default device)."""
    return resolve_loop(runtime.loop, (jax.devices() if mesh is None else mesh.devices.flat)[0].platform)


def epoch_order_fn(n: int, mesh=None):
    """``order(key, epoch)``: the jitted epoch permutation, replicated over ``mesh`` if given."""
    out = None if mesh is None else parallel.replicated(mesh)
    return jax.jit(functools.partial(augmentation.epoch_order, n=n), out_shardings=out)


def jit_epoch_steps(config: ExperimentConfig, runtime: RuntimeConfig, mesh=None):
    """The loop's jitted step function: ``fused`` runs a range of steps, ``step`` exactly one.

    Both take ``(state, totals, data, order, start, stop, epoch_step, key, mean, std)``; state
    is donated, so its buffers are reused in place.
    """
    kw = dict(batch_size=config.batch_size, augment=config.augment,
              sharding=None if mesh is None else parallel.sharded(mesh))
    out = None if mesh is None else parallel.replicated(mesh)
    if loop_for(runtime, mesh) == "fused":
        return FixedLengthLoop(functools.partial(steps.train_steps, **kw), start_at=4, out_shardings=out)
    step = jax.jit(functools.partial(steps.train_step_at, **kw), donate_argnums=0, out_shardings=out)
    return lambda state, totals, data, order, start, stop, epoch_step, key, mean, std: step(
        state, totals, data, order, start, epoch_step + start, key, mean, std)


class FixedLengthLoop:
    """A fused loop called as ``fn(..., start, stop, ...)`` but compiled per chunk length.

    ``fn`` takes ``start`` at position ``start_at``, and a static ``length`` (or, with
    ``length=None``, a traced ``stop``) as keywords: a loop of known trip count, which XLA runs
    without a host round-trip per iteration and can capture as a CUDA graph. The first
    ``STATIC_LENGTHS`` distinct lengths are compiled so (a run's ``steps_per_call`` and the
    epoch's remainder); any other length (step checkpoints cut chunks elsewhere) runs the
    traced-bounds loop, compiled once for all of them, so a run compiles at most three loops.
    All give the same steps bit for bit. The state (argument 0) is donated.
    """

    STATIC_LENGTHS = 2

    def __init__(self, fn, start_at: int, out_shardings=None):
        self.jitted = jax.jit(fn, static_argnames="length", donate_argnums=0, out_shardings=out_shardings)
        self.start_at = start_at
        self.executables: Dict[int, Any] = {}  # compiled ahead of time (``compile``), by length
        self.static: List[int] = []  # the lengths given a loop of their own

    def _split(self, args):
        i = self.start_at
        return args[:i + 1] + args[i + 2:], int(args[i + 1]) - int(args[i]), args[i + 1]

    def _static(self, length: int) -> bool:
        if length not in self.static and len(self.static) < self.STATIC_LENGTHS:
            self.static.append(length)
        return length in self.static

    def __call__(self, *args):
        rest, length, stop = self._split(args)
        if not self._static(length):
            return self.jitted(*rest, stop=stop, length=None)
        executable = self.executables.get(length)
        return executable(*rest) if executable is not None else self.jitted(*rest, length=length)

    def lower(self, *args):
        rest, length, _ = self._split(args)
        return self.jitted.lower(*rest, length=length)

    def compile(self, *args):
        """Compile the call ``args`` describe ahead of time; later calls of its length run it."""
        rest, length, _ = self._split(args)
        self._static(length)
        self.executables[length] = self.jitted.lower(*rest, length=length).compile()
        return self.executables[length]

    def lengths_compiled(self) -> int:
        return len(self.executables) + self.jitted._cache_size()


jit_eval_step = jax.jit(steps.eval_step)


def eval_batch_size(batch_size: int, n: int, mesh) -> int:
    """The test batch: at most the test set (a batch beyond it is all padding), rounded up to
    whole devices."""
    devices = mesh.devices.size
    return -(-min(batch_size, n) // devices) * devices


def pad_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, mesh) -> List[Tuple]:
    """Test batches of one fixed shape, sharded over the mesh; padding is masked out by ``valid``."""
    n = len(labels)
    batch_size = eval_batch_size(batch_size, n, mesh)
    padded = -(-n // batch_size) * batch_size
    valid = (np.arange(padded) < n).astype(np.float32)
    images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(padded - n, labels.dtype)])
    return [tuple(parallel.shard_global(a[i:i + batch_size], mesh) for a in (images, labels, valid))
            for i in range(0, padded, batch_size)]


def evaluate(state, test_batches, mean, std) -> Dict[str, float]:
    """Test metrics over ``test_batches``, an iterable of sharded (images, labels, valid)."""
    totals = None
    for images, labels, valid in test_batches:
        m = jit_eval_step(state, images, labels, valid, mean, std)
        totals = m if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, m)
    return test_metrics(jax.device_get(totals))


def scan_eval(state, images, labels, valid, mean, std, *, eval_step=steps.eval_step):
    """Test sums over stacked batches (``images[b]`` is batch b) as one loop: the sums ``evaluate``
    adds call by call, in the same order, so the metrics are the same; one call instead of one
    per batch."""
    def body(totals, batch):
        return jax.tree_util.tree_map(jnp.add, totals, eval_step(state, *batch, mean, std)), None
    shapes = jax.eval_shape(eval_step, state, images[0], labels[0], valid[0], mean, std)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(body, zeros, (images, labels, valid))[0]


jit_scan_eval = jax.jit(scan_eval)


def stack_batches(batches: List[Tuple], mesh) -> Tuple:
    """Equal-shaped sharded batches → one array per field with a leading batch axis (each batch
    still sharded over the mesh), for ``scan_eval``."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.AXIS))
    return jax.jit(lambda bs: tuple(jnp.stack(xs) for xs in zip(*bs)), out_shardings=sharding)(batches)


def test_metrics(totals) -> Dict[str, float]:
    return {"loss": float(totals["loss"] / totals["count"]),
            "accuracy": float(totals["correct"] / totals["count"]),
            "top5_accuracy": float(totals["correct_top5"] / totals["count"])}


class Data(Protocol):
    """What a dataset offers the trainer and a program: ``datasets.Dataset`` (in memory) and
    ``streaming.StreamData`` (streamed) alike."""

    class_names: List[str]
    image_shape: Any

    @property
    def num_classes(self) -> int: ...
    @property
    def num_train(self) -> int: ...
    def class_counts(self) -> Optional[Dict[str, Dict[str, int]]]: ...
    def describe(self) -> str: ...
    def subset(self, max_train: Optional[int], max_test: Optional[int]) -> "Data": ...
    def fingerprint(self) -> str: ...


class ProgramInput(Protocol):
    """A program's input beside its steps: the state it saves with a checkpoint, and its speed."""

    def checkpoint(self) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(meta, Orbax items) to save beside the train state."""

    def restore(self, ckpt, step: int, meta: Dict[str, Any], log) -> None:
        """Put the input where checkpoint ``step`` left it."""

    def report(self) -> Dict[str, float]:
        """This epoch's input figures for the progress bar and the metrics line (docs/cli.md)."""

    def summary(self, history) -> Dict[str, Any]:
        """summary.json's input figures (every process must call it)."""


class Program(Protocol):
    """What the training loop (``bn_jax.train``) needs of a program."""

    loop: str                 # "fused", "step" or "stream"
    batch_size: int
    steps_per_epoch: int
    max_steps_per_call: int
    input: ProgramInput

    def put(self, tree): ...
    def zero_totals(self): ...
    def run(self, state, totals, epoch: int, start: int, stop: int): ...
    def evaluate(self, state) -> Dict[str, float]: ...
    def position(self, epoch: int) -> Dict[str, Any]: ...
    def close(self) -> None: ...


class ResidentInput:
    """The input of device-resident data: no state of its own (the step is its position), nothing
    beside the steps to measure."""

    def checkpoint(self):
        return {}, {}

    def restore(self, ckpt, step, meta, log):
        return None

    def report(self):
        return {}

    def summary(self, history):
        return {}


def resident_position(seed: int, epoch: int, augment_key, order) -> Dict[str, Any]:
    """What must be unchanged for an exact resume of a device-resident run in ``epoch``: seed,
    augmentation key, the epoch's order."""
    return {"seed": seed, "epoch": epoch,
            "augment_key_data": np.asarray(jax.random.key_data(augment_key)).tolist(),
            "epoch_order_sha256": hashing.order_hash(np.asarray(jax.device_get(order)))}


class DeviceResidentProgram:
    """The training set on the device as uint8; each epoch's order drawn there, each batch
    gathered, augmented and trained on without the host touching the data."""

    def __init__(self, config: ExperimentConfig, runtime: RuntimeConfig, data: datasets.Dataset, mesh):
        self.mesh = mesh
        self.seed, self.batch_size = config.seed, config.batch_size
        self.steps_per_epoch = len(data.train_labels) // config.batch_size  # the remainder is dropped
        self.loop = loop_for(runtime, mesh)
        self.max_steps_per_call = runtime.steps_per_call if self.loop == "fused" else 1
        self.augment_key, self.order_key = rng.key(config.seed, "augment"), rng.key(config.seed, "order")
        self.mean, self.std = self.put(augmentation.normalization(config.normalize, data.train_images))
        self.train_data = self.put((data.train_images, data.train_labels))
        self._test = (data.test_images, data.test_labels, runtime.eval_batch_size)
        self.order_fn = epoch_order_fn(len(data.train_labels), mesh)
        self.steps_fn = jit_epoch_steps(config, runtime, mesh)
        self._order = (None, None)
        self.input = ResidentInput()

    def put(self, tree):
        """``tree`` on the program's devices, replicated (a train state, the epoch sums)."""
        return jax.device_put(tree) if self.mesh is None else parallel.replicate(tree, self.mesh)

    @functools.cached_property
    def test_batches(self):
        images, labels, batch_size = self._test
        return pad_batches(images, labels, batch_size, self.mesh or parallel.make_mesh(1))

    @functools.cached_property
    def test_stack(self):
        return stack_batches(self.test_batches, self.mesh or parallel.make_mesh(1))

    def order(self, epoch: int):
        if self._order[0] != epoch:
            self._order = (epoch, self.order_fn(self.order_key, epoch))
        return self._order[1]

    def run(self, state, totals, epoch: int, start: int, stop: int):
        """Steps ``start``…``stop - 1`` of ``epoch``: (state, totals), still on the device."""
        return self.steps_fn(state, totals, self.train_data, self.order(epoch), start, stop,
                             epoch * self.steps_per_epoch, self.augment_key, self.mean, self.std)

    def compile(self, state, totals, stop: int = 1):
        """Compile the call ``run(state, totals, 0, 0, stop)`` ahead of time and return the
        executable (its cost analysis is one step's: XLA counts a loop body once). The fused loop
        then runs that executable for every call of ``stop`` steps, so its compile time is paid
        here, apart from the steps."""
        args = (state, totals, self.train_data, self.order(0), 0, stop, 0, self.augment_key, self.mean, self.std)
        if self.loop == "fused":
            return self.steps_fn.compile(*args)
        return jax.jit(self.steps_fn).lower(*args).compile()

    def evaluate(self, state) -> Dict[str, float]:
        """The test metrics. The fused loop scores every test batch in one compiled call (no
        round-trip per batch between the epoch's steps and the next); the step loop, one call per
        batch, as it trains (on a CPU, XLA compiles a convolution inside a loop to slower code)."""
        if self.loop == "fused":
            return test_metrics(jax.device_get(jit_scan_eval(state, *self.test_stack, self.mean, self.std)))
        return evaluate(state, self.test_batches, self.mean, self.std)

    def zero_totals(self):
        """Fresh epoch sums, placed as the step returns them (so the step compiles once)."""
        return self.put(steps.zero_totals())

    def position(self, epoch: int) -> Dict[str, Any]:
        return resident_position(self.seed, epoch, self.augment_key, self.order(epoch))

    def close(self) -> None:
        """(Nothing to stop: no input runs beside the steps.)"""


class StreamingProgram:
    """Batches streamed from the hosts: grain workers decode and augment each host's slice of every
    global batch (``streaming.StreamInput``), and one jitted step trains on it."""

    loop = "stream"
    max_steps_per_call = 1

    def __init__(self, config: ExperimentConfig, runtime: RuntimeConfig, data: streaming.StreamData, mesh):
        self.mesh = mesh if mesh is not None else parallel.make_mesh(1)
        self.seed, self.batch_size, self.data = config.seed, config.batch_size, data
        self.steps_per_epoch = data.num_train // config.batch_size
        self.eval_batch_size = eval_batch_size(runtime.eval_batch_size, data.num_test, self.mesh)
        self.input = streaming.StreamInput(data, config, runtime.resolved_workers(),
                                           (jax.process_index(), jax.process_count()))
        self.mean, self.std = self.put(augmentation.normalization(config.normalize, None))
        self.step_fn = jax.jit(steps.train_step_on, donate_argnums=0, out_shardings=parallel.replicated(self.mesh))

    def put(self, tree):
        return parallel.replicate(tree, self.mesh)

    def zero_totals(self):
        return self.put(steps.zero_totals())

    def _global(self, local: np.ndarray, global_batch: int):
        """This host's slice of a batch → the global batch, sharded over the mesh."""
        return jax.make_array_from_process_local_data(parallel.sharded(self.mesh), local,
                                                      (global_batch, *local.shape[1:]))

    def run(self, state, totals, epoch: int, start: int, stop: int):
        if start == 0 or not self.input.meter.images:  # (an epoch, or a resumed session, begins)
            self.input.meter.reset()
        for i in range(start, stop):
            step = epoch * self.steps_per_epoch + i
            batch = self.input.next(step)
            images, labels = (self._global(batch[k], self.batch_size) for k in ("image", "label"))
            state, totals = self.step_fn(state, totals, images, labels, step, self.mean, self.std)
        return state, totals

    def compile_step(self, state, totals, images, labels):
        """The step on one host-prepared batch, compiled ahead of time (the benchmark times it apart
        from the input): (executable, ``step(state, totals, images, labels, i)``)."""
        compiled = self.step_fn.lower(state, totals, images, labels, 0, self.mean, self.std).compile()
        return compiled, lambda s, t, x, y, i: compiled(s, t, x, y, i, self.mean, self.std)

    def evaluate(self, state) -> Dict[str, float]:
        with self.input.eval_batches(self.eval_batch_size) as batches:
            return evaluate(state, (tuple(self._global(b[k], self.eval_batch_size) for k in ("image", "label", "valid"))
                                    for b in batches), self.mean, self.std)

    def position(self, epoch: int) -> Dict[str, Any]:
        order = streaming.epoch_order(self.seed, epoch, self.data.num_train)
        return {"seed": self.seed, "epoch": epoch, "epoch_order_sha256": hashing.order_hash(order)}

    def close(self) -> None:
        self.input.close()


def build_program(config: ExperimentConfig, runtime: RuntimeConfig, data: Data, mesh) -> Program:
    """The program that trains ``config`` on ``data`` over ``mesh``, executed as ``runtime`` says:
    the one its dataset's registry entry names (streamed from the hosts, or device-resident)."""
    kind = dataset_registry.lookup(config.dataset).program
    return {"streaming": StreamingProgram, "device_resident": DeviceResidentProgram}[kind](config, runtime, data, mesh)
