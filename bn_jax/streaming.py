"""Streaming input for data that do not fit on the device (ImageNet): grain on the hosts.

The run's training examples form one long random-access stream: example ``g`` is example
``g mod E`` of epoch ``g // E``'s shuffled order (``E`` = steps per epoch × batch size; each
epoch's leftover is dropped). Global batch ``t`` is stream examples ``t·B … (t+1)·B - 1``, and
host ``h`` of ``P`` reads only its slice ``h·B/P …`` of it, decoded and augmented by grain worker
processes, with an augmentation RNG that grain derives from (seed, ``g``). So what a step sees
is a function of the seed and the step alone: the same for any number of hosts or workers, and
replayable from any step. Every batch carries its stream indices, and the program checks them
against the step it runs, so a resume that would train on other data stops instead.

Undecodable images are not fatal (a truncated file found in hour 20 would otherwise end the
run): a training image that does not decode is replaced by the next decodable one in the
source's order, an evaluation image is left out of the accuracy; either way the file is named
in a warning and counted (``undecodable_images`` in the summary).
"""

import contextlib
import dataclasses
import functools
import hashlib
import os
import signal
import threading
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from bn_jax import rng
from bn_jax.datasets import DataError

MAX_REPLACEMENTS = 100  # undecodable images in a row before a training example gives up


class UnreadableFile(DataError):
    """A file that cannot be read (missing, an I/O error): stops the run, unlike a bad image."""


GRAIN_MISSING = ("streaming input needs grain (Python >= 3.11): pip install -e '.[imagenet]'")


def grain():
    try:
        import grain as grain_lib
    except ImportError as e:
        raise DataError(f"{GRAIN_MISSING} ({e})") from None
    return grain_lib


@dataclasses.dataclass
class StreamData:
    """A dataset read example by example: what the trainer needs to know of it up front.

    ``train`` and ``test`` are random-access sources of {"image": uint8 HWC, "label": int}
    (``len`` and ``[i]``; ``imagenet.FolderSource`` or a TFDS data source); ``prepare_train(image,
    rng)`` and ``prepare_test(image)`` turn a decoded image into the fixed-size input.
    """

    name: str
    train: Any
    test: Any
    class_names: List[str]
    image_shape: tuple
    prepare_train: Any
    prepare_test: Any
    train_indices: Optional[np.ndarray] = None  # a fixed subset of ``train`` (None: all of it)
    test_indices: Optional[np.ndarray] = None
    fingerprint_text: str = ""                  # what identifies the data (file list, TFDS version)
    labels: Optional[tuple] = None              # (train, test) label arrays, where known without decoding

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_train(self) -> int:
        return len(self.train) if self.train_indices is None else len(self.train_indices)

    @property
    def num_test(self) -> int:
        return len(self.test) if self.test_indices is None else len(self.test_indices)

    def class_counts(self) -> Optional[Dict[str, Dict[str, int]]]:
        """Images per class in each split, as trained and tested (None where labels are unknown
        without decoding every example: TFDS)."""
        if self.labels is None:
            return None
        counts = {}
        for split, labels, indices in (("train", self.labels[0], self.train_indices),
                                       ("test", self.labels[1], self.test_indices)):
            labels = labels if indices is None else labels[indices]
            counts[split] = dict(zip(self.class_names, np.bincount(labels, minlength=self.num_classes).tolist()))
        return counts

    def describe(self) -> str:
        subset = "" if self.train_indices is None and self.test_indices is None else " (a fixed subset)"
        return (f"{self.name}: {self.num_classes} classes; train {self.num_train:,}, test {self.num_test:,}"
                f"{subset}; streamed, {self.image_shape[0]}×{self.image_shape[1]} crops")

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.fingerprint_text.encode())
        for indices in (self.train_indices, self.test_indices):
            h.update(b"all" if indices is None else np.asarray(indices, np.int64).tobytes())
        return h.hexdigest()

    def subset(self, max_train: Optional[int], max_test: Optional[int]) -> "StreamData":
        """A fixed random subset (independent of the run's seed, as ``Dataset.subset``)."""
        def take(n_all, n):
            if n is None or n >= n_all:
                return None
            return np.sort(np.random.default_rng(0).permutation(n_all)[:n])
        return dataclasses.replace(self, train_indices=take(len(self.train), max_train),
                                   test_indices=take(len(self.test), max_test))


# ---- the training stream (runs in grain's worker processes; everything here pickles) --------

def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch ``epoch``'s shuffled order of ``n`` examples (NumPy's generator: stable across versions)."""
    return np.random.default_rng([seed, epoch, rng.STREAM_ORDER_TAG]).permutation(n)


def _decoded(source, index: int, name: str):
    """(example, ok) for ``source[index]``; a DataError (undecodable file) becomes a warning."""
    try:
        return source[index], True
    except UnreadableFile:
        raise
    except DataError as e:
        warnings.warn(f"{e}; {name}", stacklevel=2)
        return None, False


class TrainStream:
    """Random access to the run's stream of prepared training examples (see the module doc)."""

    def __init__(self, data: StreamData, seed: int, per_epoch: int, epochs: int):
        self.source, self.indices = data.train, data.train_indices
        self.n, self.seed, self.per_epoch, self.epochs = data.num_train, seed, per_epoch, epochs
        self._order = (None, None)

    def __len__(self) -> int:
        return self.per_epoch * self.epochs

    def order(self, epoch: int) -> np.ndarray:
        cached = self._order  # (one read: grain's threads call this concurrently)
        if cached[0] != epoch:
            cached = (epoch, epoch_order(self.seed, epoch, self.n))
            self._order = cached
        return cached[1]

    def source_index(self, j: int) -> int:
        return int(j if self.indices is None else self.indices[j])

    def __getitem__(self, g: int) -> Dict[str, Any]:
        epoch, j = divmod(int(g), self.per_epoch)
        position = int(self.order(epoch)[j])
        start = time.perf_counter()
        for attempt in range(min(self.n, MAX_REPLACEMENTS)):  # undecodable: the next one in the source's order
            example, ok = _decoded(self.source, self.source_index((position + attempt) % self.n),
                                   "training on the next image in its place")
            if ok:
                return {"image": example["image"], "label": np.int32(example["label"]), "index": np.int64(g),
                        "undecodable": np.int32(attempt), "seconds": time.perf_counter() - start}
        raise DataError(f"{min(self.n, MAX_REPLACEMENTS)} training images in a row do not decode, from "
                        f"position {position} of the folder's order: is this an image folder?")

    def __repr__(self) -> str:
        return f"TrainStream({self.source!r}, seed={self.seed}, per_epoch={self.per_epoch})"


def _prepared(prepare, element, *rng):
    """The fixed-size input (``rng``: the training crop's); ``seconds``: the worker time of the
    example, decoding included."""
    start = time.perf_counter()
    element = dict(element, image=prepare(np.asarray(element["image"]), *rng))
    return dict(element, seconds=np.float32(element["seconds"] + time.perf_counter() - start))


class EvalStream:
    """The test set padded to whole batches; padding and undecodable images have ``valid`` 0."""

    def __init__(self, data: StreamData, padded: int):
        self.source, self.indices, self.prepare = data.test, data.test_indices, data.prepare_test
        self.n, self.padded, self.shape = data.num_test, padded, data.image_shape

    def __len__(self) -> int:
        return self.padded

    def __getitem__(self, i: int) -> Dict[str, Any]:
        i = int(i)
        if i < self.n:
            example, ok = _decoded(self.source, int(i if self.indices is None else self.indices[i]),
                                   "leaving it out of the evaluation")
            if ok:
                return {"image": self.prepare(np.asarray(example["image"])), "label": np.int32(example["label"]),
                        "valid": np.float32(1), "undecodable": np.int32(0)}
        return {"image": np.zeros(self.shape, np.uint8), "label": np.int32(0), "valid": np.float32(0),
                "undecodable": np.int32(i < self.n)}

    def __repr__(self) -> str:
        return f"EvalStream({self.source!r}, padded={self.padded})"


# ---- pipelines ---------------------------------------------------------------------------------

def host_slice(ds, local_batch: int, process_index: int, process_count: int):
    """Batches of ``local_batch``; this host's are every ``process_count``-th from ``process_index``,
    so global batch ``t`` is local batches ``t·P … t·P + P - 1``, host ``h`` holding the ``h``-th."""
    return ds.batch(local_batch, drop_remainder=True)[process_index::process_count]


def train_dataset(data: StreamData, seed: int, batch_size: int, epochs: int, augment: bool,
                  process_index: int = 0, process_count: int = 1):
    """This host's training batches, as a grain MapDataset indexed by global step."""
    gr = grain()
    per_epoch = data.num_train // batch_size * batch_size
    ds = gr.MapDataset.source(TrainStream(data, seed, per_epoch, max(1, epochs)))
    if augment:
        ds = ds.random_map(functools.partial(_prepared, data.prepare_train), seed=seed)
    else:
        ds = ds.map(functools.partial(_prepared, data.prepare_test))
    return host_slice(ds, batch_size // process_count, process_index, process_count)


def eval_dataset(data: StreamData, batch_size: int, process_index: int = 0, process_count: int = 1):
    """This host's evaluation batches; ``batch_size`` (global) must divide by ``process_count``."""
    gr = grain()
    padded = -(-data.num_test // batch_size) * batch_size
    return host_slice(gr.MapDataset.source(EvalStream(data, padded)), batch_size // process_count,
                      process_index, process_count)


# Finished batches each worker process holds for the trainer. With the batch it builds and its
# read-ahead (read_options), a worker holds about 4 batches; at 1,024 ImageNet crops (150 MB each)
# and 15 workers that is about 9 GB of host memory, much of it in /dev/shm (size a container's
# /dev/shm accordingly, or lower --workers).
PER_WORKER_BUFFER = 2


def read_options(workers: int):
    """grain's reading threads and read-ahead in each reading process, counted in elements, which
    here are whole host batches (150 MB at 1,024 ImageNet crops). grain's defaults (16 threads,
    500 elements) suit records of a few KiB and would hold hundreds of batches. A worker process
    builds one batch at a time and reads one ahead (the workers are the parallelism); without
    workers, threads of this process build several."""
    if workers > 0:
        return grain().ReadOptions(num_threads=1, prefetch_buffer_size=1)
    threads = max(1, min(8, os.cpu_count() or 1))
    return grain().ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def iterate(ds, workers: int, start: int = 0):
    """An iterator over ``ds[start:]``, decoded by ``workers`` processes (0: threads of this one)."""
    gr = grain()
    it = ds[start:].to_iter_dataset(read_options(workers))
    if workers > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(gr.multiprocessing.MultiprocessingOptions(num_workers=workers,
                                                                      per_worker_buffer_size=PER_WORKER_BUFFER),
                            worker_init_fn=worker_init)
    return iter(it)


ORPHAN_POLL_S = 1.0  # how often a worker looks whether the trainer is still there


def worker_init(index: int, count: int) -> None:
    """In each grain worker process. SLURM, ``timeout`` and Ctrl-C signal the whole process group:
    the trainer turns those signals into a checkpoint and exit 75, so its workers ignore them (grain
    stops its workers itself, with an event and, failing that, SIGKILL). And a worker exits when the
    trainer is gone: after a SIGKILL of the trainer nobody else would stop it (its shared-memory
    batches and about 200 MB each would stay behind). A thread, not PR_SET_PDEATHSIG: grain may start
    workers from a thread, whose end would trigger that signal."""
    from bn_jax import preemption
    for signum in preemption.PreemptionGuard.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    parent = os.getppid()

    def exit_when_orphaned():
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        os._exit(0)
    threading.Thread(target=exit_when_orphaned, name="bn_jax-orphan-watch", daemon=True).start()


def _absl_flags_parsed() -> None:
    """grain's worker start reads absl flags, which a JAX program never parsed (google/grain#1355)."""
    try:
        from absl import flags
    except ImportError:
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def close(iterator) -> None:
    """Stop an mp_prefetch iterator's worker processes now (not at garbage collection), and let go
    of the shared memory its batches came in. grain unlinks a batch's shared memory in a thread pool
    when the array is freed; at interpreter exit that pool's last requests are dropped and Python's
    resource tracker then warns of "leaked shared_memory objects" (it unlinks them itself)."""
    stop = getattr(iterator, "close", None)
    if stop is not None:
        stop()
    import gc
    gc.collect()  # (batch arrays in reference cycles)
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:  # (grain moved it: at worst the warning returns)
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:  # drain the pending unlinks; grain starts a new pool when it needs one
        SharedMemoryArray._del_thread_pool = None
        pool.close()
        pool.join()


def check_indices(indices: Sequence[int], step: int, batch_size: int, process_index: int, process_count: int):
    """Raise RuntimeError unless a host batch holds the stream examples global step ``step`` needs."""
    local = batch_size // process_count
    first = step * batch_size + process_index * local
    if len(indices) != local or int(indices[0]) != first or int(indices[-1]) != first + local - 1:
        raise RuntimeError(f"input pipeline out of step: step {step} needs stream examples {first}…"
                           f"{first + local - 1}, got {int(indices[0])}…{int(indices[-1])}")


# ---- the trainer's side: one host's stream, its checkpoint and its speed ------------------------

class InputMeter:
    """Since the epoch (or session) began: images delivered, time the training waited for them,
    and the worker time they took (decoding included)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.wait_s, self.worker_s = time.perf_counter(), 0, 0.0, 0.0

    def add(self, batch, waited_s: float) -> None:
        self.images += len(batch["index"])
        self.wait_s += waited_s
        self.worker_s += float(np.sum(batch["seconds"]))

    def report(self, workers: int) -> Dict[str, float]:
        """What the input could deliver (images per second of worker time × workers) and the share
        of the time the training waited for it; {} before any image."""
        elapsed = time.perf_counter() - self.start
        if not self.images or elapsed <= 0:
            return {}
        capacity = self.images / self.worker_s * max(1, workers) if self.worker_s > 0 else float("inf")
        return {"input_images_per_second": capacity, "input_wait_fraction": min(1.0, self.wait_s / elapsed)}


class StreamInput:
    """One host's training stream for the trainer (``program.StreamingProgram``): the next batch of a
    step, checked against it; grain's iterator state saved with each checkpoint and restored from
    it; the input's speed and the undecodable images met."""

    def __init__(self, data: StreamData, config, workers: int, host):
        self.data, self.workers, self.host, self.batch_size = data, workers, host, config.batch_size
        self.train_ds = train_dataset(data, config.seed, config.batch_size, config.epochs, config.augment, *host)
        self.iterator, self.base = None, 0
        self.undecodable = {"train": 0, "test": 0}
        self.meter = InputMeter()

    def next(self, step: int) -> Dict[str, np.ndarray]:
        """This host's slice of global step ``step``'s batch (RuntimeError if the stream is out of step)."""
        if self.iterator is None:
            self.iterator, self.base = iterate(self.train_ds, self.workers, start=step), step
        start = time.perf_counter()
        batch = next(self.iterator)
        check_indices(batch["index"], step, self.batch_size, *self.host)
        self.meter.add(batch, time.perf_counter() - start)
        self.undecodable["train"] += int(np.sum(batch["undecodable"]))
        return batch

    @contextlib.contextmanager
    def eval_batches(self, batch_size: int):
        """This host's evaluation batches (grain workers; undecodable images counted), then stopped."""
        ds = eval_dataset(self.data, batch_size, *self.host)
        it = iterate(ds, min(self.workers, len(ds)))
        self.undecodable["test"] = 0

        def batches():
            for batch in it:
                self.undecodable["test"] += int(np.sum(batch["undecodable"]))
                yield batch
        try:
            yield batches()
        finally:
            close(it)

    def checkpoint(self):
        """(meta, Orbax items): grain's iterator state (one file per host) and how to rebuild it."""
        if self.iterator is None:
            return {}, {}
        meta = {"input": {"base": self.base, "workers": self.workers, "processes": self.host[1]}}
        return meta, {"data": grain().checkpoint.CheckpointSave(self.iterator)}

    def restore(self, ckpt, step: int, meta: Dict[str, Any], log) -> None:
        """Put grain's iterator where checkpoint ``step`` left it. Saved under another worker or
        host count (grain's state does not carry over), start the stream afresh at ``step``:
        the same batches, because a batch is a function of its step."""
        saved = meta.get("input")
        if not saved:
            return
        if (saved["workers"], saved["processes"]) != (self.workers, self.host[1]):
            log(f"input pipeline: checkpoint saved with {saved['workers']} workers on {saved['processes']} "
                f"host(s), now {self.workers} on {self.host[1]}; restarting the stream at step {step}")
            return
        iterator = iterate(self.train_ds, self.workers, start=saved["base"])
        try:
            self.iterator = ckpt.restore_item(step, "data", grain().checkpoint.CheckpointRestore(iterator))
        except Exception as e:  # noqa: BLE001  (a missing or damaged state file: the step suffices)
            close(iterator)
            log(f"input pipeline: grain's saved state did not restore ({type(e).__name__}: "
                f"{str(e)[:200]}); restarting the stream at step {step}")
            return
        self.base = saved["base"]

    def report(self) -> Dict[str, float]:
        return self.meter.report(self.workers)

    def summary(self, history) -> Dict[str, Any]:
        """summary.json's input figures: undecodable images met (this session, summed over hosts;
        every process must call it) and the mean input capacity and wait over the epochs."""
        from bn_jax import parallel
        counts = parallel.sum_over_processes([self.undecodable["train"], self.undecodable["test"]])
        rates = [r["input_images_per_second"] for r in history if "input_images_per_second" in r]
        waits = [r["input_wait_fraction"] for r in history if "input_wait_fraction" in r]
        return {"undecodable_images": {"train_replaced": int(counts[0]), "test_left_out": int(counts[1])},
                "input_images_per_second": float(np.mean(rates)) if rates else None,
                "input_wait_fraction": float(np.mean(waits)) if waits else None, "input_workers": self.workers}

    def close(self) -> None:
        close(self.iterator)
        self.iterator = None
